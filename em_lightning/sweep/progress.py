"""What the local launcher tells the user while it waits: run k of N as each run starts and ends, the elapsed
time and an estimate of the time left; and at the end one screen: how many runs are done and failed, and for
each failed run its error line and the log to read.

The estimate is the mean wall time of the runs finished so far times the runs left, divided by how many run
at once: nothing before the first run ends (no basis yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from em_lightning import rundir

SUMMARY_FAILED_LINES = 10  # failed runs listed by name; the rest are counted (one screen)


@dataclass
class Progress:
    total: int
    parallel: int = 1  # runs at once (the scheduler's CPU slots or GPU sets)
    log: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    started: int = 0
    finished: int = 0
    t0: float = field(default=0.0)
    _starts: dict[str, float] = field(default_factory=dict)
    _durations: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.t0 = self.clock()

    def run_started(self, name: str, note: str = "") -> None:
        self.started += 1
        self._starts[name] = self.clock()
        self.log(
            f"[{self.started}/{self.total}] started  {name}{f'  ({note})' if note else ''}  {self._times()}"
        )

    def run_ended(self, name: str, state: str, log_path: Path | None = None) -> None:
        self.finished += 1
        took = self.clock() - self._starts.pop(name, self.clock())
        self._durations.append(took)
        see = f"  (see {log_path})" if state != rundir.DONE and log_path else ""
        self.log(
            f"[{self.finished}/{self.total}] {state:<8} {name} in {duration(took)}{see}  {self._times()}"
        )

    def remaining_s(self) -> float | None:
        if not self._durations:
            return None
        left = self.total - self.finished
        return sum(self._durations) / len(self._durations) * left / max(1, min(self.parallel, left or 1))

    def _times(self) -> str:
        left = self.remaining_s()
        eta = "estimating" if left is None else f"~{duration(left)}"
        return f"elapsed {duration(self.clock() - self.t0)}, remaining {eta}"


def summary(
    outcome: dict[str, str], errors: dict[str, str], logs: dict[str, Path], elapsed_s: float
) -> list[str]:
    """The closing screen: counts by state, then each run that did not finish with its error and log path."""
    counts: dict[str, int] = {}
    for state in outcome.values():
        counts[state] = counts.get(state, 0) + 1
    lines = [
        f"sweep finished in {duration(elapsed_s)}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: (x[0] != rundir.DONE, x[0])))
    ]
    failed = [name for name, state in outcome.items() if state != rundir.DONE]
    for name in failed[:SUMMARY_FAILED_LINES]:
        error = (errors.get(name) or "").split("\n", 1)[0]
        lines.append(f"  {outcome[name]:<8} {name}: {error or 'no error recorded'}")
        lines.append(f"           log: {logs[name]}")
    if len(failed) > SUMMARY_FAILED_LINES:
        lines.append(
            f"  ... and {len(failed) - SUMMARY_FAILED_LINES} more not done (sweep status lists them)"
        )
    return lines


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
