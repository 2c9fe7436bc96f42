"""``python -m em_lightning sweep status SWEEP.yaml``: one line per run (state, job, step, last train loss,
last misalignment rate or probe value). Reads only: no config is resolved and no file is written.

The run dirs are read through :mod:`em_lightning.rundir` (the files the run's ``config.yaml`` names), not
through the analysis: a status line needs three numbers, not the analysis table.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from pathlib import Path

import yaml

from em_lightning import rundir
from em_lightning.sweep.launchers import alive
from em_lightning.sweep.spec import Sweep
from em_lightning.sweep.state import read_state

LOSS_TAG = "train/loss"


def print_status(sweep: Sweep, only: list[str] | None = None, log=print) -> dict[str, str]:
    runs = [r for r in sweep.runs() if not only or any(fnmatch.fnmatchcase(r.name, g) for g in only)]
    dirs = {r.name: sweep.root / r.name for r in runs}
    live = alive([d for d in dirs.values() if (read_state(d) or {}).get("state") not in (None, rundir.DONE)])
    rows, states = [], {}
    for name, d in dirs.items():
        state = read_state(d) or {}
        shown = state.get("state", "not started")
        if shown not in ("not started", rundir.DONE, "pending"):
            shown += (
                " (alive)" if live.get(d) else (" (no live job)" if shown in ("running", "submitted") else "")
            )
        step, loss, rate = run_progress(d) if state and rundir.is_run_dir(d) else ("-", "-", "-")
        rows.append((name, shown, str(state.get("job_id") or "-"), step, loss, rate))
        states[name] = state.get("state", "not started")
    header = ("run", "state", "job", "step", "train_loss", "misalignment")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        log("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    counts = {s: list(states.values()).count(s) for s in dict.fromkeys(states.values())}
    log(f"sweep {sweep.name} ({sweep.root}): " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return states


def run_progress(d: Path) -> tuple[str, str, str]:
    """(steps trained, last train loss, last misalignment signal) of a run dir, each ``-`` where absent."""
    versions = rundir.version_dirs(d)
    config_file = rundir.config_path(d)
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file else None
    names = rundir.file_names(config if isinstance(config, dict) else None)
    step = loss = rate = "-"
    last = last_scalar(versions, LOSS_TAG)
    if last is not None:
        step, loss = str(last[0] + 1), f"{last[1]:.4g}"  # train/loss is logged at the step before it counts
    judged = rundir.records_by_step(versions, names["summary"])
    ok = [r for _, r in sorted(judged.items()) if not r.get("failed") and _finite(r.get("rate"))]
    probed = rundir.records_by_step(versions, names["probe"])
    if ok:
        rate = f"{ok[-1]['rate']:.3f} (judge, step {ok[-1]['step']})"
    elif probed:
        record = probed[max(probed)]
        value = record.get("misaligned_prob")
        shown = f"{value:.3f}" if _finite(value) else "nan"
        rate = f"{shown} (probe, step {record['step']})"
    return step, loss, rate


def last_scalar(versions: list[Path], tag: str) -> tuple[int, float] | None:
    """(step, value) of ``tag``'s last point over the version dirs' TensorBoard files (a later version's
    value wins at a step both logged: a resumed run trains those steps again)."""
    try:
        from tbparse import SummaryReader
    except ImportError:  # the analysis extra: without it, status shows no loss
        return None
    points: dict[int, float] = {}
    for v in versions:
        if not any(v.glob("events.out.tfevents.*")):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scalars = SummaryReader(str(v), pivot=False).scalars
        if len(scalars):
            rows = scalars[scalars["tag"] == tag]
            points.update(zip(rows["step"].astype(int).tolist(), rows["value"].astype(float).tolist()))
    if not points:
        return None
    step = max(points)
    return step, points[step]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
