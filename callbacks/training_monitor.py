"""Throughput and data counters for TensorBoard: tokens/s, supervised tokens, padding, learning rate, data summary."""

from __future__ import annotations

import time

import lightning as L


class TrainingMonitor(L.Callback):
    """Logs every optimizer step:

    * ``train/tokens_per_s``: non-padding tokens of the step (this device) over its wall time, from the start of
      its first micro-batch to the end of its last (validation, checkpointing and blocking evals between steps
      excluded), at the step's ``global_step``;
    * ``train/supervised_tokens``: cumulative supervised tokens seen by this device (the x-axis most comparisons
      want; multiply by the number of devices under DDP);
    * ``train/padding_frac`` of the step's micro-batches, and ``train/lr`` (``train/lr/groupN`` for further groups):
      the rate the step used (read just before the optimizer step, not after the scheduler moved on).

    The counts come from what ``training_step`` returns (``supervised_tokens``, ``tokens``, ``step_end``), which the
    collator counted on the host: no recount and no device sync here. When training starts it also logs the data
    module's summary (``data/<split>/rows``, ``.../dropped_rows`` ...) at step 0.

    Args:
        log_lr: also log the learning rate of each parameter group.
    """

    def __init__(self, log_lr: bool = True):
        self.log_lr = log_lr
        self._t0: float | None = None
        self._tokens = self._positions = 0
        self._lrs: list[float] = []
        self.supervised_tokens = 0

    def on_train_start(self, trainer, pl_module):
        summary = getattr(trainer.datamodule, "summary", None) or {}
        scalars = {
            f"data/{split}/{key}": float(value)
            for split, counts in summary.items()
            for key, value in counts.items()
            if isinstance(value, (int, float))
        }
        if scalars and trainer.global_step == 0:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # The rates this step uses: by on_train_batch_end the scheduler has already moved to the next step's.
        self._lrs = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # first micro-batch of an optimizer step
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not isinstance(outputs, dict) or "step_end" not in outputs:
            return  # a module that does not report its counts (see LoRAFineTune.training_step)
        self._tokens += outputs["tokens"]
        self._positions += batch["input_ids"].numel()
        self.supervised_tokens += outputs["supervised_tokens"]
        if not outputs["step_end"]:
            return
        elapsed = time.perf_counter() - self._t0
        log = dict(on_step=True, on_epoch=False)
        pl_module.log("train/tokens_per_s", self._tokens / max(elapsed, 1e-9), prog_bar=True, **log)
        pl_module.log("train/supervised_tokens", float(self.supervised_tokens), **log)
        pl_module.log("train/padding_frac", 1.0 - self._tokens / max(self._positions, 1), **log)
        if self.log_lr:
            for i, lr in enumerate(self._lrs):
                pl_module.log(f"train/lr/group{i}" if i else "train/lr", lr, **log)
        self._t0, self._tokens, self._positions = None, 0, 0

    def state_dict(self):
        return {"supervised_tokens": self.supervised_tokens}

    def load_state_dict(self, state_dict):
        self.supervised_tokens = state_dict["supervised_tokens"]
