"""The training loop in-process on 8 fake devices: user tar shards with damaged samples (skipped
and counted in TensorBoard), a diverging run that stops with its last good checkpoint kept, and
the demo driver end to end on the tiny config."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from data_pipeline.shards import TarShardWriter
from data_pipeline.synthetic import write_synthetic_shards


def _png(colour) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _scalars(workdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(workdir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


@pytest.mark.slow
def test_damaged_samples_in_user_shards_are_skipped_and_counted(tmp_path):
    from train.loop import train_and_evaluate

    shard_dir = tmp_path / "shards"
    write_synthetic_shards(shard_dir, num_samples=96, num_shards=3, image_size=16, progress=False)
    with TarShardWriter(shard_dir / "shard-damaged.tar") as writer:
        for index in range(8):
            writer.write(f"good{index}", {"png": _png((200, 10, 10)), "txt": b"a red square"})
        writer.write("corrupt", {"png": b"\x89PNG\r\n\x1a\nnot an image", "txt": b"broken"})
        writer.write("nocaption", {"png": _png((10, 10, 200))})
    config = tiny.get_config()
    config.data.source = "tar"
    config.data.paths = str(shard_dir)
    config.data.shuffle_buffer = 16
    config.train.num_train_steps = 16  # > one pass over the 104 usable samples at batch 16
    config.train.log_every_steps = 8
    config.train.checkpoint_every_steps = 16
    config.train.sample_every_steps = 0
    workdir = str(tmp_path / "run")

    summary = train_and_evaluate(config, workdir)

    assert summary["step"] == 16 and np.isfinite(summary["loss"])
    assert summary["data"]["skipped_decode"] >= 1
    assert summary["data"]["skipped_no_caption"] >= 1
    assert summary["data"]["epochs"] >= 1
    decode = _scalars(workdir, "data/skipped_decode")
    assert [step for step, _ in decode] == [8, 16]
    assert decode[-1][1] >= 1
    assert _scalars(workdir, "data/skipped_no_caption")[-1][1] >= 1
    for tag in ("train/step_seconds", "train/images_per_sec", "train/tflops_per_device",
                "train/mfu", "train/skipped_nonfinite"):
        assert [step for step, _ in _scalars(workdir, tag)] == [8, 16], tag
    assert 0 < _scalars(workdir, "train/mfu")[-1][1] < 1
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "16", "data_iter"))


@pytest.mark.slow
def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from train import checkpoint
    from train.loop import NonFiniteLossError, train_and_evaluate

    config = tiny.get_config()
    # The first update throws the weights far out; every later step overflows and is skipped.
    config.optim.learning_rate = 1e30
    config.optim.warmup_steps = 0
    config.train.num_train_steps = 12
    config.train.checkpoint_every_steps = 1
    config.train.keep_checkpoints = 20
    config.train.max_consecutive_nonfinite = 3
    config.train.sample_every_steps = 0
    workdir = str(tmp_path)

    with pytest.raises(NonFiniteLossError) as raised:
        train_and_evaluate(config, workdir)

    message = str(raised.value)
    steps = checkpoint._steps(workdir)
    assert steps, "the steps before the divergence were saved"
    assert f"the last good checkpoint, step {steps[-1]} in" in message
    assert "3 non-finite steps in a row" in message
    assert steps[-1] < config.train.num_train_steps
    # Nothing non-finite reached the disk: every kept checkpoint samples.
    from models.factory import abstract_unet
    from train.sharding import make_mesh, tree_shardings

    _, abstract_params = abstract_unet(config.model)
    shardings = tree_shardings(make_mesh([("data", -1)]), abstract_params)
    for step in steps:
        params, _ = checkpoint.restore_ema_params(workdir, step, abstract_params, shardings)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
    skipped = _scalars(workdir, "train/skipped_nonfinite")
    assert skipped and skipped[-1][1] >= 1
    assert not os.path.exists(os.path.join(workdir, "train.lock"))


@pytest.mark.slow
def test_demo_driver_writes_the_adherence_report(tmp_path):
    from demo.__main__ import run_demo

    config = tiny.get_config()
    config.train.num_train_steps = 4
    config.train.sample_every_steps = 0
    config.sample.steps = 2
    workdir = str(tmp_path / "demo")

    result = run_demo(config, workdir, num_images_per_prompt=1,
                      classifier_kwargs={"num_train": 256, "num_test": 64, "steps": 10})

    with open(os.path.join(workdir, "eval", "adherence.json")) as f:
        saved = json.load(f)
    assert saved["held_in"] == pytest.approx(result["held_in"])
    for key in ("held_in", "held_out", "classifier_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    for split in ("held_in_per_attribute", "held_out_per_attribute"):
        assert set(saved[split]) == {"colour", "shape", "position"}
    # Every colour x shape x position combination is sampled once; held-out ones separately.
    num_held_out = len(config.data.synthetic_held_out) * 5
    assert saved["num_images"]["held_out"] == num_held_out
    assert saved["num_images"]["held_in"] + num_held_out == 6 * 3 * 5
    assert saved["held_out_combinations"] == list(config.data.synthetic_held_out)
    manifest = open(os.path.join(workdir, "eval", "samples", "manifest.jsonl")).readlines()
    assert len(manifest) == 6 * 3 * 5
    assert saved["sampling"]["checkpoint_step"] == 4
