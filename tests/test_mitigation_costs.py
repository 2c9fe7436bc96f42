"""scripts/mitigation_costs.py end to end on the tiny model and the built-in data (offline): every mitigation asked
for trains through the project's CLI with its overlay, and the cost table pairs each with none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cost_script_trains_each_overlay_and_prints_paired_costs():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mitigation_costs.py"), "--model", "tiny-qwen3", "--train-file",
         "builtin:demo", "--steps", "3", "--seeds", "0,1", "--mitigations", "spectral,interleave,nonexistent",
         "--loss-window", "2", "--val-batches", "1", "--boot", "200"],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.index("model tiny-qwen3") < text.index("costs against none")  # settings first
    assert "not in configs/mitigations/, skipped: nonexistent" in text
    runs = re.findall(r"^  (\w+)\s+seed (\d): 3 steps in .*val loss ([\d.]+), median step ([\d.]+) s$", text, re.MULTILINE)
    assert sorted((name, seed) for name, seed, *_ in runs) == sorted(
        (n, s) for n in ("none", "spectral", "interleave") for s in "01")
    # interleave's training loss is its narrow rows' own (the mixed rows are not the task)
    assert re.search(r"interleave\s+seed 0: .*\(train/loss_narrow, last 2 steps\)", text)
    assert re.search(r"spectral\s+seed 0: .*\(train/loss, last 2 steps\)", text)
    row = re.search(r"^  spectral\s+([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] \(([+-][\d.]+), ([+-][\d.]+)\)",
                    text, re.MULTILINE)
    mean, low, high, a, b = map(float, row.groups())
    assert mean == pytest.approx((a + b) / 2, abs=1e-4)  # the paired mean of the per-seed differences
    assert (low, high) == pytest.approx((min(a, b), max(a, b)), abs=1e-4)  # 2 pairs: the range
    val = {(name, seed): float(v) for name, seed, v, _ in runs}
    none_val = [val[("none", s)] for s in "01"]
    assert none_val[0] != none_val[1]  # the seeds differ (their held-out rows and the adapter's init)
