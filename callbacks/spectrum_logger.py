"""Log the singular values of every LoRA adapter update ΔW = s·B·A: TensorBoard scalars, histograms, a plot, JSONL."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import torch

from em_lightning.spectra import gathered_full_params, iter_lora_modules, lora_singular_values, spectral_metrics


class SpectrumLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps, at the start of training and when it ends, compute the spectrum of
    every LoRA module (after the optimizer step, so step N shows the adapter after N updates) and write:

      * scalars ``spectra/<module>/<metric>`` (with ``log_per_module``), ``spectra/by_proj/<proj>/<metric>`` and
        ``spectra/all/<metric>``, the aggregates being means over modules; metrics are those of
        :func:`em_lightning.spectra.spectral_metrics` (entropy, effective_rank, stable_rank, condition_number,
        frob_nuclear_ratio, nuclear_norm, top, frobenius_norm), or the subset named in ``metrics``;
      * histograms of σ: ``spectra/by_proj/<proj>/sigma``, ``spectra/all/sigma`` and, with ``log_per_module``,
        ``spectra/<module>/sigma`` (TensorBoard loggers only);
      * an image ``spectra/plot`` every ``image_every_n_steps`` and at the end: σᵢ/σ₁ against i per projection type (mean over
        layers), and a heat map of every module's σᵢ/σ₁ (TensorBoard loggers only);
      * one JSON line per logged step in ``<run dir>/spectra.jsonl``:
        ``{"step", "epoch", "modules": {name: [σ₁, …, σ_r]}, "scale": {name: s}}`` (σ already includes s),
        appended and closed each time, so a crash loses nothing and analysis never parses TensorBoard files.

    An all-zero spectrum (LoRA's start, B = 0) has every metric 0, not NaN.

    Args:
        every_n_steps: optimizer steps between logs.
        log_per_module: per-module scalars and histograms (210 modules × 8 metrics on SmolLM2); aggregates are always
            logged.
        log_histograms: write σ histograms.
        log_image: write the spectrum plot.
        image_every_n_steps: steps between plots (rendering costs ~0.1 s); default 10 × ``every_n_steps``.
        metrics: which metrics to log as scalars; default all.
        jsonl: file name in the run dir for the raw spectra; None writes no file.
        log_at_start: also log before the first update (and at the resumed step when resuming).

    Distributed: under DDP only rank zero computes. Under FSDP every rank joins the gathers of the LoRA weights
    (:func:`em_lightning.spectra.iter_lora_modules`); rank zero computes and writes. (Not testable on one CPU.)
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        log_per_module: bool = True,
        log_histograms: bool = True,
        log_image: bool = True,
        image_every_n_steps: int | None = None,
        metrics: list[str] | None = None,
        jsonl: str | None = "spectra.jsonl",
        log_at_start: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError(f"SpectrumLogger.every_n_steps must be >= 1, got {every_n_steps}")
        known = set(spectral_metrics(torch.ones(2)))
        if metrics is not None and not set(metrics) <= known:
            raise ValueError(f"SpectrumLogger.metrics: unknown {sorted(set(metrics) - known)}; known: {sorted(known)}")
        self.every_n_steps = every_n_steps
        self.log_per_module = log_per_module
        self.log_histograms = log_histograms
        self.log_image = log_image
        self.image_every_n_steps = image_every_n_steps or 10 * every_n_steps
        self.metrics = list(metrics) if metrics is not None else None
        self.jsonl = jsonl
        self.log_at_start = log_at_start
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module):
        self._last_step = None
        if self.log_at_start:
            self.log_spectra(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step only moves after an optimizer step, so accumulation micro-batches fall through here.
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self.log_spectra(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last_step:
            self.log_spectra(trainer, pl_module, final=True)

    # ---------------------------------------------------------------------------------------------- logging
    def log_spectra(self, trainer, pl_module, final: bool = False) -> None:
        """Compute every module's spectrum now and write all outputs (collective under FSDP: call on every rank)."""
        step = trainer.global_step
        self._last_step = step
        model = getattr(pl_module, "model", None) or pl_module
        names, projs, sigmas, scales = [], [], [], {}
        with torch.no_grad(), gathered_full_params(model):
            for name, proj, B, A, scale in iter_lora_modules(model):  # every rank: the loop may gather shards
                if trainer.is_global_zero:
                    names.append(name)
                    projs.append(proj)
                    sigmas.append(lora_singular_values(B.detach(), A.detach(), scale))
                    scales[name] = scale
        if not trainer.is_global_zero or not names:
            return
        # One device→host transfer for everything (each .item() on a GPU would synchronise).
        sigma_np = [s.cpu().numpy() for s in _pad_stack(sigmas).cpu().unbind(0)]
        metrics = {k: v.cpu().numpy() for k, v in _batched_metrics(sigmas).items()
                   if self.metrics is None or k in self.metrics}
        self._write_scalars(trainer, step, names, projs, metrics)
        experiment = _tensorboard(trainer)
        if experiment is not None:
            if self.log_histograms:
                self._write_histograms(experiment, step, names, projs, sigmas)
            if self.log_image and (step % self.image_every_n_steps == 0 or final):
                experiment.add_image("spectra/plot", _plot(names, projs, sigmas, step), step, dataformats="HWC")
            experiment.flush()
        if self.jsonl:
            self._write_jsonl(trainer, step, names, [s[: len(sig)] for s, sig in zip(sigma_np, sigmas)], scales)

    def _write_scalars(self, trainer, step, names, projs, metrics):
        scalars = {}
        by_proj = defaultdict(list)
        for i, proj in enumerate(projs):
            by_proj[proj].append(i)
        for metric, values in metrics.items():
            if self.log_per_module:
                scalars.update({f"spectra/{name}/{metric}": float(values[i]) for i, name in enumerate(names)})
            for proj, idx in by_proj.items():
                scalars[f"spectra/by_proj/{proj}/{metric}"] = float(values[idx].mean())
            scalars[f"spectra/all/{metric}"] = float(values.mean())
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def _write_histograms(self, experiment, step, names, projs, sigmas):
        by_proj = defaultdict(list)
        for name, proj, sigma in zip(names, projs, sigmas):
            by_proj[proj].append(sigma)
            if self.log_per_module:
                experiment.add_histogram(f"spectra/{name}/sigma", sigma.float().cpu(), step)
        for proj, group in by_proj.items():
            experiment.add_histogram(f"spectra/by_proj/{proj}/sigma", torch.cat(group).float().cpu(), step)
        experiment.add_histogram("spectra/all/sigma", torch.cat(sigmas).float().cpu(), step)

    def _write_jsonl(self, trainer, step, names, sigma_np, scales):
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "step": step,
            "epoch": trainer.current_epoch,
            "modules": {n: [float(f"{x:.6g}") for x in s] for n, s in zip(names, sigma_np)},
            "scale": scales,
        }
        with open(run_dir / self.jsonl, "a") as f:  # open/close per line: a crash keeps every finished step
            f.write(json.dumps(record) + "\n")

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")


