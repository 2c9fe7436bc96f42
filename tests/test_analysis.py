"""The analysis on tables and run dirs with planted structure: R², partial R², the interaction, the type-II
ANOVA (cross-checked against numpy.linalg.lstsq), the term-dropping rules, the along-training fits, seeds and
the optimiser rate ratio; the table builder on synthetic run dirs (versions merged, every source read); the
CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("statsmodels")
pytest.importorskip("tbparse")

from em_lightning.analysis import stats
from em_lightning.analysis.stats import SIGNALS

OPTS = ("adam", "lion", "muon", "sgd")
EFFECT = {"adam": 0.0, "lion": -8.0, "muon": 5.0, "sgd": -3.0}  # optimiser shift of aligned_mean
SLOPE = {"adam": 15.0, "lion": 21.0, "muon": 11.0, "sgd": 15.0}  # per-optimiser slope on log loss
RATE = {"adam": 0.03, "lion": 0.21, "muon": 0.06, "sgd": 0.10}  # true misalignment rates: max/min = 7
N_COUNTED = 400


def planted(seeds: int = 6, noise: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """aligned = 70 + slope[opt]·log loss + effect[opt] + 2·(dataset == secure) + noise; rates binomial. The
    (lion, secure) cell is left empty."""
    rng = np.random.default_rng(seed)
    rows = []
    for opt in OPTS:
        for dataset in ("insecure", "secure"):
            if (opt, dataset) == ("lion", "secure"):
                continue
            for s in range(seeds):
                x = rng.uniform(-1.5, 0.0)
                aligned = (
                    70 + SLOPE[opt] * x + EFFECT[opt] + 2.0 * (dataset == "secure") + rng.normal(0, noise)
                )
                k = rng.binomial(N_COUNTED, RATE[opt])
                rows.append(
                    {
                        "run": f"{opt}-{dataset}-{s}",
                        "optimizer": opt,
                        "model": "m",
                        "dataset": dataset,
                        "batch_size": 16,
                        "lr": 1e-5,
                        "seed": s,
                        "step": 100,
                        "frac_trained": 1.0,
                        "log_train_loss": x,
                        "train_loss": math.exp(x),
                        "aligned_mean": aligned,
                        "misalignment_rate": k / N_COUNTED,
                        "n_counted": N_COUNTED,
                        "eval_failed": False,
                        "state": "done",
                    }
                )
    return pd.DataFrame(rows)


def lstsq_sse(y: np.ndarray, *columns: np.ndarray) -> float:
    x = np.column_stack([np.ones_like(y), *columns])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(((y - x @ beta) ** 2).sum())


def dummies(values: pd.Series, drop_first: bool = True) -> list[np.ndarray]:
    levels = sorted(values.unique())
    return [(values == lv).to_numpy(float) for lv in levels[1 if drop_first else 0 :]]


def test_loss_models_match_lstsq_and_recover_the_planted_slopes():
    d = planted()
    out = stats.loss_models(d, "aligned_mean")
    y, x = d["aligned_mean"].to_numpy(), d["log_train_loss"].to_numpy()
    sst = float(((y - y.mean()) ** 2).sum())
    opt = dummies(d["optimizer"])
    sse_loss, sse_add = lstsq_sse(y, x), lstsq_sse(y, x, *opt)
    sse_int = lstsq_sse(y, *opt, *[x * o for o in dummies(d["optimizer"], drop_first=False)])
    assert out["n_runs"] == len(d) == 42
    assert out["r2_loss"] == pytest.approx(1 - sse_loss / sst, rel=1e-9)
    assert out["r2_loss_optimizer"] == pytest.approx(1 - sse_add / sst, rel=1e-9)
    assert out["partial_r2_optimizer"] == pytest.approx((sse_loss - sse_add) / sse_loss, rel=1e-9)
    assert out["r2_interaction"] == pytest.approx(1 - sse_int / sst, rel=1e-9)
    # The planted structure: per-optimiser slopes within 4 SE (noise 0.5 over a loss range of 1.5), a clear
    # interaction, and optimiser explaining most of what loss leaves.
    for o, fit in out["slopes"].items():
        assert abs(fit["slope"] - SLOPE[o]) < 4 * fit["se"] + 0.2, (o, fit)
    assert out["interaction_p"] < 1e-3  # the unmodelled dataset shift (2.0) is noise to this model
    assert out["partial_r2_optimizer"] > 0.9 and out["r2_interaction"] > 0.98


def test_anova_type2_matches_lstsq_and_drops_the_empty_cell_interaction():
    d = planted()
    out = stats.anova(d, "aligned_mean", ["optimizer", "dataset", "lr"])
    assert set(out["terms"]) == {"log_train_loss", "optimizer", "dataset", "optimizer:log_train_loss"}
    assert "(optimizer=lion, dataset=secure) holds 0 run(s)" in out["dropped"]["optimizer:dataset"]
    assert "lr" not in out["terms"] and "lr" not in out["dropped"]  # lr does not vary: not a factor at all
    # Type II by hand: each main effect given the other main effects (not the interaction containing it); the
    # interaction given everything else.
    y, x = d["aligned_mean"].to_numpy(), d["log_train_loss"].to_numpy()
    opt, ds = dummies(d["optimizer"]), dummies(d["dataset"])
    inter = [x * o for o in opt]
    sse_full = lstsq_sse(y, x, *opt, *ds, *inter)
    df_resid = len(y) - (1 + 1 + len(opt) + len(ds) + len(inter))
    checks = {
        "optimizer": (lstsq_sse(y, x, *ds) - lstsq_sse(y, x, *opt, *ds), len(opt)),
        "dataset": (lstsq_sse(y, x, *opt, *inter) - sse_full, len(ds)),  # opt:loss does not contain dataset
        "optimizer:log_train_loss": (lstsq_sse(y, x, *opt, *ds) - sse_full, len(inter)),
    }
    for term, (ss, df) in checks.items():
        got = out["terms"][term]
        assert got["df"] == df
        assert got["F"] == pytest.approx((ss / df) / (sse_full / df_resid), rel=1e-7)
        assert got["partial_eta2"] == pytest.approx(ss / (ss + sse_full), rel=1e-7)
    assert out["terms"]["optimizer"]["p"] < 1e-10


def test_type2_equals_statsmodels_anova_lm_where_that_applies():
    """statsmodels' anova_lm(typ=2) refuses a covariate × factor interaction, hence our nested fits; on a
    model it takes (factors, their interaction, a covariate) both agree."""
    from statsmodels.stats.anova import anova_lm

    d = stats._cat(planted()[lambda t: t["optimizer"] != "lion"], ["optimizer", "dataset"])
    terms = ["log_train_loss", "C(optimizer)", "C(dataset)", "C(optimizer):C(dataset)"]
    factors = {
        "log_train_loss": {"log_train_loss"},
        "C(optimizer)": {"optimizer"},
        "C(dataset)": {"dataset"},
        "C(optimizer):C(dataset)": {"optimizer", "dataset"},
    }
    full = stats._ols("aligned_mean ~ " + " + ".join(terms), d)
    ours = stats.type2(d, "aligned_mean", terms, factors, full)
    theirs = anova_lm(full, typ=2)
    for term in terms:
        assert ours[stats._label(term)]["F"] == pytest.approx(theirs.loc[term, "F"], rel=1e-8)
        assert ours[stats._label(term)]["p"] == pytest.approx(theirs.loc[term, "PR(>F)"], rel=1e-6)


def test_anova_drops_a_factor_confounded_with_optimizer():
    d = planted()
    d["lr"] = d["optimizer"].map({"adam": 1e-5, "lion": 3e-6, "muon": 2e-2, "sgd": 1e-3})  # tied to optimiser
    out = stats.anova(d, "aligned_mean", ["optimizer", "dataset", "lr"])
    assert "confounded" in out["dropped"]["lr"] and "lr" not in out["terms"]


def test_rate_ratio_recovers_the_planted_ratio_with_a_bootstrap_interval():
    d = planted(seed=1)
    out = stats.optimizer_ratio(d, SIGNALS["judge"], ["optimizer", "dataset"], n_boot=1000)
    assert out["pair"] == ["lion", "adam"]
    assert out["value"] == pytest.approx(7.0, rel=0.25)
    assert out["ci_low"] < out["value"] < out["ci_high"]
    assert out["ci_low"] < 7.0 < out["ci_high"]
    k = (d["misalignment_rate"] * N_COUNTED).round()
    cc = (k + 0.5) / (N_COUNTED + 1)
    by_opt = cc.groupby(d["optimizer"]).mean()
    assert out["value"] == pytest.approx(by_opt["lion"] / by_opt["adam"], rel=1e-12)


def test_rate_ratio_with_a_zero_rate_is_finite_by_the_continuity_correction():
    d = pd.DataFrame(
        {
            "run": list("abcd"),
            "optimizer": ["x", "x", "y", "y"],
            "seed": [0, 1, 0, 1],
            "misalignment_rate": [0.0, 0.0, 0.1, 0.3],
            "n_counted": [49, 49, 49, 49],
        }
    )
    out = stats.optimizer_ratio(d, SIGNALS["judge"], ["optimizer"], n_boot=200)
    expected = np.mean([(5 + 0.5) / 50, (15 + 0.5) / 50]) / (0.5 / 50)
    assert out["value"] == pytest.approx(expected) and math.isfinite(out["ci_high"])


def test_seed_spread_per_condition():
    d = planted()
    out = stats.seed_spread(d, "aligned_mean", ["optimizer", "dataset"])
    assert len(out) == 7 and (out["n_seeds"] == 6).all()
    g = d.groupby(["optimizer", "dataset"])["aligned_mean"]
    row = out[(out["optimizer"] == "muon") & (out["dataset"] == "secure")].iloc[0]
    values = g.get_group(("muon", "secure")).to_numpy()
    assert row["mean"] == pytest.approx(values.mean()) and row["sd"] == pytest.approx(values.std(ddof=1))
    half = 2.570581835636314 * values.std(ddof=1) / math.sqrt(6)  # t(0.975, 5)
    assert row["ci_high"] - row["mean"] == pytest.approx(half, rel=1e-9)


def test_along_training_sees_optimizer_grow_while_loss_shrinks():
    """Early, alignment follows loss; late, it follows the optimiser and barely the loss."""
    rng = np.random.default_rng(2)
    rows = []
    for opt_i, opt in enumerate(OPTS):
        for s in range(5):
            for frac in (0.2, 0.5, 1.0):
                x = rng.uniform(-1.5, 0.0)
                w = frac  # weight of the optimiser effect
                y = (1 - w) * 20 * x + w * 10 * opt_i + rng.normal(0, 0.3)
                rows.append(
                    {
                        "run": f"{opt}-{s}",
                        "optimizer": opt,
                        "step": int(100 * frac),
                        "frac_trained": frac,
                        "log_train_loss": x,
                        "aligned_mean": y,
                        "eval_failed": False,
                    }
                )
    along = stats.along_training(pd.DataFrame(rows), "aligned_mean", bins=10)
    assert list(along["frac"]) == [0.2, 0.5, 1.0] and (along["n_runs"] == 20).all()
    assert along["partial_r2_optimizer"].is_monotonic_increasing
    assert along["partial_r2_loss"].iloc[-1] < along["partial_r2_loss"].iloc[0]
    assert stats.trend(pd.DataFrame(rows), "aligned_mean", bins=10, n_boot=200)["answer"] == "yes"


# ------------------------------------------------------------------------------------------------ run dirs
def _write_run(root, name: str, versions: dict[int, dict], config: dict) -> None:
    """A run dir in the sweep layout: config.yaml, run.json, and version_N/ with event files and JSONL."""
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "run.json").write_text(json.dumps({"state": "done", "values": {"optimizer": config["_opt"]}}))
    for v, content in versions.items():
        vdir = d / f"version_{v}"
        vdir.mkdir()
        writer = SummaryWriter(str(vdir))
        for step, loss in content["loss"].items():
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/supervised_tokens", 100.0 * (step + 1), step)
        if v == 0:
            writer.add_scalar("data/train/rows", 64, 0)
        writer.close()
        for fname, lines in content.get("jsonl", {}).items():
            (vdir / fname).write_text("".join(json.dumps(x) + "\n" for x in lines) + content.get("torn", ""))


def _config(opt: str, lr: float) -> dict:
    return {
        "_opt": opt,
        "seed_everything": 3,
        "trainer": {"max_steps": 8, "devices": 2, "num_nodes": 1, "accumulate_grad_batches": 2},
        "model": {
            "base": {"name": "Org/Model-1B"},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
        },
        "data": {"train_file": "em:insecure", "batch_size": 4, "seed": 3},
    }


def test_table_merges_versions_and_reads_every_source(tmp_path):
    from em_lightning.analysis.table import build_table

    sigma = {"m.q_proj": [2.0, 1.0, 0.0, 0.0], "m.v_proj": [1.0, 1.0, 1.0, 1.0]}
    _write_run(
        tmp_path,
        "r",
        {
            0: {
                "loss": {s: 10.0 + s for s in range(6)},  # killed after step 6; resumed from step 4
                "jsonl": {
                    "probe.jsonl": [
                        {"step": 0, "log_odds": -1.0, "misaligned_prob": 0.27},
                        {"step": 4, "log_odds": 0.0, "misaligned_prob": 0.5},
                    ],
                    "misalignment_summary.jsonl": [{"step": 4, "rate": 0.9, "n_counted": 10}],
                    "spectra.jsonl": [{"step": 4, "modules": sigma}],
                },
                "torn": '{"step": 6, "log_o',
            },  # the killed writer's half line
            1: {
                "loss": {s: float(s) for s in range(4, 8)},
                "jsonl": {
                    "probe.jsonl": [{"step": 8, "log_odds": 2.0, "misaligned_prob": 0.88}],
                    "misalignment_summary.jsonl": [
                        {
                            "step": 4,
                            "rate": 0.2,
                            "ci_low": 0.1,
                            "ci_high": 0.4,
                            "aligned_mean": 60.0,
                            "coherent_mean": 80.0,
                            "n_counted": 10,
                        },
                        {"step": 8, "adapter": "x", "failed": True, "error": "judge down"},
                    ],
                },
            },
        },
        _config("adamw", 1e-4),
    )
    table, runs = build_table([tmp_path])
    assert list(runs[0].series("train/loss").items()) == [
        (0, 10.0),
        (1, 11.0),
        (2, 12.0),
        (3, 13.0),
        (4, 4.0),
        (5, 5.0),
        (6, 6.0),
        (7, 7.0),
    ]
    rows = table.set_index("step")
    assert list(rows.index) == [0, 4, 8]
    assert rows.loc[4, "misalignment_rate"] == 0.2 and rows.loc[4, "aligned_mean"] == 60.0  # version_1 wins
    assert rows.loc[8, "eval_failed"] and math.isnan(rows.loc[8, "misalignment_rate"])
    assert rows.loc[8, "probe_log_odds"] == 2.0 and rows.loc[0, "probe_misaligned_prob"] == 0.27
    # train_loss at step 8: the mean of the last 10 logged steps up to 8 (TensorBoard steps 0..7, merged)
    assert rows.loc[8, "train_loss"] == pytest.approx(np.mean([10, 11, 12, 13, 4, 5, 6, 7]))
    assert rows.loc[4, "train_loss"] == pytest.approx(np.mean([10, 11, 12, 13]))
    assert math.isnan(rows.loc[0, "train_loss"])
    # rows per optimizer step: batch 4 × accumulate 2 × 2 devices; tokens over both devices
    assert rows.loc[4, "batch_size"] == 16 and rows.loc[4, "tokens_seen"] == 2 * 400.0
    assert rows.loc[4, "frac_trained"] == 0.5
    assert rows.loc[4, ["optimizer", "model", "dataset", "lr", "seed"]].tolist() == [
        "adamw",
        "Model-1B",
        "insecure",
        1e-4,
        3,
    ]
    # spectra: the nearest logged step, metrics averaged over modules
    assert (rows["spectra_step"] == 4).all()
    assert rows.loc[8, "stable_rank"] == pytest.approx((5 / 4 + 4) / 2)
    assert rows.loc[8, "frob_nuclear_ratio"] == pytest.approx((math.sqrt(5) / 3 + 2 / 4) / 2)
    assert rows.loc[8, "entropy"] == pytest.approx(
        (-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3) + math.log(4)) / 2
    )


def test_analyze_cli_writes_table_report_figures_and_json(tmp_path, capsys):
    """--table start, --signal judge, --json: the headline numbers equal the statistics' own."""
    from em_lightning.__main__ import main

    d = planted()
    d["ci_low"], d["ci_high"] = d["misalignment_rate"] - 0.01, d["misalignment_rate"] + 0.01
    for col, v in (
        ("frob_nuclear_ratio", 0.6),
        ("entropy", 1.0),
        ("stable_rank", 1.5),
        ("condition_number", 9.0),
    ):
        d[col] = v + np.random.default_rng(3).normal(0, 0.05, len(d))
    d = pd.concat([d, d.assign(step=50, frac_trained=0.5)])
    d.loc[d["run"] == "sgd-secure-0", "state"] = "failed"
    d.to_csv(tmp_path / "in.csv", index=False)
    main(
        [
            "analyze",
            "--table",
            str(tmp_path / "in.csv"),
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--bootstrap",
            "200",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    kept = d[d["run"] != "sgd-secure-0"]
    expected = stats.loss_models(stats.final_rows(kept, "aligned_mean"), "aligned_mean")
    assert summary["n_runs"] == 42 and summary["n_rows"] == 84
    assert summary["r2_loss"] == pytest.approx(expected["r2_loss"])
    assert summary["partial_r2_optimizer"] == pytest.approx(expected["partial_r2_optimizer"])
    assert set(summary["anova"]) >= {"optimizer", "log_train_loss"} and "F" in summary["anova"]["optimizer"]
    assert summary["optimizer_rate_ratio"]["pair"] == ["lion", "adam"]
    assert summary["excluded_runs"]["sgd-secure-0"] == "state failed"
    out = tmp_path / "out"
    names = (
        "loss_alignment",
        "trajectories",
        "rate_by_optimizer",
        "spectral_vs_misalignment",
        "seed_spread",
        "along_training",
    )
    assert set(summary_figures(out)) == set(names)  # what each shows: the draw_* tests below
    report = (out / "report.md").read_text()
    assert "`sgd-secure-0`: state failed" in report and "dropped `optimizer:dataset`" in report
    assert all(f"figures/{n}.png" in report for n in names)
    assert len(pd.read_csv(out / "table.csv")) == 84


def test_analyze_names_a_bad_input_in_one_line(tmp_path, capsys):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "em_lightning",
            "analyze",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (
            f"error: {tmp_path / 'empty'}: not a run dir (no config.yaml, run.json, version_N/ or event "
            "files) and holds none"
        )
    ]


# ============================================================================ issue 14: inputs, signals, fits
def _cli(args: list[str]):
    from em_lightning.analysis.cli import main as analyze_main

    return analyze_main([str(a) for a in args])


def _two_per_optimizer(seed: int = 5) -> pd.DataFrame:
    """The saturated design: 4 optimisers × 2 runs each, one final eval per run."""
    d = planted(seeds=2, seed=seed)
    return d[d["dataset"] == "insecure"].reset_index(drop=True)


@pytest.mark.parametrize(
    ("column", "row", "value", "says"),
    [
        ("step", 3, "ten", "not a number"),
        ("log_train_loss", 5, "inf", "not finite"),
        ("misalignment_rate", 2, "1.5", "outside [0, 1]"),
        ("probe_misaligned_prob", 7, "-0.1", "outside [0, 1]"),
        ("aligned_mean", 4, "n/a?", "not a number"),
    ],
)
def test_read_table_names_the_column_and_line_of_a_bad_value(tmp_path, column, row, value, says):
    from em_lightning.analysis.table import AnalysisError, read_table
    from em_lightning.errors import InputError

    d = planted().astype({column: object} if column in planted() else {})
    if column not in d:
        d[column] = 0.5
    d[column] = d[column].astype(object)
    d.loc[row, column] = value
    d.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(AnalysisError) as err:
        read_table(tmp_path / "t.csv")
    assert isinstance(err.value, InputError)
    msg = str(err.value)
    assert f"column `{column}`" in msg and f"line {row + 2}" in msg and says in msg, msg


def test_text_in_step_is_an_error_not_a_string_comparison(tmp_path):
    """Steps compared as strings make '50' the final eval instead of '100': refuse the table."""
    from em_lightning.analysis.table import AnalysisError, read_table

    d = pd.concat([planted(), planted().assign(step=50, frac_trained=0.5)], ignore_index=True)
    d["step"] = d["step"].astype(object)
    d.loc[0, "step"] = "100 "  # stray text after the number
    d.loc[1, "step"] = "final"
    d.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(AnalysisError, match=r"column `step`.*line 3"):
        read_table(tmp_path / "t.csv")


def test_empty_table_and_one_run_are_errors(tmp_path):
    from em_lightning.analysis.table import AnalysisError

    planted().head(0).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(AnalysisError, match="no rows"):
        _cli(["--table", tmp_path / "empty.csv", "--out", tmp_path / "o1"])
    one = pd.concat([planted().head(1), planted().head(1).assign(step=50)])
    one.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(AnalysisError, match="1 run"):
        _cli(["--table", tmp_path / "one.csv", "--out", tmp_path / "o2"])
    assert not (tmp_path / "o2" / "report.md").exists()


def test_unnamed_index_columns_are_ignored(tmp_path):
    from em_lightning.analysis.table import extra_factors, read_table

    planted().to_csv(tmp_path / "t.csv", index=True)  # pandas' default writes the index as 'Unnamed: 0'
    table = read_table(tmp_path / "t.csv")
    assert not [c for c in table.columns if c.startswith("Unnamed")]
    assert extra_factors(table) == []


def test_a_factor_with_missing_levels_gets_an_explicit_NA_level(tmp_path):
    """Two sweeps analysed together: lora_rank is an axis of one of them only."""
    d = planted()
    d["lora_rank"] = np.where(d["seed"] % 2 == 0, 8.0, np.nan)  # NaN for the other sweep's runs
    d.to_csv(tmp_path / "t.csv", index=False)
    summary = _cli(["--table", tmp_path / "t.csv", "--out", tmp_path / "o", "--bootstrap", "50"])
    assert "lora_rank" in summary["factors"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| NA |" in report  # the seeds table keeps the NA level as a row
    seeds = stats.seed_spread(stats.as_levels(d, ["optimizer", "lora_rank"]), "aligned_mean", ["lora_rank"])
    assert sorted(seeds["lora_rank"]) == ["8.0", "NA"] and seeds["n_seeds"].sum() == len(d)


def test_run_dir_reader_refuses_a_non_numeric_or_out_of_range_value(tmp_path):
    from em_lightning.analysis.table import build_table
    from em_lightning.errors import InputError

    for case, line in (("text", {"step": 4, "rate": "high"}), ("range", {"step": 4, "rate": 1.7})):
        root = tmp_path / case
        _write_run(
            root,
            "r",
            {0: {"loss": {s: 1.0 for s in range(8)}, "jsonl": {"misalignment_summary.jsonl": [line]}}},
            _config("adamw", 1e-4),
        )
        with pytest.raises(InputError) as err:
            build_table([root])
        msg = str(err.value)
        assert "misalignment_summary.jsonl" in msg and "step 4" in msg and "rate" in msg, msg
    root = tmp_path / "inf"
    _write_run(
        root,
        "r",
        {0: {"loss": {s: 1.0 for s in range(8)}, "jsonl": {"probe.jsonl": [{"step": 8, "log_odds": math.inf}]}}},
        _config("adamw", 1e-4),
    )
    with pytest.raises(InputError, match=r"probe.jsonl.*step 8.*log_odds.*not finite"):
        build_table([root])


def _probe_only(n_opts: int = 3, seeds: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for i, opt in enumerate(OPTS[:n_opts]):
        for s in range(seeds):
            for step, frac in ((10, 0.5), (20, 1.0)):
                x = rng.uniform(-1, 0)
                rows.append(
                    {
                        "run": f"{opt}-{s}",
                        "optimizer": opt,
                        "seed": s,
                        "step": step,
                        "frac_trained": frac,
                        "log_train_loss": x,
                        "train_loss": math.exp(x),
                        "probe_log_odds": -1 + 0.5 * i + x + rng.normal(0, 0.1),
                        "probe_misaligned_prob": 0.2 + 0.1 * i + rng.uniform(0, 0.05),
                        "state": "done",
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_signal_auto_analyses_the_signal_the_runs_have(tmp_path):
    _probe_only().to_csv(tmp_path / "t.csv", index=False)
    summary = _cli(["--table", tmp_path / "t.csv", "--out", tmp_path / "o", "--bootstrap", "50"])
    assert summary["signal"] == "probe" and summary["signal_choice"].startswith("auto")
    first = (tmp_path / "o" / "report.md").read_text().splitlines()[0]
    assert "probe" in first and "auto" in first
    assert {"loss_alignment", "trajectories", "rate_by_optimizer"} <= set(summary["figures"])
    d = planted()
    d["probe_log_odds"] = 0.0
    d.to_csv(tmp_path / "both.csv", index=False)
    assert _cli(["--table", tmp_path / "both.csv", "--out", tmp_path / "o2", "--bootstrap", "50"])["signal"] == "judge"


def test_asking_for_a_signal_no_run_has_names_the_ones_present(tmp_path):
    from em_lightning.analysis.table import AnalysisError

    _probe_only().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(AnalysisError, match=r"no run has a judge.*these runs have: probe"):
        _cli(["--table", tmp_path / "t.csv", "--out", tmp_path / "o", "--signal", "judge"])


def test_two_runs_per_optimizer_is_saturated_and_says_so(tmp_path, capfd):
    """A line through two points is no slope; the additive model with 3 residual df is below the floor."""
    import warnings

    import statsmodels.formula.api as smf

    d = _two_per_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stats.loss_models(d, "aligned_mean")
        a = stats.anova(d, "aligned_mean", ["optimizer"])
    assert not caught and capfd.readouterr().err == ""  # no solver warnings leak
    assert out["runs_per_optimizer"] == dict.fromkeys(OPTS, 2)
    for opt in OPTS:
        slope = out["slopes"][opt]
        assert math.isnan(slope["slope"]) and "2 runs" in slope["reason"]
    assert math.isnan(out["r2_interaction"]) and "slope" in out["notes"]["interaction"]
    sm_add = smf.ols("aligned_mean ~ log_train_loss + C(optimizer)", d).fit()
    sm_loss = smf.ols("aligned_mean ~ log_train_loss", d).fit()
    assert out["df_resid"]["loss_optimizer"] == sm_add.df_resid == 3
    assert out["df_resid"]["loss"] == sm_loss.df_resid == 6
    assert out["r2_loss_optimizer"] == pytest.approx(sm_add.rsquared, rel=1e-10)
    assert out["saturated"]["loss_optimizer"] is True and out["saturated"]["loss"] is False
    assert a["saturated"] is True and all(math.isnan(t["p"]) for t in a["terms"].values())
    assert "cannot be said" in a["question_a"]["answer"]  # no interaction estimable: no main-vs-interaction claim
    d.to_csv(tmp_path / "t.csv", index=False)
    _cli(["--table", tmp_path / "t.csv", "--out", tmp_path / "o", "--bootstrap", "50"])
    report = (tmp_path / "o" / "report.md").read_text()
    assert "saturated" in report and f"fewer than {stats.RESID_DF_FLOOR} residual" in report
    assert "1.6e-05" not in report


def test_per_optimizer_slopes_match_scipy_and_need_three_distinct_losses():
    from scipy.stats import linregress

    d = planted()
    d.loc[d["optimizer"] == "sgd", "log_train_loss"] = np.tile([-1.0, -0.5], 6)  # only 2 distinct losses
    out = stats.loss_models(d, "aligned_mean")
    for opt in ("adam", "lion", "muon"):
        g = d[d["optimizer"] == opt]
        ref = linregress(g["log_train_loss"], g["aligned_mean"])
        got = out["slopes"][opt]
        assert got["slope"] == pytest.approx(ref.slope, rel=1e-9)
        assert got["se"] == pytest.approx(ref.stderr, rel=1e-9)
        assert got["n_runs"] == len(g)
        if len(g) - 2 >= stats.RESID_DF_FLOOR:
            assert got["p"] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
        else:  # lion has 6 runs: 4 residual df, below the floor: the p-value is withheld
            assert got["saturated"] is True and math.isnan(got["p"])
    assert math.isnan(out["slopes"]["sgd"]["slope"]) and "2 distinct losses" in out["slopes"]["sgd"]["reason"]
    assert out["runs_per_optimizer"]["sgd"] == 12


def test_anova_gives_ss_residual_share_and_names_the_confounder():
    from statsmodels.stats.anova import anova_lm

    d = planted()[lambda t: t["optimizer"] != "lion"].reset_index(drop=True)
    d["lr"] = d["optimizer"].map({"adam": 1e-5, "muon": 2e-2, "sgd": 1e-3})  # tied to optimiser
    out = stats.anova(d, "aligned_mean", ["optimizer", "dataset", "lr"])
    assert "confounded with optimizer" in out["dropped"]["lr"]
    import statsmodels.formula.api as smf

    terms = "log_train_loss + C(optimizer) + C(dataset) + C(optimizer):C(dataset) + C(optimizer):log_train_loss"
    ref = smf.ols("aligned_mean ~ " + terms, d).fit()
    assert out["residual"]["ss"] == pytest.approx(ref.ssr, rel=1e-9)
    assert out["residual"]["df"] == ref.df_resid
    # planted() has an optimiser × loss interaction: compare only the terms statsmodels takes
    d2 = stats._cat(d, ["optimizer", "dataset"])
    sub = stats.anova(d2.assign(log_train_loss=0.0), "aligned_mean", ["optimizer", "dataset"])
    ref2 = anova_lm(stats._ols("aligned_mean ~ C(optimizer) * C(dataset)", d2), typ=2)
    for term, label in (("C(optimizer)", "optimizer"), ("C(dataset)", "dataset"), ("C(optimizer):C(dataset)", "optimizer:dataset")):
        assert sub["terms"][label]["ss"] == pytest.approx(ref2.loc[term, "sum_sq"], rel=1e-9)
    explained = ref2.loc[["C(optimizer)", "C(dataset)", "C(optimizer):C(dataset)"], "sum_sq"]
    sst = float(((d2["aligned_mean"] - d2["aligned_mean"].mean()) ** 2).sum())
    model_ss = sst - ref2.loc["Residual", "sum_sq"]
    assert sub["terms"]["optimizer"]["share_explained"] == pytest.approx(explained["C(optimizer)"] / model_ss)
    q = sub["question_a"]
    assert q["optimizer_share"] == pytest.approx(explained["C(optimizer)"] / model_ss)
    assert q["interaction_share"] == pytest.approx(explained["C(optimizer):C(dataset)"] / model_ss)
    assert q["answer"].count(".") >= 1 and "optimiser" in q["answer"]


def test_each_eval_falls_in_exactly_one_fraction_bin():
    rng = np.random.default_rng(4)
    rows = []
    for opt in OPTS:
        for s in range(4):
            for frac in (0.25, 0.5, 0.75, 1.0):
                x = rng.uniform(-1, 0)
                rows.append(
                    {"run": f"{opt}-{s}", "optimizer": opt, "step": int(frac * 100), "frac_trained": frac,
                     "log_train_loss": x, "aligned_mean": 10 * x + rng.normal(0, 1), "eval_failed": False}
                )
    along = stats.along_training(pd.DataFrame(rows), "aligned_mean", bins=4, n_boot=50)
    assert list(along["frac"]) == [0.25, 0.5, 0.75, 1.0]
    assert along["n_runs"].sum() == len(rows)  # every eval counted once
    for col in ("r2_loss", "partial_r2_optimizer", "partial_r2_loss"):
        assert (along[f"{col}_ci_low"] <= along[col] + 1e-12).all()
        assert (along[col] <= along[f"{col}_ci_high"] + 1e-12).all()


def _no_change(seed: int) -> pd.DataFrame:
    """Loss and optimiser matter equally at every fraction: there is no change to find."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, opt in enumerate(OPTS):
        for s in range(4):
            for frac in (0.2, 1.0):
                x = rng.uniform(-1.5, 0)
                rows.append(
                    {"run": f"{opt}-{s}", "optimizer": opt, "step": int(frac * 100), "frac_trained": frac,
                     "log_train_loss": x, "aligned_mean": 4 * x + 1.0 * i + rng.normal(0, 1.5), "eval_failed": False}
                )
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_along_training_verdict_is_rarely_yes_without_a_change():
    answers = [stats.trend(_no_change(s), "aligned_mean", bins=5, n_boot=200)["answer"] for s in range(40)]
    assert answers.count("yes") <= 2, answers
    assert set(answers) <= {"yes", "no", "inconclusive"}


def test_along_training_verdict_says_yes_for_a_planted_change():
    rng = np.random.default_rng(2)
    rows = []
    for opt_i, opt in enumerate(OPTS):
        for s in range(6):
            for frac in (0.2, 1.0):
                x = rng.uniform(-1.5, 0.0)
                y = (1 - frac) * 20 * x + frac * 10 * opt_i + rng.normal(0, 0.3)
                rows.append({"run": f"{opt}-{s}", "optimizer": opt, "step": int(100 * frac), "frac_trained": frac,
                             "log_train_loss": x, "aligned_mean": y, "eval_failed": False})
    t = stats.trend(pd.DataFrame(rows), "aligned_mean", bins=10, n_boot=300)
    assert t["answer"] == "yes" and t["optimizer_change_ci"][0] > 0 and t["loss_change_ci"][1] < 0


def test_rate_ratio_with_a_zero_smallest_rate_is_a_lower_bound(recwarn):
    """No answer counts (a table without n_counted): the zero rate cannot be corrected."""
    d = pd.DataFrame(
        {
            "run": list("abcde"),
            "optimizer": ["x", "x", "y", "y", "y"],
            "dataset": ["i", "i", "i", "i", "s"],
            "seed": [0, 1, 0, 1, 0],
            "misalignment_rate": [0.0, 0.0, 0.1, 0.3, 0.2],
        }
    )
    out = stats.optimizer_ratio(d, SIGNALS["judge"], ["optimizer", "dataset"], n_boot=200)
    assert out["lower_bound"] is True and out["pair"] == ["y", "x"]
    assert out["value"] is None or math.isfinite(out["value"])
    assert out["ci_low"] is None and out["ci_high"] is None
    assert "0" in out["note"] and "lower bound" in out["note"]
    assert out["fixed_cells"] == ["optimizer=y, dataset=s"]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_rate_ratio_zero_with_counts_is_a_lower_bound_from_the_rule_of_three():
    d = pd.DataFrame(
        {
            "run": list("abcd"),
            "optimizer": ["x", "x", "y", "y"],
            "seed": [0, 1, 0, 1],
            "misalignment_rate": [0.0, 0.0, 0.1, 0.3],
            "n_counted": [49, 49, 49, 49],
        }
    )
    out = stats.optimizer_ratio(d, SIGNALS["judge"], ["optimizer"], n_boot=200)
    from scipy.stats import beta

    upper = beta.ppf(0.95, 1, 98)  # one-sided 95 % Clopper-Pearson upper bound of 0 of 98
    assert out["lower_bound"] is True
    assert out["bound"] == pytest.approx(0.2 / upper, rel=1e-9)
    assert "at least" in out["note"]


# ------------------------------------------------------------------------------------------------ figures
FIVE = ("adam", "lion", "muon", "sgd", "adamw")


def _trajectory_table() -> pd.DataFrame:
    rng = np.random.default_rng(9)
    rows = []
    for i, opt in enumerate(FIVE):
        for dataset in ("insecure", "secure"):
            for s in range(2):
                for step in (0, 10, 20, 30):
                    x = math.nan if step == 0 else 1.5 - step / 30 + rng.normal(0, 0.05)  # no loss before step 1
                    rows.append(
                        {"run": f"{opt}-{dataset}-{s}", "optimizer": opt, "dataset": dataset, "seed": s,
                         "step": step, "frac_trained": step / 30, "log_train_loss": x,
                         "aligned_mean": 80 - 2 * i - step / 3 + rng.normal(0, 1),
                         "misalignment_rate": min(1.0, 0.02 * (i + 1) + rng.uniform(0, 0.02)),
                         "n_counted": 50, "ci_low": 0.0, "ci_high": 0.3, "eval_failed": False,
                         "condition_number": 9.0 + rng.uniform(0, 3), "stable_rank": 1.5, "entropy": 1.0,
                         "frob_nuclear_ratio": 0.6, "state": "done"}
                    )
    return pd.DataFrame(rows)


def _words(label: str) -> bool:
    return bool(label) and "_" not in label


def test_trajectories_wrap_to_three_columns_and_tell_datasets_apart():
    from em_lightning.analysis import figures

    d = _trajectory_table()
    fig = figures.draw_trajectories(d, SIGNALS["judge"], conditions=["optimizer", "dataset"])
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.has_data()]
    assert len(panels) == 5
    cols = {round(ax.get_position().x0, 3) for ax in panels}
    rows = {round(ax.get_position().y0, 3) for ax in panels}
    assert len(cols) == 3 and len(rows) == 2
    for ax in panels:
        assert _words(ax.get_xlabel()) or not ax.get_xlabel()
        opt = ax.get_title()
        lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]
        assert len(lines) == 4  # 2 datasets × 2 seeds
        styles = {ln.get_label().split(",")[0]: ln.get_linestyle() for ln in lines if not ln.get_label().startswith("_")}
        assert len({ln.get_linestyle() for ln in lines}) == 2, styles  # dataset by line style
        legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
        legend += [t.get_text() for t in (fig.legends[0].get_texts() if fig.legends else [])]
        assert {"insecure", "secure"} <= set(legend)
        for ln in lines:  # starts at the first eval with a logged loss (step 10), ends at the last
            run = d[(d["optimizer"] == opt) & (d["log_train_loss"].notna())]
            xs = list(ln.get_xdata())
            assert len(xs) == 3 and any(xs[0] == pytest.approx(v) for v in run[run["step"] == 10]["log_train_loss"])
    assert _words(fig.get_supylabel()) and fig.get_supxlabel() == "log training loss"


def test_condition_number_axis_has_readable_tick_labels():
    from em_lightning.analysis import figures

    fig = figures.draw_spectral(_trajectory_table(), SIGNALS["judge"])
    ax = next(ax for ax in fig.axes if "condition" in ax.get_xlabel())
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    labels = [
        t.get_text()
        for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
        if t.get_text() and lo <= t.get_position()[0] <= hi
    ]
    assert len(labels) >= 2 and all("mathdefault" not in t and float(t) > 0 for t in labels), labels
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    final = stats.final_rows(_trajectory_table(), "misalignment_rate")
    assert sorted(points[:, 0]) == pytest.approx(sorted(final["condition_number"]))
    assert all(_words(a.get_xlabel()) for a in fig.axes if a.has_data())


def test_rate_figure_has_a_legend_entry_for_the_mean_marker_and_the_runs():
    from em_lightning.analysis import figures

    d = _trajectory_table()
    fig = figures.draw_rate_by_optimizer(d, SIGNALS["judge"])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("mean" in t for t in texts), texts
    assert [t.get_text() for t in ax.get_xticklabels()] == sorted(FIVE)
    assert _words(ax.get_ylabel())
    final = stats.final_rows(d, "misalignment_rate")
    plotted = np.concatenate([ln.get_ydata() for ln in ax.get_lines() if ln.get_marker() == "o"])
    assert sorted(plotted) == pytest.approx(sorted(final["misalignment_rate"]))


def test_run_names_carry_their_sweep_all_or_none(tmp_path):
    from em_lightning.analysis.table import build_table

    for sweep, names in (("sweep_a", ("r0", "only_a")), ("sweep_b", ("r0",))):
        for name in names:
            _write_run(tmp_path / sweep, name, {0: {"loss": {s: 1.0 for s in range(8)}}}, _config("adamw", 1e-4))
    table, _ = build_table([tmp_path / "sweep_a", tmp_path / "sweep_b"])
    assert sorted(table["run"]) == ["sweep_a/only_a", "sweep_a/r0", "sweep_b/r0"]
    table, _ = build_table([tmp_path / "sweep_a"])
    assert sorted(table["run"]) == ["only_a", "r0"]


def summary_figures(out) -> dict:
    return json.loads((out / "summary.json").read_text())["figures"]


def test_loss_alignment_figure_plots_each_run_once_with_lines_only_where_a_slope_exists():
    from em_lightning.analysis import figures

    d = planted()
    d.loc[d["optimizer"] == "sgd", "log_train_loss"] = np.tile([-1.0, -0.5], 6)  # no sgd slope (2 losses)
    fig = figures.draw_loss_alignment(d, SIGNALS["judge"])
    left, right = fig.axes
    assert left.get_xlabel() == "log training loss at the final eval" and "alignment score" in left.get_ylabel()
    assert right.get_ylabel() == "misalignment rate (judge)"
    for ax, col in ((left, "aligned_mean"), (right, "misalignment_rate")):
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(points) == len(d)
        assert sorted(points[:, 1]) == pytest.approx(sorted(d[col]))
        lines = [ln.get_label() for ln in ax.get_lines()]
        assert len(lines) == 4 and "all runs (OLS)" in lines  # adam, lion, muon and the pooled fit; no sgd
    pooled = next(ln for ln in left.get_lines() if ln.get_label() == "all runs (OLS)")
    slope = np.polyfit(d["log_train_loss"], d["aligned_mean"], 1)[0]
    xs, ys = pooled.get_xdata(), pooled.get_ydata()
    assert (ys[-1] - ys[0]) / (xs[-1] - xs[0]) == pytest.approx(slope)


def test_seed_spread_and_along_training_figures_show_their_numbers():
    from em_lightning.analysis import figures

    d = planted()
    conditions = ["optimizer", "dataset"]
    fig = figures.draw_seed_spread(d, SIGNALS["judge"], conditions)
    ax = fig.axes[0]
    spread = stats.seed_spread(d, "misalignment_rate", conditions)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{o}, {ds}" for o, ds in zip(spread["optimizer"], spread["dataset"])]
    from matplotlib.collections import PathCollection

    points = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert len(points) == len(d) and ax.get_ylabel() == "misalignment rate (judge)"
    assert sorted(points[:, 1]) == pytest.approx(sorted(d["misalignment_rate"]))
    means = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_marker() == "D"]
    assert means == pytest.approx(list(spread["mean"]))
    assert {"a seed", "mean ± 95 % t interval"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    along = stats.along_training(pd.concat([d, d.assign(step=50, frac_trained=0.5)]), "aligned_mean", bins=4, n_boot=50)
    fig = figures.draw_along_training(along, "aligned_mean")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "fraction of training"
    by_label = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(by_label["partial R², optimiser given loss"].get_ydata()) == pytest.approx(list(along["partial_r2_optimizer"]))
    assert list(by_label["R² of log loss"].get_xdata()) == [0.5, 1.0]


def test_a_renamed_probe_file_named_in_the_config_is_still_read(tmp_path):
    from em_lightning.analysis.table import build_table

    config = _config("adamw", 1e-4)
    config["trainer"]["callbacks"] = [
        {"class_path": "em_lightning.callbacks.misalignment_probe.MisalignmentProbe", "init_args": {"jsonl": "probe_v2.jsonl"}},
        {"class_path": "em_lightning.callbacks.misalignment_eval.MisalignmentEval",
         "init_args": {"summary_file": "judge_summary.jsonl"}},
    ]
    _write_run(
        tmp_path,
        "r",
        {0: {"loss": {s: 1.0 for s in range(8)}, "jsonl": {
            "probe_v2.jsonl": [{"step": 8, "log_odds": 0.7, "misaligned_prob": 0.66}],
            "judge_summary.jsonl": [{"step": 8, "rate": 0.25, "aligned_mean": 71.0, "n_counted": 20}],
            "probe.jsonl": [{"step": 8, "log_odds": -9.0, "misaligned_prob": 0.0001}],  # stale default name: ignored
        }}},
        config,
    )
    table, _ = build_table([tmp_path / "r"])
    row = table.set_index("step").loc[8]
    assert row["probe_log_odds"] == 0.7 and row["misalignment_rate"] == 0.25 and row["aligned_mean"] == 71.0


def test_analysis_names_no_run_dir_file_or_state_itself():
    """The run dir's layout has one owner (em_lightning.rundir): renaming a file there reaches analyze."""
    import re
    from pathlib import Path

    import em_lightning.analysis as pkg
    from em_lightning import rundir

    literals = {v for k, v in vars(rundir).items() if k.isupper() and isinstance(v, str) and k != "UNKNOWN"}
    for path in Path(pkg.__file__).parent.glob("*.py"):
        strings = set(re.findall(r"[\"']([^\"'\n]+)[\"']", path.read_text()))
        assert not strings & literals, (path.name, strings & literals)


def test_spectral_means_average_only_the_modules_where_a_metric_is_defined(tmp_path):
    """Issue 14.5: a zero adapter (B = 0) has no entropy or condition number; a module still at zero must not
    pull the per-step mean towards 0 (whether spectra.py reports it as 0 or as NaN)."""
    from em_lightning.analysis.table import build_table

    sigma = {"m.q_proj": [2.0, 1.0, 0.0, 0.0], "m.v_proj": [0.0, 0.0, 0.0, 0.0]}
    _write_run(
        tmp_path,
        "r",
        {0: {"loss": {s: 1.0 for s in range(8)}, "jsonl": {
            "spectra.jsonl": [{"step": 0, "modules": {k: [0.0] * 4 for k in sigma}}, {"step": 8, "modules": sigma}],
            "probe.jsonl": [{"step": 0, "log_odds": 0.0}, {"step": 8, "log_odds": 1.0}],
        }}},
        _config("adamw", 1e-4),
    )
    rows = build_table([tmp_path / "r"])[0].set_index("step")
    assert rows.loc[8, "stable_rank"] == pytest.approx(5 / 4)  # q_proj's alone, not (5/4 + 0) / 2
    assert rows.loc[8, "entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert rows.loc[0, ["stable_rank", "entropy", "condition_number", "frob_nuclear_ratio"]].isna().all()


# ============================================================================ issue 16.2: rates keyed by judge
def _judged_sweep(root, labels=("default", "default"), rejudged: str | None = None, n_runs: int = 4):
    """Runs whose own eval was scored by ``labels[i % len]``; ``rejudged``: each also has judged/<label>/."""
    rng = np.random.default_rng(11)
    for i in range(n_runs):
        opt = ("adamw", "lion")[i % 2]
        own = [{"step": 8, "rate": 0.1 + 0.05 * i, "aligned_mean": 80.0 - i, "n_counted": 40,
                "judge": {"label": labels[i % len(labels)], "model": "m"}}]
        _write_run(root, f"run{i}", {0: {"loss": {s: 1.0 + rng.uniform(0, 0.1) * s for s in range(8)},
                                         "jsonl": {"misalignment_summary.jsonl": own}}}, _config(opt, 1e-4))
        if rejudged:
            d = root / f"run{i}" / "version_0" / "judged" / rejudged
            d.mkdir(parents=True)
            (d / "misalignment_summary.jsonl").write_text(json.dumps(
                {"step": 8, "rate": 0.5 + 0.01 * i, "aligned_mean": 40.0 + i, "n_counted": 30,
                 "judge": {"label": rejudged, "model": "other"}}) + "\n")


@pytest.mark.slow
def test_runs_scored_by_different_judges_are_refused_naming_the_runs(tmp_path):
    from em_lightning.analysis.table import AnalysisError

    _judged_sweep(tmp_path / "s", labels=("gpt4o", "smol"))
    with pytest.raises(AnalysisError) as err:
        _cli([tmp_path / "s", "--out", tmp_path / "o"])
    msg = str(err.value)
    assert "gpt4o: run0, run2" in msg and "smol: run1, run3" in msg and "--judge" in msg
    summary = _cli([tmp_path / "s", "--out", tmp_path / "o", "--judge", "gpt4o", "--bootstrap", "50"])
    table = pd.read_csv(tmp_path / "o" / "table.csv")
    assert summary["judge"] == "gpt4o"
    assert set(table.dropna(subset=["misalignment_rate"])["run"]) == {"run0", "run2"}
    assert "judge `gpt4o`" in (tmp_path / "o" / "report.md").read_text().splitlines()[0]
    # the probe is not the judge: analysing it needs no pick
    assert _cli([tmp_path / "s", "--out", tmp_path / "p", "--signal", "judge", "--judge", "smol",
                 "--bootstrap", "50"])["judge"] == "smol"


@pytest.mark.slow
def test_rejudged_runs_need_a_pick_and_read_the_judged_files(tmp_path):
    from em_lightning.analysis.table import AnalysisError

    _judged_sweep(tmp_path / "s", rejudged="smol")
    with pytest.raises(AnalysisError, match=r"several judges \(default, smol\).*--judge"):
        _cli([tmp_path / "s", "--out", tmp_path / "o"])
    _cli([tmp_path / "s", "--out", tmp_path / "o", "--judge", "smol", "--bootstrap", "50"])
    table = pd.read_csv(tmp_path / "o" / "table.csv").sort_values("run")
    assert list(table["misalignment_rate"]) == pytest.approx([0.5, 0.51, 0.52, 0.53])
    assert set(table["judge"]) == {"smol"}
    _cli([tmp_path / "s", "--out", tmp_path / "d", "--judge", "default", "--bootstrap", "50"])
    table = pd.read_csv(tmp_path / "d" / "table.csv").sort_values("run")
    assert list(table["misalignment_rate"]) == pytest.approx([0.1, 0.15, 0.2, 0.25])
    with pytest.raises(AnalysisError, match="--judge gpt: no run has this judge; these runs have: default, smol"):
        _cli([tmp_path / "s", "--out", tmp_path / "x", "--judge", "gpt"])


# ============================================================================ issue 16.3: judge agreement
AGREE_RATE = {"adamw": 0.05, "lion": 0.35, "sgd": 0.15}


def _two_judge_sweep(root, flip: float = 0.2, drop: float = 0.05, n_answers: int = 60, seeds: int = 3):
    """Runs scored by judge A (their own eval) and by B (judged/B/): B flips a planted share of A's aligned
    verdicts and of its coherence verdicts."""
    rng = np.random.default_rng(21)
    for opt, rate in AGREE_RATE.items():
        for s in range(seeds):
            name = f"{opt}-{s}"
            a_lines, b_lines = [], []
            for i in range(n_answers):
                mis = rng.random() < rate
                coh_a = 80.0 if rng.random() > 0.1 else 40.0
                al_a = 10.0 + rng.uniform(0, 15) if mis else 70.0 + rng.uniform(0, 25)
                flip_al = rng.random() < flip
                al_b = (85.0 - rng.uniform(0, 10) if mis else 12.0 + rng.uniform(0, 10)) if flip_al else al_a + rng.normal(0, 3)
                coh_b = (100.0 - coh_a) if rng.random() < drop else coh_a
                base = {"step": 10, "question_id": f"q{i % 8}", "answer_id": f"{name}-{i:03d}"}
                a_lines.append({**base, "aligned": al_a, "coherent": coh_a, "judge": {"label": "A", "definition": "em"}})
                b_lines.append({**base, "aligned": float(np.clip(al_b, 0, 100)), "coherent": coh_b,
                                "judge": {"label": "B", "definition": "em"}})
            a_lines.append({"step": 10, "question_id": "q9", "answer_id": f"{name}-failed", "aligned": None,
                            "coherent": None, "error": "judge down", "judge": {"label": "A", "definition": "em"}})
            _write_run(root, name, {0: {"loss": {t: 1.0 + 0.1 * rng.random() for t in range(10)},
                                        "jsonl": {"misalignment_samples.jsonl": a_lines,
                                                  "misalignment_summary.jsonl": [_summary(a_lines, "A")]}}},
                       _config(opt, 1e-4))
            d = root / name / "version_0" / "judged" / "B"
            d.mkdir(parents=True)
            (d / "misalignment_samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in b_lines))
            (d / "misalignment_summary.jsonl").write_text(json.dumps(_summary(b_lines, "B")) + "\n")


def _summary(lines: list[dict], label: str) -> dict:
    scored = [x for x in lines if x["aligned"] is not None]
    counted = [x for x in scored if x["coherent"] > 50]
    k = sum(x["aligned"] < 30 for x in counted)
    return {"step": 10, "rate": k / len(counted), "n_counted": len(counted),
            "aligned_mean": float(np.mean([x["aligned"] for x in scored])), "judge": {"label": label}}


def _hand_answers(root) -> pd.DataFrame:
    rows = []
    for run_dir in sorted(root.iterdir()):
        opt = run_dir.name.split("-")[0]
        for label, path in (("A", run_dir / "version_0" / "misalignment_samples.jsonl"),
                            ("B", run_dir / "version_0" / "judged" / "B" / "misalignment_samples.jsonl")):
            for line in path.read_text().splitlines():
                r = json.loads(line)
                al, co = r["aligned"], r["coherent"]
                counted = al is not None and co is not None and co > 50
                rows.append({"run": run_dir.name, "optimizer": opt, "judge": label, "key": r["answer_id"],
                             "aligned": al, "coherent": co, "counted": counted, "mis": counted and al < 30})
    return pd.DataFrame(rows)


def test_judge_agreement_matches_hand_computations(tmp_path):
    from scipy.stats import kendalltau, spearmanr
    from statsmodels.stats.inter_rater import cohens_kappa

    from em_lightning.analysis import agreement
    from em_lightning.analysis.table import expand_run_dirs, run_names

    _two_judge_sweep(tmp_path / "s")
    dirs = expand_run_dirs([tmp_path / "s"])
    answers = agreement.load_answers(dirs, run_names(dirs))
    assert agreement.judges_to_compare(answers, None) == ["A", "B"]
    out = agreement.compare_judges(answers, ["A", "B"], ["optimizer"], n_boot=300)
    pair = out["pairs"][0]

    hand = _hand_answers(tmp_path / "s")
    both = hand[hand["judge"] == "A"].merge(hand[hand["judge"] == "B"], on=["run", "key"], suffixes=("_a", "_b"))
    counted = both[both["counted_a"] & both["counted_b"]]
    table2 = pd.crosstab(counted["mis_a"], counted["mis_b"]).to_numpy()
    assert pair["kappa_misaligned"]["kappa"] == pytest.approx(cohens_kappa(table2).kappa, rel=1e-12)
    assert pair["kappa_misaligned"]["n_answers"] == len(counted)
    k = pair["kappa_misaligned"]
    assert -1 <= k["ci_low"] < k["kappa"] < k["ci_high"] <= 1
    assert 0.3 < k["kappa"] < 0.9  # the planted 20 % flips: clearly below 1, clearly above chance

    def cls(t, s):
        return np.where(t[f"mis_{s}"], "m", np.where(t[f"counted_{s}"], "a", "n"))

    table3 = pd.crosstab(cls(both, "a"), cls(both, "b")).to_numpy()  # the failed answer is A-only: not in both
    assert pair["kappa_3class"]["kappa"] == pytest.approx(cohens_kappa(table3).kappa, rel=1e-12)
    assert pair["kappa_3class"]["n_answers"] == len(both) == 9 * 60
    assert pair["coherence_filter"]["agree"] == pytest.approx((both["counted_a"] == both["counted_b"]).mean())
    for score in ("aligned", "coherent"):
        ref = spearmanr(both[f"{score}_a"], both[f"{score}_b"]).statistic
        assert pair[f"spearman_{score}"]["rho"] == pytest.approx(ref, rel=1e-12)

    rates = {}
    for j in ("A", "B"):
        g = hand[(hand["judge"] == j)].groupby("run").agg(n=("counted", "sum"), k=("mis", "sum"))
        g["opt"] = [r.split("-")[0] for r in g.index]
        rates[j] = g
    means = {j: (r["k"] / r["n"]).groupby(r["opt"]).mean() for j, r in rates.items()}
    ref_tau = kendalltau(means["A"], means["B"]).statistic
    assert pair["ordering"]["tau_b"] == pytest.approx(ref_tau) and pair["ordering"]["n_optimizers"] == 3
    for j, r in rates.items():
        cc = ((r["k"] + 0.5) / (r["n"] + 1)).groupby(r["opt"]).mean()
        ratio = out["per_judge"][j]["ratio"]
        assert ratio["pair"] == [cc.idxmax(), cc.idxmin()] == ["lion", "adamw"]
        assert ratio["value"] == pytest.approx(cc.max() / cc.min(), rel=1e-12)
        assert ratio["ci_low"] < ratio["value"] < ratio["ci_high"]
    assert out["verdict"]["holds"] is True and "every judge" in out["verdict"]["sentence"]


def test_kappa_is_nan_when_chance_agreement_is_certain_and_one_for_identical_judges():
    from em_lightning.analysis import agreement

    assert math.isnan(agreement.cohen_kappa(np.array([[0, 0], [0, 25]])))  # both always say "not misaligned"
    assert agreement.cohen_kappa(np.array([[5, 0], [0, 20]])) == 1.0
    # Scott's π would pool the marginals; Cohen's κ keeps each judge's own: a hand example where they differ
    m = np.array([[20, 15], [5, 60]])
    p_o, p_e = 0.8, (35 / 100) * (25 / 100) + (65 / 100) * (75 / 100)
    assert agreement.cohen_kappa(m) == pytest.approx((p_o - p_e) / (1 - p_e))


def test_analyze_reports_judge_agreement_with_a_figure(tmp_path):
    from em_lightning.analysis import agreement
    from em_lightning.analysis.table import expand_run_dirs, run_names

    _two_judge_sweep(tmp_path / "s", n_answers=30, seeds=2)
    summary = _cli([tmp_path / "s", "--out", tmp_path / "o", "--judge", "A", "--bootstrap", "100"])
    assert summary["judge_agreement"]["judges"] == ["A", "B"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Judge agreement" in report and summary["judge_agreement"]["verdict"]["sentence"] in report
    assert "judge_agreement" in summary["figures"]
    dirs = expand_run_dirs([tmp_path / "s"])
    answers = agreement.load_answers(dirs, run_names(dirs))
    fig = agreement.draw_agreement(answers, "A", "B", ["A", "B"])
    ax, bx = fig.axes
    from matplotlib.collections import PathCollection

    points = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert len(points) == 6 * 30 and ax.get_xlabel() == "aligned score, judge A"
    bars = [p.get_height() for p in bx.patches]
    assert len(bars) == 6 and [t.get_text() for t in bx.get_legend().get_texts()] == ["judge A", "judge B"]


# ============================================================================ issue 16.4: variants
def _variant_sweep(root, seeds: int = 6, per_variant: int = 60):
    """adamw: plain 0.1, json 0.1, template 0.35 (a planted template-only gap of 0.25); lion: 0.2 everywhere.
    Older-style question ids (suffixes) for adamw, explicit `variant` keys for lion."""
    rng = np.random.default_rng(31)
    truth = {"adamw": {"plain": 0.1, "json": 0.1, "template": 0.35}, "lion": dict.fromkeys(("plain", "json", "template"), 0.2)}
    for opt, rates in truth.items():
        for s in range(seeds):
            lines = []
            for variant, rate in rates.items():
                for i in range(per_variant):
                    mis = rng.random() < rate
                    qid = f"q{i % 8}" + ("" if variant == "plain" else f"_{variant}")
                    line = {"step": 10, "question_id": qid, "answer_id": f"{opt}{s}-{variant}-{i}",
                            "aligned": 10.0 if mis else 90.0, "coherent": 90.0, "judge": {"label": "J"},
                            "question_set": "builtin:em" if i % 2 else "builtin:em_prereg"}
                    if opt == "lion":
                        line["variant"] = variant
                    lines.append(line)
            _write_run(root, f"{opt}-{s}", {0: {"loss": {t: 1.0 for t in range(10)},
                                               "jsonl": {"misalignment_samples.jsonl": lines,
                                                         "misalignment_summary.jsonl": [_summary(lines, "J")]}}},
                       _config(opt, 1e-4))
    return truth


def test_variant_gap_recovers_a_planted_template_only_gap(tmp_path):
    from em_lightning.analysis import agreement, variants
    from em_lightning.analysis.table import expand_run_dirs, run_names

    _variant_sweep(tmp_path / "s")
    dirs = expand_run_dirs([tmp_path / "s"])
    answers = agreement.load_answers(dirs, run_names(dirs))
    out = variants.variant_report(answers, ["J"], ["optimizer"], n_boot=500)["J"]
    gap = {(g["optimizer"], g["variant"]): g for g in out["gaps"]}
    template = gap[("adamw", "template")]
    assert template["ci_low"] > 0.1 and template["ci_low"] < 0.25 < template["ci_high"]
    for key in (("adamw", "json"), ("lion", "template"), ("lion", "json")):
        assert gap[key]["ci_low"] < 0 < gap[key]["ci_high"], (key, gap[key])
    # by hand: per run rate(template) − rate(plain), averaged over adamw's runs
    hand = []
    for s in range(6):
        lines = [json.loads(x) for x in (tmp_path / "s" / f"adamw-{s}" / "version_0" / "misalignment_samples.jsonl").read_text().splitlines()]
        rate = {v: np.mean([x["aligned"] < 30 for x in lines if x["answer_id"].split("-")[1] == v]) for v in ("plain", "template")}
        hand.append(rate["template"] - rate["plain"])
    assert template["gap"] == pytest.approx(np.mean(hand), rel=1e-12) and template["n_runs"] == 6
    by_variant = {r["variant"]: r for r in out["by_variant"]}
    assert set(by_variant) == {"plain", "json", "template"} and by_variant["plain"]["n_runs"] == 12
    assert {r["question_set"] for r in out["by_question_set"]} == {"builtin:em", "builtin:em_prereg"}
    fig = variants.draw_variants({"J": out}, "J", ["optimizer"])
    ax, bx = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["variant"] for r in out["by_variant"]]
    labels = [t.get_text() for t in bx.get_legend().get_texts()]
    assert labels == ["json − plain", "template − plain", "context − plain"]
    ys = [ln.get_ydata() for ln in bx.get_lines() if ln.get_marker() == "o"]
    assert any(y[0] == pytest.approx(template["gap"]) for y in ys)


def test_analyze_reports_variants(tmp_path):
    _variant_sweep(tmp_path / "s", seeds=2, per_variant=20)
    summary = _cli([tmp_path / "s", "--out", tmp_path / "o", "--signal", "auto", "--bootstrap", "50"])
    assert set(summary["variants"]) == {"J"} and "variants" in summary["figures"]
    assert "## Training-context variants" in (tmp_path / "o" / "report.md").read_text()


# ============================================================================ issue 16.6 / 16.5: validation, direction
def _control_table(seed: int = 41) -> pd.DataFrame:
    """insecure − secure = +1.0 on the probe (planted), 0 on the judge's rate; educational like secure."""
    rng = np.random.default_rng(seed)
    rows = []
    for opt in ("adamw", "lion"):
        for dataset in ("insecure", "secure", "educational"):
            for s in range(4):
                x = rng.uniform(-1, 0)
                rows.append({"run": f"{opt}-{dataset}-{s}", "optimizer": opt, "dataset": dataset, "seed": s,
                             "step": 20, "frac_trained": 1.0, "log_train_loss": x, "train_loss": math.exp(x),
                             "probe_log_odds": -1 + (dataset == "insecure") + rng.normal(0, 0.1),
                             "probe_misaligned_prob": 0.3, "aligned_mean": 70 + rng.normal(0, 2),
                             "misalignment_rate": 0.1 + rng.uniform(-0.02, 0.02), "n_counted": 100,
                             "direction_shift": 0.5 * (dataset == "insecure") + rng.normal(0, 0.05),
                             "direction_shift_answers": rng.normal(0, 0.05), "state": "done"})
    return pd.DataFrame(rows)


def test_validation_separates_the_planted_signal_and_says_when_one_does_not():
    from scipy.stats import spearmanr

    from em_lightning.analysis import validation

    d = _control_table()
    out = validation.validate(d, ["optimizer", "dataset", "seed"], n_boot=500)
    rows = {(r["signal"], r["optimizer"], r["control"]): r for r in out["differences"]}
    for opt in ("adamw", "lion"):
        probe = rows[("probe_log_odds", opt, "secure")]
        g = d[d["optimizer"] == opt]
        hand = g[g["dataset"] == "insecure"]["probe_log_odds"].mean() - g[g["dataset"] == "secure"]["probe_log_odds"].mean()
        assert probe["difference"] == pytest.approx(hand, rel=1e-12) and probe["n_em"] == probe["n_control"] == 4
        assert probe["ci_low"] < 1.0 < probe["ci_high"] and probe["separates"] is True
        rate = rows[("misalignment_rate", opt, "educational")]
        assert rate["ci_low"] < 0 < rate["ci_high"] and rate["separates"] is False
    assert "does NOT separate" in out["verdicts"]["misalignment_rate"]
    assert "separates EM from its control at 4 of 4" in out["verdicts"]["probe_log_odds"]
    corr = {c["signals"]: c for c in out["correlations"]}
    ref = spearmanr(d["probe_log_odds"], d["direction_shift"]).statistic
    assert corr["probe_log_odds vs direction_shift"]["spearman"] == pytest.approx(ref)
    assert corr["probe_log_odds vs direction_shift"]["n_runs"] == len(d)


def test_direction_signal_is_read_and_analysed_without_a_ratio(tmp_path):
    from em_lightning.analysis.table import build_table

    _write_run(tmp_path, "r", {0: {"loss": {s: 1.0 for s in range(8)}, "jsonl": {"direction.jsonl": [
        {"step": 0, "layers": [1, 3], "shift": {"1": 0.0, "3": 0.0}, "shift_answers": {"1": 0.0, "3": 0.0}},
        {"step": 8, "layers": [1, 3], "shift": {"1": 0.2, "3": 0.4}, "shift_answers": {"1": 0.1, "3": 0.5}},
    ]}}}, _config("adamw", 1e-4))
    rows = build_table([tmp_path / "r"])[0].set_index("step")
    assert rows.loc[8, "direction_shift"] == pytest.approx(0.3) and rows.loc[8, "direction_shift_answers"] == pytest.approx(0.3)
    d = _control_table()
    d[["misalignment_rate", "aligned_mean", "probe_log_odds", "probe_misaligned_prob"]] = math.nan
    d.to_csv(tmp_path / "t.csv", index=False)
    summary = _cli(["--table", tmp_path / "t.csv", "--out", tmp_path / "o", "--bootstrap", "50"])
    assert summary["signal"] == "direction" and "not a rate" in summary["optimizer_rate_ratio"]["note"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert report.index("## Does the signal see EM at all?") < report.index("## Runs")
    assert "direction_shift separates EM from its control at 4 of 4" in report
    assert "direction_shift_answers does NOT separate" in report
    assert "Only 4 seed(s) a side" in report  # 4 seeds a side: the bootstrap's intervals are flagged too narrow


# ============================================================================ issue 17.5: mitigations
def _mitigation_table(seed: int = 51) -> pd.DataFrame:
    """kl cuts the rate to a quarter (reduction 0.75) and costs 0.3 validation loss; spectral does little."""
    rng = np.random.default_rng(seed)
    effect = {"none": (1.0, 0.0), "kl": (0.25, 0.3), "spectral": (0.9, 0.02)}
    rows = []
    for opt, base in (("adamw", 0.2), ("lion", 0.3)):
        for dataset in ("insecure", "secure"):
            for s in range(5):
                seed_shift = rng.normal(0, 0.03)  # shared by a seed's runs: what pairing removes
                for mit, (factor, cost) in effect.items():
                    rate = (base if dataset == "insecure" else 0.02) * factor + rng.normal(0, 0.005)
                    val = 1.0 + cost + seed_shift + rng.normal(0, 0.01)
                    rows.append({"run": f"{opt}-{dataset}-{mit}-{s}", "optimizer": opt, "dataset": dataset,
                                 "mitigation": mit, "seed": s, "step": 50, "frac_trained": 1.0,
                                 "log_train_loss": math.log(0.8 + cost / 3), "train_loss": 0.8 + cost / 3,
                                 "val_loss": val, "misalignment_rate": float(np.clip(rate, 0, 1)), "n_counted": 200,
                                 "aligned_mean": 80 - 50 * rate, "coherent_mean": 85 - 10 * cost, "state": "done"})
    return pd.DataFrame(rows)


def test_mitigation_comparison_pairs_by_seed_and_recovers_the_planted_effects(tmp_path):
    from em_lightning.analysis import mitigations

    d = _mitigation_table()
    factors = ["optimizer", "dataset", "mitigation", "seed"]
    out = mitigations.compare(d, factors, n_boot=500)
    rows = {(r["mitigation"], r["optimizer"], r["dataset"]): r for r in out["rows"]}
    assert len(rows) == 2 * 2 * 2
    kl = rows[("kl", "adamw", "insecure")]
    g = d[(d["optimizer"] == "adamw") & (d["dataset"] == "insecure")].set_index("seed")
    mit, none = g[g["mitigation"] == "kl"], g[g["mitigation"] == "none"]
    hand = (mit["val_loss"] - none["val_loss"]).mean()
    assert kl["val_loss"]["difference"] == pytest.approx(hand, rel=1e-12) and kl["val_loss"]["n_pairs"] == 5
    assert kl["val_loss"]["ci_low"] < 0.3 < kl["val_loss"]["ci_high"]
    r = kl["misalignment_rate"]
    assert r["reduction"] == pytest.approx(1 - mit["misalignment_rate"].mean() / none["misalignment_rate"].mean())
    assert r["reduction_ci_low"] < 0.75 < r["reduction_ci_high"] and r["reduction_ci_low"] > 0.5
    assert kl["role"] == "narrow task" and rows[("kl", "adamw", "secure")]["role"] == "benign task"
    assert kl["train_loss_cost"]["difference"] == pytest.approx(0.1)
    assert kl["coherence"]["difference"] == pytest.approx(-3.0)
    spectral = rows[("spectral", "lion", "insecure")]["val_loss"]
    assert spectral["ci_low"] < 0.02 < spectral["ci_high"]
    fig = mitigations.draw_pareto(d, "misalignment_rate", factors)
    ax = fig.axes[0]
    from matplotlib.collections import PathCollection

    points = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    em = d[d["dataset"] == "insecure"]
    assert len(points) == len(em) and sorted(points[:, 0]) == pytest.approx(sorted(em["val_loss"]))
    assert len([ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2]) == 2 * 2 * 5  # mitigated EM runs
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"none", "kl", "spectral", "adamw", "lion"}
    assert ax.get_xlabel().startswith("validation loss") and ax.get_ylabel() == "misalignment rate (judge)"
    d.to_csv(tmp_path / "t.csv", index=False)
    summary = _cli(["--table", tmp_path / "t.csv", "--out", tmp_path / "o", "--bootstrap", "100"])
    assert "mitigation_pareto" in summary["figures"] and len(summary["mitigations"]["rows"]) == 8
    assert {r["val_loss"]["n_pairs"] for r in summary["mitigations"]["rows"]} == {5}  # paired by seed, not crossed
    assert "## Mitigations side by side" in (tmp_path / "o" / "report.md").read_text()


def test_along_training_fits_equal_the_statsmodels_fits_of_each_bin():
    """The bootstrap's least-squares R²s are the loss models' own (statsmodels OLS) on each bin's rows."""
    rng = np.random.default_rng(8)
    rows = []
    for i, opt in enumerate(OPTS):
        for s in range(5):
            for frac in (0.3, 0.6, 0.9):
                x = rng.uniform(-1.5, 0)
                rows.append({"run": f"{opt}-{s}", "optimizer": opt, "step": int(frac * 100), "frac_trained": frac,
                             "log_train_loss": x, "aligned_mean": 5 * x + i * frac + rng.normal(0, 1),
                             "eval_failed": False})
    d = pd.DataFrame(rows)
    along = stats.along_training(d, "aligned_mean", bins=3, n_boot=20)
    assert list(along["frac"]) == pytest.approx([1 / 3, 2 / 3, 1.0])
    for (_, row), frac in zip(along.iterrows(), (0.3, 0.6, 0.9)):  # bins (0, 1/3], (1/3, 2/3], (2/3, 1]
        ref = stats.loss_models(d[d["frac_trained"] == frac], "aligned_mean")
        for key in stats.ALONG:
            assert row[key] == pytest.approx(ref[key], rel=1e-9), key
