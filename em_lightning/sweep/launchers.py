"""Where runs train: a registry of launchers, each a class with its own settings dataclass, in its own file.

A launcher ``kind`` in a sweep file (``launcher: {kind: slurm, ...}``) is found as the module
``em_lightning.sweep.launcher_<kind>`` (``local``, ``slurm`` ship with the project) or, for one outside the
project, as a class path (``kind: my_lab.sweeps.RayLauncher``). Either way it is a :class:`Launcher` subclass
whose ``Config`` is a :class:`LauncherConfig` subclass: a new launcher (another cluster scheduler, Ray) is one
file. Every launcher runs the same :class:`~em_lightning.sweep.job.RunJob` (state, resume, requeue).

Settings another kind defines are kept, not refused, so ``--launcher local`` runs a SLURM sweep file as it is;
a setting no kind defines is an error naming the sweep file's line.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from em_lightning.sweep.job import RunJob
from em_lightning.sweep.resolve import Resolved
from em_lightning.sweep.spec import Sweep, SweepError
from em_lightning.sweep.state import read_state, run_lock_held

MODULE_PREFIX = "launcher_"  # em_lightning/sweep/launcher_<kind>.py
SUBMITIT_DIR = ".submitit"  # submitit's pickles and logs, beside the run dirs (hidden: `analyze <sweep>/*`)


@dataclass
class LauncherConfig:
    """Settings every launcher has (the sweep file's ``launcher:`` and per-run ``launcher.<field>`` keys).

    kind: the launcher (``local``, ``slurm``, or a class path).
    timeout_min: wall time of one job (slurm: ``--time``; local: submitit's timeout). Before it ends the job
        gets submitit's signal, stops its trainer and requeues, up to ``max_requeues`` times.
    max_requeues: requeues after a time-out (submitit's ``max_num_timeout``; preemptions do not count).
    stop_grace_s: on the signal, how long the trainer may take to stop before it is killed.
    python: the python that runs jobs and trainers (default: this one; on a cluster: the nodes' venv).
    env: extra environment variables for the trainers.
    eval_gpus: GPUs per run beyond the trainer's ``trainer.devices``, for the eval sidecar (same node).
    signal_delay_s: submitit's signal comes this long before the time limit.
    """

    kind: str = "local"
    timeout_min: float = 3 * 24 * 60
    max_requeues: int = 3
    stop_grace_s: float = 60.0
    python: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    eval_gpus: int = 0
    signal_delay_s: int = 120
    # settings of other kinds, kept for a run (or a --launcher override) that switches to one of them
    other: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, sweep: Sweep, raw: dict, path: tuple = ("launcher",), base: LauncherConfig | None = None):
        """The config of the kind ``raw`` (over ``base``) names; errors name the sweep file's line and key."""
        values = {**(base.settings() if base is not None else {}), **raw}
        kind = values.get("kind", "local")
        every = all_settings([kind])
        for key in raw:
            if key not in every:
                raise SweepError(
                    f"{sweep.where(*path, key)}: unknown launcher setting; there are {', '.join(every)}"
                )
        try:
            config_class = launcher_class(kind).Config
        except SweepError as err:
            raise SweepError(f"{_where(sweep, path, 'kind', raw)}: kind: {err}") from None
        own = config_fields(config_class)
        cfg = config_class(
            **{k: v for k, v in values.items() if k in own},
            other={k: v for k, v in values.items() if k not in own},
        )
        problem = cfg.problem()
        if problem:
            key, message = problem
            raise SweepError(f"{_where(sweep, path, key, raw)}: {key}: {message}")
        return cfg

    def settings(self) -> dict[str, Any]:
        """Every setting (this kind's and the kept ones of other kinds), as the sweep file would give them."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        return {**self.other, **own}

    def problem(self) -> tuple[str, str] | None:
        """(key, what is wrong) for the first bad value, or None. Subclasses check theirs after these."""
        for key in ("max_requeues", "eval_gpus", "signal_delay_s"):
            if not _natural(getattr(self, key)):
                return key, f"{getattr(self, key)!r}: a non-negative integer"
        if not isinstance(self.timeout_min, (int, float)) or self.timeout_min <= 0:
            return "timeout_min", f"{self.timeout_min!r}: minutes, > 0"
        if not isinstance(self.env, dict):
            return "env", f"{self.env!r}: a mapping of variable to value"
        return None


@dataclass
class Item:
    """A run to launch: its resolved config and its launcher settings."""

    resolved: Resolved
    launcher: LauncherConfig

    @property
    def name(self) -> str:
        return self.resolved.run.name


class Launcher:
    """Trains a sweep's runs somewhere. Subclasses set ``kind`` and ``Config`` and implement :meth:`launch`;
    :meth:`alive_jobs` when their jobs can be alive without holding the run's lock (a queued SLURM job)."""

    kind: ClassVar[str]
    Config: ClassVar[type[LauncherConfig]] = LauncherConfig

    def launch(self, sweep: Sweep, items: list[Item], cwd: Path, log=print) -> dict[str, str]:
        """Start (and, for a launcher that waits, finish) the runs; each run's state or submission note."""
        raise NotImplementedError

    def alive_jobs(self, states: dict[Path, dict]) -> dict[Path, str]:
        """For run dirs whose state names this launcher: why its job is alive, for those whose is."""
        return {}


# --------------------------------------------------------------------------------------------- the registry
def launcher_class(kind: str) -> type[Launcher]:
    """The launcher of ``kind``: ``em_lightning.sweep.launcher_<kind>``'s, or the class a dotted path names."""
    if not isinstance(kind, str) or not kind:
        raise SweepError(f"{kind!r}: {' or '.join(kinds())}")
    if "." in kind:
        module_name, _, class_name = kind.rpartition(".")
    elif kind in kinds():
        module_name, class_name = f"{__package__}.{MODULE_PREFIX}{kind}", None
    else:
        raise SweepError(f"{kind!r}: {' or '.join(kinds())} (or the class path of a Launcher)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SweepError(f"{kind!r}: cannot import {module_name} ({err})") from None
    found = getattr(module, class_name or "LAUNCHER", None)
    if not (isinstance(found, type) and issubclass(found, Launcher)):
        raise SweepError(f"{kind!r}: {module_name}.{class_name or 'LAUNCHER'} is not a Launcher subclass")
    return found


def kinds() -> list[str]:
    """The launchers that ship with the project: the ``launcher_<kind>.py`` modules beside this one."""
    here = [str(Path(__file__).parent)]
    found = [
        m.name[len(MODULE_PREFIX) :] for m in pkgutil.iter_modules(here) if m.name.startswith(MODULE_PREFIX)
    ]
    return sorted(found, key=lambda k: (k != "local", k))  # local first: the default


def all_settings(extra_kinds: list[str] = ()) -> list[str]:
    """Every setting name of every known launcher (the shipped kinds and ``extra_kinds`` that import)."""
    names = dict.fromkeys(config_fields(LauncherConfig))
    for kind in [*kinds(), *extra_kinds]:
        try:
            names.update(dict.fromkeys(config_fields(launcher_class(kind).Config)))
        except SweepError:
            continue  # an unknown kind is reported as such, after the settings
    return list(names)


def config_fields(config_class: type[LauncherConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class) if f.name != "other"]


# ------------------------------------------------------------------------------------------ shared parts
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


def submitit_module():
    try:
        import submitit
    except ImportError:
        raise SweepError(
            "sweeps launch through submitit: pip install 'em-lightning[analysis]' (or `pip install submitit`)"
        ) from None
    return submitit


def alive(run_dirs: list[Path]) -> dict[Path, str | None]:
    """For each run dir whose state is not final: why it is alive ("job 123 RUNNING", "locked"), or None."""
    states = {d: read_state(d) or {} for d in run_dirs}
    out: dict[Path, str | None] = {}
    by_launcher: dict[str, dict[Path, dict]] = {}
    for d, s in states.items():
        if s.get("launcher"):
            by_launcher.setdefault(s["launcher"], {})[d] = s
    queued: dict[Path, str] = {}
    for kind, group in by_launcher.items():
        try:
            launcher = launcher_class(kind)()
        except SweepError:
            continue  # a launcher that is gone: only the run lock can tell
        queued.update(launcher.alive_jobs(group))
    for d, s in states.items():
        if run_lock_held(d):
            out[d] = f"job {s.get('job_id')} holds the run's lock"
        else:
            out[d] = queued.get(d)
    return out


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _where(sweep: Sweep, path: tuple, key: str, raw: dict) -> str:
    return sweep.where(*path, key) if key in raw else sweep.where(*path)
