"""Metric writers: TensorBoard event files (tensorboardX, no TensorFlow) and the console.

The interface is clu's `MetricWriter` (write_scalars / write_texts / flush / close);
clu's own writers import TensorFlow, which we do not require. Only process 0 writes.
"""

import os
from typing import Mapping

import jax
import numpy as np
from absl import logging


class MetricWriter:
    """Writes scalars and texts to `<logdir>` as TensorBoard events and to the log."""

    def __init__(self, logdir: str | None, *, console: bool = True):
        self._console = console
        self._writer = None
        if logdir and jax.process_index() == 0:
            import tensorboardX  # imported lazily: only the writing process needs it

            os.makedirs(logdir, exist_ok=True)
            self._writer = tensorboardX.SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if self._console and jax.process_index() == 0:
            logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if self._writer is not None:
            for key, value in texts.items():
                self._writer.add_text(key, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
