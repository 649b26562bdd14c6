"""Metric output: TensorBoard event files (tensorboardX) in the workdir, written by process 0."""

import sys

import numpy as np


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch, when it is installed, only to accept torch tensors; we pass
    numpy. That import costs 1.5-10 s per process (every `python -m train` start in a machine
    with the test extras), so it is hidden for the duration of tensorboardX's own import.
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    def __init__(self, logdir: str, *, enabled: bool = True):
        self._writer = _summary_writer_class()(logdir) if enabled else None

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)

    def image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
        if self._writer is None:
            return
        self._writer.add_image(name, image_uint8, step, dataformats="HWC")

    def text(self, step: int, name: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(name, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
