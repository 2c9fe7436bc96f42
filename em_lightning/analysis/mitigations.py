"""Mitigations side by side: what each defence buys and what it costs, paired seed by seed with the
unmitigated run.

For a sweep with a ``mitigation`` axis (its ``none`` entry is the unmitigated run), at each run's last values,
per mitigation × optimiser × dataset, each mitigated run paired with the ``none`` run of the same optimiser,
dataset, seed and every other setting:

(a) misalignment, for every signal present (each judge's rate, the probe, the direction shift): the paired
    difference, and for rates the relative reduction 1 − mean(mitigated) / mean(none);
(b) the narrow task still learned: the final validation loss (held-out rows of the narrow set) and its paired
    difference — on the EM datasets;
(c) the training-loss cost (the paper's "negligible cost" claim): the paired difference of the final training
    loss (the narrow rows' own loss, ``train/loss_narrow``, where mixing logged it) — the interval, no verdict;
(d) coherence: the judge's coherent mean and its paired difference, where a judge ran;
(e) a benign task still learned: the same validation-loss difference on the control datasets (``secure``…).

Every interval is a 95 % bootstrap over the seed pairs. (a), (b), (d), (e) are Kaczér et al.'s four criteria,
(c) is the paper's.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from em_lightning.analysis.stats import _interval, levels, quiet
from em_lightning.analysis.validation import CONTROLS, signal_columns

NONE = "none"
AXIS = "mitigation"
RATE_COLUMNS = ("misalignment_rate", "probe_misaligned_prob")


def has_mitigations(table: pd.DataFrame) -> bool:
    return AXIS in table and (levels(table[AXIS]) == NONE).any() and levels(table[AXIS]).nunique() > 1


def pairs(final: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Each mitigated run beside its unmitigated twin (suffixes ``_mit`` / ``_none``)."""
    seeds = [c for c in ("seed", "data_seed") if c in final and c not in factors]  # a pair shares its seeds
    keys = [f for f in [*factors, *seeds] if f != AXIS and f in final]
    d = final.assign(**{f: levels(final[f]) for f in [*keys, AXIS]})
    none = d[d[AXIS] == NONE]
    mitigated = d[d[AXIS] != NONE]
    return mitigated.merge(none, on=keys, suffixes=("_mit", "_none"))


def paired(x: np.ndarray, y: np.ndarray, rng, n_boot: int, relative: bool) -> dict:
    """Mean of x − y with a bootstrap over pairs; for rates also 1 − mean(x)/mean(y)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n_pairs": int(len(x)), "difference": float((x - y).mean()) if len(x) else math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if relative:
        out.update(reduction=float(1 - x.mean() / y.mean()) if len(x) and y.mean() > 0 else math.nan,
                   reduction_ci_low=math.nan, reduction_ci_high=math.nan)
    if len(x) > 1:
        idx = rng.integers(0, len(x), (n_boot, len(x)))
        out["ci_low"], out["ci_high"] = _interval((x[idx] - y[idx]).mean(1))
        if relative:
            with quiet():
                ratio = 1 - x[idx].mean(1) / y[idx].mean(1)
            out["reduction_ci_low"], out["reduction_ci_high"] = _interval(np.where(np.isfinite(ratio), ratio, np.nan))
    return out


def compare(final: pd.DataFrame, factors: list[str], n_boot: int = 2000, seed: int = 0) -> dict | None:
    """The four criteria plus the cost, per mitigation × optimiser × dataset."""
    if not has_mitigations(final):
        return None
    p = pairs(final, factors)
    if not len(p):
        return {"rows": [], "note": "no mitigated run has an unmitigated twin (same optimiser, dataset, seed)"}
    signals = [c for c in signal_columns(final)]
    loss = "train_loss_narrow" if "train_loss_narrow" in final and final["train_loss_narrow"].notna().any() else "train_loss"
    rng = np.random.default_rng(seed)
    group = [AXIS + "_mit", *[c for c in ("optimizer", "dataset") if c in p]]
    rows = []
    for key, g in p.groupby(group, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(["mitigation", *group[1:]], key))
        benign = row.get("dataset") in CONTROLS
        row["role"] = "benign task" if benign else "narrow task"
        for column in signals:
            row[column] = paired(g[f"{column}_mit"].to_numpy(float), g[f"{column}_none"].to_numpy(float), rng,
                                 n_boot, relative=column in RATE_COLUMNS or str(column).startswith("rate ("))
        for column, name in (("val_loss", "val_loss"), (loss, "train_loss_cost"), ("coherent_mean", "coherence")):
            if f"{column}_mit" in g:
                row[name] = paired(g[f"{column}_mit"].to_numpy(float), g[f"{column}_none"].to_numpy(float), rng,
                                   n_boot, relative=False)
                row[name]["mitigated"] = float(np.nanmean(g[f"{column}_mit"])) if g[f"{column}_mit"].notna().any() else math.nan
        rows.append(row)
    return {"rows": rows, "signals": signals, "train_loss_column": loss,
            "note": "intervals: 95 % bootstrap over seed pairs; the cost is stated as an interval, not a verdict"}


def draw_pareto(final: pd.DataFrame, signal: str, factors: list[str]):
    """Misalignment against the narrow task's validation loss, one point per run (EM datasets): mitigations by
    marker, optimisers by colour, each unmitigated run linked to its mitigated twins."""
    from em_lightning.analysis.figures import MARKERS, Skip, _plt, colours, label

    d = final[~levels(final["dataset"]).isin(CONTROLS)] if "dataset" in final else final
    d = d.dropna(subset=[signal, "val_loss"])
    if not len(d) or not has_mitigations(d):
        raise Skip(f"no mitigated and unmitigated runs with both {signal} and a validation loss")
    plt = _plt()
    d = d.assign(optimizer=levels(d["optimizer"]), mitigation=levels(d[AXIS]))
    col = colours(d["optimizer"].unique())
    mits = [NONE, *sorted(m for m in d["mitigation"].unique() if m != NONE)]
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(mits)}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for _, r in pairs(d, factors).iterrows():
        ax.plot([r["val_loss_none"], r["val_loss_mit"]], [r[f"{signal}_none"], r[f"{signal}_mit"]],
                color=col[r["optimizer"]], lw=0.6, alpha=0.5, label="_nolegend_")
    for (m, o), g in d.groupby(["mitigation", "optimizer"]):
        ax.scatter(g["val_loss"], g[signal], marker=marker[m], color=col[o], s=40 if m == NONE else 28,
                   edgecolors="k" if m == NONE else "none", label="_nolegend_")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=marker[m], color="grey", ls="", label=m) for m in mits]
    handles += [Line2D([], [], marker="o", color=col[o], ls="", label=o) for o in sorted(col)]
    ax.legend(handles=handles, fontsize=7, title="mitigation / optimiser", title_fontsize=7)
    ax.set(xlabel="validation loss on held-out narrow-task rows (final)", ylabel=label(signal),
           title="Mitigations: misalignment against the narrow task's loss (lines: pairs by seed)")
    return fig
