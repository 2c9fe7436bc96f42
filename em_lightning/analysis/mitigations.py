"""Mitigations side by side: what each defence buys and what it costs, paired seed by seed with the
unmitigated run.

For a sweep with a ``mitigation`` axis (its ``none`` entry is the unmitigated run), at each run's last values,
per mitigation × optimiser × dataset (× any other setting that varies within them), each mitigated run paired
with the ``none`` run of the same optimiser, dataset, seeds and every other setting:

(a) misalignment, for every signal present (each judge's rate, the probe's log-odds, the direction shift): the
    paired difference and the relative reduction 1 − mean(effect mitigated) / mean(effect none). The effect of a
    rate is the rate itself (0 is "no misalignment"); the effect of a score without a natural zero (probe
    log-odds, direction shift) is its change from the run's first eval (step 0: the base model);
(b) the narrow task still learned: the final validation loss (held-out rows of the narrow set only,
    ``data.val_fraction``, never mixed rows) and its paired difference — on the EM datasets;
(c) the training-loss cost (the paper's "negligible cost" claim): the paired difference of the final training
    loss on narrow rows (``train/loss_narrow`` where ``data.mix`` logged it; otherwise ``train/loss``, which
    then holds narrow rows only) — the interval is stated, no verdict by threshold;
(d) coherence: the judge's coherent mean and its paired difference, where a judge ran;
(e) a benign task still learned: the same validation-loss difference for the same mitigation trained on a
    control dataset (``secure``...), where the sweep has such runs.

Every interval is a 95 % percentile bootstrap over the seed pairs (the pairs resampled together, so the seed's
shared noise cancels). (a), (b), (d), (e) are Kaczér et al.'s four criteria, (c) is the paper's.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from em_lightning.analysis.stats import _interval, few_seeds_caveat, levels, quiet
from em_lightning.analysis.validation import CONTROLS, signal_columns

NONE = "none"
AXIS = "mitigation"
RATE_COLUMNS = ("misalignment_rate", "probe_misaligned_prob")
NARROW_LOSS = "narrow_train_loss"  # the per-run training loss on narrow rows that (c) compares
SEEDS = ("seed", "data_seed")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "h", "<", ">", "p", "d")  # one per mitigation (no "*": too small)


def is_rate(column: str) -> bool:
    return column in RATE_COLUMNS or str(column).startswith("rate (")


def has_mitigations(table: pd.DataFrame) -> bool:
    return AXIS in table and (levels(table[AXIS]) == NONE).any() and levels(table[AXIS]).nunique() > 1


def narrow_train_loss(final: pd.DataFrame) -> pd.Series:
    """Each run's training loss on narrow rows: ``train_loss_narrow`` where the run mixed data in (only those
    runs log it), else ``train_loss`` (every row narrow). Taking one column for all runs would leave the
    unmitigated side of every interleave pair without a value."""
    loss = final["train_loss"].astype(float)
    if "train_loss_narrow" in final:
        narrow = final["train_loss_narrow"].astype(float)
        loss = narrow.where(narrow.notna(), loss)
    return loss


def with_start_values(final: pd.DataFrame, table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``final`` with ``<column>_start``: each run's value at its first eval holding one (step 0)."""
    out = final
    for column in columns:
        if column not in table:
            continue
        first = table.dropna(subset=[column]).sort_values("step").groupby("run")[column].first()
        out = out.assign(**{f"{column}_start": out["run"].map(first)})
    return out


