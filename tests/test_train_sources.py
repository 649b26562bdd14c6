"""Every user data source trains through the real `python -m train` CLI: a folder of captioned
images made into ArrayRecord shards by `prepare` (the README's path), and a TFDS dataset built on
disk. (Tar shards: tests/test_train_loop.py; the synthetic source: the end-to-end test and the
demo.)"""

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from data_pipeline.prepare import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


def _train(workdir, *overrides):
    # The environment carries conftest's 8 fake devices and its shared compilation cache.
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(workdir),
         f"--config.train.num_train_steps={STEPS}", "--config.train.log_every_steps=1",
         f"--config.train.checkpoint_every_steps={STEPS}", "--config.train.sample_every_steps=0",
         *overrides],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _data_position(workdir) -> dict:
    path = workdir / "checkpoints" / str(STEPS) / "data_iter" / "process_0-of-1.json"
    return json.loads(path.read_text())


@pytest.mark.slow
def test_prepared_folder_trains_through_the_cli(tmp_path):
    folder = tmp_path / "my_images"
    folder.mkdir()
    colours = [(220, 30, 30), (30, 180, 40), (30, 70, 235)]
    for index in range(24):
        Image.new("RGB", (40 + index, 30), colours[index % 3]).save(folder / f"img{index:02d}.png")
        # The TFDS test's captions: the BPE tokenizer trained on them has the same vocabulary
        # size, so both runs compile the same train step (once per session, shared cache).
        (folder / f"img{index:02d}.txt").write_text(f"shape number {index}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (folder / "broken.txt").write_text("never used")
    shards = tmp_path / "shards"
    summary = prepare(str(folder), str(shards), samples_per_shard=10, progress=False,
                      log=io.StringIO())
    assert summary["written"] == 24 and summary["skipped"] == {"decode": 1}

    workdir = tmp_path / "run"
    _train(workdir, "--config.data.source=arrayrecord", f"--config.data.paths={shards}")
    position = _data_position(workdir)
    # Two global batches of 16 drawn from the 24 prepared images (a second epoch begun).
    assert position["source"] == "arrayrecord"
    assert position["batches"] == STEPS and position["counters"]["examples"] == 16 * STEPS
    assert (workdir / "tokenizer.json").exists()  # the BPE tokenizer was trained on these captions


@pytest.mark.slow
def test_tfds_dataset_trains_through_the_cli(tmp_path):
    # The module pytest itself imported (rootdir-relative), so the builder registers once.
    from test_data_tfds import TinyCaptionedShapes

    data_dir = tmp_path / "tfds"
    TinyCaptionedShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    workdir = tmp_path / "run"
    _train(workdir, "--config.data.source=tfds", "--config.data.tfds_name=tiny_captioned_shapes",
           f"--config.data.tfds_data_dir={data_dir}", "--config.data.image_feature=picture",
           "--config.data.caption_feature=text")
    position = _data_position(workdir)
    assert position["source"] == "tfds"
    assert position["batches"] == STEPS and position["counters"]["examples"] == 16 * STEPS
