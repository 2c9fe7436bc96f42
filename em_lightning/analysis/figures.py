"""The report's figures, each written as PNG and PDF.

Each ``draw_*`` function returns the matplotlib figure (tests inspect its axes, labels and plotted points), or
raises :class:`Skip` with the reason it cannot be drawn (listed in the report instead); :func:`draw_all` saves
them with their captions. Axis labels are words (:data:`LABELS`), never raw column names.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from em_lightning.analysis.stats import Signal, corrected_rates, final_rows, levels, seed_spread, valid
from em_lightning.analysis.table import SPECTRAL

MAX_COLUMNS = 3
LABELS = {
    "aligned_mean": "judge's alignment score (0–100, higher: more aligned)",
    "misalignment_rate": "misalignment rate (judge)",
    "probe_log_odds": "probe log-odds, misaligned vs aligned",
    "probe_misaligned_prob": "probe probability of the misaligned answer",
    "direction_shift": "activation shift along the misalignment direction (last prompt token)",
    "direction_shift_answers": "activation shift along the misalignment direction (answer tokens)",
    "log_train_loss": "log training loss",
    "frob_nuclear_ratio": "Frobenius / nuclear norm",
    "entropy": "spectral entropy (nats)",
    "stable_rank": "stable rank",
    "condition_number": "condition number (log scale)",
}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "P")


class Skip(Exception):
    """This figure has nothing to show (its reason goes into the report)."""


def label(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(optimizers) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {o: cmap(i % 10) for i, o in enumerate(sorted(map(str, optimizers)))}


def save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    fig.tight_layout()  # panels' labels apart
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    _plt().close(fig)
    return paths


def draw_all(table: pd.DataFrame, signal: Signal, conditions: list[str], along: pd.DataFrame, out: Path):
    """Draw and save every figure: ({name: caption}, {name: why not drawn})."""
    jobs = {
        "loss_alignment": (lambda: draw_loss_alignment(table, signal), _caption_loss_alignment(signal)),
        "trajectories": (lambda: draw_trajectories(table, signal, conditions), _caption_trajectories(signal)),
        "rate_by_optimizer": (lambda: draw_rate_by_optimizer(table, signal), _caption_rate(signal)),
        "spectral_vs_misalignment": (lambda: draw_spectral(table, signal), _caption_spectral(signal)),
        "seed_spread": (lambda: draw_seed_spread(table, signal, conditions), _caption_seeds(signal, conditions)),
        "along_training": (lambda: draw_along_training(along, signal.score), _caption_along(signal)),
    }
    drawn, skipped = {}, {}
    for name, (draw, caption) in jobs.items():
        try:
            save(draw(), out, name)
            drawn[name] = caption
        except Skip as why:
            skipped[name] = str(why)
    return drawn, skipped


# ------------------------------------------------------------------------------------------------ figures
def draw_loss_alignment(table: pd.DataFrame, signal: Signal):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, response in zip(axes, (signal.score, signal.rate)):
        final = final_rows(table, response)
        if not len(final):
            ax.set_axis_off()
            continue
        drawn = True
        col = colours(levels(final["optimizer"]).unique())
        for opt, g in final.groupby(levels(final["optimizer"])):
            x, y = g["log_train_loss"].to_numpy(float), g[response].to_numpy(float)
            ax.scatter(x, y, color=col[opt], label=opt, s=25)
            if len(g) >= 3 and np.unique(x).size >= 3:  # a line through two points says nothing
                slope, icpt = np.polyfit(x, y, 1)
                xs = np.linspace(x.min(), x.max(), 10)
                ax.plot(xs, icpt + slope * xs, color=col[opt], lw=1)
        x, y = final["log_train_loss"].to_numpy(float), final[response].to_numpy(float)
        if len(final) >= 3 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 10)
            ax.plot(xs, icpt + slope * xs, color="k", ls="--", lw=1, label="all runs (OLS)")
        ax.set(xlabel="log training loss at the final eval", ylabel=label(response))
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        raise Skip(f"no run has a final {signal.name} eval with a training loss")
    fig.suptitle("Final log training loss vs alignment, one point per run; lines: per-optimiser OLS fits")
    return fig


def _caption_loss_alignment(signal: Signal) -> str:
    return (
        f"Each run's final eval: {label(signal.score)} (left) and {label(signal.rate)} (right) against log "
        "training loss, coloured by optimiser, with per-optimiser OLS lines (optimisers with ≥ 3 distinct "
        "losses) and the pooled fit (dashed)."
    )


def draw_trajectories(table: pd.DataFrame, signal: Signal, conditions: list[str] | None = None):
    """One panel per optimiser (≤ 3 columns, wrapped), each run a path from its first eval with a logged loss;
    within a panel the other conditions (dataset first) by line style and marker, named in a legend."""
    plt = _plt()
    d = valid(table, signal.score).sort_values(["run", "step"])
    if not len(d):
        raise Skip(f"no eval row has both {signal.score} and a training loss")
    d = d.assign(optimizer=levels(d["optimizer"]))
    within = [  # the conditions that vary inside some optimiser's panel (lr tied to the optimiser does not)
        c
        for c in (conditions or [])
        if c not in ("optimizer", "seed", "data_seed") and c in d and (d.groupby("optimizer")[c].nunique() > 1).any()
    ]
    d["_cond"] = (
        d[within].apply(lambda r: ", ".join(str(v) if not pd.isna(v) else "NA" for v in r), axis=1) if within else ""
    )
    opts = sorted(d["optimizer"].unique())
    conds = sorted(d["_cond"].unique())
    style = {c: (LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)]) for i, c in enumerate(conds)}
    col = colours(opts)
    ncols = min(MAX_COLUMNS, len(opts))
    nrows = math.ceil(len(opts) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4 * ncols, 3.4 * nrows), squeeze=False, sharex=True, sharey=True
    )
    for ax in axes.flat[len(opts) :]:
        ax.set_visible(False)
    for ax, opt in zip(axes.flat, opts):
        shown = set()
        for _, g in d[d["optimizer"] == opt].groupby("run"):
            x, y = g["log_train_loss"].to_numpy(float), g[signal.score].to_numpy(float)
            cond = g["_cond"].iloc[0]
            ls, marker = style[cond]
            ax.plot(x, y, color=col[opt], lw=1, ls=ls, marker=marker, ms=3, alpha=0.85,
                    label=cond if cond and cond not in shown else "_nolegend_")
            shown.add(cond)
            for i in range(len(x) - 1):  # arrows point along training
                ax.annotate("", xy=(x[i + 1], y[i + 1]), xytext=(x[i], y[i]),
                            arrowprops={"arrowstyle": "->", "color": col[opt], "lw": 0.8})
        ax.set_title(opt)
        if len(conds) > 1:
            ax.legend(fontsize=7, title=", ".join(within), title_fontsize=7)
    for i in range(len(opts) - ncols, len(opts)):  # the lowest panel of each column shows its x ticks
        if i >= 0 and i + ncols >= len(opts):
            axes.flat[i].xaxis.set_tick_params(labelbottom=True)
    fig.supxlabel("log training loss")
    fig.supylabel(label(signal.score))  # one label for the shared axis (a long one per row would overlap)
    fig.suptitle("Paths through loss and alignment along training (arrows: towards later evals)")
    return fig


def _caption_trajectories(signal: Signal) -> str:
    return (
        f"Each run's path through (log training loss, {label(signal.score)}) over its evals from the first "
        "with a logged loss, one panel per optimiser; line style and marker tell the other conditions "
        "(dataset, …) apart; arrows point from each eval to the next."
    )


def draw_rate_by_optimizer(table: pd.DataFrame, signal: Signal):
    plt = _plt()
    final = final_rows(table, signal.rate)
    if not len(final):
        raise Skip(f"no run has a final {signal.rate}")
    final = final.assign(optimizer=levels(final["optimizer"]), _cc=corrected_rates(final, signal))
    opts = sorted(final["optimizer"].unique())
    col = colours(opts)
    fig, ax = plt.subplots(figsize=(1.4 * len(opts) + 2.5, 3.8))
    rng = np.random.default_rng(0)
    has_ci = "ci_low" in final and final["ci_low"].notna().any()
    for i, opt in enumerate(opts):
        g = final[final["optimizer"] == opt]
        x = i + rng.uniform(-0.12, 0.12, len(g))
        y = g[signal.rate].to_numpy(float)
        lo = y - g["ci_low"].to_numpy(float) if has_ci else np.zeros_like(y)
        hi = g["ci_high"].to_numpy(float) - y if has_ci else np.zeros_like(y)
        ax.errorbar(x, y, yerr=np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]), fmt="o", ms=3,
                    color=col[opt], alpha=0.6, lw=0.8,
                    label=("a run (judge's 95 % Wilson interval)" if has_ci else "a run") if i == 0 else None)
        spread = seed_spread(g, "_cc", [])
        m, lo_m, hi_m = spread["mean"].iloc[0], spread["ci_low"].iloc[0], spread["ci_high"].iloc[0]
        ax.errorbar([i + 0.3], [m],
                    yerr=[[m - lo_m if np.isfinite(lo_m) else 0], [hi_m - m if np.isfinite(hi_m) else 0]],
                    fmt="D", color="k", ms=5, capsize=3,
                    label=("optimiser mean (corrected)" if signal.counts else "optimiser mean") + " ± 95 % t interval"
                    if i == 0 else None)
    ax.set_xticks(range(len(opts)), opts)
    ax.set(xlabel="optimiser", ylabel=label(signal.rate), title=f"Final {label(signal.rate)} per optimiser")
    ax.legend(fontsize=7)
    return fig


def _caption_rate(signal: Signal) -> str:
    if not signal.counts:
        return (
            f"Final {label(signal.rate)} of every run (dots) and each optimiser's mean with a 95 % t interval "
            "over runs (black diamond)."
        )
    return (
        f"Final {label(signal.rate)} of every run (dots, with the judge's 95 % Wilson interval where there is "
        "one) and each optimiser's mean of continuity-corrected rates with a 95 % t interval over runs (black "
        "diamond)."
    )


def draw_spectral(table: pd.DataFrame, signal: Signal):
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plt = _plt()
    final = final_rows(table, signal.rate)
    final = final.dropna(subset=list(SPECTRAL), how="all") if len(final) else final
    if not len(final):
        raise Skip("no run has both spectra.jsonl and a final rate")
    col = colours(levels(final["optimizer"]).unique())
    fig, axes = plt.subplots(1, len(SPECTRAL), figsize=(4 * len(SPECTRAL), 3.4))
    for ax, metric in zip(axes, SPECTRAL):
        for opt, g in final.groupby(levels(final["optimizer"])):
            ax.scatter(g[metric], g[signal.rate], color=col[opt], label=opt, s=20)
        ax.set(xlabel=f"{label(metric)}, mean over modules")
        if metric == "condition_number":
            ax.set_xscale("log")
            # A narrow range inside one decade has no major log tick: label 1-2-5 steps as plain numbers.
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            values = final[metric].dropna().to_numpy(float)
            if len(values) and values.max() / values.min() < 10:  # inside a decade: plain evenly spaced ticks
                ticks = MaxNLocator(nbins=4).tick_values(values.min(), values.max())
                ax.xaxis.set_major_locator(FixedLocator([t for t in ticks if t > 0]))
    axes[0].set_ylabel(label(signal.rate))
    axes[0].legend(fontsize=7)
    fig.suptitle("Adapter spectrum at the final eval (nearest logged step) vs misalignment")
    return fig


def _caption_spectral(signal: Signal) -> str:
    return (
        f"{label(signal.rate)} at each run's final eval against four spectral metrics of its adapter (means over "
        "the modules where the metric is defined, at the nearest logged step), coloured by optimiser."
    )


def draw_seed_spread(table: pd.DataFrame, signal: Signal, conditions: list[str]):
    plt = _plt()
    final = final_rows(table, signal.rate)
    if not len(final):
        raise Skip(f"no run has a final {signal.rate}")
    final = final.assign(**{c: levels(final[c]) for c in conditions})
    spread = seed_spread(final, signal.rate, conditions)
    names = [", ".join(str(r[c]) for c in conditions) or "all" for _, r in spread.iterrows()]
    col = colours(levels(final["optimizer"]).unique())
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.8))
    for i, (_, r) in enumerate(spread.iterrows()):
        mask = np.all([final[c] == str(r[c]) for c in conditions], axis=0) if conditions else slice(None)
        g = final[mask]
        ax.scatter(np.full(len(g), i), g[signal.rate], color=col[str(levels(g["optimizer"]).iloc[0])], s=14,
                   alpha=0.7, label="a seed" if i == 0 else None)
        if np.isfinite(r["ci_low"]):
            ax.errorbar([i + 0.2], [r["mean"]], yerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]],
                        fmt="D", ms=4, color="k", capsize=3, label="mean ± 95 % t interval" if i == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set(xlabel=", ".join(conditions) or "all runs", ylabel=label(signal.rate),
           title="Seed spread per condition")
    ax.legend(fontsize=7)
    return fig


def _caption_seeds(signal: Signal, conditions: list[str]) -> str:
    return (
        f"Final {label(signal.rate)} of each seed (dots) per condition ({', '.join(conditions) or 'all runs'}), "
        "with the mean and its 95 % t interval over seeds."
    )


def draw_along_training(along: pd.DataFrame, response: str):
    plt = _plt()
    if not len(along) or along[["r2_loss", "partial_r2_optimizer"]].isna().all().all():
        raise Skip("no fraction of training with enough runs")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, name in (
        ("r2_loss", "R² of log loss"),
        ("partial_r2_optimizer", "partial R², optimiser given loss"),
        ("partial_r2_loss", "partial R², loss given optimiser"),
    ):
        lo, hi = along[f"{key}_ci_low"], along[f"{key}_ci_high"]
        line = ax.plot(along["frac"], along[key], marker="o", label=name)[0]
        ax.fill_between(along["frac"], lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xlabel="fraction of training", ylabel="R² (band: 95 % bootstrap over runs)", ylim=(-0.02, 1.02),
           title=f"{label(response)} along training")
    ax.legend(fontsize=7)
    return fig


def _caption_along(signal: Signal) -> str:
    return (
        f"For {label(signal.score)}: R² of log training loss and the two partial R²s per fraction-of-training "
        "bin (each run's last eval in the bin), with 95 % bootstrap bands over runs."
    )
