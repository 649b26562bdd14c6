"""TensorBoard event files from MetricWriter, and its import staying free of torch."""

import subprocess
import sys

import numpy as np

from train.metrics import MetricWriter


def test_scalars_images_and_text_reach_the_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricWriter(str(tmp_path))
    writer.scalars(3, {"train/loss": 0.5, "train/lr": np.float32(1e-3)})
    writer.scalars(7, {"train/loss": 0.25})
    writer.image(7, "samples", np.full((4, 6, 3), 200, np.uint8))
    writer.text(7, "prompts", "a red circle")
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.5), (7, 0.25)]
    assert events.Scalars("train/lr")[0].value == np.float32(1e-3)
    image = events.Images("samples")[0]
    assert (image.step, image.width, image.height) == (7, 6, 4)
    assert "prompts/text_summary" in events.Tags()["tensors"]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(str(tmp_path / "off"), enabled=False)
    writer.scalars(1, {"a": 1.0})
    writer.close()
    assert not (tmp_path / "off").exists()


def test_import_does_not_load_torch(tmp_path):
    # tensorboardX would import torch (seconds per process) when it is installed.
    code = (
        "import sys\n"
        "from train.metrics import MetricWriter\n"
        f"MetricWriter({str(tmp_path)!r}).scalars(1, {{'a': 1.0}})\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
