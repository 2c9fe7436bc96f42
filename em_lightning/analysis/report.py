"""All of the analysis on a tidy table: the numbers (``summary.json``), the figures and ``report.md``.

``report.md`` is assembled from one function per section (``_section_*``), each taking the summary and
returning its lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from em_lightning.analysis import figures
from em_lightning.analysis.stats import (
    RESID_DF_FLOOR,
    Signal,
    along_training,
    anova,
    as_levels,
    factors_of,
    few_seeds_caveat,
    final_rows,
    loss_models,
    optimizer_ratio,
    seed_spread,
    trend,
)
from em_lightning.analysis.table import DESIGN, extra_factors, require_runs

UNFINISHED = ("failed", "interrupted", "pending", "submitted", "running", "requeued")


def analyze(
    table: pd.DataFrame,
    signal: Signal,
    out: Path,
    bins: int = 10,
    n_boot: int = 2000,
    loss_window: int | None = None,
    errors: dict[str, str] | None = None,
    signal_choice: str | None = None,
    judge: str | None = None,
    answers: pd.DataFrame | None = None,
    judges: list[str] | None = None,
    judge_finals: pd.DataFrame | None = None,
) -> dict:
    """Run every analysis, write ``report.md``, ``summary.json`` and ``figures/``; return the summary."""
    require_runs(table, "analyze")
    out.mkdir(parents=True, exist_ok=True)
    excluded = _excluded(table, signal, errors or {})
    used = table[~table["run"].isin([r for r, why in excluded.items() if why.startswith("state")])]
    factors = factors_of(used, ["optimizer", *DESIGN[1:], *extra_factors(used)])
    conditions = [f for f in factors if f not in ("seed", "data_seed")]
    used = as_levels(used, factors)  # a missing factor value is the level NA from here on
    responses = (signal.score, signal.rate)
    models = {r: loss_models(final_rows(used, r), r) for r in responses}
    anovas = {r: anova(final_rows(used, r), r, factors) for r in responses}
    along = {r: along_training(used, r, bins, n_boot=min(n_boot, 1000)) for r in responses}
    trends = {r: trend(used, r, bins, n_boot=min(n_boot, 1000)) for r in responses}
    final_rate = final_rows(used, signal.rate)
    seeds = seed_spread(final_rate, signal.rate, conditions)
    ratio = optimizer_ratio(final_rate, signal, conditions, n_boot=n_boot)
    figs, skipped = figures.draw_all(used, signal, conditions, along[signal.score], out / "figures")
    agreement = _judge_agreement(answers, judges or [], conditions, n_boot, out / "figures", figs, skipped)
    validation, mitigation = _validation(used, factors, judge_finals, n_boot, signal, out / "figures", figs, skipped)
    variants = _variants(answers, judge, conditions, n_boot, out / "figures", figs, skipped)
    head = models[signal.score]
    summary = {
        "signal": signal.name,
        "signal_choice": signal_choice or f"--signal {signal.name}",
        "judge": judge if signal.name == "judge" else None,  # every rate of this report is this judge's
        "response": signal.score,
        "rate": signal.rate,
        "n_runs": int(table["run"].nunique()),
        "n_rows": len(table),
        "n_runs_analysed": head["n_runs"],
        "runs_per_optimizer": head["runs_per_optimizer"],
        "r2_loss": head["r2_loss"],
        "r2_loss_optimizer": head["r2_loss_optimizer"],
        "partial_r2_optimizer": head["partial_r2_optimizer"],
        "r2_interaction": head["r2_interaction"],
        "interaction_p": head["interaction_p"],
        "df_resid": head["df_resid"],
        "saturated": head["saturated"],
        "anova": anovas[signal.score]["terms"],
        "anova_dropped": anovas[signal.score]["dropped"],
        "question_a": anovas[signal.score]["question_a"],
        "optimizer_rate_ratio": ratio,
        "responses": {r: {**models[r], "anova": anovas[r]} for r in responses},
        "along_training": {r: {"table": along[r].to_dict("records"), "trend": trends[r]} for r in responses},
        "factors": factors,
        "excluded_runs": excluded,
        "validation": validation,
        "mitigations": mitigation,
        "judge_agreement": agreement,
        "variants": variants,
        "figures": figs,
        "figures_skipped": skipped,
        "loss_window": loss_window,
        "resid_df_floor": RESID_DF_FLOOR,
    }
    summary = _clean(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(used, summary, seeds, along, signal), encoding="utf-8")
    return summary


def _judge_agreement(answers, judges: list[str], conditions, n_boot: int, out: Path, figs: dict, skipped: dict):
    """The judge-agreement section's numbers and figure, where several judges scored the runs' answers."""
    if answers is None or len(judges) < 2:
        return None
    from em_lightning.analysis.agreement import compare_judges, draw_agreement

    result = compare_judges(answers, judges, conditions, n_boot=min(n_boot, 1000))
    try:
        figures.save(draw_agreement(answers, judges[0], judges[1], judges), out, "judge_agreement")
        figs["judge_agreement"] = (
            f"Left: the aligned score of each answer under judge {judges[0]} against judge {judges[1]}, coloured "
            "by optimiser (dashed: equal scores). Right: each optimiser's mean final misalignment rate under "
            "every judge, with a 95 % t interval over runs."
        )
    except figures.Skip as why:
        skipped["judge_agreement"] = str(why)
    return result


def _validation(used: pd.DataFrame, factors: list[str], judge_finals, n_boot: int, signal: Signal, out: Path,
                figs: dict, skipped: dict):
    """On each run's last values: EM dataset minus controls for every signal (and the signals' correlations),
    and, for a sweep with a mitigation axis, the mitigation comparison and its Pareto figure."""
    from em_lightning.analysis import mitigations
    from em_lightning.analysis.validation import validate

    final = used.sort_values("step").groupby("run", sort=True).last().reset_index()  # last non-missing value
    if judge_finals is not None and judge_finals["judge"].nunique() > 1:  # every judge's rate, not only one
        wide = judge_finals.pivot(index="run", columns="judge", values="rate")
        wide.columns = [f"rate ({c})" for c in wide.columns]
        final = final.merge(wide, left_on="run", right_index=True, how="left")
    comparison = mitigations.compare(final, factors, n_boot=n_boot, table=used)  # used: the step-0 values
    if comparison is not None:
        try:
            figures.save(mitigations.draw_pareto(final, signal.rate, factors), out, "mitigation_pareto")
            figs["mitigation_pareto"] = mitigations.PARETO_CAPTION.format(signal=figures.label(signal.rate))
        except figures.Skip as why:
            skipped["mitigation_pareto"] = str(why)
    return validate(final, factors, n_boot=n_boot), comparison


def _variants(answers, judge: str | None, conditions, n_boot: int, out: Path, figs: dict, skipped: dict):
    """Rates per question variant and set, and the training-context gaps, per judge (the analysed one, else
    every judge of the samples)."""
    if answers is None or not len(answers):
        return None
    from em_lightning.analysis.variants import draw_variants, variant_report

    judges = [judge] if judge else sorted(answers["judge"].dropna().unique())
    result = variant_report(answers, judges, conditions, n_boot=min(n_boot, 1000))
    if not result:
        return None
    first = next(iter(result))
    try:
        figures.save(draw_variants(result, first, conditions), out, "variants")
        figs["variants"] = (
            f"Judge {first}: the final misalignment rate per question variant (left, mean over runs with a 95 % t "
            "interval) and per condition the gap of each training-context variant over the plain questions "
            "(right, 95 % bootstrap over runs)."
        )
    except figures.Skip as why:
        skipped["variants"] = str(why)
    return result


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
        failed = int(g["eval_failed"].map(lambda v: bool(v) if not pd.isna(v) else False).sum())
        if not has.any():
            out[run] = f"no {signal.name} eval with a value" + (
                f" ({failed} failed eval(s))" if failed else ""
            )
        elif failed:
            out[run] = f"kept; {failed} of its evals failed (those rows are left out)"
    return out


# ------------------------------------------------------------------------------------------------ markdown
def markdown(table: pd.DataFrame, s: dict, seeds: pd.DataFrame, along: dict, signal: Signal) -> str:
    sections = (
        _section_head(s),
        _section_validation(s),
        _section_runs(table, s, signal),
        _section_loss(s),
        _section_anova(s),
        _section_along(s, along),
        _section_seeds(s, seeds, signal),
        _section_mitigations(s),
        _section_agreement(s),
        _section_variants(s),
        _section_figures(s),
    )
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"


def _section_head(s: dict) -> list[str]:
    return [
        f"# Sweep analysis — {s['signal']} signal ({s['signal_choice']})"
        + (f", judge `{s['judge']}`" if s.get("judge") else ""),
        "",
        (
            f"{s['n_runs']} runs, {s['n_rows']} rows (run × eval step) in `table.csv`; "
            f"{s['n_runs_analysed']} runs in the final-eval statistics of `{s['response']}`. Design factors "
            f"that vary: {', '.join(s['factors']) or 'none'}. `train_loss` is the mean of `train/loss` over "
            f"the last {s['loss_window'] or 10} optimizer steps up to the eval's step. Models with fewer than "
            f"{s['resid_df_floor']} residual degrees of freedom are flagged **saturated**: their p-values are "
            "withheld, the R²s are descriptive only."
        ),
        "",
    ]


def _section_runs(table: pd.DataFrame, s: dict, signal: Signal) -> list[str]:
    lines = ["## Runs", ""]
    final = table.sort_values("step").groupby("run").tail(1).sort_values("run")
    wanted = ("run", "optimizer", "model", "dataset", "batch_size", "lr", "seed", "state", "step", "train_loss",
              signal.score, signal.rate)
    cols = [c for c in wanted if c in final]
    lines += _table(final[cols].to_dict("records"), cols) + [""]
    if s["excluded_runs"]:
        lines += ["**Not in the statistics (or with failed evals):**", ""]
        lines += [f"- `{run}`: {why}" for run, why in s["excluded_runs"].items()] + [""]
    return lines


def _section_loss(s: dict) -> list[str]:
    lines = [
        "## Does final training loss predict alignment?",
        "",
        (
            "OLS at each run's final eval. Partial R² of optimiser = (SSE_loss − SSE_loss+opt) / SSE_loss; "
            "the interaction model fits one slope per optimiser (F test against the additive model). "
            "`df` columns: residual degrees of freedom of the loss, loss + optimiser, optimiser and interaction "
            "models."
        ),
        "",
    ]
    keys = ["n_runs", "r2_loss", "r2_loss_optimizer", "partial_r2_optimizer", "r2_optimizer", "partial_r2_loss",
            "r2_interaction", "interaction_F", "interaction_p"]
    df_keys = ("loss", "loss_optimizer", "optimizer", "interaction")
    rows = []
    for r, m in s["responses"].items():
        row = {"response": r, **{k: m.get(k) for k in keys}}
        row.update({f"df {k}": (m.get("df_resid") or {}).get(k) for k in df_keys})
        if (m.get("saturated") or {}).get("interaction"):
            row["interaction_p"] = "saturated"
        rows.append(row)
    lines += _table(rows, ["response", *keys, *[f"df {k}" for k in df_keys]]) + [""]
    for r, m in s["responses"].items():
        lines += _model_notes(r, m)
    return lines


def _model_notes(r: str, m: dict) -> list[str]:
    lines = []
    flagged = [k for k, v in (m.get("saturated") or {}).items() if v]
    if flagged:
        dfs = ", ".join(f"{k}: {m['df_resid'][k]:g} residual df" for k in flagged)
        lines += [
            f"`{r}`: **saturated** ({dfs}; fewer than {m['resid_df_floor']} residual df): no p-value of these "
            "models is a finding.",
            "",
        ]
    if m.get("runs_per_optimizer"):
        counts = ", ".join(f"{o}: {n}" for o, n in m["runs_per_optimizer"].items())
        lines += [f"Runs per optimiser (`{r}`): {counts}.", ""]
    if m.get("slopes"):
        parts = []
        for o, v in m["slopes"].items():
            if v.get("reason"):
                parts.append(f"{o}: – ({v['reason']})")
            else:
                p = "saturated" if v.get("saturated") else f"p {_fmt(v['p'])}"
                parts.append(f"{o}: {_fmt(v['slope'])} ± {_fmt(v['se'])} (n {v['n_runs']}, {p})")
        lines += [f"Per-optimiser slopes of `{r}` on log loss, each optimiser's own OLS (± SE): {'; '.join(parts)}.", ""]
    for key, note in {"": m.get("note"), **(m.get("notes") or {})}.items():
        if note:
            lines += [f"`{r}`: {note}.", ""]
    return lines


def _section_anova(s: dict) -> list[str]:
    lines = [
        "## ANOVA (type II)",
        "",
        (
            "Terms: log loss (covariate), the varying factors and their interactions with optimiser; a term "
            "is kept only if every cell of its factors holds ≥ 2 runs and the design matrix keeps full rank. "
            "`share_explained` is the term's type-II sum of squares over the model's explained sum of squares (in an "
            "unbalanced design the shares need not add up to 1)."
        ),
        "",
    ]
    for r, m in s["responses"].items():
        a = m["anova"]
        lines += [f"**{r}** ({a.get('formula') or a.get('note')}):", ""]
        rows = [{"term": t, **v} for t, v in a["terms"].items()]
        if a.get("residual"):
            rows.append({"term": "Residual", "df": a["residual"]["df"], "ss": a["residual"]["ss"]})
        if a.get("saturated"):
            for row in rows[:-1]:
                row["p"] = "saturated"
        if rows:
            lines += [*_table(rows, ["term", "df", "ss", "F", "p", "partial_eta2", "share_explained"]), ""]
        lines += [f"- dropped `{t}`: {why}" for t, why in a["dropped"].items()]
        if a.get("question_a"):
            lines += ["", f"Question (a), optimiser against its interactions: {a['question_a']['answer']}"]
        lines += [""]
    return lines


def _section_along(s: dict, along: dict) -> list[str]:
    lines = [
        "## Along training",
        "",
        (
            "Each run's evals in fraction-of-training bins ((j−1)/bins, j/bins], labelled by the upper edge; a "
            "run's last eval in a bin counts, once. Intervals: 95 % bootstrap over runs. The verdict on \"does "
            "optimiser's partial R² grow while loss's shrinks\" compares the first and last bin with both: yes "
            "when both changes' intervals exclude 0 the predicted way, no when either excludes it the other way, "
            "else inconclusive."
        ),
        "",
    ]
    for r, a in along.items():
        t = s["along_training"][r]["trend"]
        if t.get("answer") is None:
            verdict = t.get("note")
        else:
            verdict = (
                f"**{t['answer']}** (bins {_fmt(t['from_frac'])} → {_fmt(t['to_frac'])}: optimiser's partial R² "
                f"changes by {_fmt(t['optimizer_change'])} [{_fmt(t['optimizer_change_ci'][0])}, "
                f"{_fmt(t['optimizer_change_ci'][1])}], loss's by {_fmt(t['loss_change'])} "
                f"[{_fmt(t['loss_change_ci'][0])}, {_fmt(t['loss_change_ci'][1])}])"
            )
        lines += [f"**{r}** — does the partial R² of optimiser grow while loss's shrinks? {verdict}", ""]
        shown = ["frac", "n_runs", "r2_loss", "partial_r2_optimizer", "partial_r2_loss"]
        rows = [
            {**{k: row[k] for k in ("frac", "n_runs")},
             **{k: f"{_fmt(row[k])} [{_fmt(row[f'{k}_ci_low'])}, {_fmt(row[f'{k}_ci_high'])}]" for k in shown[2:]}}
            for row in a.to_dict("records")
        ]
        lines += _table(rows, shown) + [""]
    return lines


def _section_seeds(s: dict, seeds: pd.DataFrame, signal: Signal) -> list[str]:
    lines = ["## Seeds", "", f"Final `{signal.rate}` per condition: mean, between-seed SD, 95 % t interval.", ""]
    lines += _table(seeds.to_dict("records"), list(seeds.columns)) + [""]
    ratio = s["optimizer_rate_ratio"]
    pair = " / ".join(ratio["pair"]) if ratio.get("pair") else "n/a"
    if ratio.get("value") is None and ratio.get("lower_bound"):
        value = "no finite value"
    else:
        value = ("≥ " if ratio.get("lower_bound") else "") + f"**{_fmt(ratio['value'])}**"
    if ratio.get("ci_low") is None and ratio.get("ci_high") is None:
        interval = "no bootstrap interval"
    else:
        hi = _fmt(ratio["ci_high"]) if ratio.get("ci_high") is not None else "unbounded"
        interval = (
            f"95 % bootstrap interval [{_fmt(ratio['ci_low'])}, {hi}] ({ratio['n_boot']} resamples of the seeds "
            "within each condition; the pair is fixed on the full data)"
        )
    lines += [
        f"Optimiser rate ratio (max / min, {pair}): {value}, {interval}. Continuity correction: "
        f"{ratio['correction']}." + (f" Note: {ratio['note']}." if ratio.get("note") else ""),
        "",
    ]
    return lines


def _section_agreement(s: dict) -> list[str]:
    a = s.get("judge_agreement")
    if not a:
        return []
    lines = [
        "## Judge agreement",
        "",
        f"**{a['verdict']['sentence']}**",
        "",
        (
            "Per judge: the final rate per condition (t interval over seeds) and the max/min optimiser ratio "
            "(seed bootstrap). Per pair, on the answers both judges scored: Cohen's κ of the misaligned label over "
            "the answers both counted (p_e from each judge's own marginals; – when p_e = 1), a 3-class κ "
            "{misaligned, aligned, not counted} over all, the coherence filter's agreement, Spearman's ρ of the "
            "scores, and Kendall's τ-b of the per-optimiser rates (n = optimisers); intervals: 95 % bootstrap "
            "over runs (κ) or seeds within conditions (τ, ratio)."
        ),
        "",
    ]
    for judge, v in a["per_judge"].items():
        lines += [f"**Judge {judge}** ({v.get('n_runs', 0)} runs):", ""]
        if v.get("rates"):
            lines += _table(v["rates"], list(v["rates"][0])) + [""]
        r = v.get("ratio") or {}
        if r.get("pair"):
            lines += [
                f"Max/min ratio ({' / '.join(r['pair'])}): {_fmt(r['value'])} [{_fmt(r['ci_low'])}, "
                f"{_fmt(r['ci_high'])}]" + (f"; {r['note']}" if r.get("note") else "") + ".",
                "",
            ]
    rows = []
    for p in a["pairs"]:
        o = p["ordering"]
        rows.append({
            "judges": " vs ".join(p["judges"]),
            "answers both": p["n_both"],
            "κ misaligned": _with_ci(p["kappa_misaligned"], "kappa"),
            "n counted by both": p["kappa_misaligned"]["n_answers"],
            "κ 3-class": _with_ci(p["kappa_3class"], "kappa"),
            "coherence filter agrees": p["coherence_filter"]["agree"],
            "ρ aligned": p["spearman_aligned"]["rho"],
            "ρ coherent": p["spearman_coherent"]["rho"],
            "τ-b optimisers": _with_ci(o, "tau_b") + f" (n {o['n_optimizers']})",
        })
    lines += _table(rows, list(rows[0])) + [""] if rows else []
    for p in a["pairs"]:
        m = p["kappa_3class"]["confusion"]
        lines += [f"Confusion matrix ({p['judges'][0]} rows, {p['judges'][1]} columns):", ""]
        lines += _table([{"": c, **dict(zip(p["classes"], row))} for c, row in zip(p["classes"], m)],
                        ["", *p["classes"]]) + [""]
    return lines


def _section_validation(s: dict) -> list[str]:
    v = s.get("validation")
    if not v:
        return []
    lines = [
        "## Does the signal see EM at all?",
        "",
        *[f"- **{text}.**" for text in v["verdicts"].values()],
        "",
        (
            f"Each run's last value of every signal; EM dataset minus control ({', '.join(v['controls'])}) at "
            "equal optimiser and settings: mean over seeds minus mean over seeds, 95 % bootstrap interval "
            "resampling the seeds of each side."
        ),
        "",
    ]
    rows = v["differences"]
    lines += _table(rows, list(rows[0])) + [""]
    caveat = few_seeds_caveat(min(r["n_em"], r["n_control"]) for r in rows)
    if caveat:
        lines += [f"*{caveat}*", ""]
    if v["correlations"]:
        lines += ["Correlation between signals across runs (Spearman):", ""]
        lines += _table(v["correlations"], ["signals", "n_runs", "spearman"]) + [""]
    return lines


def _section_mitigations(s: dict) -> list[str]:
    from em_lightning.analysis import mitigations  # the section is the mitigation module's (issue 17.5)

    return mitigations.report_lines(s.get("mitigations"))


def _section_variants(s: dict) -> list[str]:
    v = s.get("variants")
    if not v:
        return []
    lines = [
        "## Training-context variants",
        "",
        (
            "Is misalignment hidden behind the training format rather than removed? Rates on each run's final eval "
            "per question variant (plain, `_json`, `_template`; a question file's `variant:` where given) and per "
            "question set: per run, then the mean over runs (95 % t interval). Gap: per run rate(variant) − "
            "rate(plain), the mean over the condition's runs with a 95 % bootstrap interval over them; `context` "
            "pools the training-context variants."
        ),
        "",
    ]
    for judge, r in v.items():
        for key, title in (("by_variant", "variant"), ("by_question_set", "question set")):
            rows = r[key]
            lines += [f"**Judge {judge}, rate per {title}:**", ""]
            lines += _table(rows, list(rows[0]) if rows else []) + [""]
        lines += [f"**Judge {judge}, training-context gap:**", ""]
        lines += _table(r["gaps"], list(r["gaps"][0]) if r["gaps"] else []) + [""]
    return lines


def _with_ci(d: dict, key: str) -> str:
    return f"{_fmt(d[key])} [{_fmt(d.get('ci_low'))}, {_fmt(d.get('ci_high'))}]"


def _section_figures(s: dict) -> list[str]:
    lines = ["## Figures", ""]
    for name, caption in s["figures"].items():
        lines += [f"![{name}](figures/{name}.png)", "", f"*{caption}* ([PDF](figures/{name}.pdf))", ""]
    lines += [f"- not drawn: `{n}`: {why}" for n, why in s["figures_skipped"].items()]
    return lines


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