# ---------------------------------------------------------------------------------------------------- helpers
def _tensorboard(trainer):
    """The SummaryWriter of the first TensorBoard logger, or None (histograms and images are TensorBoard-only)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_histogram") and hasattr(experiment, "add_image"):
            return experiment
    return None


def _pad_stack(sigmas: list[torch.Tensor]) -> torch.Tensor:
    """Stack spectra of possibly different ranks (peft's rank_pattern), zero-padded to the largest."""
    r = max(len(s) for s in sigmas)
    return torch.stack([torch.nn.functional.pad(s.float(), (0, r - len(s))) for s in sigmas])


def _batched_metrics(sigmas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """spectral_metrics of every spectrum, batched when all ranks agree (one call instead of one per module)."""
    if len({len(s) for s in sigmas}) == 1:
        return spectral_metrics(torch.stack(sigmas))
    per = [spectral_metrics(s) for s in sigmas]
    return {k: torch.stack([m[k] for m in per]) for k in per[0]}


def _plot(names, projs, sigmas, step) -> np.ndarray:
    """An RGB array (H, W, 3): left, mean σᵢ/σ₁ per projection type; right, σᵢ/σ₁ of every module as a heat map.

    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    normalised = _pad_stack(sigmas).cpu()
    top = normalised[:, :1]
    normalised = torch.where(top > 0, normalised / torch.where(top > 0, top, torch.ones_like(top)), 0.0).numpy()
    fig = Figure(figsize=(10, 4), dpi=80)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    index = np.arange(1, normalised.shape[1] + 1)
    for proj in dict.fromkeys(projs):
        rows = [i for i, p in enumerate(projs) if p == proj]
        left.plot(index, normalised[rows].mean(0), marker="o", markersize=3, label=proj)
    left.set(xlabel="index i", ylabel="σᵢ / σ₁ (mean over layers)", ylim=(0, 1.05), title=f"step {step}")
    left.legend(fontsize=7)
    extent = (0.5, normalised.shape[1] + 0.5, len(names) - 0.5, -0.5)  # columns labelled 1..r like the left panel
    image = right.imshow(normalised, aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis",
                         extent=extent)
    right.set(xlabel="index i", ylabel="module", title="σᵢ / σ₁ per module")
    if len(names) <= 40:
        right.set_yticks(range(len(names)), labels=names, fontsize=5)
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
