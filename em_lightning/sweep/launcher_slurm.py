"""``launcher: {kind: slurm, ...}``: submit the runs as SLURM job arrays through submitit (one array per group
of runs with equal resources and settings) and return at once; a queued job is alive while squeue lists it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_lightning.sweep.launchers import (
    SUBMITIT_DIR,
    Item,
    Launcher,
    LauncherConfig,
    make_job,
    resources,
    submitit_module,
)
from em_lightning.sweep.spec import Sweep, SweepError
from em_lightning.sweep.state import update_state

ALIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",
}
# Lightning's SLURM environment without its auto-requeue: submitit owns requeue in sweeps.
SLURM_PLUGIN = [
    {
        "class_path": "lightning.fabric.plugins.environments.SLURMEnvironment",
        "init_args": {"auto_requeue": False},
    }
]


@dataclass
class SlurmConfig(LauncherConfig):
    """slurm (each group of runs with equal resources is one job array):
    partition, account, qos, constraint, exclude: the sbatch options of those names.
    cpus_per_task: CPUs per task (one task per trainer device: ``--ntasks-per-node`` is ``trainer.devices``).
    mem_gb: memory per node.
    array_parallelism: at most this many runs of an array at once (``--array=0-N%cap``).
    signal_delay_s (all kinds): here ``--signal=USR2@s``.
    setup: shell lines run before the job (``module load ...``, ``source .venv/bin/activate``).
    additional: any other sbatch option, ``{name: value}``.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 32
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)

    def problem(self) -> tuple[str, str] | None:
        value = self.array_parallelism
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return "array_parallelism", f"{value!r}: a non-negative integer"
        if not isinstance(self.setup, list) or not isinstance(self.additional, dict):
            return "setup", "setup is a list of shell lines; additional is a mapping"
        return super().problem()


class SlurmLauncher(Launcher):
    kind = "slurm"
    Config = SlurmConfig

    def launch(self, sweep: Sweep, items: list[Item], cwd: Path, log=print) -> dict[str, str]:
        """Submit the runs as job arrays (one per group of equal resources) and return at once."""
        submitit = submitit_module()
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise SweepError(
                f"{sweep.path}: launcher.kind slurm: no {' or '.join(missing)} on PATH; run the sweep "
                "on a SLURM login node (or --launcher local)"
            )
        launch_args = (f"--trainer.plugins={json.dumps(SLURM_PLUGIN)}",)
        outcome = {}
        for (nodes, tasks, gpus), group in _groups(sweep, items):
            cfg = group[0].launcher
            executor = submitit.SlurmExecutor(
                folder=sweep.root / SUBMITIT_DIR, max_num_timeout=cfg.max_requeues, python=cfg.python
            )
            executor.update_parameters(**slurm_parameters(sweep, cfg, nodes, tasks, gpus))
            for item in group:  # before sbatch: a job that starts at once writes "running" after this
                update_state(item.resolved.dir, state="submitted", launcher=self.kind, job_id=None)
            with executor.batch():
                jobs = [executor.submit(make_job(item, cwd, launch_args)) for item in group]
            for item, job in zip(group, jobs):
                update_state(item.resolved.dir, job_id=job.job_id)
                outcome[item.name] = f"submitted (job {job.job_id})"
                log(f"submitted {item.name}  (job {job.job_id})")
        return outcome

    def alive_jobs(self, states: dict[Path, dict]) -> dict[Path, str]:
        jobs = {d: s["job_id"] for d, s in states.items() if s.get("job_id")}
        queue = squeue_states(sorted(set(jobs.values()))) if jobs else {}
        return {d: f"job {j} {queue[j]}" for d, j in jobs.items() if queue.get(j) in ALIVE_SLURM_STATES}


def _groups(sweep: Sweep, items: list[Item]) -> list[tuple[tuple[int, int, int], list[Item]]]:
    """Runs grouped by (nodes, tasks per node, GPUs per node) and equal launcher settings: one array each."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        plugins = (item.resolved.config.get("trainer") or {}).get("plugins")
        if plugins not in (None, [], SLURM_PLUGIN):
            raise SweepError(
                f"{sweep.path}: run {item.name}: trainer.plugins: the slurm launcher sets "
                "SLURMEnvironment(auto_requeue=False) there (submitit owns requeue); remove the "
                f"config's {plugins!r}"
            )
        key = (resources(item, sweep), json.dumps(dataclasses.asdict(item.launcher), sort_keys=True))
        groups.setdefault(key, []).append(item)
    return [(shape, group) for (shape, _), group in groups.items()]


def slurm_parameters(sweep: Sweep, cfg: SlurmConfig, nodes: int, tasks: int, gpus: int) -> dict:
    params = {
        "job_name": f"em-{sweep.name}",
        "time": max(1, round(cfg.timeout_min)),
        "nodes": nodes,
        "ntasks_per_node": tasks,  # one task per trainer device (pitfall: any other count hangs the trainer)
        "gpus_per_node": gpus or None,
        "cpus_per_task": cfg.cpus_per_task,
        "mem": f"{cfg.mem_gb:g}GB" if cfg.mem_gb else None,
        "signal_delay_s": cfg.signal_delay_s,
        "array_parallelism": cfg.array_parallelism,
        "setup": list(cfg.setup) or None,
        "partition": cfg.partition,
        "account": cfg.account,
        "qos": cfg.qos,
        "constraint": cfg.constraint,
        "exclude": cfg.exclude,
        "additional_parameters": dict(cfg.additional) or None,
        "stderr_to_stdout": True,
    }
    return {k: v for k, v in params.items() if v is not None}


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each job id squeue still lists (array tasks one by one); a job it omits has ended."""
    if not job_ids:
        return {}
    cmd = ["squeue", "--noheader", "--array", "--format=%i %T", f"--jobs={','.join(job_ids)}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise SweepError(
            f"cannot tell whether jobs {', '.join(job_ids)} are alive ({' '.join(cmd[:1])}: {err}); "
            "not resubmitting them: run `sweep` where squeue works"
        ) from None
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise SweepError(
            f"cannot tell whether jobs {', '.join(job_ids)} are alive (squeue: "
            f"{done.stderr.strip()[-300:]}); not resubmitting them"
        )
    states = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


LAUNCHER = SlurmLauncher
