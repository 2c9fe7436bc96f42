"""All of the analysis on a tidy table: the numbers (``summary.json``), the figures and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from em_lightning.analysis import figures
from em_lightning.analysis.stats import (
    Signal,
    along_training,
    anova,
    factors_of,
    final_rows,
    loss_models,
    optimizer_ratio,
    seed_spread,
    trend,
)
from em_lightning.analysis.table import DESIGN, extra_factors

UNFINISHED = ("failed", "interrupted", "pending", "submitted", "running", "requeued")


def analyze(
    table: pd.DataFrame,
    signal: Signal,
    out: Path,
    bins: int = 10,
    n_boot: int = 2000,
    loss_window: int | None = None,
    errors: dict[str, str] | None = None,
) -> dict:
    """Run every analysis, write ``report.md``, ``summary.json`` and ``figures/``; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    excluded = _excluded(table, signal, errors or {})
    used = table[~table["run"].isin([r for r, why in excluded.items() if why.startswith("state")])]
    factors = factors_of(used, ["optimizer", *DESIGN[1:], *extra_factors(used)])
    conditions = [f for f in factors if f not in ("seed", "data_seed")]
    responses = (signal.score, signal.rate)
    models = {r: loss_models(final_rows(used, r), r) for r in responses}
    anovas = {r: anova(final_rows(used, r), r, factors) for r in responses}
    along = {r: along_training(used, r, bins) for r in responses}
    final_rate = final_rows(used, signal.rate)
    seeds = seed_spread(
        final_rate.assign(**{c: final_rate[c].astype(str) for c in conditions}), signal.rate, conditions
    )
    ratio = optimizer_ratio(final_rate, signal, conditions, n_boot=n_boot)
    figs, skipped = _figures(used, signal, conditions, along[signal.score], out / "figures")
    head = models[signal.score]
    summary = {
        "signal": signal.name,
        "response": signal.score,
        "rate": signal.rate,
        "n_runs": int(table["run"].nunique()),
        "n_rows": len(table),
        "n_runs_analysed": head["n_runs"],
        "r2_loss": head["r2_loss"],
        "r2_loss_optimizer": head["r2_loss_optimizer"],
        "partial_r2_optimizer": head["partial_r2_optimizer"],
        "r2_interaction": head["r2_interaction"],
        "interaction_p": head["interaction_p"],
        "anova": anovas[signal.score]["terms"],
        "anova_dropped": anovas[signal.score]["dropped"],
        "optimizer_rate_ratio": ratio,
        "responses": {r: {**models[r], "anova": anovas[r]} for r in responses},
        "along_training": {
            r: {"table": along[r].to_dict("records"), "trend": trend(along[r])} for r in responses
        },
        "factors": factors,
        "excluded_runs": excluded,
        "figures": figs,
        "figures_skipped": skipped,
        "loss_window": loss_window,
    }
    summary = _clean(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(table, summary, seeds, along, signal), encoding="utf-8")
    return summary


def _excluded(table: pd.DataFrame, signal: Signal, errors: dict[str, str]) -> dict[str, str]:
    """Runs that are not in the statistics, and why: unfinished or failed, or no eval with a value."""
    out = {}
    for run, g in table.groupby("run", sort=True):
        state = str(g["state"].iloc[0])
        if state in UNFINISHED:
            error = errors.get(run, "")
            out[run] = f"state {state}" + (f": {error.splitlines()[0]}" if error else "")
            continue
        has = g[[signal.score, signal.rate]].notna().any(axis=1) & g["log_train_loss"].notna()
        failed = int(g["eval_failed"].fillna(False).astype(bool).sum()) if "eval_failed" in g else 0
        if not has.any():
            out[run] = f"no {signal.name} eval with a value" + (
                f" ({failed} failed eval(s))" if failed else ""
            )
        elif failed:
            out[run] = f"kept; {failed} of its evals failed (those rows are left out)"
    return out


def _figures(table, signal, conditions, along, out: Path):
    drawn, skipped = {}, {}
    jobs = {
        "loss_alignment": lambda: figures.loss_alignment(table, signal, out),
        "trajectories": lambda: figures.trajectories(table, signal, out),
        "rate_by_optimizer": lambda: figures.rate_by_optimizer(table, signal, out),
        "spectral_vs_misalignment": lambda: figures.spectral_vs_misalignment(table, signal, out),
        "seed_spread": lambda: figures.seed_spread_figure(table, signal, conditions, out),
        "along_training": lambda: figures.along_training_figure(along, signal.score, out),
    }
    for name, draw in jobs.items():
        try:
            drawn[name] = draw()
        except figures.Skip as why:
            skipped[name] = str(why)
    return drawn, skipped


