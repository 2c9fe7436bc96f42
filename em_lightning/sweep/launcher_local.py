"""``launcher: {kind: local}``: train the runs on this machine through submitit's local executor and wait for
them, one at a time or one per free GPU set (:mod:`em_lightning.sweep.slots`), showing progress
(:mod:`em_lightning.sweep.progress`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_lightning.sweep.job import train_log
from em_lightning.sweep.launchers import (
    SUBMITIT_DIR,
    Item,
    Launcher,
    LauncherConfig,
    make_job,
    resources,
    submitit_module,
)
from em_lightning.sweep.progress import Progress, summary
from em_lightning.sweep.slots import Slot, SlotScheduler
from em_lightning.sweep.spec import Sweep, SweepError
from em_lightning.sweep.state import read_state, run_lock_held, update_state

POLL_S = 0.5


@dataclass
class LocalConfig(LauncherConfig):
    """local:
    gpus: ``auto`` (every visible GPU), a list of GPU indices, or ``[]``; each run gets its own
        ``trainer.devices`` (+ ``eval_gpus``) of them, so runs train side by side, one per free GPU set.
    parallel: runs at once that need no GPU (CPU runs); 1 trains them one after the other.
    """

    gpus: Any = "auto"
    parallel: int = 1

    def problem(self) -> tuple[str, str] | None:
        if not isinstance(self.parallel, int) or isinstance(self.parallel, bool) or self.parallel < 1:
            return "parallel", f"{self.parallel!r}: a positive integer"
        if not (
            self.gpus == "auto"
            or (isinstance(self.gpus, list) and all(isinstance(g, int) for g in self.gpus))
        ):
            return "gpus", f"{self.gpus!r}: auto or a list of GPU indices"
        return super().problem()


class LocalLauncher(Launcher):
    kind = "local"
    Config = LocalConfig

    def launch(self, sweep: Sweep, items: list[Item], cwd: Path, log=print) -> dict[str, str]:
        """Train the runs on this machine and wait for them; returns each run's final state."""
        if not items:
            return {}
        submitit = submitit_module()
        first = items[0].launcher
        pool = local_gpus(first)
        scheduler: SlotScheduler[Item] = SlotScheduler(list(pool), cpu_slots=first.parallel)
        for item in items:
            scheduler.add(item, _gpus_needed(item, sweep, pool))
        executor = submitit.LocalExecutor(
            folder=sweep.root / SUBMITIT_DIR, max_num_timeout=first.max_requeues, python=first.python
        )
        gpu_sets = len(pool) // max(1, min((g for _, g in scheduler.queue if g), default=1))
        progress = Progress(len(items), parallel=max(first.parallel, gpu_sets), log=log)
        jobs: dict[str, Any] = {}
        outcome: dict[str, str] = {}
        try:
            while scheduler.busy:
                while (slot := scheduler.start_next()) is not None:
                    jobs[slot.run.name] = _start(executor, slot, cwd, progress)
                time.sleep(POLL_S)
                for slot in [s for s in scheduler.running if jobs[s.run.name].done()]:
                    scheduler.finish(slot)
                    outcome[slot.run.name] = _ended(slot.run, progress)
        except KeyboardInterrupt:
            for slot in scheduler.running:
                jobs[slot.run.name].cancel(check=False)
            raise
        errors = {i.name: (read_state(i.resolved.dir) or {}).get("error") or "" for i in items}
        for line in summary(
            outcome,
            errors,
            {i.name: train_log(i.resolved.dir) for i in items},
            progress.clock() - progress.t0,
        ):
            log(line)
        return outcome


def local_gpus(cfg: LocalConfig) -> list[int]:
    if cfg.gpus != "auto":
        return list(cfg.gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if not all(v.isdigit() for v in ids):
            raise SweepError(
                f"CUDA_VISIBLE_DEVICES={visible!r}: the local launcher needs GPU indices; set "
                "launcher.gpus to a list of indices"
            )
        return [int(v) for v in ids]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except (ImportError, RuntimeError):
        return []


def _gpus_needed(item: Item, sweep: Sweep, pool: list[int]) -> int:
    _, _, gpus = resources(item, sweep, len(pool))
    if gpus > len(pool):
        raise SweepError(
            f"{sweep.path}: run {item.name} needs {gpus} GPU(s); this machine shows {len(pool)} (launcher.gpus)"
        )
    return gpus


def _start(executor, slot: Slot[Item], cwd: Path, progress: Progress):
    item, cfg = slot.run, slot.run.launcher
    executor.update_parameters(
        timeout_min=cfg.timeout_min,
        signal_delay_s=cfg.signal_delay_s,
        gpus_per_node=len(slot.gpus),
        visible_gpus=slot.gpus,
        stderr_to_stdout=True,
    )
    # "submitted" before the job exists: the job's own "running" comes after it, never before.
    update_state(item.resolved.dir, state="submitted", launcher=LocalLauncher.kind, job_id=None)
    job = executor.submit(make_job(item, cwd))
    update_state(item.resolved.dir, job_id=job.job_id)
    gpus_note = f", GPUs {','.join(map(str, slot.gpus))}" if slot.gpus else ""
    progress.run_started(item.name, f"job {job.job_id}{gpus_note}")
    return job


def _ended(item: Item, progress: Progress) -> str:
    state = (read_state(item.resolved.dir) or {}).get("state", "?")
    if state == "running" and not run_lock_held(item.resolved.dir):
        state = "running (its job died: resumed by the next invocation)"
    progress.run_ended(item.name, state, train_log(item.resolved.dir))
    return state


LAUNCHER = LocalLauncher
