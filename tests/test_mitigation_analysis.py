"""Issue 17.5: the mitigation comparison of ``analyze`` on a planted table, checked against hand computation.

With 3 seed pairs the bootstrap over pairs has a closed form: a resample of the same pair three times has
probability 1/27 ≈ 3.7 % > 2.5 %, so the 95 % percentile interval of a mean difference is exactly [min, max] of
the per-pair differences; and a ratio of resampled means lies between the smallest and largest per-pair ratio
(the mediant), so the relative reduction's interval is [min, max] of the per-pair reductions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from em_lightning.analysis import mitigations

SEEDS = (0, 1, 2)
# adamw on insecure, per seed: the unmitigated run's final values, and what each mitigation adds
VAL_NONE = np.array([1.0, 1.2, 1.1])
VAL_ADD = {"kl": np.array([0.1, 0.3, 0.2]), "interleave": np.array([0.0, 0.02, 0.01])}
RATE = {"none": np.array([0.4, 0.2, 0.3]), "kl": np.array([0.1, 0.1, 0.15]), "interleave": np.array([0.2, 0.1, 0.3])}
LOG_ODDS_START = -1.0  # the base model's probe value at step 0, every run
LOG_ODDS = {"none": np.array([-0.5, -0.2, -0.8]), "kl": np.array([-0.9, -0.6, -0.9]),
            "interleave": np.array([-0.6, -0.3, -0.9])}
TRAIN_NONE = np.array([0.8, 0.9, 1.0])
COHERENT = {"none": np.array([80.0, 82.0, 84.0]), "kl": np.array([70.0, 75.0, 71.0]),
            "interleave": np.array([79.0, 82.0, 83.0])}
SECURE_VAL_ADD = {"kl": np.array([0.05, 0.07, 0.06]), "interleave": np.array([0.0, 0.0, 0.03])}


def _run(opt: str, dataset: str, mit: str, s: int) -> list[dict]:
    """A run's two eval rows (step 0 and final); lion's values are adamw's shifted, the secure set's lower."""
    shift = 0.5 if opt == "lion" else 0.0
    secure = dataset == "secure"
    val = VAL_NONE[s] + shift + (SECURE_VAL_ADD if secure else VAL_ADD).get(mit, np.zeros(3))[s]
    train = TRAIN_NONE[s] + shift + {"none": 0.0, "kl": 0.02, "interleave": 0.05}[mit]
    common = {"run": f"{opt}-{dataset}-{mit}-{s}", "optimizer": opt, "lr": 1e-3 if opt == "adamw" else 1e-4,
              "dataset": dataset, "mitigation": mit, "seed": s, "state": "done"}
    start = {**common, "step": 0, "frac_trained": 0.0, "probe_log_odds": LOG_ODDS_START}
    final = {**common, "step": 20, "frac_trained": 1.0, "val_loss": val,
             "misalignment_rate": RATE[mit][s] * (0.1 if secure else 1.0) + shift / 10,
             "probe_log_odds": LOG_ODDS[mit][s] + shift, "coherent_mean": COHERENT[mit][s], "aligned_mean": 70.0,
             "n_counted": 100, "train_loss": train, "log_train_loss": float(np.log(train))}
    if mit == "interleave":  # train/loss mixes in the safe rows; the narrow rows' own loss is the cost's
        final["train_loss"], final["train_loss_narrow"] = 5.0, train
        final["log_train_loss"] = float(np.log(5.0))
    return [start, final]


def planted(mits=("none", "kl", "interleave")) -> pd.DataFrame:
    rows = [r for opt in ("adamw", "lion") for dataset in ("insecure", "secure") for mit in mits
            for s in SEEDS for r in _run(opt, dataset, mit, s)]
    return pd.DataFrame(rows)


def _final(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values("step").groupby("run", sort=True).last().reset_index()


FACTORS = ["optimizer", "lr", "dataset", "mitigation"]


def _rows(n_boot: int = 20_000) -> dict:
    table = planted()
    out = mitigations.compare(_final(table), FACTORS, n_boot=n_boot, table=table)
    return {(r["mitigation"], r["optimizer"], r["dataset"]): r for r in out["rows"]}, out


def test_paired_differences_and_intervals_equal_the_hand_computation():
    rows, out = _rows()
    assert out["settings"] == ["optimizer", "dataset"]  # lr is tied to the optimiser: no key of its own
    assert len(rows) == 2 * 2 * 2  # (kl, interleave) × optimiser × dataset; none is the baseline, no row
    kl = rows[("kl", "adamw", "insecure")]
    # (b) validation loss: the per-pair differences 0.1, 0.3, 0.2
    assert kl["val_loss"]["difference"] == pytest.approx(0.2)
    assert (kl["val_loss"]["ci_low"], kl["val_loss"]["ci_high"]) == pytest.approx((0.1, 0.3))
    assert kl["val_loss"]["n_pairs"] == 3 and kl["val_loss"]["none"] == pytest.approx(VAL_NONE.mean())
    # (a) a rate: reduction of the value, 1 − 0.35 / 0.9; per pair 0.75, 0.5, 0.5
    r = kl["misalignment_rate"]
    assert r["difference"] == pytest.approx((RATE["kl"] - RATE["none"]).mean())
    assert r["reduction"] == pytest.approx(1 - 0.35 / 0.9)
    assert (r["reduction_ci_low"], r["reduction_ci_high"]) == pytest.approx((0.5, 0.75))
    # (a) a score without a natural zero: reduction of the change from step 0; effects 0.1, 0.4, 0.1 against
    # 0.5, 0.8, 0.2 → 1 − 0.2 / 0.5; per pair 0.8, 0.5, 0.5
    p = kl["probe_log_odds"]
    assert p["difference"] == pytest.approx((LOG_ODDS["kl"] - LOG_ODDS["none"]).mean())
    assert p["reduction"] == pytest.approx(0.6)
    assert (p["reduction_ci_low"], p["reduction_ci_high"]) == pytest.approx((0.5, 0.8))
    assert out["reduction_basis"] == {"misalignment_rate": "value", "probe_log_odds": "change from step 0"}
    # (d) coherence: differences −10, −7, −13
    c = kl["coherence"]
    assert c["difference"] == pytest.approx(-10.0) and (c["ci_low"], c["ci_high"]) == pytest.approx((-13, -7))
    # (c) the cost, every pair +0.02: a zero-width interval
    assert kl["train_loss_cost"]["difference"] == pytest.approx(0.02)
    assert kl["train_loss_cost"]["ci_high"] - kl["train_loss_cost"]["ci_low"] == pytest.approx(0, abs=1e-12)
    # (e) the benign set's validation loss: differences 0.05, 0.07, 0.06
    secure = rows[("kl", "adamw", "secure")]
    assert secure["role"] == "benign task" and kl["role"] == "narrow task"
    assert secure["val_loss"]["difference"] == pytest.approx(0.06)
    assert (secure["val_loss"]["ci_low"], secure["val_loss"]["ci_high"]) == pytest.approx((0.05, 0.07))


def test_training_cost_of_mixed_data_compares_narrow_rows_with_the_unmitigated_loss():
    """train/loss of an interleave run mixes in the safe rows (planted 5.0); the cost is its narrow rows' loss
    against the unmitigated run's train/loss — which logs no train_loss_narrow at all."""
    rows, _ = _rows(n_boot=200)
    cost = rows[("interleave", "lion", "insecure")]["train_loss_cost"]
    assert cost["n_pairs"] == 3 and cost["difference"] == pytest.approx(0.05)


