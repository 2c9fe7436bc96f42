"""Throughput and data counters for TensorBoard: tokens/s, supervised tokens, padding, learning rate."""

from __future__ import annotations

import time

import lightning as L


class TrainingMonitor(L.Callback):
    """Logs every optimizer step:

    * ``train/tokens_per_s``: non-padding tokens of the step over its wall time, from the start of its first
      micro-batch to the end of its last (validation, checkpointing and blocking evals between steps excluded);
    * ``train/supervised_tokens``: cumulative supervised tokens seen by this device (the x-axis most comparisons
      want; multiply by the number of devices under DDP);
    * ``train/padding_frac`` of the micro-batch, and ``train/lr`` (``train/lr/groupN`` for further groups).

    Args:
        log_lr: also log the learning rate of each parameter group.
    """

    def __init__(self, log_lr: bool = True):
        self.log_lr = log_lr
        self._t0: float | None = None
        self._tokens = 0
        self.supervised_tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # first micro-batch of an optimizer step
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = batch["attention_mask"]
        self._tokens += int(mask.sum())
        self.supervised_tokens += int((batch["labels"][:, 1:] != -100).sum())
        pl_module.log("train/padding_frac", 1.0 - mask.float().mean().item(), on_step=True, on_epoch=False)
        pl_module.log("train/supervised_tokens", float(self.supervised_tokens), on_step=True, on_epoch=False)
        if trainer.fit_loop._should_accumulate():
            return
        elapsed = time.perf_counter() - self._t0
        pl_module.log("train/tokens_per_s", self._tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False,
                      prog_bar=True)
        if self.log_lr:
            for i, group in enumerate(trainer.optimizers[0].param_groups):
                pl_module.log(f"train/lr/group{i}" if i else "train/lr", group["lr"], on_step=True, on_epoch=False)
        self._t0, self._tokens = None, 0

    def state_dict(self):
        return {"supervised_tokens": self.supervised_tokens}

    def load_state_dict(self, state_dict):
        self.supervised_tokens = state_dict["supervised_tokens"]