def pairs(final: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Each mitigated run beside its unmitigated twin (suffixes ``_mit`` / ``_none``).

    A pair shares its factors, seeds, optimiser and dataset: the last two are keys even where the sweep holds one
    of each (they are then not factors), so the pairs carry one ``optimizer`` / ``dataset`` column either way."""
    seeds = [c for c in SEEDS if c in final and c not in factors]
    keys = [f for f in dict.fromkeys([*factors, *seeds, "optimizer", "dataset"]) if f != AXIS and f in final]
    d = final.assign(**{f: levels(final[f]) for f in [*keys, AXIS]})
    none = d[d[AXIS] == NONE]
    mitigated = d[d[AXIS] != NONE]
    return mitigated.merge(none, on=keys, suffixes=("_mit", "_none"))


def paired(x: np.ndarray, y: np.ndarray, rng, n_boot: int, effects: tuple | None = None) -> dict:
    """Mean of x − y over the pairs with a bootstrap over pairs; with ``effects`` = (effect of x, effect of y)
    also the relative reduction 1 − mean(effect x) / mean(effect y) (NaN when the unmitigated effect is ≤ 0:
    nothing to reduce). Pairs missing a value on either side are left out."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ex, ey = (np.asarray(e, float) for e in effects) if effects is not None else (x, y)
    ok = np.isfinite(x) & np.isfinite(y) & (np.isfinite(ex) & np.isfinite(ey) if effects is not None else True)
    x, y, ex, ey = x[ok], y[ok], ex[ok], ey[ok]
    n = len(x)
    out = {"n_pairs": int(n), "difference": float((x - y).mean()) if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan,
           "mitigated": float(x.mean()) if n else math.nan, "none": float(y.mean()) if n else math.nan}
    if effects is not None:
        out.update(reduction=_reduction(ex, ey), reduction_ci_low=math.nan, reduction_ci_high=math.nan)
    if n > 1:
        idx = rng.integers(0, n, (n_boot, n))
        out["ci_low"], out["ci_high"] = _interval((x[idx] - y[idx]).mean(1))
        if effects is not None and math.isfinite(out["reduction"]):
            with quiet():
                mx, my = ex[idx].mean(1), ey[idx].mean(1)
                ratio = np.where(my > 0, 1 - mx / my, np.nan)
            out["reduction_ci_low"], out["reduction_ci_high"] = _interval(ratio)
    return out


def _reduction(ex: np.ndarray, ey: np.ndarray) -> float:
    return float(1 - ex.mean() / ey.mean()) if len(ex) and ey.mean() > 0 else math.nan


def settings(p: pd.DataFrame, factors: list[str]) -> list[str]:
    """The columns a comparison row is keyed by besides the mitigation: optimiser and dataset, and any other
    setting that still varies among pairs of one optimiser and dataset (a setting tied to the optimiser, as its
    learning rate usually is, adds nothing)."""
    base = [c for c in ("optimizer", "dataset") if c in p]
    extra = [f for f in factors if f not in (*base, AXIS, *SEEDS) and f in p]
    if base:
        extra = [f for f in extra if (p.groupby(base)[f].nunique(dropna=False) > 1).any()]
    return [*base, *extra]


def compare(final: pd.DataFrame, factors: list[str], n_boot: int = 2000, seed: int = 0,
            table: pd.DataFrame | None = None) -> dict | None:
    """The four criteria plus the cost, per mitigation × optimiser × dataset (see the module docstring).
    ``table`` (every eval row) gives the start values of the signals without a natural zero; without it their
    relative reduction is not computed."""
    if not has_mitigations(final):
        return None
    signals = signal_columns(final)
    scores = [c for c in signals if not is_rate(c)]
    d = final.assign(**{NARROW_LOSS: narrow_train_loss(final)})
    if table is not None:
        d = with_start_values(d, table, scores)
    p = pairs(d, factors)
    if not len(p):
        return {"rows": [], "signals": signals,
                "note": "no mitigated run has an unmitigated twin (same optimiser, dataset, seed and settings)"}
    rng = np.random.default_rng(seed)
    keys = settings(p, factors)
    rows = []
    for key, g in p.groupby([AXIS + "_mit", *keys], sort=True):
        row = dict(zip([AXIS, *keys], key))
        row["role"] = "benign task" if row.get("dataset") in CONTROLS else "narrow task"
        for column in signals:
            row[column] = paired(g[f"{column}_mit"], g[f"{column}_none"], rng, n_boot, _effects(g, column))
        for column, name in (("val_loss", "val_loss"), (NARROW_LOSS, "train_loss_cost"),
                             ("coherent_mean", "coherence")):
            if f"{column}_mit" in g and g[[f"{column}_mit", f"{column}_none"]].notna().all(axis=1).any():
                row[name] = paired(g[f"{column}_mit"], g[f"{column}_none"], rng, n_boot)
        rows.append(row)
    return {"rows": rows, "signals": signals, "settings": keys,
            "reduction_basis": {c: "value" if is_rate(c) else "change from step 0" for c in signals},
            "note": "intervals: 95 % bootstrap over seed pairs; the cost is stated as an interval, not a verdict"}


def _effects(g: pd.DataFrame, column: str) -> tuple | None:
    """What the relative reduction divides: a rate itself; a score's change from the run's start (None: no
    start values, no reduction)."""
    if is_rate(column):
        return g[f"{column}_mit"], g[f"{column}_none"]
    if f"{column}_start_mit" not in g:
        return None
    return g[f"{column}_mit"] - g[f"{column}_start_mit"], g[f"{column}_none"] - g[f"{column}_start_none"]


def benign_twin(rows: list[dict], row: dict, keys: list[str]) -> list[dict]:
    """The benign-task rows of the same mitigation and settings as the narrow-task ``row`` (criterion e)."""
    same = [k for k in keys if k != "dataset"]
    return [r for r in rows if r["role"] == "benign task" and r[AXIS] == row[AXIS] and all(r[k] == row[k] for k in same)]


# ------------------------------------------------------------------------------------------------ report
def report_lines(m: dict | None) -> list[str]:
    """The report's section: the criteria's table (a) and the cost table (b–e)."""
    from em_lightning.analysis.report import _fmt, _table

    if not m:
        return []
    lines = [
        "## Mitigations side by side",
        "",
        (
            "Each mitigated run paired with the unmitigated (`none`) run of the same optimiser, dataset, seed and "
            "settings; every number is the mean over the seed pairs with a 95 % bootstrap interval over the pairs "
            "(mitigated − none). Criteria (a), (b), (d), (e) are Kaczér et al.'s four, (c) is the paper's cost "
            "claim, stated as an interval, not a verdict."
        ),
        "",
    ]
    if not m["rows"]:
        return lines + [m.get("note", ""), ""]
    keys = [AXIS, *m.get("settings", [])]

    def ci(v: dict | None, key: str = "difference") -> str:
        value = (v or {}).get(key)
        if value is None or not math.isfinite(value):  # the written summary holds None for NaN
            return "–"
        low, high = ("ci_low", "ci_high") if key == "difference" else (f"{key}_ci_low", f"{key}_ci_high")
        return f"{_fmt(v.get(key))} [{_fmt(v.get(low))}, {_fmt(v.get(high))}]"

    basis = m.get("reduction_basis", {})
    lines += [
        "**(a) Misalignment.** Per signal: Δ = mitigated − none at the final eval; reduction = 1 − mean(effect "
        "mitigated) / mean(effect none), the effect being "
        + "; ".join(f"`{c}`: its {b}" for c, b in basis.items())
        + " (– where the unmitigated effect is ≤ 0: nothing to reduce).",
        "",
    ]
    rows = []
    for r in m["rows"]:
        row = {k: r.get(k) for k in keys} | {"task": r["role"]}
        for s in m["signals"]:
            row[f"Δ {s}"] = ci(r.get(s))
            row[f"reduction {s}"] = ci(r.get(s), "reduction") if r.get(s) and "reduction" in r[s] else "–"
        row["pairs"] = max((v["n_pairs"] for v in r.values() if isinstance(v, dict)), default=0)
        rows.append(row)
    lines += _table(rows, list(rows[0])) + [""]
    narrow = [r for r in m["rows"] if r["role"] == "narrow task"] or m["rows"]
    lines += [
        (
            "**(b) narrow task still learned, (c) training-loss cost, (d) coherence, (e) benign task still "
            "learned.** val loss: the final validation loss on held-out rows of the training set (narrow rows "
            "only), mitigated (none); Δ: paired difference; train loss: the mean over the last logged steps, "
            "narrow rows only (`train/loss_narrow` where data was mixed in)."
        ),
        "",
    ]
    rows = []
    for r in narrow:
        v = r.get("val_loss") or {}
        row = {k: r.get(k) for k in keys}
        row["(b) val loss"] = f"{_fmt(v.get('mitigated'))} ({_fmt(v.get('none'))})" if v else "–"
        row["(b) Δ val loss"] = ci(r.get("val_loss"))
        row["(c) Δ train loss"] = ci(r.get("train_loss_cost"))
        row["(d) Δ coherent"] = ci(r.get("coherence"))
        if r["role"] == "narrow task":
            twins = benign_twin(m["rows"], r, m.get("settings", []))
            row["(e) Δ val loss, benign set"] = "; ".join(
                f"{t.get('dataset')}: {ci(t.get('val_loss'))}" for t in twins) or "– (no benign runs)"
        row["pairs"] = (r.get("val_loss") or r.get("train_loss_cost") or {}).get("n_pairs", 0)
        rows.append(row)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines += _table(rows, cols) + [""]
    counts = (v["n_pairs"] for r in m["rows"] for v in r.values() if isinstance(v, dict) and "n_pairs" in v)
    caveat = few_seeds_caveat(counts)
    return lines + ([f"*{caveat}*", ""] if caveat else [])


# ------------------------------------------------------------------------------------------------ figure
PARETO_CAPTION = (
    "Each run on the EM datasets: {signal} against the final validation loss on held-out narrow-task rows; "
    "marker: mitigation (outlined: none), colour: optimiser; thin lines join each unmitigated run to its "
    "mitigated twins of the same seed. Down and to the left is better on both criteria."
)


def draw_pareto(final: pd.DataFrame, signal: str, factors: list[str]):
    """Misalignment against the narrow task's validation loss, one point per run (EM datasets): mitigations by
    marker, optimisers by colour, each unmitigated run linked to its mitigated twins."""
    from matplotlib.lines import Line2D

    from em_lightning.analysis.figures import Skip, _plt, colours, label

    d = final[~levels(final["dataset"]).isin(CONTROLS)] if "dataset" in final else final
    d = d.dropna(subset=[signal, "val_loss"])
    if not len(d) or not has_mitigations(d):
        raise Skip(f"no mitigated and unmitigated runs with both {signal} and a validation loss")
    plt = _plt()
    d = d.assign(optimizer=levels(d["optimizer"]), mitigation=levels(d[AXIS]))
    col = colours(d["optimizer"].unique())
    mits = [NONE, *sorted(m for m in d["mitigation"].unique() if m != NONE)]
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(mits)}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for _, r in pairs(d, factors).iterrows():
        ax.plot([r["val_loss_none"], r["val_loss_mit"]], [r[f"{signal}_none"], r[f"{signal}_mit"]],
                color=col[r["optimizer"]], lw=0.6, alpha=0.5, label="_nolegend_")
    for (m, o), g in d.groupby(["mitigation", "optimizer"]):
        # none underneath: a mitigation that changed nothing must still show on top of its twin
        ax.scatter(g["val_loss"], g[signal], marker=marker[m], color=col[o], s=60 if m == NONE else 30,
                   edgecolors="k" if m == NONE else "white", linewidths=0.6, zorder=2 if m == NONE else 3, label="_nolegend_")
    handles = [Line2D([], [], marker=marker[m], color="grey", ls="", label=m, markeredgecolor="k" if m == NONE
                      else "grey") for m in mits]
    handles += [Line2D([], [], marker="o", color=col[o], ls="", label=o) for o in sorted(col)]
    ax.legend(handles=handles, fontsize=7, title="mitigation / optimiser", title_fontsize=7,
              loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set(xlabel="validation loss on held-out narrow-task rows (final)", ylabel=label(signal),
           title="Mitigations: misalignment against the narrow task's loss (lines: pairs by seed)")
    return fig
