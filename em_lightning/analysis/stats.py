"""The paper's analysis and the referee's additions, on the tidy table.

* Loss predicts alignment: OLS of the alignment score and of the misalignment rate on ``log_train_loss`` at
  each run's final eval (R²); with optimiser as an additive categorical term (R²); the partial R² of optimiser
  given loss, (SSE_loss − SSE_loss+opt) / SSE_loss; the interaction model (one slope per optimiser) with its F
  test.
* A type-II ANOVA with the sweep's factors, their interactions with optimiser and log loss as a covariate. A
  term stays only if every cell of its factors holds ≥ 2 runs and the design matrix keeps full rank (and a
  residual degree of freedom); the others are listed with the reason. Partial η² = SS_term / (SS_term +
  SS_residual).
* Along training: the same R²s on the rows nearest each fraction of training.
* Seeds: per condition (every factor but the seed) the mean, the between-seed SD and a t interval; the ratio
  of the highest to the lowest optimiser rate (the pair fixed on the full data) with a bootstrap interval that
  resamples seeds within each condition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_CELL = 2


@dataclass(frozen=True)
class Signal:
    """The two responses of an alignment signal: a score (higher: more aligned for the judge) and a rate."""

    name: str
    score: str
    rate: str
    counts: str | None  # the rate's denominator per run (for the continuity correction), if it has one


SIGNALS = {
    "judge": Signal("judge", "aligned_mean", "misalignment_rate", "n_counted"),
    "probe": Signal("probe", "probe_log_odds", "probe_misaligned_prob", None),
}


def valid(table: pd.DataFrame, response: str) -> pd.DataFrame:
    ok = table[response].notna() & table["log_train_loss"].notna()
    if "eval_failed" in table:
        ok &= table["eval_failed"].fillna(False).astype(bool).eq(False) | table["eval_failed"].isna()
    return table[ok]


def final_rows(table: pd.DataFrame, response: str) -> pd.DataFrame:
    """Each run's last eval with a value of ``response`` (and a training loss)."""
    d = valid(table, response)
    return d.loc[d.groupby("run")["step"].idxmax()].reset_index(drop=True) if len(d) else d


