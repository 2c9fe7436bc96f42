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
    assert stats.trend(along)["answer"] is True


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
    for name in names:
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
        assert (out / "figures" / f"{name}.pdf").exists()
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
