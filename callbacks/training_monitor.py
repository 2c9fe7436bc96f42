"""Throughput and data counters for TensorBoard: tokens/s, supervised tokens, padding, learning rate."""

from __future__ import annotations

import time

import lightning as L
import torch


class TrainingMonitor(L.Callback):
    """Logs per optimizer step: ``train/tokens_per_s`` (non-padding tokens over wall time since the previous
    batch started), ``train/supervised_tokens`` (cumulative; the x-axis most comparisons want), ``train/padding_frac``
    and ``train/lr`` (of the first parameter group).

    Args:
        log_lr: also log the learning rate of each parameter group.
    """

    def __init__(self, log_lr: bool = True):
        self.log_lr = log_lr
        self._t0: float | None = None
        self._tokens = 0
        self.supervised_tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = batch["attention_mask"]
        self._tokens += int(mask.sum())
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        self.supervised_tokens += supervised
        pl_module.log("train/padding_frac", 1.0 - mask.float().mean().item(), on_step=True, on_epoch=False)
        pl_module.log("train/supervised_tokens", float(self.supervised_tokens), on_step=True, on_epoch=False,
                      reduce_fx="sum")
        if trainer.fit_loop._should_accumulate():
            return
        elapsed = time.perf_counter() - self._t0
        pl_module.log("train/tokens_per_s", self._tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False,
                      prog_bar=True)
        if self.log_lr:
            for i, group in enumerate(trainer.optimizers[0].param_groups):
                pl_module.log(f"train/lr/group{i}" if i else "train/lr", group["lr"], on_step=True, on_epoch=False)
        self._t0, self._tokens = time.perf_counter(), 0

    def state_dict(self):
        return {"supervised_tokens": self.supervised_tokens}

    def load_state_dict(self, state_dict):
        self.supervised_tokens = state_dict["supervised_tokens"]