def factors_of(table: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The design factors that vary in ``table`` (optimizer first)."""
    return [f for f in candidates if f in table and table[f].astype(str).nunique() > 1]


# ------------------------------------------------------------------------------------------------ OLS
def _ols(formula: str, d: pd.DataFrame):
    import warnings

    import statsmodels.formula.api as smf

    with warnings.catch_warnings():  # a saturated model (no residual df) has no scale: its SEs are NaN, fine
        warnings.simplefilter("ignore", RuntimeWarning)
        return smf.ols(formula, data=d).fit()


def _cat(d: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    d = d.copy()
    for c in cols:
        d[c] = d[c].astype(str)
    return d


def loss_models(final: pd.DataFrame, response: str) -> dict:
    """R² of loss, of loss + optimiser, the partial R² of optimiser, and the per-optimiser slopes."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a saturated fit's SEs are NaN, not an error
        return _loss_models(final, response)


def _loss_models(final: pd.DataFrame, response: str) -> dict:
    d = _cat(final.dropna(subset=[response, "log_train_loss"]), ["optimizer"])
    n, k = len(d), d["optimizer"].nunique() if len(d) else 0
    out = {
        "response": response,
        "n_runs": n,
        "n_optimizers": k,
        "r2_loss": math.nan,
        "r2_loss_optimizer": math.nan,
        "partial_r2_optimizer": math.nan,
        "partial_r2_loss": math.nan,
        "r2_optimizer": math.nan,
        "r2_interaction": math.nan,
        "interaction_F": math.nan,
        "interaction_p": math.nan,
        "slopes": {},
        "slope_loss": math.nan,
    }
    y = f"Q('{response}')"
    if n < 3 or d[response].std() == 0:
        out["note"] = "fewer than 3 runs with a value" if n < 3 else "the response is constant"
        return out
    m_loss = _ols(f"{y} ~ log_train_loss", d)
    out.update(r2_loss=m_loss.rsquared, slope_loss=m_loss.params["log_train_loss"])
    if k < 2 or n <= k + 1:
        out["note"] = "one optimiser only" if k < 2 else "too few runs for the optimiser terms"
        return out
    m_add = _ols(f"{y} ~ log_train_loss + C(optimizer)", d)
    m_opt = _ols(f"{y} ~ C(optimizer)", d)
    out.update(
        r2_loss_optimizer=m_add.rsquared,
        r2_optimizer=m_opt.rsquared,
        partial_r2_optimizer=_partial(m_loss.ssr, m_add.ssr),
        partial_r2_loss=_partial(m_opt.ssr, m_add.ssr),
    )
    if n >= 2 * k:
        m_int = _ols(f"{y} ~ C(optimizer) + C(optimizer):log_train_loss", d)
        out["r2_interaction"] = m_int.rsquared
        for name, value in m_int.params.items():
            if name.endswith(":log_train_loss"):
                level = name.split("[", 1)[1].split("]", 1)[0].removeprefix("T.")
                out["slopes"][level] = {"slope": value, "se": m_int.bse[name]}
        if m_int.df_resid > 0:
            from statsmodels.stats.anova import anova_lm

            test = anova_lm(m_add, m_int)
            out.update(interaction_F=test["F"].iloc[1], interaction_p=test["Pr(>F)"].iloc[1])
    return out


def _partial(sse_small: float, sse_big: float) -> float:
    return (sse_small - sse_big) / sse_small if sse_small > 1e-300 else math.nan


# ------------------------------------------------------------------------------------------------ ANOVA
def anova(final: pd.DataFrame, response: str, factors: list[str]) -> dict:
    """Type-II ANOVA with the terms the design supports; ``dropped`` says why each other term is out."""
    from patsy import dmatrix

    d = _cat(final.dropna(subset=[response, "log_train_loss"]), factors)
    if len(d) < 3 or d[response].std() == 0:
        return {
            "response": response,
            "n_runs": len(d),
            "terms": {},
            "dropped": {},
            "formula": None,
            "note": "fewer than 3 runs with a value" if len(d) < 3 else "the response is constant",
        }
    factors = [f for f in factors if d[f].nunique() > 1]  # a factor with one level here is no factor
    candidates: list[tuple[str, list[str]]] = []
    if d["log_train_loss"].nunique() > 1:
        candidates.append(("log_train_loss", []))
    candidates += [(f"C({_q(f)})", [f]) for f in factors]
    if "optimizer" in factors:
        candidates += [(f"C(optimizer):C({_q(f)})", ["optimizer", f]) for f in factors if f != "optimizer"]
        candidates.append(("C(optimizer):log_train_loss", ["optimizer"]))
    kept, dropped = [], {}
    for term, cols in candidates:
        lost = [c for c in cols if _label(f"C({_q(c)})") in dropped]
        reason = f"its main effect {lost[0]} is out" if lost else _empty_cell(d, cols)
        if reason is None:
            x = dmatrix(" + ".join(["1", *kept, term]), d, return_type="dataframe")
            rank = np.linalg.matrix_rank(x.to_numpy())
            if rank < x.shape[1]:
                reason = "confounded with the terms before it (the design matrix loses full rank)"
            elif len(d) - rank < 1:
                reason = "no residual degree of freedom left"
        if reason:
            dropped[_label(term)] = reason
        else:
            kept.append(term)
    out = {"response": response, "n_runs": len(d), "terms": {}, "dropped": dropped, "formula": None}
    if not kept:
        out["note"] = "no term the design supports"
        return out
    formula = f"Q('{response}') ~ " + " + ".join(kept)
    full = _ols(formula, d)
    out["terms"] = type2(
        d,
        response,
        kept,
        {t: set(cols) | ({"log_train_loss"} if "log_train_loss" in t else set()) for t, cols in candidates},
        full,
    )
    out.update(formula=formula, df_resid=full.df_resid)
    return out


def type2(d: pd.DataFrame, response: str, terms: list[str], factors: dict[str, set], full) -> dict:
    """Type-II sums of squares by nested fits: a term against every term that does not contain it (by its
    factors), so a main effect is tested beside the other main effects, not beside its own interactions.
    (statsmodels' anova_lm(typ=2) computes the same, but refuses a covariate × factor interaction.)"""
    from scipy import stats

    y = f"Q('{response}')"
    out = {}
    for term in terms:
        others = [t for t in terms if t != term and not factors[term] < factors[t]]
        without = _ols(f"{y} ~ " + (" + ".join(others) or "1"), d)
        with_ = _ols(f"{y} ~ " + " + ".join([*others, term]), d)
        ss, df = without.ssr - with_.ssr, with_.df_model - without.df_model
        f_value = (ss / df) / (full.ssr / full.df_resid)
        out[_label(term)] = {
            "df": df,
            "F": f_value,
            "p": float(stats.f.sf(f_value, df, full.df_resid)),
            "partial_eta2": ss / (ss + full.ssr),
        }
    return out


def _empty_cell(d: pd.DataFrame, cols: list[str]) -> str | None:
    """Why a term of factors ``cols`` cannot be estimated: a cell of the factors' levels with < 2 runs."""
    if not cols:
        return None
    counts = d.groupby(cols).size()
    levels = [sorted(d[c].unique()) for c in cols]
    full = (
        pd.MultiIndex.from_product(levels, names=cols) if len(cols) > 1 else pd.Index(levels[0], name=cols[0])
    )
    counts = counts.reindex(full, fill_value=0)
    if counts.min() >= MIN_CELL:
        return None
    cell = counts.idxmin()
    cell = ", ".join(f"{c}={v}" for c, v in zip(cols, cell if isinstance(cell, tuple) else (cell,)))
    return f"cell ({cell}) holds {int(counts.min())} run(s); every cell needs {MIN_CELL}"


def _q(name: str) -> str:
    return name if name.isidentifier() else f"Q('{name}')"


def _label(term: str) -> str:
    """``C(optimizer):C(model)`` → ``optimizer:model`` (the names in the report and the JSON)."""
    return term.replace("C(Q('", "").replace("')", "").replace("C(", "").replace(")", "")


# -------------------------------------------------------------------------------------------- along training
def along_training(table: pd.DataFrame, response: str, bins: int = 10) -> pd.DataFrame:
    """At each fraction j/bins of training, the runs' rows nearest it (within half a bin): R² of loss, and the
    partial R² of optimiser given loss and of loss given optimiser."""
    d = _cat(valid(table, response).dropna(subset=["frac_trained"]), ["optimizer"])
    rows = []
    for j in range(1, bins + 1):
        target = j / bins
        near = d.assign(dist=(d["frac_trained"] - target).abs())
        near = near[near["dist"] <= 0.5 / bins + 1e-9]
        if not len(near):
            continue
        near = near.loc[near.groupby("run")["dist"].idxmin()]
        fit = loss_models(near, response)
        rows.append(
            {
                "frac": target,
                "n_runs": fit["n_runs"],
                "r2_loss": fit["r2_loss"],
                "r2_loss_optimizer": fit["r2_loss_optimizer"],
                "partial_r2_optimizer": fit["partial_r2_optimizer"],
                "partial_r2_loss": fit["partial_r2_loss"],
            }
        )
    return pd.DataFrame(
        rows,
        columns=["frac", "n_runs", "r2_loss", "r2_loss_optimizer", "partial_r2_optimizer", "partial_r2_loss"],
    )


def trend(along: pd.DataFrame) -> dict:
    """First vs last fraction with both partial R²: does optimiser's grow while loss's shrinks?"""
    ok = along.dropna(subset=["partial_r2_optimizer", "partial_r2_loss"])
    if len(ok) < 2:
        return {"answer": None, "note": "fewer than two fractions with both partial R²"}
    first, last = ok.iloc[0], ok.iloc[-1]
    grows = last["partial_r2_optimizer"] > first["partial_r2_optimizer"]
    shrinks = last["partial_r2_loss"] < first["partial_r2_loss"]
    return {
        "answer": bool(grows and shrinks),
        "optimizer_grows": bool(grows),
        "loss_shrinks": bool(shrinks),
        "from_frac": first["frac"],
        "to_frac": last["frac"],
    }


# ------------------------------------------------------------------------------------------------ seeds
def seed_spread(final: pd.DataFrame, response: str, conditions: list[str]) -> pd.DataFrame:
    """Per condition: seeds, mean, between-seed SD and a 95 % t interval of the mean."""
    from scipy import stats

    d = final.dropna(subset=[response])
    if not len(d):
        return pd.DataFrame(columns=[*conditions, "n_seeds", "mean", "sd", "ci_low", "ci_high"])
    rows = []
    for key, g in d.groupby(conditions or (lambda _: "all"), sort=True):
        values = g[response].to_numpy(float)
        n, mean = len(values), float(values.mean())
        sd = float(values.std(ddof=1)) if n > 1 else math.nan
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
        key = key if isinstance(key, tuple) else (key,)
        rows.append(
            {
                **dict(zip(conditions, key)),
                "n_seeds": n,
                "mean": mean,
                "sd": sd,
                "ci_low": mean - half,
                "ci_high": mean + half,
            }
        )
    return pd.DataFrame(rows)


def corrected_rates(final: pd.DataFrame, signal: Signal) -> pd.Series:
    """Per run, the rate with a continuity correction where it is a count: (k + ½) / (n + 1), k = rate × n
    misaligned of n counted answers; a rate without counts (the probe's probability) as it is."""
    rate = final[signal.rate].astype(float)
    if signal.counts and signal.counts in final:
        n = final[signal.counts].astype(float)
        k = (rate * n).round()
        cc = (k + 0.5) / (n + 1)
        return cc.where(n.notna() & (n > 0), rate)
    return rate


def optimizer_ratio(
    final: pd.DataFrame, signal: Signal, conditions: list[str], n_boot: int = 2000, seed: int = 0
) -> dict:
    """max/min over optimisers of their mean corrected rate; the pair is fixed on the full data, and the
    bootstrap resamples the runs (seeds) within each condition."""
    d = final.dropna(subset=[signal.rate]).copy()
    out = {
        "value": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "pair": None,
        "rates": {},
        "n_boot": n_boot,
        "correction": (
            "(k + 0.5) / (n + 1) per run, k misaligned of n counted answers"
            if signal.counts
            else "none (a probability, never 0)"
        ),
    }
    if not len(d) or d["optimizer"].nunique() < 2:
        out["note"] = "fewer than two optimisers with a rate"
        return out
    d["_rate"] = corrected_rates(d, signal)
    d["optimizer"] = d["optimizer"].astype(str)
    rates = d.groupby("optimizer")["_rate"].mean()
    hi, lo = rates.idxmax(), rates.idxmin()
    out.update(
        value=rates[hi] / rates[lo] if rates[lo] > 0 else math.inf, pair=[hi, lo], rates=rates.to_dict()
    )
    keys = ["optimizer", *[c for c in conditions if c != "optimizer"]]
    groups = list(d.groupby(keys))
    cells = [g["_rate"].to_numpy(float) for _, g in groups]
    owners = [g["optimizer"].iloc[0] for _, g in groups]
    if all(len(c) < 2 for c in cells):
        out["note"] = "no condition has two seeds: no bootstrap interval"
        return out
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    for b in range(n_boot):
        sums: dict[str, list[float]] = {hi: [0.0, 0], lo: [0.0, 0]}
        for owner, cell in zip(owners, cells):
            if owner in sums:
                sample = cell[rng.integers(0, len(cell), len(cell))]
                sums[owner][0] += sample.sum()
                sums[owner][1] += len(sample)
        ratios[b] = (sums[hi][0] / sums[hi][1]) / (sums[lo][0] / sums[lo][1])
    out.update(ci_low=float(np.percentile(ratios, 2.5)), ci_high=float(np.percentile(ratios, 97.5)))
    return out
