"""The step timer the measurement scripts share (``python scripts/<name>.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import time

import lightning as L
import torch


class StepTimer(L.Callback):
    """Wall time of every training batch after the first ``warmup``, from ``on_train_batch_start`` to
    ``on_train_batch_end`` (forward, backward and, on a step's last micro-batch, the optimizer step). Put it first in
    the callback list: Lightning calls both hooks in list order, so its start runs before every other callback's
    and its end before theirs, and a signal computed in another callback's ``on_train_batch_end`` is not counted.

    On a GPU the device is synchronised at both ends, so queued kernels are counted in the step they belong to.
    """

    def __init__(self, warmup: int = 1):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        elapsed = time.perf_counter() - self._t
        if batch_idx >= self.warmup:
            self.times.append(elapsed)
            self.record(trainer, batch)

    def record(self, trainer, batch) -> None:
        """Called after each timed step; subclasses keep more of it."""


def sync() -> None:
    """Wait for queued GPU work (no-op on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
