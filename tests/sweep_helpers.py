"""Test-only callback for the sweep tests, wired into sweep runs by a config overlay.

``FakeProbe`` stands in for the MisalignmentProbe (whose scoring would cost the tiny sweeps more than their
training): it writes ``<run dir>/probe.jsonl`` lines built by the real probe's own ``ProbeScores.record`` (so the
same keys, one line per probed step, step 0 too) for one synthetic entry whose log-odds moves with the adapter
(3·‖lora_B‖ − 2), so the analysis has a signal that differs between optimisers and along training.

It also carries the tests' fault injection, driven by environment variables (the sweep's ``launcher.env``), so
a run's config, and with it its hash, is the same with and without a fault:

* ``EM_TEST_KILL_AT_STEP`` / ``EM_TEST_KILL_MARKER``: at that global step, once, SIGKILL the job process and
  the trainer (a node dying);
* ``EM_TEST_PAUSE_AT_STEP`` / ``EM_TEST_PAUSE_MARKER``: at that step, once, create the marker and wait until
  the trainer receives SIGTERM (a job the test then signals, as SLURM would before its time limit).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import lightning as L

from em_lightning import rundir
from em_lightning.probe import ProbeScores


class FakeProbe(L.Callback):
    def __init__(self, every_n_steps: int = 5):
        self.every_n_steps = every_n_steps
        self._last: int | None = None
        self._run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage):
        self._run_dir = rundir.resolve_run_dir(trainer)  # every rank: trainer.log_dir is a collective

    def _write(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last:
            return
        self._last = step
        sq = sum(
            float(p.detach().double().square().sum())
            for n, p in pl_module.named_parameters()
            if "lora_B" in n
        )
        log_odds = 3.0 * math.sqrt(sq) - 2.0
        # one entry, one answer a side: its log-odds is the difference of the two scores
        scores = ProbeScores.from_answer_scores({"fake": {"aligned": [-1.0], "misaligned": [log_odds - 1.0]}})
        record = scores.record(step, probe_set="fake", n_entries=1, n_answers=2, duration_s=0.0)
        rundir.append_jsonl(self._run_dir / rundir.PROBE, [record])

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            self._write(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self._write(trainer, pl_module)
        if _fires("KILL", step):
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        if _fires("PAUSE", step):
            deadline = time.monotonic() + 120
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)


def _fires(kind: str, step: int) -> bool:
    at, marker = os.environ.get(f"EM_TEST_{kind}_AT_STEP"), os.environ.get(f"EM_TEST_{kind}_MARKER")
    if at is None or marker is None or int(at) != step or Path(marker).exists():
        return False
    Path(marker).touch()
    return True
