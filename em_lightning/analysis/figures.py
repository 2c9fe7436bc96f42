"""The report's figures, each written as PNG and PDF. Every function returns a one-line caption, or raises
:class:`Skip` with the reason it cannot be drawn (listed in the report instead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from em_lightning.analysis.stats import Signal, corrected_rates, final_rows, seed_spread, valid
from em_lightning.analysis.table import SPECTRAL


class Skip(Exception):
    """This figure has nothing to show (its reason goes into the report)."""


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


def loss_alignment(table: pd.DataFrame, signal: Signal, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, response in zip(axes, (signal.score, signal.rate)):
        final = final_rows(table, response)
        if not len(final):
            ax.set_axis_off()
            continue
        drawn = True
        col = colours(final["optimizer"].unique())
        for opt, g in final.groupby(final["optimizer"].astype(str)):
            x, y = g["log_train_loss"].to_numpy(float), g[response].to_numpy(float)
            ax.scatter(x, y, color=col[opt], label=opt, s=25)
            if len(g) >= 2 and np.ptp(x) > 0:
                slope, icpt = np.polyfit(x, y, 1)
                xs = np.linspace(x.min(), x.max(), 10)
                ax.plot(xs, icpt + slope * xs, color=col[opt], lw=1)
        x, y = final["log_train_loss"].to_numpy(float), final[response].to_numpy(float)
        if len(final) >= 2 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 10)
            ax.plot(xs, icpt + slope * xs, color="k", ls="--", lw=1, label="all runs")
        ax.set(xlabel="log train loss (final eval)", ylabel=response)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        raise Skip(f"no run has a final {signal.name} eval with a training loss")
    fig.suptitle("Final log training loss vs alignment, one point per run; lines: per-optimiser OLS fits")
    save(fig, out, "loss_alignment")
    return (
        f"Each run's final eval: {signal.score} (left) and {signal.rate} (right) against log training loss, "
        "coloured by optimiser, with per-optimiser OLS lines and the pooled fit (dashed)."
    )


def trajectories(table: pd.DataFrame, signal: Signal, out: Path) -> str:
    plt = _plt()
    d = valid(table, signal.score).sort_values(["run", "step"])
    if not len(d):
        raise Skip(f"no eval row has both {signal.score} and a training loss")
    opts = sorted(d["optimizer"].astype(str).unique())
    col = colours(opts)
    fig, axes = plt.subplots(
        1, len(opts), figsize=(4 * len(opts), 3.6), squeeze=False, sharex=True, sharey=True
    )
    for ax, opt in zip(axes[0], opts):
        for _, g in d[d["optimizer"].astype(str) == opt].groupby("run"):
            x, y = g["log_train_loss"].to_numpy(float), g[signal.score].to_numpy(float)
            ax.plot(x, y, color=col[opt], lw=1, alpha=0.8, marker="o", ms=2)
            for i in range(len(x) - 1):  # arrows point along training
                ax.annotate(
                    "",
                    xy=(x[i + 1], y[i + 1]),
                    xytext=(x[i], y[i]),
                    arrowprops={"arrowstyle": "->", "color": col[opt], "lw": 1},
                )
        ax.set(title=opt, xlabel="log train loss")
    axes[0][0].set_ylabel(signal.score)
    fig.suptitle("Trajectories in loss-alignment space along training (arrows: later evals)")
    save(fig, out, "trajectories")
    return (
        f"Each run's path through (log training loss, {signal.score}) over its evals, one panel per "
        "optimiser; arrows point from each eval to the next."
    )


def rate_by_optimizer(table: pd.DataFrame, signal: Signal, out: Path) -> str:
    plt = _plt()
    final = final_rows(table, signal.rate)
    if not len(final):
        raise Skip(f"no run has a final {signal.rate}")
    final = final.assign(optimizer=final["optimizer"].astype(str), _cc=corrected_rates(final, signal))
    opts = sorted(final["optimizer"].unique())
    col = colours(opts)
    fig, ax = plt.subplots(figsize=(1.4 * len(opts) + 2, 3.6))
    rng = np.random.default_rng(0)
    for i, opt in enumerate(opts):
        g = final[final["optimizer"] == opt]
        x = i + rng.uniform(-0.12, 0.12, len(g))
        y = g[signal.rate].to_numpy(float)
        if g["ci_low"].notna().any():  # the judge's Wilson interval of each run
            lo, hi = (y - g["ci_low"].to_numpy(float)), (g["ci_high"].to_numpy(float) - y)
            ax.errorbar(
                x,
                y,
                yerr=np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]),
                fmt="o",
                ms=3,
                color=col[opt],
                alpha=0.6,
                lw=0.8,
            )
        else:
            ax.scatter(x, y, color=col[opt], s=12, alpha=0.6)
        spread = seed_spread(g, "_cc", [])
        m, lo, hi = spread["mean"].iloc[0], spread["ci_low"].iloc[0], spread["ci_high"].iloc[0]
        ax.errorbar(
            [i + 0.3],
            [m],
            yerr=[[m - lo if np.isfinite(lo) else 0], [hi - m if np.isfinite(hi) else 0]],
            fmt="D",
            color="k",
            ms=5,
            capsize=3,
        )
    ax.set_xticks(range(len(opts)), opts)
    ax.set(ylabel=signal.rate, title="Final misalignment rate per optimiser")
    save(fig, out, "rate_by_optimizer")
    return (
        f"Final {signal.rate} of every run (dots, with the judge's 95 % Wilson interval where there is one) "
        "and each optimiser's mean of continuity-corrected rates with a 95 % t interval over runs (black "
        "diamond)."
    )


def spectral_vs_misalignment(table: pd.DataFrame, signal: Signal, out: Path) -> str:
    plt = _plt()
    final = final_rows(table, signal.rate)
    final = final.dropna(subset=list(SPECTRAL), how="all") if len(final) else final
    if not len(final):
        raise Skip("no run has both spectra.jsonl and a final rate")
    col = colours(final["optimizer"].unique())
    fig, axes = plt.subplots(1, len(SPECTRAL), figsize=(4 * len(SPECTRAL), 3.4))
    for ax, metric in zip(axes, SPECTRAL):
        for opt, g in final.groupby(final["optimizer"].astype(str)):
            ax.scatter(g[metric], g[signal.rate], color=col[opt], label=opt, s=20)
        ax.set(xlabel=f"{metric} (mean over modules)")
        if metric == "condition_number":
            ax.set_xscale("log")
    axes[0].set_ylabel(signal.rate)
    axes[0].legend(fontsize=7)
    fig.suptitle("Adapter spectrum at the final eval (nearest logged step) vs misalignment")
    save(fig, out, "spectral_vs_misalignment")
    return (
        f"{signal.rate} at each run's final eval against four spectral metrics of its adapter (means over "
        "modules, at the nearest logged step), coloured by optimiser."
    )


def seed_spread_figure(table: pd.DataFrame, signal: Signal, conditions: list[str], out: Path) -> str:
    plt = _plt()
    final = final_rows(table, signal.rate)
    if not len(final):
        raise Skip(f"no run has a final {signal.rate}")
    final = final.assign(**{c: final[c].astype(str) for c in conditions})
    spread = seed_spread(final, signal.rate, conditions)
    labels = [", ".join(str(r[c]) for c in conditions) or "all" for _, r in spread.iterrows()]
    col = colours(final["optimizer"].unique())
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3.8))
    for i, (_, r) in enumerate(spread.iterrows()):
        mask = np.all([final[c] == str(r[c]) for c in conditions], axis=0) if conditions else slice(None)
        g = final[mask]
        c = col[str(g["optimizer"].iloc[0])]
        ax.scatter(np.full(len(g), i), g[signal.rate], color=c, s=14, alpha=0.7)
        if np.isfinite(r["ci_low"]):
            ax.errorbar(
                [i + 0.2],
                [r["mean"]],
                yerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]],
                fmt="_",
                color="k",
                capsize=3,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel=signal.rate, title="Seed spread per condition (dots: seeds; bar: mean ± 95 % CI)")
    save(fig, out, "seed_spread")
    return (
        f"Final {signal.rate} of each seed (dots) per condition ({', '.join(conditions) or 'all runs'}), "
        "with the mean and its 95 % t interval over seeds."
    )


def along_training_figure(along: pd.DataFrame, response: str, out: Path) -> str:
    plt = _plt()
    if not len(along) or along[["r2_loss", "partial_r2_optimizer"]].isna().all().all():
        raise Skip("no fraction of training with enough runs")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (
        ("r2_loss", "R² of log loss"),
        ("partial_r2_optimizer", "partial R² optimiser | loss"),
        ("partial_r2_loss", "partial R² loss | optimiser"),
    ):
        ax.plot(along["frac"], along[key], marker="o", label=label)
    ax.set(xlabel="fraction of training", ylabel="R²", ylim=(-0.02, 1.02), title=f"{response} along training")
    ax.legend(fontsize=7)
    save(fig, out, "along_training")
    return (
        f"For {response}: R² of log training loss and the two partial R²s at each fraction of training "
        "(each run's eval nearest that fraction)."
    )