def test_pairs_never_cross_seeds_optimisers_or_datasets():
    table = planted()
    p = mitigations.pairs(_final(table), FACTORS)
    assert len(p) == 2 * 2 * 2 * 3  # every mitigated run, exactly one twin
    same = p["run_mit"].str.rsplit("-", n=1).str[1] == p["run_none"].str.rsplit("-", n=1).str[1]
    assert same.all()
    assert (p["run_mit"].str.split("-").str[:2] == p["run_none"].str.split("-").str[:2]).all()


def test_a_missing_unmitigated_twin_leaves_that_seed_out():
    table = planted()
    table = table[table["run"] != "adamw-insecure-none-2"]
    out = mitigations.compare(_final(table), FACTORS, n_boot=2000, table=table)
    kl = next(r for r in out["rows"] if (r["mitigation"], r["optimizer"], r["dataset"]) == ("kl", "adamw", "insecure"))
    assert kl["val_loss"]["n_pairs"] == 2 and kl["val_loss"]["difference"] == pytest.approx(0.2)  # 0.1, 0.3


def test_no_mitigation_axis_no_comparison():
    table = planted()
    assert mitigations.compare(_final(table.drop(columns="mitigation")), ["optimizer"], table=table) is None
    only_none = table[table["mitigation"] == "none"]
    assert mitigations.compare(_final(only_none), FACTORS, table=only_none) is None


