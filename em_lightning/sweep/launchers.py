"""Where runs train: ``local`` (this machine, one run at a time or one per free GPU) or ``slurm`` (job
arrays), both through submitit, so the same :class:`~em_lightning.sweep.job.RunJob` (state, resume, requeue)
runs in both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_lightning.sweep.job import RunJob
from em_lightning.sweep.resolve import Resolved
from em_lightning.sweep.spec import Sweep, SweepError
from em_lightning.sweep.state import read_state, run_lock_held, update_state

SUBMITIT_DIR = ".submitit"  # submitit's pickles and logs, beside the run dirs (hidden: `analyze <sweep>/*`)
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
class LauncherConfig:
    """The sweep file's ``launcher:`` (and per-run ``launcher.<field>`` keys).

    Both launchers:
        kind: ``local`` or ``slurm``.
        timeout_min: wall time of one job (slurm: ``--time``; local: submitit's timeout). Before it ends the
            job gets submitit's signal, stops its trainer and requeues, up to ``max_requeues`` times.
        max_requeues: requeues after a time-out (submitit's ``max_num_timeout``; preemptions do not count).
        stop_grace_s: on the signal, how long the trainer may take to stop before it is killed.
        python: the python that runs jobs and trainers (default: this one; on a cluster: the nodes' venv).
        env: extra environment variables for the trainers.
        eval_gpus: GPUs per run beyond the trainer's ``trainer.devices``, for the eval sidecar (same node).
    local:
        gpus: ``auto`` (every visible GPU), a list of GPU indices, or ``[]``; each run gets its own
            ``trainer.devices`` (+ ``eval_gpus``) of them, so runs train side by side, one per free GPU set.
        parallel: runs at once that need no GPU (CPU runs); 1 trains them one after the other.
    slurm (each group of runs with equal resources is one job array):
        partition, account, qos, constraint, exclude: the sbatch options of those names.
        cpus_per_task: CPUs per task (one task per trainer device: ``--ntasks-per-node`` is
            ``trainer.devices``).
        mem_gb: memory per node.
        array_parallelism: at most this many runs of an array at once (``--array=0-N%cap``).
        signal_delay_s: submitit's signal comes this long before the time limit (``--signal=USR2@s``).
        setup: shell lines run before the job (``module load ...``, ``source .venv/bin/activate``).
        additional: any other sbatch option, ``{name: value}``.
    """

    kind: str = "local"
    timeout_min: float = 3 * 24 * 60
    max_requeues: int = 3
    stop_grace_s: float = 60.0
    python: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    eval_gpus: int = 0
    gpus: Any = "auto"
    parallel: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 32
    signal_delay_s: int = 120
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, sweep: Sweep, raw: dict, path: tuple = ("launcher",), base: LauncherConfig | None = None):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dataclasses.asdict(base) if base is not None else {}
        for key, value in raw.items():
            if key not in fields:
                raise SweepError(
                    f"{sweep.where(*path, key)}: unknown launcher setting; there are {', '.join(fields)}"
                )
            values[key] = value
        cfg = cls(**values)
        problem = cfg._problem()
        if problem:
            key, message = problem
            raise SweepError(
                f"{sweep.where(*path, key) if key in raw else sweep.where(*path)}: {key}: {message}"
            )
        return cfg

    def _problem(self) -> tuple[str, str] | None:
        if self.kind not in ("local", "slurm"):
            return "kind", f"{self.kind!r}: local or slurm"
        for key in ("max_requeues", "eval_gpus", "array_parallelism", "signal_delay_s"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return key, f"{value!r}: a non-negative integer"
        if not isinstance(self.parallel, int) or self.parallel < 1:
            return "parallel", f"{self.parallel!r}: a positive integer"
        if not isinstance(self.timeout_min, (int, float)) or self.timeout_min <= 0:
            return "timeout_min", f"{self.timeout_min!r}: minutes, > 0"
        if not (
            self.gpus == "auto"
            or (isinstance(self.gpus, list) and all(isinstance(g, int) for g in self.gpus))
        ):
            return "gpus", f"{self.gpus!r}: auto or a list of GPU indices"
        if (
            not isinstance(self.setup, list)
            or not isinstance(self.env, dict)
            or not isinstance(self.additional, dict)
        ):
            return "setup", "setup is a list of shell lines; env and additional are mappings"
        return None


@dataclass
class Item:
    """A run to launch: its resolved config and its launcher settings."""

    resolved: Resolved
    launcher: LauncherConfig

    @property
    def name(self) -> str:
        return self.resolved.run.name


def resources(item: Item, sweep: Sweep, gpus_here: int | None = None) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node) of a run, from its resolved ``trainer`` section."""
    trainer = item.resolved.config.get("trainer") or {}
    devices, accelerator = trainer.get("devices", 1), str(trainer.get("accelerator") or "auto")
    if isinstance(devices, list):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        n = int(devices)
    else:
        raise SweepError(
            f"{sweep.path}: run {item.name}: trainer.devices: {devices!r}: a sweep needs a number "
            "(the launcher gives each run that many GPUs, one task each)"
        )
    uses_gpu = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and (gpus_here is None or gpus_here > 0)
    )
    gpus = (n if uses_gpu else 0) + item.launcher.eval_gpus
    return int(trainer.get("num_nodes") or 1), n, gpus


def make_job(item: Item, cwd: Path, launch_args: tuple[str, ...] = ()) -> RunJob:
    cfg = item.launcher
    return RunJob(
        str(item.resolved.dir),
        str(cwd),
        cfg.kind,
        cfg.python or sys.executable,
        launch_args,
        {k: str(v) for k, v in cfg.env.items()},
        float(cfg.stop_grace_s),
    )


# ------------------------------------------------------------------------------------------------ local
def local_gpus(cfg: LauncherConfig) -> list[int]:
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


def _submitit():
    try:
        import submitit
    except ImportError:
        raise SweepError(
            "sweeps launch through submitit: pip install 'em-lightning[analysis]' (or `pip install submitit`)"
        ) from None
    return submitit


def launch_local(sweep: Sweep, items: list[Item], cwd: Path, log=print) -> dict[str, str]:
    """Train the runs on this machine and wait for them; returns each run's final state."""
    submitit = _submitit()

    if not items:
        return {}
    pool = local_gpus(items[0].launcher)
    need = {}
    for item in items:
        _, _, gpus = resources(item, sweep, len(pool))
        if gpus > len(pool):
            raise SweepError(
                f"{sweep.path}: run {item.name} needs {gpus} GPU(s); this machine shows {len(pool)} "
                "(launcher.gpus)"
            )
        need[item.name] = gpus
    executor = submitit.LocalExecutor(
        folder=sweep.root / SUBMITIT_DIR,
        max_num_timeout=items[0].launcher.max_requeues,
        python=items[0].launcher.python,
    )
    queue, running, free, outcome = list(items), [], list(pool), {}
    cpu_slots = items[0].launcher.parallel
    try:
        while queue or running:
            while queue:
                item = queue[0]
                gpus = need[item.name]
                if (gpus and len(free) < gpus) or (
                    not gpus and sum(1 for r in running if not r[2]) >= cpu_slots
                ):
                    break
                queue.pop(0)
                mine, free = free[:gpus], free[gpus:]
                cfg = item.launcher
                executor.update_parameters(
                    timeout_min=cfg.timeout_min,
                    signal_delay_s=cfg.signal_delay_s,
                    gpus_per_node=len(mine),
                    visible_gpus=tuple(mine),
                    stderr_to_stdout=True,
                )
                # "submitted" before the job exists: the job's own "running" comes after it, never before.
                update_state(item.resolved.dir, state="submitted", launcher="local", job_id=None)
                job = executor.submit(make_job(item, cwd))
                update_state(item.resolved.dir, job_id=job.job_id)
                gpus_note = f", GPUs {','.join(map(str, mine))}" if mine else ""
                log(f"started  {item.name}  (job {job.job_id}{gpus_note})")
                running.append((job, item, mine))
            time.sleep(0.5)
            for entry in list(running):
                job, item, mine = entry
                if not job.done():
                    continue
                running.remove(entry)
                free += mine
                state = (read_state(item.resolved.dir) or {}).get("state", "?")
                if state == "running" and not run_lock_held(item.resolved.dir):
                    state = "running (its job died: resumed by the next invocation)"
                outcome[item.name] = state
                log(
                    f"{state:<8} {item.name}"
                    + (f"  (see {item.resolved.dir / 'train.log'})" if state != "done" else "")
                )
    except KeyboardInterrupt:
        for job, _, _ in running:
            job.cancel(check=False)
        raise
    return outcome


# ------------------------------------------------------------------------------------------------ slurm
def slurm_parameters(sweep: Sweep, cfg: LauncherConfig, nodes: int, tasks: int, gpus: int) -> dict:
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


def launch_slurm(sweep: Sweep, items: list[Item], cwd: Path, log=print) -> dict[str, str]:
    """Submit the runs as job arrays (one per group of equal resources) and return at once."""
    submitit = _submitit()
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise SweepError(
            f"{sweep.path}: launcher.kind slurm: no {' or '.join(missing)} on PATH; run the sweep "
            "on a SLURM login node (or --launcher local)"
        )

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
    launch_args = (f"--trainer.plugins={json.dumps(SLURM_PLUGIN)}",)
    outcome = {}
    for ((nodes, tasks, gpus), _), group in groups.items():
        cfg = group[0].launcher
        executor = submitit.SlurmExecutor(
            folder=sweep.root / SUBMITIT_DIR, max_num_timeout=cfg.max_requeues, python=cfg.python
        )
        executor.update_parameters(**slurm_parameters(sweep, cfg, nodes, tasks, gpus))
        for item in group:  # before sbatch: a job that starts at once writes "running" after this
            update_state(item.resolved.dir, state="submitted", launcher="slurm", job_id=None)
        with executor.batch():
            jobs = [executor.submit(make_job(item, cwd, launch_args)) for item in group]
        for item, job in zip(group, jobs):
            update_state(item.resolved.dir, job_id=job.job_id)
            outcome[item.name] = f"submitted (job {job.job_id})"
            log(f"submitted {item.name}  (job {job.job_id})")
    return outcome


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


def alive(run_dirs: list[Path]) -> dict[Path, str | None]:
    """For each run dir whose state is not final: why it is alive ("job 123 RUNNING", "locked"), or None."""
    states = {d: read_state(d) or {} for d in run_dirs}
    out: dict[Path, str | None] = {}
    slurm = {d: s["job_id"] for d, s in states.items() if s.get("launcher") == "slurm" and s.get("job_id")}
    queue = squeue_states(sorted(set(slurm.values()))) if slurm else {}
    for d, s in states.items():
        if run_lock_held(d):
            out[d] = f"job {s.get('job_id')} holds the run's lock"
        elif d in slurm and queue.get(slurm[d]) in ALIVE_SLURM_STATES:
            out[d] = f"job {slurm[d]} {queue[slurm[d]]}"
        else:
            out[d] = None
    return out
