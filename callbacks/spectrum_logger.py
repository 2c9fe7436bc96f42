"""Log the singular values of every LoRA adapter update ΔW = s·B·A: TensorBoard scalars, histograms, a plot, JSONL."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import lightning as L
import numpy as np
import torch

from em_lightning import rundir
from em_lightning.errors import InputError
from em_lightning.lora import find_lora_layers, gathered_full_params, iter_lora_modules, uses_fsdp1
from em_lightning.spectra import SubspaceTracker, grouped_singular_values, spectral_metrics
from em_lightning.tb_events import log_histograms, log_scalars, tensorboard_experiment


class SpectrumLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps, at the start of training and when it ends, compute the spectrum of
    every LoRA module (after the optimizer step, so step N shows the adapter after N updates) and write:

      * scalars ``spectra/<module>/<metric>`` (with ``log_per_module``), ``spectra/by_proj/<proj>/<metric>`` and
        ``spectra/all/<metric>``, the aggregates being means over modules; metrics are those of
        :func:`em_lightning.spectra.spectral_metrics` (entropy, effective_rank, stable_rank, condition_number,
        frob_nuclear_ratio, nuclear_norm, top, frobenius_norm), or the subset named in ``metrics``;
      * histograms of σ: ``spectra/by_proj/<proj>/sigma``, ``spectra/all/sigma`` and, with ``log_per_module``,
        ``spectra/<module>/sigma`` (TensorBoard loggers only);
      * an image ``spectra/plot`` every ``image_every_n_steps`` and at the end: σᵢ/σ₁ against i per projection type
        (mean over layers), and a heat map of every module's σᵢ/σ₁ (TensorBoard loggers only);
      * one JSON line per logged step in ``<run dir>/spectra.jsonl``:
        ``{"step", "epoch", "modules": {name: [σ₁, …, σ_r]}, "scale": {name: s}}`` (σ already includes s),
        appended and closed each time, so a crash loses nothing and analysis never parses TensorBoard files.

    An all-zero spectrum (LoRA's start, B = 0) has norms 0 and NaN ratio metrics (entropy, ranks, condition
    number, ‖σ‖₂/‖σ‖₁: undefined, see :func:`~em_lightning.spectra.spectral_metrics`). The per-projection and
    overall means average the modules where a metric is defined (NaN when it is defined for none, as at step 0);
    TensorBoard stores NaN scalars as they are and shows them as gaps.

    Subspace dynamics (``subspace=True``, off by default): at every logged step, how far each module's top-k
    singular subspaces of ΔW turned since the previous logged step of this fit, computed from the factors
    (:class:`em_lightning.spectra.SubspaceTracker`, from :func:`~em_lightning.spectra.lora_singular_subspaces`; ΔW is
    never formed):

      * ``spectra.jsonl`` lines get ``"subspace_k"``, ``"subspace_prev_step"`` (the step compared with, null
        at the first log) and ``"subspace": {name: {"left": [θ₁, …, θ_k], "right": [θ₁, …, θ_k]}}``, the
        principal angles in degrees (to 1e-4°), ascending, between the top-k left (output) and right (input)
        singular subspaces now and at ``subspace_prev_step``; a list is null where undefined (below). Rank-1
        adapters also get ``"A_abs_cos"`` and ``"B_abs_cos"``: |cos| between this and the previous A vector,
        and B vector (sign-blind: flipping both leaves ΔW unchanged); B's is null while B = 0, A's is defined
        from the start.
      * scalars ``subspace_left_cos2`` and ``subspace_right_cos2``, the mean cos² of the k principal angles
        (1: unchanged, 0: orthogonal; ‖XᵀX'‖²_F/k), per module (with ``log_per_module``), and their means over
        the modules per projection and overall; rank-1 modules add ``rank1_A_abs_cos`` and
        ``rank1_B_abs_cos`` (aggregates over rank-1 modules only). Undefined values are NaN and left out of
        the means (NaN if none is defined).

    k is ``min(subspace_k, r, d_out, d_in)`` per module. A subspace is undefined when σ_k ≤ 1e-6·σ₁ now or at
    the previous log: B = 0 (so with LoRA's init the first two logs read NaN: nothing before step 0, and the
    step-0 adapter has no direction), or ΔW of rank < k. The top k < r subspace is only as stable as the gap
    σ_k − σ_{k+1} (a flat spectrum, e.g. under the spectral penalty, turns it freely within the span);
    ``subspace_k`` ≥ r gives the whole column and row space, determined for any spectrum. The previous bases
    (8·k·(d_out + d_in) bytes per module on the adapters' device, ~10 MB on SmolLM2 with k = 4) are not
    checkpointed: the first value after a resume is NaN.

    Args:
        every_n_steps: optimizer steps between logs.
        log_per_module: per-module scalars and histograms (210 modules × 8 metrics on SmolLM2); aggregates are always
            logged.
        per_module_every_n_steps: steps between per-module scalars/histograms (~1900 TensorBoard values);
            default ``every_n_steps``. The JSONL file holds every module's σ at every logged step regardless.
        log_histograms: write σ histograms.
        log_image: write the spectrum plot.
        image_every_n_steps: steps between plots (rendering costs ~0.2 s); default 10 × ``every_n_steps``, at least
            100.
        metrics: which metrics to log as scalars; default all.
        jsonl: file name in the run dir for the raw spectra; None writes no file.
        log_at_start: also log before the first update (and at the resumed step when resuming, unless the
            checkpoint says that step was logged already).
        subspace: also log the subspace dynamics above (default off).
        subspace_k: dimension k of the top-k singular subspaces compared (``min(subspace_k, r, d_out,
            d_in)`` per module); default 4, so k = r for r ≤ 4 (the whole span, rank-1 adapters included) and
            the dominant directions of larger adapters.

    Resuming (``--ckpt_path``): the checkpoint holds the last logged step. The resumed run writes to its own run dir
    (TensorBoardLogger starts a new ``version_N``) and logs only steps after that one, so the checkpoint's step is
    not logged twice (same adapter, same σ): the first run's files hold steps ≤ k, the resumed run's steps > k, and
    concatenating the versions' ``spectra.jsonl`` in order gives every step once. Exception: if the first run went
    on past its checkpoint (a crash after step k), those later steps appear in both files; the resumed run's are
    the ones that continue from the checkpoint. With ``subspace``, the resumed run's first line has
    ``"subspace_prev_step": null`` and null angles, and its first subspace scalars are NaN: the bases of step
    k are not in the checkpoint (the first run's file has the angles up to k).

    Cost on SmolLM2 (210 adapters): σ of all adapters ~15 ms (H100 and CPU alike); per-module TensorBoard output
    (1680 scalars + 210 histograms, ~230 KB) ~40 ms on a CPU core, most of it building the histograms and the event
    writer's pure-Python checksum, hence ``per_module_every_n_steps``; aggregates ~5 ms; the JSONL line ~2 ms; a
    plot ~0.2 s; subspace dynamics (k = 4) about as much again as σ plus ~10 ms of bookkeeping (a loaded
    2-core CPU: +45 ms per log, σ 31 ms there; ``scripts/bench_spectra.py --subspace-only``). TensorBoard gets
    each step's scalars as one event and its histograms as another (one event per value costs ~3× as much);
    the values are those ``add_scalar`` / ``add_histogram`` write (:mod:`em_lightning.tb_events`).

    Distributed: under DDP only rank zero computes. Under FSDP every rank joins the gathers of the LoRA weights
    (:func:`em_lightning.lora.iter_lora_modules`); rank zero computes and writes. (Both tested on 2 CPU ranks:
    ``spectra.jsonl`` equals the one-process file, ``tests/test_distributed.py``.)
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        log_per_module: bool = True,
        log_histograms: bool = True,
        log_image: bool = True,
        per_module_every_n_steps: int | None = None,
        image_every_n_steps: int | None = None,
        metrics: list[str] | None = None,
        jsonl: str | None = rundir.SPECTRA,
        log_at_start: bool = True,
        subspace: bool = False,
        subspace_k: int = 4,
    ):
        if every_n_steps < 1:
            raise InputError(f"SpectrumLogger.every_n_steps: must be >= 1, got {every_n_steps}")
        if subspace_k < 1:
            raise InputError(f"SpectrumLogger.subspace_k: must be >= 1, got {subspace_k}")
        known = set(spectral_metrics(torch.ones(2)))
        if metrics is not None and not set(metrics) <= known:
            raise InputError(f"SpectrumLogger.metrics: unknown {sorted(set(metrics) - known)}; known: {sorted(known)}")
        self.every_n_steps = every_n_steps
        self.log_per_module = log_per_module
        self.log_histograms = log_histograms
        self.log_image = log_image
        self.per_module_every_n_steps = per_module_every_n_steps or every_n_steps
        self.image_every_n_steps = image_every_n_steps or max(10 * every_n_steps, 100)
        self.metrics = list(metrics) if metrics is not None else None
        self.jsonl = jsonl
        self.log_at_start = log_at_start
        self.subspace = subspace
        self.subspace_k = subspace_k
        self._last_step: int | None = None
        self._layers = None  # (model, its LoRA layers): found once, not on every log
        self._run_dir = None  # set in setup, on every rank
        self._subspaces = SubspaceTracker(subspace_k)  # the previous log's bases; not checkpointed

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage):
        # Forget the last fit here, not in on_train_start: Lightning restores a checkpoint's callback state
        # (load_state_dict) after setup and before on_train_start.
        # The run dir is a collective to ask for (a broadcast from rank zero): here, on every rank, once.
        self._run_dir = rundir.resolve_run_dir(trainer)
        if stage == "fit":
            self._last_step, self._layers = None, None
            self._subspaces.reset()  # never checkpointed: a resumed fit starts without them (NaN first)

    def on_train_start(self, trainer, pl_module):
        # Resuming from a checkpoint taken right after a log: that step's spectrum is already in the first run's file.
        if self.log_at_start and trainer.global_step != self._last_step:
            self.log_spectra(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step only moves after an optimizer step, so accumulation micro-batches fall through here; the first
        # micro-batches end at step 0 (no update yet), which is log_at_start's to log, not the periodic trigger's.
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
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
        if self._layers is None or self._layers[0] is not model:
            self._layers = (model, find_lora_layers(model), uses_fsdp1(model))
        gather = gathered_full_params(model) if self._layers[2] else contextlib.nullcontext()
        with torch.no_grad(), gather:
            # Every rank reads the adapters (under FSDP that gathers shards); only rank zero computes.
            modules = [(n, p, B.detach(), A.detach(), s) for n, p, B, A, s in iter_lora_modules(model, self._layers[1])]
            if not trainer.is_global_zero or not modules:
                return
            factors = [(B, A, s) for _, _, B, A, s in modules]
            groups = grouped_singular_values(factors)
            subspace = self._subspaces.update([m[0] for m in modules], factors, step) if self.subspace else None
        names = [m[0] for m in modules]
        projs = [m[1] for m in modules]
        sigmas, metrics = _to_host(groups, len(modules), self.metrics)
        applies = {}
        if subspace is not None:
            metrics.update(subspace.metrics)
            applies = subspace.applies
        per_module = self.log_per_module and (step % self.per_module_every_n_steps == 0 or final)
        self._write_scalars(trainer, step, names, projs, metrics, per_module, applies)
        experiment = tensorboard_experiment(trainer)
        if experiment is not None:
            if self.log_histograms:
                self._write_histograms(experiment, step, names, projs, sigmas, per_module)
            if self.log_image and (step % self.image_every_n_steps == 0 or final):
                experiment.add_image("spectra/plot", _plot(names, projs, sigmas, step), step, dataformats="HWC")
        if self.jsonl:
            extra = subspace.record if subspace is not None else None
            self._write_jsonl(trainer, step, names, sigmas, {m[0]: m[4] for m in modules}, extra)

    def _write_scalars(self, trainer, step, names, projs, metrics, per_module, applies=None):
        """Scalars per module (``per_module``), per projection and overall; a metric named in ``applies``
        exists only for the modules its mask selects. Means leave NaN (an undefined subspace) out."""
        scalars = {}
        applies = applies or {}
        by_proj = defaultdict(list)
        for i, proj in enumerate(projs):
            by_proj[proj].append(i)
        for metric, values in metrics.items():
            mask = applies.get(metric)
            if per_module:
                scalars.update({f"spectra/{name}/{metric}": float(values[i]) for i, name in enumerate(names)
                                if mask is None or mask[i]})
            for proj, idx in by_proj.items():
                if mask is None or mask[idx].any():
                    scalars[f"spectra/by_proj/{proj}/{metric}"] = _mean(values[idx] if mask is None else
                                                                        values[idx][mask[idx]])
            scalars[f"spectra/all/{metric}"] = _mean(values if mask is None else values[mask])
        log_scalars(trainer, scalars, step)

    def _write_histograms(self, experiment, step, names, projs, sigmas, per_module):
        by_proj = defaultdict(list)
        histograms = {}
        for name, proj, sigma in zip(names, projs, sigmas):
            by_proj[proj].append(sigma)
            if per_module:
                histograms[f"spectra/{name}/sigma"] = sigma
        for proj, group in by_proj.items():
            histograms[f"spectra/by_proj/{proj}/sigma"] = np.concatenate(group)
        histograms["spectra/all/sigma"] = np.concatenate(sigmas)
        log_histograms(experiment, histograms, step)

    def _write_jsonl(self, trainer, step, names, sigmas, scales, extra=None):
        record = {
            "step": step,
            "epoch": trainer.current_epoch,
            "modules": {n: [float(f"{x:.6g}") for x in s] for n, s in zip(names, sigmas)},
            "scale": scales,
            **(extra or {}),
        }
        if self._run_dir is None:
            raise RuntimeError("SpectrumLogger.log_spectra before setup: the run dir is resolved there")
        rundir.append_jsonl(self._run_dir / self.jsonl, [record])  # whole lines: a crash keeps every finished step

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")


# ---------------------------------------------------------------------------------------------------- helpers
def _mean(values: np.ndarray) -> float:
    """Mean of the non-NaN values (the plain mean when there is no NaN); NaN if none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _to_host(groups, n_modules: int, wanted: list[str] | None):
    """Per-module σ (numpy, module order) and metrics ({name: array over modules}) from grouped spectra, with one
    device→host copy for everything (each ``.item()`` or ``.cpu()`` on a GPU synchronises)."""
    order, parts, ranks = [], [], []
    metric_names = None
    for idx, sigma in groups:
        m = spectral_metrics(sigma)
        metric_names = metric_names or [k for k in m if wanted is None or k in wanted]
        order += idx
        ranks += [sigma.shape[-1]] * len(idx)
        parts += [m[k] for k in metric_names] + [sigma.flatten()]
    flat = torch.cat([p.float().flatten() for p in parts]).cpu().numpy()
    sigmas: list[np.ndarray | None] = [None] * n_modules
    metrics = {k: np.zeros(n_modules, dtype=np.float32) for k in metric_names}
    pos = 0
    for idx, sigma in groups:
        for k in metric_names:
            metrics[k][idx] = flat[pos: pos + len(idx)]
            pos += len(idx)
        block = flat[pos: pos + sigma.numel()].reshape(len(idx), sigma.shape[-1])
        pos += sigma.numel()
        for j, i in enumerate(idx):
            sigmas[i] = block[j]
    return sigmas, metrics


def _plot(names, projs, sigmas, step) -> np.ndarray:
    """An RGB array (H, W, 3): left, mean σᵢ/σ₁ per projection type; right, σᵢ/σ₁ of every module as a heat map.

    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = max(len(s) for s in sigmas)
    padded = np.stack([np.pad(s, (0, r - len(s))) for s in sigmas])
    top = padded[:, :1]
    normalised = np.divide(padded, top, out=np.zeros_like(padded), where=top > 0)
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