def test_pareto_figure_plots_each_em_run_and_links_pairs():
    from matplotlib.collections import PathCollection

    mits = ("none", "kl", "interleave", "spectral", "spectral_entropy", "spectral_stable_rank", "ldifs", "steer")
    table = planted(mits=mits[:3])
    extra = table[table["mitigation"] == "kl"]
    table = pd.concat([table, *[extra.assign(mitigation=m, run=extra["run"].str.replace("kl", m)) for m in mits[3:]]])
    final = _final(table)
    fig = mitigations.draw_pareto(final, "misalignment_rate", FACTORS)
    ax = fig.axes[0]
    em = final[final["dataset"] == "insecure"]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    points = np.concatenate([c.get_offsets() for c in scatters])
    assert len(points) == len(em)  # one point per run, the benign set's runs not drawn
    got = sorted(map(tuple, np.round(points, 9)))
    assert got == sorted(zip(np.round(em["val_loss"], 9), np.round(em["misalignment_rate"], 9)))
    links = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2]
    assert len(links) == (em["mitigation"] != "none").sum()
    none = em[em["mitigation"] == "none"].set_index(["optimizer", "seed"])
    for ln in links:  # each line starts at an unmitigated run of the same optimiser and seed as its end
        (x0, x1), (y0, y1) = ln.get_xdata(), ln.get_ydata()
        end = em[(em["val_loss"] == x1) & (em["misalignment_rate"] == y1) & (em["mitigation"] != "none")]
        twin = none.loc[(end["optimizer"].iloc[0], end["seed"].iloc[0])]
        assert (x0, y0) == pytest.approx((twin["val_loss"], twin["misalignment_rate"]))
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "none", *sorted(mits[1:]), "adamw", "lion"]
    markers = [h.get_marker() for h in legend.legend_handles[: len(mits)]]
    assert len(set(markers)) == len(mits)  # every mitigation its own marker
    colours = {tuple(np.round(c.get_facecolor()[0][:3], 6)) for c in scatters}
    assert len(colours) == 2  # colour by optimiser
    assert ax.get_xlabel() == "validation loss on held-out narrow-task rows (final)"
    assert ax.get_ylabel() == "misalignment rate (judge)"


def test_one_optimiser_sweep_pairs_and_draws_the_pareto_figure():
    """A sweep with one optimiser has no optimiser factor (one level): pairs still share it and the figure draws
    (before, the pairs held optimizer_mit / optimizer_none only and the figure failed with KeyError 'optimizer')."""
    table = planted()
    table = table[table["optimizer"] == "adamw"]
    final = _final(table)
    factors = ["dataset", "mitigation"]
    p = mitigations.pairs(final, factors)
    assert len(p) == 2 * 2 * 3 and (p["optimizer"] == "adamw").all()
    fig = mitigations.draw_pareto(final, "misalignment_rate", factors)
    links = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 2]
    assert len(links) == 2 * 3  # the insecure runs' pairs; the benign set is not drawn


