"""The training loop in-process on 8 fake devices: user tar shards with damaged samples (skipped
and counted in TensorBoard), and the demo driver end to end on the tiny config."""

import json
import os

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
    assert summary["data"]["epochs"] >= 2
    decode = _scalars(workdir, "data/skipped_decode")
    assert [step for step, _ in decode] == [8, 16]
    assert decode[-1][1] >= 1
    assert _scalars(workdir, "data/skipped_no_caption")[-1][1] >= 1
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "16"))


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
