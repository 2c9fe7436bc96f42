"""The paper's analysis and the referee's additions, on the tidy table.

* Loss predicts alignment: OLS of the alignment score and of the misalignment rate on ``log_train_loss`` at
  each run's final eval (R²); with optimiser as an additive categorical term (R²); the partial R² of optimiser
  given loss, (SSE_loss − SSE_loss+opt) / SSE_loss; one slope per optimiser (its own OLS line, only where the
  optimiser has ≥ 3 runs with distinct losses) and the interaction model with its F test. Every model reports
  its residual degrees of freedom; below :data:`RESID_DF_FLOOR` it is flagged saturated and its p-values are
  withheld (NaN): with so few residual df the error variance is a guess, and a p-value of it is no finding.
* A type-II ANOVA with the sweep's factors, their interactions with optimiser and log loss as a covariate. A
  term stays only if every cell of its factors holds ≥ 2 runs and the design matrix keeps full rank (and a
  residual degree of freedom); the others are listed with the reason (and what they are confounded with).
  Sums of squares, the residual row, partial η² = SS_term / (SS_term + SS_residual), and each term's share of
  the explained sum of squares (the referee's question (a): optimiser against its interactions).
* Along training: each run's eval in exactly one fraction bin ((j−1)/bins, j/bins], the same R²s per bin with a
  bootstrap over runs, and a yes / no / inconclusive verdict on "optimiser's partial R² grows while loss's
  shrinks" from the bootstrap interval of the change between the first and last bin.
* Seeds: per condition (every factor but the seed) the mean, the between-seed SD and a t interval; the ratio
  of the highest to the lowest optimiser rate (the pair fixed on the full data) with a bootstrap interval that
  resamples seeds within each condition; a zero lowest rate makes it a lower bound.

A factor with missing values (two sweeps analysed together, an axis only one of them has) gets the explicit
level ``NA``, which every grouping keeps.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from em_lightning.analysis.table import AnalysisError

MIN_CELL = 2
RESID_DF_FLOOR = 5  # below this many residual df a model is flagged saturated and its p-values are withheld
MIN_SLOPE_RUNS = 3  # a per-optimiser slope needs this many runs with distinct losses (2 points make any line)
NA_LEVEL = "NA"


@dataclass(frozen=True)
class Signal:
    """The two responses of an alignment signal: a score (higher: more aligned for the judge) and a rate."""

    name: str
    score: str
    rate: str
    counts: str | None  # the rate's denominator per run (for the continuity correction), if it has one
    is_rate: bool = True  # False: the "rate" column is a second score (no max/min ratio of it)


SIGNALS = {  # in the order --signal auto prefers them
    "judge": Signal("judge", "aligned_mean", "misalignment_rate", "n_counted"),
    "probe": Signal("probe", "probe_log_odds", "probe_misaligned_prob", None),
    # judge-free, representation level: the activation shift along the misalignment direction (over the
    # reference answers' tokens, and at the last prompt token)
    "direction": Signal("direction", "direction_shift_answers", "direction_shift", None, is_rate=False),
}


def signals_present(table: pd.DataFrame) -> list[str]:
    """The signals some run of ``table`` has a value of, in :data:`SIGNALS` order."""
    return [
        name
        for name, sig in SIGNALS.items()
        if any(c in table and table[c].notna().any() for c in (sig.score, sig.rate))
    ]


def choose_signal(table: pd.DataFrame, requested: str = "auto") -> tuple[Signal, str]:
    """The signal to analyse and a phrase saying why: ``auto`` takes the judge where the runs have one, else
    the probe (the order of :data:`SIGNALS`); a named signal no run has is an error naming the ones present."""
    present = signals_present(table)
    if requested == "auto":
        if not present:
            raise AnalysisError(
                f"no run has a value of any alignment signal ({', '.join(SIGNALS)}): nothing to analyse"
            )
        skipped = [n for n in SIGNALS if n not in present][: list(SIGNALS).index(present[0])]
        why = f"no run has a {' or '.join(skipped)} value; " if skipped else ""
        return SIGNALS[present[0]], f"auto: {why}the runs have {', '.join(present)}"
    if requested not in SIGNALS:
        raise AnalysisError(f"--signal {requested}: unknown signal (one of auto, {', '.join(SIGNALS)})")
    if requested not in present:
        raise AnalysisError(
            f"--signal {requested}: no run has a {requested} value; these runs have: {', '.join(present) or 'none'}"
        )
    return SIGNALS[requested], f"--signal {requested}"


def levels(values: pd.Series) -> pd.Series:
    """A factor's values as level names; a missing value is the level ``NA`` (kept by every groupby)."""
    return values.map(lambda v: NA_LEVEL if pd.isna(v) else str(v)).astype(object)


