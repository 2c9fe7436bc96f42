"""Small test-only callbacks, wired into CLI runs with ``--trainer.callbacks+=tests.helpers.<Name>``."""

from __future__ import annotations

import time

import lightning as L
import torch


class ParamSnapshot(L.Callback):
    """Copies every parameter when fit starts (after configure_model), to compare with the trained model."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class LossRecorder(L.Callback):
    """Records the training loss returned at each optimizer step, keyed by global step (1-based after the step)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def find(trainer, cls):
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))


class GradRecorder(L.Callback):
    """Records every adapter gradient just before each optimizer step (after accumulation), by global step."""

    def __init__(self):
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = {
            n: p.grad.detach().clone() for n, p in pl_module.trainable_named_parameters() if p.grad is not None
        }


class LRRecorder(L.Callback):
    """Records the learning rate of every parameter group at each optimizer step, just before the step (the rate
    the step uses; by ``on_train_batch_end`` the scheduler has moved on), by global step."""

    def __init__(self):
        self.lrs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = [group["lr"] for group in optimizer.param_groups]


class SumOfATerm(L.Callback):
    """Registers the loss term Σ lora_A (gradient exactly 1 per element) with weight 0.5·(step + 1)."""

    def setup(self, trainer, pl_module, stage):
        def raw(module):
            return sum(p.sum() for n, p in module.trainable_named_parameters() if "lora_A" in n)

        pl_module.add_loss_term("sum_a", raw, weight=lambda step: 0.5 * (step + 1))


class BatchCounts(L.Callback):
    """Records the host-side counts of every training micro-batch: (tokens, supervised, padded positions)."""

    def __init__(self):
        self.counts: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append((int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum()),
                            batch["input_ids"].numel()))


class StepWindows(L.Callback):
    """Two wall-clock windows per optimizer step that bracket any measure of the step taken in its
    ``on_train_batch_start`` / ``on_train_batch_end`` hooks, whatever the callbacks' order:

    * ``inner``: from the first micro-batch's backward to the optimizer step (both inside the step);
    * ``outer``: from the hook that ended the previous step (or started training) to the one that starts the
      next (or ends training).
    """

    def __init__(self):
        self.inner: list[tuple[float, float]] = []
        self.outer: list[tuple[float, float]] = []
        self._last_end = self._inner_start = self._outer_start = None
        self._pending_outer_start = None

    def _close_outer(self):
        if self._pending_outer_start is not None:
            self.outer.append((self._pending_outer_start, time.perf_counter()))
            self._pending_outer_start = None

    def on_train_start(self, trainer, pl_module):
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close_outer()
        if self._outer_start is None:
            self._outer_start = self._last_end

    def on_before_backward(self, trainer, pl_module, loss):
        if self._inner_start is None:
            self._inner_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.inner.append((self._inner_start, time.perf_counter()))
        self._inner_start = None
        self._pending_outer_start, self._outer_start = self._outer_start, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._close_outer()


class HangAfterCheckpoint(L.Callback):
    """At the first micro-batch after optimizer step ``step`` (whose checkpoint is written by then), writes
    ``marker`` and blocks, so a test can kill the whole process group at a known point."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            import pathlib
            import time

            pathlib.Path(self.marker).write_text(str(trainer.global_rank))
            time.sleep(3600)
