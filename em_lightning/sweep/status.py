"""``python -m em_lightning sweep status SWEEP.yaml``: one line per run (state, job, step, last train loss,
last misalignment rate or probe value). Reads only: no config is resolved and no file is written."""

from __future__ import annotations

import fnmatch
import math

from em_lightning.sweep.launchers import alive
from em_lightning.sweep.spec import Sweep
from em_lightning.sweep.state import DONE, read_state


def print_status(sweep: Sweep, only: list[str] | None = None, log=print) -> dict[str, str]:
    from em_lightning.analysis.table import is_run_dir, load_run

    runs = [r for r in sweep.runs() if not only or any(fnmatch.fnmatchcase(r.name, g) for g in only)]
    dirs = {r.name: sweep.root / r.name for r in runs}
    live = alive([d for d in dirs.values() if (read_state(d) or {}).get("state") not in (None, DONE)])
    rows, states = [], {}
    for name, d in dirs.items():
        state = read_state(d) or {}
        shown = state.get("state", "not started")
        if shown not in ("not started", DONE, "pending"):
            shown += (
                " (alive)" if live.get(d) else (" (no live job)" if shown in ("running", "submitted") else "")
            )
        step = loss = rate = "-"
        if is_run_dir(d) and state:
            run = load_run(d, name)
            losses = run.series("train/loss")
            if len(losses):
                step, loss = str(int(losses.index.max()) + 1), f"{losses.iloc[-1]:.4g}"
            ok = [v for _, v in sorted(run.judge.items()) if not v.get("failed")]
            if ok and ok[-1].get("rate") is not None and not math.isnan(ok[-1]["rate"]):
                rate = f"{ok[-1]['rate']:.3f} (judge, step {ok[-1]['step']})"
            elif run.probe:
                last = run.probe[max(run.probe)]
                rate = f"{last.get('misaligned_prob', float('nan')):.3f} (probe, step {last['step']})"
        rows.append((name, shown, str(state.get("job_id") or "-"), step, loss, rate))
        states[name] = state.get("state", "not started")
    header = ("run", "state", "job", "step", "train_loss", "misalignment")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        log("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    counts = {s: list(states.values()).count(s) for s in dict.fromkeys(states.values())}
    log(f"sweep {sweep.name} ({sweep.root}): " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return states