def as_levels(table: pd.DataFrame, cols) -> pd.DataFrame:
    d = table.copy()
    for c in cols:
        if c in d:
            d[c] = levels(d[c])
    return d


_cat = as_levels  # the fits' name for it


def valid(table: pd.DataFrame, response: str) -> pd.DataFrame:
    ok = table[response].notna() & table["log_train_loss"].notna()
    if "eval_failed" in table:
        failed = table["eval_failed"].map(lambda v: bool(v) if not pd.isna(v) else False).astype(bool)
        ok &= ~failed
    return table[ok]


def final_rows(table: pd.DataFrame, response: str) -> pd.DataFrame:
    """Each run's last eval with a value of ``response`` (and a training loss)."""
    d = valid(table, response)
    return d.loc[d.groupby("run")["step"].idxmax()].reset_index(drop=True) if len(d) else d


def factors_of(table: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The design factors that vary in ``table`` (optimizer first); a missing value counts as a level."""
    return [f for f in candidates if f in table and levels(table[f]).nunique() > 1]


@contextlib.contextmanager
def quiet():
    """Fits of small designs divide by zero residual df on purpose (and say so in their output): no solver
    warning reaches the user's terminal."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ OLS
def _ols(formula: str, d: pd.DataFrame):
    import statsmodels.formula.api as smf

    with quiet():  # a saturated model (no residual df) has no scale: its SEs are NaN, said in the output
        return smf.ols(formula, data=d).fit()


def _saturated(df_resid: float) -> bool:
    return bool(df_resid < RESID_DF_FLOOR)


def loss_models(final: pd.DataFrame, response: str) -> dict:
    """R² of loss, of loss + optimiser, the partial R² of optimiser, the per-optimiser slopes and the
    interaction model; each model's residual df and whether it is saturated (then its p-values are NaN)."""
    with quiet():
        return _loss_models(final, response)


def _loss_models(final: pd.DataFrame, response: str) -> dict:
    d = as_levels(final.dropna(subset=[response, "log_train_loss"]), ["optimizer"])
    n, k = len(d), d["optimizer"].nunique() if len(d) else 0
    out = {
        "response": response,
        "n_runs": n,
        "n_optimizers": k,
        "runs_per_optimizer": {str(o): int(c) for o, c in d.groupby("optimizer").size().items()} if n else {},
        "r2_loss": math.nan,
        "r2_loss_optimizer": math.nan,
        "partial_r2_optimizer": math.nan,
        "partial_r2_loss": math.nan,
        "r2_optimizer": math.nan,
        "r2_interaction": math.nan,
        "interaction_F": math.nan,
        "interaction_p": math.nan,
        "slope_loss": math.nan,
        "p_loss": math.nan,
        "slopes": {},
        "df_resid": {},
        "saturated": {},
        "notes": {},
        "resid_df_floor": RESID_DF_FLOOR,
    }
    y = f"Q('{response}')"
    if n < 3 or d[response].std() == 0:
        out["note"] = "fewer than 3 runs with a value" if n < 3 else "the response is constant"
        return out
    m_loss = _ols(f"{y} ~ log_train_loss", d)
    _record(out, "loss", m_loss)
    out.update(r2_loss=m_loss.rsquared, slope_loss=m_loss.params["log_train_loss"])
    out["p_loss"] = math.nan if out["saturated"]["loss"] else float(m_loss.pvalues["log_train_loss"])
    out["slopes"] = {str(o): slope_of(g, response) for o, g in d.groupby("optimizer")}
    if k < 2 or n <= k + 1:
        out["note"] = "one optimiser only" if k < 2 else "too few runs for the optimiser terms"
        return out
    m_add = _ols(f"{y} ~ log_train_loss + C(optimizer)", d)
    m_opt = _ols(f"{y} ~ C(optimizer)", d)
    _record(out, "loss_optimizer", m_add)
    _record(out, "optimizer", m_opt)
    out.update(
        r2_loss_optimizer=m_add.rsquared,
        r2_optimizer=m_opt.rsquared,
        partial_r2_optimizer=_partial(m_loss.ssr, m_add.ssr, m_loss.centered_tss),
        partial_r2_loss=_partial(m_opt.ssr, m_add.ssr, m_loss.centered_tss),
    )
    unestimable = [o for o, v in out["slopes"].items() if v.get("reason")]
    if unestimable:
        out["notes"]["interaction"] = (
            f"no interaction model: it needs a slope for every optimiser, and {', '.join(unestimable)} "
            f"{'has' if len(unestimable) == 1 else 'have'} fewer than {MIN_SLOPE_RUNS} runs with distinct losses"
        )
        return out
    m_int = _ols(f"{y} ~ C(optimizer) + C(optimizer):log_train_loss", d)
    _record(out, "interaction", m_int)
    out["r2_interaction"] = m_int.rsquared
    if m_int.df_resid > 0:
        from statsmodels.stats.anova import anova_lm

        test = anova_lm(m_add, m_int)
        out["interaction_F"] = test["F"].iloc[1]
        out["interaction_p"] = math.nan if out["saturated"]["interaction"] else test["Pr(>F)"].iloc[1]
    return out


def _record(out: dict, name: str, model) -> None:
    out["df_resid"][name] = float(model.df_resid)
    out["saturated"][name] = _saturated(model.df_resid)


def slope_of(g: pd.DataFrame, response: str) -> dict:
    """One optimiser's own OLS line of ``response`` on log loss; NaN with the reason when its runs cannot give
    one (fewer than :data:`MIN_SLOPE_RUNS` runs with distinct losses: two points fit any line exactly)."""
    n, distinct = len(g), int(g["log_train_loss"].nunique())
    out = {"slope": math.nan, "se": math.nan, "p": math.nan, "r2": math.nan, "n_runs": n, "df_resid": max(n - 2, 0)}
    if distinct < MIN_SLOPE_RUNS:
        what = f"{n} run{'s' * (n != 1)}" if n < MIN_SLOPE_RUNS else f"{distinct} distinct losses over {n} runs"
        out["reason"] = f"{what}; a slope needs ≥ {MIN_SLOPE_RUNS} runs with distinct losses"
        return out
    m = _ols(f"Q('{response}') ~ log_train_loss", g)
    out.update(slope=float(m.params["log_train_loss"]), se=float(m.bse["log_train_loss"]), r2=float(m.rsquared))
    out["saturated"] = _saturated(m.df_resid)
    out["p"] = math.nan if out["saturated"] else float(m.pvalues["log_train_loss"])
    return out


def _partial(sse_small: float, sse_big: float, sst: float | None = None) -> float:
    """(SSE_small − SSE_big) / SSE_small; NaN when the smaller model already fits (almost) exactly — then the
    ratio is rounding noise over rounding noise — and never below 0 (nested models: rounding only)."""
    floor = 1e-10 * sst if sst else 1e-300
    return max(0.0, (sse_small - sse_big) / sse_small) if sse_small > floor else math.nan


# ------------------------------------------------------------------------------------------------ ANOVA
def anova(final: pd.DataFrame, response: str, factors: list[str]) -> dict:
    """Type-II ANOVA with the terms the design supports; ``dropped`` says why each other term is out."""
    with quiet():
        return _anova(final, response, factors)


def _anova(final: pd.DataFrame, response: str, factors: list[str]) -> dict:
    d = as_levels(final.dropna(subset=[response, "log_train_loss"]), factors)
    out = {"response": response, "n_runs": len(d), "terms": {}, "dropped": {}, "formula": None,
           "residual": None, "saturated": None, "question_a": None}
    if len(d) < 3 or d[response].std() == 0:
        out["note"] = "fewer than 3 runs with a value" if len(d) < 3 else "the response is constant"
        return out
    factors = [f for f in factors if d[f].nunique() > 1]  # a factor with one level here is no factor
    candidates: list[tuple[str, list[str]]] = []
    if d["log_train_loss"].nunique() > 1:
        candidates.append(("log_train_loss", []))
    candidates += [(f"C({_q(f)})", [f]) for f in factors]
    if "optimizer" in factors:
        candidates += [(f"C(optimizer):C({_q(f)})", ["optimizer", f]) for f in factors if f != "optimizer"]
        candidates.append(("C(optimizer):log_train_loss", ["optimizer"]))
    kept, dropped = _select_terms(d, candidates)
    out["dropped"] = dropped
    if not kept:
        out["note"] = "no term the design supports"
        return out
    formula = f"Q('{response}') ~ " + " + ".join(kept)
    full = _ols(formula, d)
    saturated = _saturated(full.df_resid)
    out["terms"] = type2(
        d,
        response,
        kept,
        {t: set(cols) | ({"log_train_loss"} if "log_train_loss" in t else set()) for t, cols in candidates},
        full,
    )
    explained = full.centered_tss - full.ssr
    for term in out["terms"].values():
        term["share_explained"] = term["ss"] / explained if explained > 0 else math.nan
        if saturated:
            term["p"] = math.nan
    out.update(
        formula=formula,
        df_resid=float(full.df_resid),
        residual={"df": float(full.df_resid), "ss": float(full.ssr)},
        explained_ss=float(explained),
        saturated=saturated,
    )
    out["question_a"] = optimizer_share(out["terms"], response, saturated, dropped)
    return out


def _select_terms(d: pd.DataFrame, candidates: list[tuple[str, list[str]]]) -> tuple[list[str], dict]:
    """Terms in order, each kept if its cells are filled and the design keeps full rank with it; the reason
    (and, for a rank loss, the kept terms it is confounded with) for each one dropped."""
    kept, dropped = [], {}
    for term, cols in candidates:
        lost = [c for c in cols if _label(f"C({_q(c)})") in dropped]
        reason = f"its main effect {lost[0]} is out" if lost else _empty_cell(d, cols)
        if reason is None:
            if _deficient(d, kept, term):
                with_ = _confounders(d, kept, term)
                reason = (
                    f"confounded with {', '.join(_label(t) for t in with_) if with_ else 'the intercept'} "
                    "(the design matrix loses full rank)"
                )
            elif len(d) - _rank(d, [*kept, term]) < 1:
                reason = "no residual degree of freedom left"
        if reason:
            dropped[_label(term)] = reason
        else:
            kept.append(term)
    return kept, dropped


def _design(d: pd.DataFrame, terms: list[str]) -> np.ndarray:
    from patsy import dmatrix

    return dmatrix(" + ".join(["1", *terms]), d, return_type="dataframe").to_numpy()


def _rank(d: pd.DataFrame, terms: list[str]) -> int:
    return int(np.linalg.matrix_rank(_design(d, terms)))


def _deficient(d: pd.DataFrame, terms: list[str], term: str) -> bool:
    x = _design(d, [*terms, term])
    return int(np.linalg.matrix_rank(x)) < x.shape[1]


def _confounders(d: pd.DataFrame, kept: list[str], term: str) -> list[str]:
    """A smallest-by-removal set of the kept terms that, with the intercept, leaves ``term`` rank-deficient."""
    needed = list(kept)
    for t in list(kept):
        trial = [x for x in needed if x != t]
        if _deficient(d, trial, term):
            needed = trial
    return needed


def optimizer_share(terms: dict, response: str, saturated: bool, dropped: dict) -> dict:
    """The referee's question (a): how much of what the model explains is optimiser's main effect, and how much
    its interactions with the other factors (and loss) — with a one-sentence answer."""
    if "optimizer" not in terms:
        why = dropped.get("optimizer", "optimiser does not vary in these runs")
        return {"optimizer_share": math.nan, "interaction_share": math.nan,
                "answer": f"Cannot say for {response}: the optimiser is not in the model ({why})."}
    main = terms["optimizer"]["share_explained"]
    inter = {t: v["share_explained"] for t, v in terms.items() if t.startswith("optimizer:")}
    total = float(sum(inter.values()))
    if not inter:  # nothing to weigh the main effect against
        out_of = [t for t in dropped if t.startswith("optimizer:")]
        return {
            "optimizer_share": main, "interaction_share": math.nan, "interactions": {},
            "answer": (
                f"For {response}, the optimiser's main effect accounts for {main:.0%} of the explained sum of "
                "squares, but no interaction of optimiser could be estimated in this design"
                + (f" ({', '.join(out_of)} dropped)" if out_of else "")
                + ", so whether its effect depends on the other factors cannot be said."
            ),
        }
    kind = (
        "mostly a main effect (the same shift whatever the other factors)"
        if main >= total
        else "mostly an interaction (it depends on the other factors)"
    )
    answer = (
        f"For {response}, the optimiser's main effect accounts for {main:.0%} of the explained sum of squares "
        f"and its interactions ({', '.join(inter) or 'none in the model'}) for {total:.0%}: the optimiser "
        f"effect is {kind}"
        + (" — descriptive only, the model is saturated." if saturated else ".")
    )
    return {"optimizer_share": main, "interaction_share": total, "interactions": inter, "answer": answer}


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
        with quiet():
            f_value = (ss / df) / (full.ssr / full.df_resid) if full.df_resid > 0 else math.nan
            p = float(stats.f.sf(f_value, df, full.df_resid)) if full.df_resid > 0 else math.nan
        out[_label(term)] = {"df": df, "ss": float(ss), "F": f_value, "p": p, "partial_eta2": ss / (ss + full.ssr)}
    return out


def _empty_cell(d: pd.DataFrame, cols: list[str]) -> str | None:
    """Why a term of factors ``cols`` cannot be estimated: a cell of the factors' levels with < 2 runs."""
    if not cols:
        return None
    counts = d.groupby(cols, dropna=False).size()
    lv = [sorted(d[c].unique()) for c in cols]
    full = pd.MultiIndex.from_product(lv, names=cols) if len(cols) > 1 else pd.Index(lv[0], name=cols[0])
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
ALONG = ("r2_loss", "r2_loss_optimizer", "partial_r2_optimizer", "partial_r2_loss")


def binned(table: pd.DataFrame, response: str, bins: int) -> pd.DataFrame:
    """Each run's evals with a value, each in exactly one fraction bin j — the evals with (j−1)/bins < frac ≤
    j/bins — and of a run's evals in one bin only its last (so a run counts once per bin)."""
    d = as_levels(valid(table, response).dropna(subset=["frac_trained"]), ["optimizer"])
    d = d[d["frac_trained"] > 0]
    b = np.clip(np.ceil(d["frac_trained"].to_numpy(float) * bins - 1e-9), 1, bins).astype(int)
    d = d.assign(bin=b).sort_values(["run", "bin", "frac_trained"])
    return d.groupby(["run", "bin"], sort=False).tail(1).reset_index(drop=True)


def fast_r2s(y: np.ndarray, x: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """The along-training R²s by least squares (the bootstrap's inner loop; equals :func:`loss_models`)."""
    out = dict.fromkeys(ALONG, math.nan)
    n = len(y)
    sst = float(((y - y.mean()) ** 2).sum()) if n else 0.0
    if n < 3 or sst <= 1e-300:
        return out
    ones = np.ones(n)
    sse_loss = _sse(y, np.column_stack([ones, x]))
    out["r2_loss"] = 1 - sse_loss / sst
    lv = np.unique(groups)
    if len(lv) < 2 or n <= len(lv) + 1:
        return out
    dummies = np.column_stack([(groups == g).astype(float) for g in lv[1:]])
    sse_add = _sse(y, np.column_stack([ones, x, dummies]))
    sse_opt = _sse(y, np.column_stack([ones, dummies]))
    out.update(
        r2_loss_optimizer=1 - sse_add / sst,
        partial_r2_optimizer=_partial(sse_loss, sse_add, sst),
        partial_r2_loss=_partial(sse_opt, sse_add, sst),
    )
    return out


def _sse(y: np.ndarray, x: np.ndarray) -> float:
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    r = y - x @ beta
    return float(r @ r)


def _arrays(rows: pd.DataFrame, response: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes, _ = pd.factorize(rows["optimizer"])
    return rows[response].to_numpy(float), rows["log_train_loss"].to_numpy(float), codes


def along_training(
    table: pd.DataFrame, response: str, bins: int = 10, n_boot: int = 500, seed: int = 0
) -> pd.DataFrame:
    """Per fraction bin (labelled by its upper edge): runs, the R²s, and 95 % bootstrap intervals over runs (a
    run has one row per bin, so resampling the bin's rows resamples its runs)."""
    d = binned(table, response, bins)
    cols = ["frac", "n_runs", *[c for a in ALONG for c in (a, f"{a}_ci_low", f"{a}_ci_high")]]
    rng = np.random.default_rng(seed)
    rows = []
    with quiet():
        for j, g in d.groupby("bin", sort=True):
            y, x, codes = _arrays(g, response)
            fit = fast_r2s(y, x, codes)
            row = {"frac": j / bins, "n_runs": len(g), **fit}
            n = len(g)
            draws = np.array(
                [list(fast_r2s(y[i], x[i], codes[i]).values()) for i in rng.integers(0, n, (n_boot, n))]
            ).reshape(-1, len(ALONG))
            for k, key in enumerate(ALONG):
                lo, hi = _interval(draws[:, k]) if n_boot and not math.isnan(fit[key]) else (math.nan, math.nan)
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = lo, hi
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


FEW_SEEDS = 5


def few_seeds_caveat(counts) -> str | None:
    """The warning a table of seed-bootstrap intervals needs when one rests on fewer than ``FEW_SEEDS`` seeds (or
    seed pairs) a side: n seeds have at most C(2n−1, n) distinct resamples (10 for 3, 3 for 2), so the percentile
    interval is too narrow. ``counts``: the seeds a side behind each row; rows of 0 or 1 have no interval and do
    not count. None when every interval has enough."""
    n = min((c for c in counts if c > 1), default=FEW_SEEDS)
    if n >= FEW_SEEDS:
        return None
    return (f"Only {n} seed(s) a side under some interval: a percentile bootstrap over so few has few distinct "
            "resamples and tends to be too narrow; read an interval that only just excludes 0 as weak evidence.")


def _interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    ok = draws[np.isfinite(draws)]
    if len(ok) < 0.9 * len(draws) or not len(ok):  # most resamples could not fit: no honest interval
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    return float(np.percentile(ok, tail)), float(np.percentile(ok, 100 - tail))


def trend(table: pd.DataFrame, response: str, bins: int = 10, n_boot: int = 500, seed: int = 0) -> dict:
    """Does optimiser's partial R² grow while loss's shrinks, from the first to the last bin with both? The
    change of each with a 95 % interval from one bootstrap over runs (a run's rows in both bins go together):
    ``yes`` when both intervals exclude 0 the predicted way, ``no`` when either excludes it the other way,
    else ``inconclusive``."""
    d = binned(table, response, bins)
    with quiet():
        fits = {j: fast_r2s(*_arrays(g, response)) for j, g in d.groupby("bin", sort=True)}
    keys = ("partial_r2_optimizer", "partial_r2_loss")
    ok = [j for j, f in fits.items() if not any(math.isnan(f[k]) for k in keys)]
    if len(ok) < 2:
        return {"answer": None, "note": "fewer than two fractions of training with both partial R²"}
    first, last = ok[0], ok[-1]
    change = {k: fits[last][k] - fits[first][k] for k in keys}
    runs = np.array(sorted(d.loc[d["bin"].isin([first, last]), "run"].unique()))
    parts = {j: d[d["bin"] == j].set_index("run") for j in (first, last)}
    data = {j: _arrays(parts[j], response) for j in parts}
    where = {j: parts[j].index.get_indexer(runs) for j in parts}  # each run's row in the bin, or -1
    rng = np.random.default_rng(seed)
    draws = np.full((n_boot, 2), math.nan)
    with quiet():
        for b, sample in enumerate(rng.integers(0, len(runs), (n_boot, len(runs)))):
            fit = {}
            for j in (first, last):
                rows = where[j][sample]
                rows = rows[rows >= 0]
                y, x, codes = data[j]
                fit[j] = fast_r2s(y[rows], x[rows], codes[rows])
            draws[b] = [fit[last][k] - fit[first][k] for k in keys]
    opt_ci, loss_ci = _interval(draws[:, 0]), _interval(draws[:, 1])
    if any(math.isnan(v) for v in (*opt_ci, *loss_ci)):
        answer = "inconclusive"
    elif opt_ci[0] > 0 and loss_ci[1] < 0:
        answer = "yes"
    elif opt_ci[1] < 0 or loss_ci[0] > 0:
        answer = "no"
    else:
        answer = "inconclusive"
    return {
        "answer": answer,
        "from_frac": first / bins,
        "to_frac": last / bins,
        "optimizer_change": change["partial_r2_optimizer"],
        "optimizer_change_ci": list(opt_ci),
        "loss_change": change["partial_r2_loss"],
        "loss_change_ci": list(loss_ci),
        "n_boot": n_boot,
    }


# ------------------------------------------------------------------------------------------------ seeds
def seed_spread(final: pd.DataFrame, response: str, conditions: list[str]) -> pd.DataFrame:
    """Per condition: seeds, mean, between-seed SD and a 95 % t interval of the mean."""
    from scipy import stats

    d = as_levels(final.dropna(subset=[response]), conditions)
    if not len(d):
        return pd.DataFrame(columns=[*conditions, "n_seeds", "mean", "sd", "ci_low", "ci_high"])
    rows = []
    for key, g in d.groupby(conditions or (lambda _: "all"), sort=True, dropna=False):
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
    bootstrap resamples the runs (seeds) within each condition. A lowest rate of 0 in every run makes the
    ratio a lower bound (said in ``note``; ``bound`` from the one-sided 95 % upper bound of that rate where
    answer counts exist, else no value at all)."""
    d = as_levels(final.dropna(subset=[signal.rate]), ["optimizer", *conditions])
    out = {
        "value": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "pair": None,
        "rates": {},
        "n_boot": n_boot,
        "lower_bound": False,
        "bound": None,
        "fixed_cells": [],
        "correction": (
            "(k + 0.5) / (n + 1) per run, k misaligned of n counted answers"
            if signal.counts and signal.counts in d and d[signal.counts].notna().any()
            else "none (no answer counts in the table)"
            if signal.counts
            else "none (a probability, never 0)"
        ),
    }
    if not signal.is_rate:
        out["note"] = f"{signal.rate} is a shift, not a rate: no max/min ratio"
        return out
    if not len(d) or d["optimizer"].nunique() < 2:
        out["note"] = "fewer than two optimisers with a rate"
        return out
    d["_rate"] = corrected_rates(d, signal)
    rates = d.groupby("optimizer")["_rate"].mean()
    hi, lo = rates.idxmax(), rates.idxmin()
    out.update(pair=[hi, lo], rates=rates.to_dict())
    notes = []
    keys = ["optimizer", *[c for c in conditions if c != "optimizer"]]
    groups = list(d.groupby(keys, dropna=False))
    cells = [g["_rate"].to_numpy(float) for _, g in groups]
    owners = [g["optimizer"].iloc[0] for _, g in groups]
    out["fixed_cells"] = [
        ", ".join(f"{k}={v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,)))
        for (key, _), cell in zip(groups, cells)
        if len(cell) < 2
    ]
    if out["fixed_cells"]:
        notes.append(f"held fixed in the bootstrap (one seed): {'; '.join(out['fixed_cells'])}")
    raw = d.groupby("optimizer")[signal.rate].mean()
    if raw[lo] == 0:
        out["lower_bound"] = True
        bound = _zero_rate_bound(d[d["optimizer"] == lo], signal, raw[hi])
        if bound is None:  # nothing bounds a zero rate from above: no ratio, no interval
            out.update(value=None, ci_low=None, ci_high=None)
            notes.insert(0, (
                f"{lo}'s rate is 0 in all {int((d['optimizer'] == lo).sum())} runs and the table has no answer "
                f"counts (`{signal.counts or 'n_counted'}`): the ratio {hi}/{lo} is unbounded, so neither a "
                "value nor an interval is given (with counts it would be reported as a lower bound)"
            ))
            out["note"] = "; ".join(notes)
            return out
        n_answers, out["bound"] = bound
        notes.append(
            f"no run of {lo} has a misaligned answer (0 of {n_answers} counted): the ratio is at least "
            f"{out['bound']:.3g} ({hi}'s mean rate over the one-sided 95 % upper bound 1 − 0.05^(1/{n_answers}) "
            f"of {lo}'s); the value shown uses the continuity correction and is itself a lower bound"
        )
    out["value"] = rates[hi] / rates[lo]
    if all(len(c) < 2 for c in cells):
        notes.append("no condition has two seeds: no bootstrap interval")
        out["note"] = "; ".join(notes)
        return out
    ratios = _bootstrap_ratio(cells, owners, hi, lo, n_boot, seed)
    zero = ~np.isfinite(ratios)
    if zero.any():  # a resample whose lowest rate is 0: the interval's upper end is unbounded
        notes.append(f"{int(zero.sum())} of {n_boot} resamples had a zero {lo} rate: the upper end is unbounded")
        low = np.quantile(np.where(zero, np.inf, ratios), 0.025, method="inverted_cdf")
        out.update(ci_low=float(low) if math.isfinite(low) else None, ci_high=None)
    else:
        out.update(ci_low=float(np.percentile(ratios, 2.5)), ci_high=float(np.percentile(ratios, 97.5)))
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _zero_rate_bound(runs: pd.DataFrame, signal: Signal, top_rate: float) -> tuple[int, float] | None:
    """(answers counted, top rate / one-sided 95 % upper bound of a 0-of-N rate), or None without counts."""
    if not signal.counts or signal.counts not in runs:
        return None
    n = runs[signal.counts].astype(float)
    if n.isna().any() or (n <= 0).any():
        return None
    total = int(n.sum())
    upper = 1 - 0.05 ** (1 / total)  # Clopper-Pearson for 0 of N, one-sided 95 %
    return total, float(top_rate / upper)


def _bootstrap_ratio(cells, owners, hi: str, lo: str, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    for b in range(n_boot):
        sums: dict[str, list[float]] = {hi: [0.0, 0], lo: [0.0, 0]}
        for owner, cell in zip(owners, cells):
            if owner in sums:
                sample = cell[rng.integers(0, len(cell), len(cell))]
                sums[owner][0] += sample.sum()
                sums[owner][1] += len(sample)
        top, bottom = sums[hi][0] / sums[hi][1], sums[lo][0] / sums[lo][1]
        ratios[b] = top / bottom if bottom > 0 else math.inf
    return ratios
