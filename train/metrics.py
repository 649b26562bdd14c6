"""Metric output: TensorBoard event files (tensorboardX) in the workdir, written by process 0."""

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, logdir: str, *, enabled: bool = True):
        self._writer = SummaryWriter(logdir) if enabled else None

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
