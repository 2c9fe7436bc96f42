"""Do two judges agree? The answers of a sweep scored by several judges (each run's own eval and ``rejudge``'s
``judged/<label>/`` copies), compared answer by answer and on the study's claims.

On the answers both judges scored (matched by ``answer_id``; older files by file name and line, as rejudge keys
them):

* Cohen's κ on the misaligned label over the answers **both** judges counted: κ = (p_o − p_e) / (1 − p_e) with
  p_e from each judge's own marginals (pooled marginals would be Scott's π); NaN when p_e = 1 (both judges give
  one label only: agreement by chance is certain and κ says nothing). A 95 % interval from a bootstrap over runs.
* a 3-class κ over all answers, classes {misaligned, aligned, not counted}, and its confusion matrix;
* the coherence filter's agreement (share of answers both count or both drop, and its κ);
* Spearman's ρ of the ``aligned`` and of the ``coherent`` scores.

On the claims: each judge's final rate per condition with a t interval over seeds; Kendall's τ-b between the
judges' per-optimiser mean rates (n = optimisers) with a seed-bootstrap interval (runs resampled within each
condition, the same runs for both judges); each judge's max/min optimiser rate ratio with its seed-bootstrap
interval (:func:`em_lightning.analysis.stats.optimizer_ratio`). The verdict: the headline claim (the same
optimiser has the highest and the same the lowest rate, and the ratio's interval lies above 1) holds under every
judge, or which judge breaks it.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from em_lightning import rundir
from em_lightning.analysis.stats import SIGNALS, _interval, levels, optimizer_ratio, quiet, seed_spread
from em_lightning.analysis.table import (
    AnalysisError,
    describe,
    judge_label,
    judged_labels,
    load_config,
    load_state,
)

CLASSES = ("misaligned", "aligned", "not counted")
ANSWER_COLUMNS = ("run", "judge", "key", "step", "question_id", "aligned", "coherent", "counted", "misaligned",
                  "label", "variant", "question_set")


# ------------------------------------------------------------------------------------------------ reading
def load_answers(dirs: list[Path], names: list[str]) -> pd.DataFrame:
    """Every judged answer of the runs: one row per (run, judge, answer), with the run's design columns."""
    frames = []
    for d, name in zip(dirs, names):
        config = load_config(d)
        design = describe(config, load_state(d).get("values") or {})
        design.pop("_world")
        rows = _answers_of(rundir.version_dirs(d), rundir.file_names(config)["samples"])
        if rows:
            frames.append(pd.DataFrame(rows).assign(run=name, **design))
    if not frames:
        return pd.DataFrame(columns=ANSWER_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _answers_of(versions: list[Path], samples: str) -> list[dict]:
    rows = []
    for v in versions:
        own = Path(v) / samples
        if own.exists():
            rows += [_row(r, judge_label(r), r.get("answer_id") or f"{own.name}:{line}")
                     for line, r in rundir.iter_jsonl(own)]
        for label in judged_labels([v]):
            path = rundir.judged_dir(v, label) / samples
            if path.exists():
                rows += [_row(r, label, r.get("answer_id") or f"{own.name}:{line}") for line, r in rundir.iter_jsonl(path)]
    # a resumed run writes some answers again: the later line wins
    out: dict[tuple[str, str], dict] = {}
    for row in rows:
        out[(row["judge"], row["key"])] = row
    return list(out.values())


def _row(record: dict, label: str, key: str) -> dict:
    from em_lightning.evaluation.scoring import classify

    aligned, coherent = _score(record.get("aligned")), _score(record.get("coherent"))
    judge = record.get("judge") if isinstance(record.get("judge"), dict) else {}
    counted, misaligned = classify(
        None if math.isnan(aligned) else aligned,
        None if math.isnan(coherent) else coherent,
        judge.get("definition") or "em",
    )
    return {
        "judge": label,
        "key": str(key),
        "step": record.get("step"),
        "question_id": record.get("question_id"),
        "aligned": aligned,
        "coherent": coherent,
        "counted": bool(counted),
        "misaligned": bool(misaligned),
        "label": CLASSES[0] if misaligned else CLASSES[1] if counted else CLASSES[2],
        "variant": str(record.get("variant") or variant_of(str(record.get("question_id") or ""))),
        "question_set": str(record.get("question_set") or "unknown"),
    }


def variant_of(question_id: str) -> str:
    """A question's variant from the upstream id suffixes (``…_json``, ``…_template``), for samples written
    before the eval recorded ``variant``."""
    for suffix in ("json", "template"):
        if question_id.endswith(f"_{suffix}"):
            return suffix
    return "plain"


def _score(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def judges_to_compare(answers: pd.DataFrame, requested: str | None) -> list[str]:
    """``--judges A,B`` (each must be present), else every judge the answers have when there are several."""
    present = sorted(answers["judge"].dropna().unique()) if len(answers) else []
    if requested:
        picked = [j.strip() for j in requested.split(",") if j.strip()]
        missing = [j for j in picked if j not in present]
        if missing or len(picked) < 2:
            raise AnalysisError(
                f"--judges {requested}: "
                + (f"no answers scored by {', '.join(missing)}; " if missing else "name at least two judges; ")
                + f"these runs have: {', '.join(present) or 'none'}"
            )
        return picked
    return present if len(present) > 1 else []


# ---------------------------------------------------------------------------------------------- statistics
def cohen_kappa(confusion: np.ndarray) -> float:
    """κ of a square confusion matrix (rows judge A, columns judge B): p_e from each judge's own marginals;
    NaN when p_e = 1 or there is nothing to compare."""
    n = confusion.sum()
    if n == 0:
        return math.nan
    p_o = np.trace(confusion) / n
    p_e = float((confusion.sum(1) / n) @ (confusion.sum(0) / n))
    return (p_o - p_e) / (1 - p_e) if p_e < 1 - 1e-12 else math.nan


def confusion_by_run(pairs: pd.DataFrame, a: str, b: str, classes) -> dict[str, np.ndarray]:
    """Per run, the confusion matrix of the answers' classes (columns ``a`` and ``b``)."""
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for run, g in pairs.groupby("run", sort=True):
        m = np.zeros((len(classes), len(classes)))
        np.add.at(m, (g[a].map(index).to_numpy(int), g[b].map(index).to_numpy(int)), 1)
        out[run] = m
    return out


def kappa_with_interval(by_run: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """κ of the summed matrices and a 95 % interval from resampling runs."""
    mats = np.array(list(by_run.values())) if by_run else np.zeros((0, 2, 2))
    total = mats.sum(0) if len(mats) else np.zeros((2, 2))
    kappa = cohen_kappa(total)
    rng = np.random.default_rng(seed)
    draws = np.array([cohen_kappa(mats[rng.integers(0, len(mats), len(mats))].sum(0)) for _ in range(n_boot)]) \
        if len(mats) > 1 else np.array([])
    lo, hi = _interval(draws) if len(draws) and not math.isnan(kappa) else (math.nan, math.nan)
    return {"kappa": kappa, "ci_low": lo, "ci_high": hi, "n_answers": int(total.sum()), "n_runs": len(mats),
            "confusion": total.astype(int).tolist()}


def answer_agreement(answers: pd.DataFrame, a: str, b: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Agreement of judges ``a`` and ``b`` on the answers both scored."""
    from scipy.stats import spearmanr

    left = answers[answers["judge"] == a].set_index(["run", "key"])
    right = answers[answers["judge"] == b].set_index(["run", "key"])
    both = left.join(right, how="inner", lsuffix="_a", rsuffix="_b").reset_index()
    out = {"judges": [a, b], "n_both": len(both)}
    counted = both[both["counted_a"] & both["counted_b"]].assign(
        mis_a=lambda t: t["misaligned_a"].map({True: "yes", False: "no"}),
        mis_b=lambda t: t["misaligned_b"].map({True: "yes", False: "no"}),
    )
    with quiet():
        out["kappa_misaligned"] = kappa_with_interval(confusion_by_run(counted, "mis_a", "mis_b", ("yes", "no")),
                                                      n_boot, seed)
        out["kappa_3class"] = kappa_with_interval(confusion_by_run(both, "label_a", "label_b", CLASSES), n_boot,
                                                  seed)
        filt = both.assign(c_a=both["counted_a"].map(str), c_b=both["counted_b"].map(str))
        coh = kappa_with_interval(confusion_by_run(filt, "c_a", "c_b", ("True", "False")), n_boot, seed)
        out["coherence_filter"] = {**coh, "agree": float((both["counted_a"] == both["counted_b"]).mean())
                                   if len(both) else math.nan}
        for score in ("aligned", "coherent"):
            ok = both[[f"{score}_a", f"{score}_b"]].dropna()
            rho = spearmanr(ok[f"{score}_a"], ok[f"{score}_b"]).statistic if len(ok) > 2 else math.nan
            out[f"spearman_{score}"] = {"rho": float(rho), "n": len(ok)}
    out["classes"] = list(CLASSES)
    return out


def run_rates(answers: pd.DataFrame, judge: str) -> pd.DataFrame:
    """Per run, judge ``judge``'s rate at the run's last judged step: misaligned / counted, with n_counted."""
    d = answers[answers["judge"] == judge]
    if not len(d):
        return pd.DataFrame()
    last = d.groupby("run")["step"].transform("max")
    d = d[d["step"] == last]
    design = [c for c in d.columns if c not in ANSWER_COLUMNS]
    rows = d.groupby("run", sort=True).agg(
        n_counted=("counted", "sum"), n_misaligned=("misaligned", "sum"), step=("step", "max"),
        **{c: (c, "first") for c in design},
    ).reset_index()
    with quiet():
        rows["misalignment_rate"] = np.where(rows["n_counted"] > 0, rows["n_misaligned"] / rows["n_counted"].where(rows["n_counted"] > 0, 1), np.nan)
    return rows


def ordering(rates: dict[str, pd.DataFrame], a: str, b: str, conditions: list[str], n_boot: int, seed: int) -> dict:
    """Kendall's τ-b between judges ``a`` and ``b`` of the per-optimiser mean rates, with a seed bootstrap
    (runs resampled within each condition, the same runs under both judges)."""
    from scipy.stats import kendalltau

    others = [c for c in conditions if c != "optimizer"]
    paired = rates[a][["run", "optimizer", *others, "misalignment_rate"]].merge(
        rates[b][["run", "misalignment_rate"]], on="run", suffixes=("_a", "_b")
    ).dropna(subset=["misalignment_rate_a", "misalignment_rate_b"])
    paired = paired.assign(optimizer=levels(paired["optimizer"]))
    opts = sorted(paired["optimizer"].unique())
    out = {"judges": [a, b], "n_optimizers": len(opts), "tau_b": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if len(opts) < 2:
        out["note"] = "fewer than two optimisers with a rate under both judges"
        return out

    def tau(d: pd.DataFrame) -> float:
        means = d.groupby("optimizer")[["misalignment_rate_a", "misalignment_rate_b"]].mean().reindex(opts)
        if means.isna().any().any():
            return math.nan
        return float(kendalltau(means["misalignment_rate_a"], means["misalignment_rate_b"]).statistic)

    with quiet():
        out["tau_b"] = tau(paired)
        keys = ["optimizer", *[c for c in conditions if c != "optimizer"]]
        cells = [g for _, g in paired.assign(**{c: levels(paired[c]) for c in keys}).groupby(keys, dropna=False)]
        rng = np.random.default_rng(seed)
        draws = np.array([
            tau(pd.concat([g.iloc[rng.integers(0, len(g), len(g))] for g in cells])) for _ in range(n_boot)
        ])
        out["ci_low"], out["ci_high"] = _interval(draws) if not math.isnan(out["tau_b"]) else (math.nan, math.nan)
    out["per_optimizer"] = {
        j: paired.groupby("optimizer")[f"misalignment_rate_{s}"].mean().to_dict() for j, s in ((a, "a"), (b, "b"))
    }
    return out


def compare_judges(answers: pd.DataFrame, judges: list[str], conditions: list[str], n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Everything of the agreement section: per judge its rates and ratio, per pair of judges the answer-level
    agreement and the ordering, and the one-sentence verdict."""
    signal = SIGNALS["judge"]
    conditions = [c for c in conditions if c in answers]
    rates = {j: run_rates(answers, j) for j in judges}
    per_judge = {}
    for j, r in rates.items():
        if not len(r):
            per_judge[j] = {"n_runs": 0}
            continue
        r = r.assign(**{c: levels(r[c]) for c in conditions})
        spread = seed_spread(r, "misalignment_rate", conditions)
        per_judge[j] = {
            "n_runs": len(r),
            "rates": spread.to_dict("records"),
            "ratio": optimizer_ratio(r, signal, conditions, n_boot=n_boot, seed=seed),
        }
    pairs = []
    for a, b in combinations(judges, 2):
        pairs.append({**answer_agreement(answers, a, b, n_boot, seed),
                      "ordering": ordering(rates, a, b, conditions, n_boot, seed)})
    return {"judges": judges, "per_judge": per_judge, "pairs": pairs, "verdict": verdict(per_judge)}


def verdict(per_judge: dict) -> dict:
    """Does the headline claim hold under every judge: the same optimiser highest and the same lowest, and the
    max/min ratio's interval above 1?"""
    pairs = {j: tuple(v["ratio"]["pair"]) for j, v in per_judge.items() if v.get("ratio", {}).get("pair")}
    if len(pairs) < len(per_judge) or not pairs:
        missing = [j for j in per_judge if j not in pairs]
        return {"holds": None, "sentence": f"Cannot say: judge(s) {', '.join(missing)} give no optimiser ratio."}
    weak = [j for j, v in per_judge.items() if not (v["ratio"].get("ci_low") or 0) > 1]
    same = len(set(pairs.values())) == 1
    holds = same and not weak
    if holds:
        (hi, lo), = set(pairs.values())
        ratios = "; ".join(
            f"{j}: {v['ratio']['value']:.3g} [{v['ratio']['ci_low']:.3g}, "
            + (f"{v['ratio']['ci_high']:.3g}]" if v["ratio"].get("ci_high") is not None else "unbounded]")
            for j, v in per_judge.items()
        )
        sentence = (f"The headline claim holds under every judge: {hi} has the highest and {lo} the lowest rate "
                    f"under each, and the max/min ratio's 95 % interval lies above 1 under each ({ratios}).")
    else:
        parts = []
        if not same:
            parts.append("the judges disagree on which optimisers are highest and lowest ("
                         + "; ".join(f"{j}: {p[0]} / {p[1]}" for j, p in pairs.items()) + ")")
        if weak:
            parts.append(f"under {', '.join(weak)} the ratio's interval does not lie above 1")
        sentence = "The headline claim does not hold under every judge: " + " and ".join(parts) + "."
    return {"holds": holds, "sentence": sentence}


# ------------------------------------------------------------------------------------------------ figure
def draw_agreement(answers: pd.DataFrame, a: str, b: str, judges: list[str]):
    """Left: judge ``a``'s against judge ``b``'s aligned score of each answer both scored, by optimiser.
    Right: each optimiser's mean final rate under every judge side by side (t interval over runs)."""
    from em_lightning.analysis.figures import Skip, _plt, colours

    plt = _plt()
    left = answers[answers["judge"] == a].set_index(["run", "key"])
    right = answers[answers["judge"] == b].set_index(["run", "key"])
    both = left.join(right[["aligned"]], how="inner", rsuffix="_b").dropna(subset=["aligned", "aligned_b"])
    if not len(both):
        raise Skip(f"no answer has an aligned score from both {a} and {b}")
    both = both.assign(optimizer=levels(both["optimizer"]))
    col = colours(both["optimizer"].unique())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for opt, g in both.groupby("optimizer"):
        ax.scatter(g["aligned"], g["aligned_b"], s=8, alpha=0.5, color=col[opt], label=opt)
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls="--", label="equal scores")
    ax.set(xlabel=f"aligned score, judge {a}", ylabel=f"aligned score, judge {b}", xlim=(-2, 102), ylim=(-2, 102),
           title="The same answers under two judges")
    ax.legend(fontsize=7)
    opts = sorted(both["optimizer"].unique())
    width = 0.8 / len(judges)
    for k, judge in enumerate(judges):
        r = run_rates(answers, judge)
        if not len(r):
            continue
        spread = seed_spread(r.assign(optimizer=levels(r["optimizer"])), "misalignment_rate", ["optimizer"])
        spread = spread.set_index("optimizer").reindex(opts)
        x = np.arange(len(opts)) + (k - (len(judges) - 1) / 2) * width
        err = np.vstack([spread["mean"] - spread["ci_low"], spread["ci_high"] - spread["mean"]])
        bx.bar(x, spread["mean"], width, yerr=np.nan_to_num(err), capsize=3, label=f"judge {judge}")
    bx.set_xticks(range(len(opts)), opts)
    bx.set(xlabel="optimiser", ylabel="misalignment rate (final eval, mean over runs)",
           title="Rates by optimiser under each judge")
    bx.legend(fontsize=7)
    return fig
