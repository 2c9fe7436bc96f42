"""TrainingMonitor's values against the batches that were trained on (not just its tags)."""

from __future__ import annotations

import pytest
from tbparse import SummaryReader

from tests.helpers import BatchCounts, find


def _series(scalars, tag):
    rows = scalars[scalars["tag"] == tag].sort_values("step")
    return rows["value"].tolist()


def test_monitor_values_match_the_batches(run_cli):
    k, steps = 2, 4
    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", str(steps), "--data.batch_size", "3",
                  "--trainer.accumulate_grad_batches", str(k), "--trainer.limit_val_batches", "0",
                  "--trainer.callbacks+=tests.helpers.BatchCounts")
    counts = find(cli.trainer, BatchCounts).counts
    assert len(counts) == k * steps
    scalars = SummaryReader(cli.trainer.log_dir, pivot=False).scalars
    per_step = [counts[i * k : (i + 1) * k] for i in range(steps)]
    cumulative, expected_sup, expected_pad = 0, [], []
    for step in per_step:
        cumulative += sum(c[1] for c in step)
        expected_sup.append(float(cumulative))
        expected_pad.append(1 - sum(c[0] for c in step) / sum(c[2] for c in step))
    assert _series(scalars, "train/supervised_tokens") == expected_sup
    assert _series(scalars, "train/padding_frac") == pytest.approx(expected_pad, rel=1e-6)
    rates = _series(scalars, "train/tokens_per_s")
    assert len(rates) == steps and all(r > 0 for r in rates)
    # the rate each step used: 2 warm-up steps ((s + 1) / 3 of lr 1e-3), then 1e-3
    assert _series(scalars, "train/lr") == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-6)
    summary = cli.datamodule.summary["train"]
    assert _series(scalars, "data/train/rows") == [summary["rows"]]
    assert _series(scalars, "data/train/supervised_tokens") == [summary["supervised_tokens"]]