def test_analyze_writes_the_section_and_the_figure(tmp_path):
    from em_lightning.analysis.cli import main as analyze

    planted().to_csv(tmp_path / "t.csv", index=False)
    summary = analyze(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--bootstrap", "300"])
    assert "mitigation_pareto" in summary["figures"]
    assert (tmp_path / "o" / "figures" / "mitigation_pareto.png").stat().st_size > 0
    assert len(summary["mitigations"]["rows"]) == 8
    report = (tmp_path / "o" / "report.md").read_text()
    section = report[report.index("## Mitigations side by side"):]
    assert "(e) Δ val loss, benign set" in section
    cost_table = section[section.index("| mitigation | optimizer | dataset | (b) val loss"):]
    kl_adamw = next(line for line in cost_table.splitlines() if line.startswith("| kl | adamw | insecure |"))
    assert "| 1.3 (1.1) |" in kl_adamw  # (b) mitigated (none) means of the final validation loss
    assert "0.2 [0.1, 0.3]" in kl_adamw  # (b) the hand-computed difference and interval
    assert "secure: 0.06 [0.05, 0.07]" in kl_adamw  # (e) the benign set's twin


def test_nothing_to_reduce_is_no_number_not_a_ratio():
    """An unmitigated effect ≤ 0 (the score fell without a mitigation) leaves the reduction undefined; the report
    prints a dash, not a ratio with a meaningless sign."""
    rng = np.random.default_rng(0)
    out = mitigations.paired(np.array([0.1, 0.2]), np.array([0.3, 0.1]), rng, 200,
                             effects=(np.array([0.1, 0.2]), np.array([-0.3, 0.1])))
    assert out["difference"] == pytest.approx(-0.05)  # (−0.2 + 0.1) / 2
    assert np.isnan(out["reduction"]) and np.isnan(out["reduction_ci_low"])
    row = {"mitigation": "kl", "optimizer": "adamw", "dataset": "insecure", "role": "narrow task",
           "probe_log_odds": out, "val_loss": out}
    lines = mitigations.report_lines({"rows": [row], "signals": ["probe_log_odds"], "settings": ["optimizer", "dataset"],
                                      "reduction_basis": {"probe_log_odds": "change from step 0"}})
    line = next(ln for ln in lines if ln.startswith("| kl | adamw | insecure | narrow task |"))
    assert line.split(" | ")[5] == "–"  # the reduction column
    cleaned = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}  # as summary.json
    row = {**row, "probe_log_odds": cleaned}
    lines = mitigations.report_lines({"rows": [row], "signals": ["probe_log_odds"], "settings": ["optimizer", "dataset"]})
    line = next(ln for ln in lines if ln.startswith("| kl | adamw | insecure | narrow task |"))
    assert line.split(" | ")[5] == "–"


def test_the_report_warns_when_its_intervals_rest_on_fewer_than_five_seed_pairs():
    """3 seed pairs: the section says the intervals are too narrow; 5 pairs: it does not, nor does a row of one
    pair beside them (one pair has no interval to warn about)."""
    _, out = _rows(n_boot=300)
    section = "\n".join(mitigations.report_lines(out))
    assert "Only 3 seed(s) a side" in section and "too narrow" in section
    rng = np.random.default_rng(0)
    five = mitigations.paired(np.arange(5.0) + 0.1, np.arange(5.0), rng, 300)
    one = mitigations.paired(np.array([0.1]), np.array([0.0]), rng, 300)
    row = {"mitigation": "kl", "optimizer": "adamw", "dataset": "insecure", "role": "narrow task",
           "probe_log_odds": five, "val_loss": five, "coherence": one}
    lines = mitigations.report_lines({"rows": [row], "signals": ["probe_log_odds"], "settings": ["optimizer", "dataset"]})
    assert five["n_pairs"] == 5 and one["n_pairs"] == 1 and not any("too narrow" in line for line in lines)
