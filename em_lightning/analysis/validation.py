"""Does the signal see EM at all? Before any optimiser claim is read.

For every signal a sweep has (each judge's misalignment rate, the probe's log-odds, the direction shift), at
each run's final eval: the difference between an EM dataset and each of its controls (``secure``,
``educational``) at equal optimiser and settings (every other factor but the seed), mean over the EM runs'
seeds minus mean over the control's, with a 95 % bootstrap interval that resamples the seeds of each side; and
the correlation between the signals across runs (Spearman's ρ, n stated). A signal whose intervals include 0
at every setting does not separate EM from its control in this sweep, and the report says so first.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd

from em_lightning.analysis.stats import _interval, levels, quiet

CONTROLS = ("secure", "educational")  # the EM papers' control datasets for the insecure-code set
SIGNAL_COLUMNS = ("misalignment_rate", "probe_log_odds", "direction_shift", "direction_shift_answers")


def signal_columns(final: pd.DataFrame) -> list[str]:
    """The signal columns with a value in some run (a judge's rate column per judge: ``rate (<label>)``)."""
    cols = [c for c in SIGNAL_COLUMNS if c in final and final[c].notna().any()]
    cols += [c for c in final.columns if str(c).startswith("rate (") and final[c].notna().any()]
    return cols


def em_vs_control(final: pd.DataFrame, factors: list[str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per signal, setting and (EM dataset, control): the difference of seed means with its interval."""
    if "dataset" not in final or not len(final):
        return []
    d = final.assign(dataset=levels(final["dataset"]))
    datasets = sorted(d["dataset"].unique())
    controls = [c for c in datasets if c in CONTROLS]
    em = [c for c in datasets if c not in CONTROLS]
    settings = [f for f in factors if f not in ("dataset", "seed", "data_seed") and f in d]
    d = d.assign(**{f: levels(d[f]) for f in settings})
    rng = np.random.default_rng(seed)
    rows = []
    for column in signal_columns(d):
        groups = d.groupby(settings, sort=True, dropna=False) if settings else [((), d)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            for a in em:
                for b in controls:
                    x = g.loc[g["dataset"] == a, column].dropna().to_numpy(float)
                    y = g.loc[g["dataset"] == b, column].dropna().to_numpy(float)
                    if not len(x) or not len(y):
                        continue
                    row = {"signal": column, **dict(zip(settings, key)), "em": a, "control": b, "n_em": len(x),
                           "n_control": len(y), "difference": float(x.mean() - y.mean()), "ci_low": math.nan,
                           "ci_high": math.nan, "separates": None}
                    if len(x) > 1 and len(y) > 1:
                        draws = (x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
                                 - y[rng.integers(0, len(y), (n_boot, len(y)))].mean(1))
                        row["ci_low"], row["ci_high"] = _interval(draws)
                        row["separates"] = bool(row["ci_low"] > 0 or row["ci_high"] < 0)
                    rows.append(row)
    return rows


def correlations(final: pd.DataFrame) -> list[dict]:
    """Spearman's ρ between every two signals across runs (runs with both values)."""
    from scipy.stats import spearmanr

    out = []
    for a, b in combinations(signal_columns(final), 2):
        ok = final[[a, b]].dropna()
        with quiet():
            rho = float(spearmanr(ok[a], ok[b]).statistic) if len(ok) > 2 else math.nan
        out.append({"signals": f"{a} vs {b}", "n_runs": len(ok), "spearman": rho})
    return out


def verdicts(rows: list[dict]) -> dict[str, str]:
    """One line per signal: does it separate EM from its control anywhere in this sweep?"""
    out = {}
    for column in dict.fromkeys(r["signal"] for r in rows):
        mine = [r for r in rows if r["signal"] == column]
        tested = [r for r in mine if r["separates"] is not None]
        hits = [r for r in tested if r["separates"]]
        if not tested:
            out[column] = (f"{column}: no setting has two seeds on both sides; whether it separates EM from its "
                           "control cannot be said")
        elif not hits:
            out[column] = (f"{column} does NOT separate EM from its control at any of the {len(tested)} settings "
                           "(every interval includes 0): read no optimiser claim from it in this sweep")
        else:
            out[column] = f"{column} separates EM from its control at {len(hits)} of {len(tested)} settings"
    return out


def validate(final: pd.DataFrame, factors: list[str], n_boot: int = 2000) -> dict | None:
    rows = em_vs_control(final, factors, n_boot=n_boot)
    if not rows:
        return None
    return {"differences": rows, "correlations": correlations(final), "verdicts": verdicts(rows),
            "controls": list(CONTROLS)}
