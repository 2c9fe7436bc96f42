"""Training-context variants: is misalignment hidden behind the training format rather than removed?

The EM question file asks each question plain and in ``_json`` / ``_template`` variants that look like the
training data; a question file may tag variants explicitly (``variant:``), otherwise the id suffix decides
(:func:`em_lightning.analysis.agreement.variant_of`). Per judge, on each run's final eval:

* the rate per variant group and per question set: per run misaligned / counted within the group, then the
  mean over runs with a 95 % t interval;
* per condition (optimiser and the sweep's other factors), the gap between each training-context variant (and
  both pooled, ``context``) and the plain questions: per run rate(variant) − rate(plain), the mean over the
  condition's runs, and a 95 % bootstrap interval that resamples those runs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from em_lightning.analysis.stats import _interval, levels, quiet, seed_spread

CONTEXT = ("json", "template")  # the variants that look like the training data


def final_answers(answers: pd.DataFrame, judge: str) -> pd.DataFrame:
    d = answers[answers["judge"] == judge]
    return d[d["step"] == d.groupby("run")["step"].transform("max")]


def rates_by(d: pd.DataFrame, group: str) -> pd.DataFrame:
    """Per run and ``group`` level: counted, misaligned, rate (NaN where nothing was counted)."""
    g = d.groupby(["run", group], sort=True).agg(n_counted=("counted", "sum"), n_misaligned=("misaligned", "sum"))
    g = g.reset_index()
    with quiet():
        g["rate"] = g["n_misaligned"] / g["n_counted"].where(g["n_counted"] > 0)
    return g


def group_rates(d: pd.DataFrame, group: str) -> list[dict]:
    per_run = rates_by(d, group)
    spread = seed_spread(per_run, "rate", [group])
    answers = per_run.groupby(group)["n_counted"].sum()
    spread["n_counted"] = spread[group].map(answers)
    return spread.rename(columns={"n_seeds": "n_runs"}).to_dict("records")


def gaps(d: pd.DataFrame, conditions: list[str], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per condition and training-context variant: mean over runs of rate(variant) − rate(plain), with a 95 %
    bootstrap interval over the condition's runs."""
    d = d.assign(context=np.where(d["variant"].isin(CONTEXT), "context", d["variant"]))
    wide = rates_by(d, "variant").pivot(index="run", columns="variant", values="rate")
    pooled = rates_by(d, "context").pivot(index="run", columns="context", values="rate")
    if "plain" not in wide:
        return []
    design = d.groupby("run")[conditions].first() if conditions else pd.DataFrame(index=wide.index)
    design = design.assign(**{c: levels(design[c]) for c in conditions})
    diffs = pd.DataFrame(index=wide.index)
    for variant in [v for v in CONTEXT if v in wide]:
        diffs[variant] = wide[variant] - wide["plain"]
    if "context" in pooled:
        diffs["context"] = pooled["context"] - wide["plain"]
    diffs = diffs.join(design)
    rng = np.random.default_rng(seed)
    rows = []
    groups = diffs.groupby(conditions, sort=True, dropna=False) if conditions else [((), diffs)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for variant in [c for c in diffs.columns if c not in conditions]:
            values = g[variant].dropna().to_numpy(float)
            row = {**dict(zip(conditions, key)), "variant": variant, "n_runs": len(values),
                   "gap": float(values.mean()) if len(values) else math.nan, "ci_low": math.nan, "ci_high": math.nan}
            if len(values) > 1:
                draws = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
                row["ci_low"], row["ci_high"] = _interval(draws)
            rows.append(row)
    return rows


def variant_report(answers: pd.DataFrame, judges: list[str], conditions: list[str], n_boot: int = 1000) -> dict:
    """Per judge: rates per variant group and per question set, and the training-context gaps."""
    out = {}
    for judge in judges:
        d = final_answers(answers, judge)
        if not len(d) or d["variant"].nunique() < 2:
            continue
        conds = [c for c in conditions if c in d]
        out[judge] = {
            "by_variant": group_rates(d, "variant"),
            "by_question_set": group_rates(d, "question_set"),
            "gaps": gaps(d, conds, n_boot=n_boot),
        }
    return out


def draw_variants(result: dict, judge: str, conditions: list[str]):
    """Left: the rate per variant group (mean over runs, t interval). Right: per condition the training-context
    gap of each variant over the plain questions with its bootstrap interval."""
    from em_lightning.analysis.figures import Skip, _plt

    r = result.get(judge)
    if not r or not r["gaps"]:
        raise Skip(f"judge {judge}'s answers have no plain questions beside training-context variants")
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    by = pd.DataFrame(r["by_variant"])
    err = np.vstack([by["mean"] - by["ci_low"], by["ci_high"] - by["mean"]])
    ax.bar(by["variant"], by["mean"], yerr=np.nan_to_num(err), capsize=3, color="tab:grey")
    ax.set(xlabel="question variant", ylabel="misalignment rate (final eval, mean over runs)",
           title=f"Rate per variant group (judge {judge})")
    g = pd.DataFrame(r["gaps"])
    g["condition"] = g[conditions].astype(str).agg(", ".join, axis=1) if conditions else "all runs"
    names = list(dict.fromkeys(g["condition"]))
    variants = list(dict.fromkeys(g["variant"]))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        v = g[g["variant"] == variant].set_index("condition").reindex(names)
        x = np.arange(len(names)) + (k - (len(variants) - 1) / 2) * width
        lo, hi = (v["gap"] - v["ci_low"]).to_numpy(float), (v["ci_high"] - v["gap"]).to_numpy(float)
        bx.errorbar(x, v["gap"], yerr=np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]), fmt="o", capsize=3,
                    label=f"{variant} − plain")
    bx.axhline(0, color="grey", lw=0.8)
    bx.set_xticks(range(len(names)), names, rotation=30, ha="right")
    bx.set(xlabel=", ".join(conditions) or "runs", ylabel="rate difference to plain questions",
           title="Training-context gap (95 % bootstrap over runs)")
    bx.legend(fontsize=7)
    return fig