# ------------------------------------------------------------------------------------------------ markdown
def _markdown(table: pd.DataFrame, s: dict, seeds: pd.DataFrame, along: dict, signal: Signal) -> str:
    lines = [
        f"# Sweep analysis ({s['signal']} signal)",
        "",
        (
            f"{s['n_runs']} runs, {s['n_rows']} rows (run × eval step) in `table.csv`; "
            f"{s['n_runs_analysed']} runs in the final-eval statistics of `{s['response']}`. Design factors "
            f"that vary: {', '.join(s['factors']) or 'none'}. `train_loss` is the mean of `train/loss` over "
            f"the last {s['loss_window'] or 10} optimizer steps up to the eval's step."
        ),
        "",
    ]
    lines += ["## Runs", ""]
    final = table.sort_values("step").groupby("run").tail(1).sort_values("run")
    cols = [
        c
        for c in (
            "run",
            "optimizer",
            "model",
            "dataset",
            "batch_size",
            "lr",
            "seed",
            "state",
            "step",
            "train_loss",
            signal.score,
            signal.rate,
        )
        if c in final
    ]
    lines += _table(final[cols].to_dict("records"), cols) + [""]
    if s["excluded_runs"]:
        lines += ["**Not in the statistics (or with failed evals):**", ""]
        lines += [f"- `{run}`: {why}" for run, why in s["excluded_runs"].items()] + [""]
    lines += [
        "## Does final training loss predict alignment?",
        "",
        (
            "OLS at each run's final eval. Partial R² of optimiser = (SSE_loss − SSE_loss+opt) / SSE_loss; "
            "the interaction model fits one slope per optimiser (F test against the additive model)."
        ),
        "",
    ]
    keys = [
        "n_runs",
        "r2_loss",
        "r2_loss_optimizer",
        "partial_r2_optimizer",
        "r2_optimizer",
        "partial_r2_loss",
        "r2_interaction",
        "interaction_F",
        "interaction_p",
    ]
    rows = [{"response": r, **{k: m.get(k) for k in keys}} for r, m in s["responses"].items()]
    lines += _table(rows, ["response", *keys]) + [""]
    for r, m in s["responses"].items():
        if m.get("slopes"):
            slopes = ", ".join(f"{o}: {_fmt(v['slope'])} ± {_fmt(v['se'])}" for o, v in m["slopes"].items())
            lines += [f"Per-optimiser slopes of `{r}` on log loss (± SE): {slopes}.", ""]
        if m.get("note"):
            lines += [f"`{r}`: {m['note']}.", ""]
    lines += [
        "## ANOVA (type II)",
        "",
        (
            "Terms: log loss (covariate), the varying factors and their interactions with optimiser; a term "
            "is kept only if every cell of its factors holds ≥ 2 runs and the design matrix keeps full rank."
        ),
        "",
    ]
    for r, m in s["responses"].items():
        a = m["anova"]
        lines += [f"**{r}** ({a.get('formula') or a.get('note')}):", ""]
        rows = [{"term": t, **v} for t, v in a["terms"].items()]
        lines += [*_table(rows, ["term", "df", "F", "p", "partial_eta2"]), ""] if rows else []
        lines += [f"- dropped `{t}`: {why}" for t, why in a["dropped"].items()] + [""]
    lines += [
        "## Along training",
        "",
        "Rows aligned by `frac_trained` (each run's eval nearest each fraction).",
        "",
    ]
    for r, a in along.items():
        t = s["along_training"][r]["trend"]
        verdict = ("yes" if t.get("answer") else "no") if t.get("answer") is not None else t.get("note")
        lines += [f"**{r}** — does the partial R² of optimiser grow while loss's shrinks? {verdict}", ""]
        lines += _table(a.to_dict("records"), list(a.columns)) + [""]
    ratio = s["optimizer_rate_ratio"]
    lines += [
        "## Seeds",
        "",
        f"Final `{signal.rate}` per condition: mean, between-seed SD, 95 % t interval.",
        "",
    ]
    lines += _table(seeds.to_dict("records"), list(seeds.columns)) + [""]
    pair = " / ".join(ratio["pair"]) if ratio.get("pair") else "n/a"
    lines += [
        f"Optimiser rate ratio (max / min, {pair}): **{_fmt(ratio['value'])}**, 95 % bootstrap interval "
        f"[{_fmt(ratio['ci_low'])}, {_fmt(ratio['ci_high'])}] ({ratio['n_boot']} resamples of the seeds "
        f"within each condition; the pair is fixed on the full data). Continuity correction: "
        f"{ratio['correction']}."
        + (f" {ratio['note']}." if ratio.get("note") else ""),
        "",
    ]
    lines += ["## Figures", ""]
    for name, caption in s["figures"].items():
        lines += [f"![{name}](figures/{name}.png)", "", f"*{caption}* ([PDF](figures/{name}.pdf))", ""]
    lines += [f"- not drawn: `{n}`: {why}" for n, why in s["figures_skipped"].items()]
    return "\n".join(lines).rstrip() + "\n"


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    if not rows:
        return ["(none)"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.3g}"
    return str(v)


def _clean(value):
    """JSON-ready: NaN/inf → None, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value
