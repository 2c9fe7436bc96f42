"""Throughput, data and memory counters for TensorBoard, and where a fit's files went."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch

from em_lightning import rundir

_GIB = 1024**3


class TrainingMonitor(L.Callback):
    """Logs every optimizer step:

    * ``train/tokens_per_s``: non-padding tokens of the step (this device) over its wall time, from the start of
      its first micro-batch to the end of its last (validation, checkpointing and blocking evals between steps
      excluded), at the step's ``global_step``;
    * ``train/supervised_tokens``: cumulative supervised tokens seen by this device (the x-axis most comparisons
      want; multiply by the number of devices under DDP);
    * ``train/padding_frac`` of the step's micro-batches, and ``train/lr`` (``train/lr/groupN`` for further groups):
      the rate the step used (read just before the optimizer step, not after the scheduler moved on);
    * ``memory/peak_rss_gib``: the process's peak resident host memory so far (``getrusage``'s ``ru_maxrss``), and
      on a GPU ``memory/peak_gpu_allocated_gib``: the most tensor memory allocated on this device so far
      (``torch.cuda.max_memory_allocated``; the caching allocator's reserve beyond it is not counted).

    The counts come from what ``training_step`` returns (``supervised_tokens``, ``tokens``, ``step_end``), which the
    collator counted on the host: no recount and no device sync here. When training starts it also logs the data
    module's summary (``data/<split>/rows``, ``.../dropped_rows`` ...) at step 0. When fit ends, rank zero prints
    where things went: the run dir, the adapter dir, the last checkpoint, the TensorBoard command and the next
    commands to try.

    The memory figures and the closing lines are always on (no settings): a new setting would enter every run's
    resolved config, and with it the config hash by which ``sweep`` recognises its existing run dirs.

    Args:
        log_lr: also log the learning rate of each parameter group.
    """

    def __init__(self, log_lr: bool = True):
        self.log_lr = log_lr
        self._t0: float | None = None
        self._tokens = self._positions = 0
        self._lrs: list[float] = []
        self.supervised_tokens = 0
        self.run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage):
        # Every rank: trainer.log_dir is a broadcast from rank zero (see rundir.resolve_run_dir).
        if stage == "fit":
            self.run_dir = rundir.resolve_run_dir(trainer)

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
        log = {"on_step": True, "on_epoch": False}
        pl_module.log("train/tokens_per_s", self._tokens / max(elapsed, 1e-9), prog_bar=True, **log)
        pl_module.log("train/supervised_tokens", float(self.supervised_tokens), **log)
        pl_module.log("train/padding_frac", 1.0 - self._tokens / max(self._positions, 1), **log)
        if self.log_lr:
            for i, lr in enumerate(self._lrs):
                pl_module.log(f"train/lr/group{i}" if i else "train/lr", lr, **log)
        for tag, value in peak_memory_gib(pl_module.device).items():
            pl_module.log(tag, value, **log)
        self._t0, self._tokens, self._positions = None, 0, 0

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.run_dir is not None:
            print("\n".join(fit_summary(trainer, self.run_dir)), flush=True)

    def state_dict(self):
        return {"supervised_tokens": self.supervised_tokens}

    def load_state_dict(self, state_dict):
        self.supervised_tokens = state_dict["supervised_tokens"]


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """This process's peak host RSS and, on a CUDA device, its peak allocated GPU memory, in GiB."""
    out = {}
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        pass
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        out["memory/peak_rss_gib"] = peak * unit / _GIB
    if device.type == "cuda":
        out["memory/peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / _GIB
    return out


def fit_summary(trainer, run_dir: Path) -> list[str]:
    """The lines that end a fit: where its files are and what to run next (paths as the user would type them)."""
    lines = [f"Fit finished at step {trainer.global_step}.", f"  run dir:      {_shown(run_dir)}"]
    adapter = rundir.adapter_dir(run_dir)
    if adapter.is_dir():
        lines.append(f"  adapter:      {_shown(adapter)}   (loads in peft and vLLM)")
    checkpoint = run_dir / rundir.CHECKPOINTS / rundir.LAST_CHECKPOINT
    if checkpoint.is_file():
        lines.append(f"  checkpoint:   {_shown(checkpoint)}")
    if any(type(lg).__name__ == "TensorBoardLogger" for lg in trainer.loggers):
        # The experiment's dir, so the curves of every version (and a resumed run) show side by side.
        logs = run_dir.parent if rundir.version_dirs(run_dir.parent) else run_dir
        lines.append(f"  TensorBoard:  {_program('tensorboard')} --logdir {_shown(logs)}")
    if adapter.is_dir():  # this adapter's misalignment eval (a vLLM sidecar; judge options: evaluate --help)
        lines.append(
            f"  next:         {_program('python')} -m em_lightning evaluate --adapter {_shown(adapter)} --output_dir "
            f"{_shown(run_dir)} --step {trainer.global_step}"
        )
    config = run_dir / rundir.CONFIG
    if config.is_file() and checkpoint.is_file():
        lines.append(
            f"  train on:     {_program('python')} -m em_lightning fit --config {_shown(config)} --ckpt_path "
            f"{_shown(checkpoint)} --trainer.max_steps {2 * max(trainer.global_step, 1)}"
        )
    return lines


def _program(name: str) -> str:
    """How to run ``name`` here: this interpreter (``python``) or the script beside it in its environment
    (``.venv/bin/tensorboard``), so the command works without activating it; else the bare name."""
    path = Path(sys.executable) if name == "python" else Path(sys.executable).parent / name
    return _shown(path) if path.is_file() else name


def _shown(path: Path) -> str:
    """``path`` relative to the working dir when it lies below it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
