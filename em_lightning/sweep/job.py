"""What a submitit job runs: one run of a sweep, started or resumed, with its state kept in ``run.json``.

The trainer is a subprocess (``python -m em_lightning fit --config <run>/config.yaml``): Lightning's launchers
re-run ``sys.argv`` for distributed training, and the job must outlive a trainer that crashes to record it. On
SLURM every task of a multi-GPU job runs this; the trainer finds its rank in the SLURM variables, and only
rank 0 keeps the state file.

Requeue is submitit's: on its signal (``USR2`` before the time limit, or a preemption)
:meth:`RunJob.checkpoint` stops the trainer, marks the run ``requeued`` and hands submitit a fresh job, which
resumes from the newest ``last.ckpt`` (a new ``version_N`` beside the old ones; the analysis merges them).
Lightning's own SLURM auto-requeue is off in these runs (the launcher passes
``SLURMEnvironment(auto_requeue=False)``), so the two never both act on one signal. Progress since the last
checkpoint is trained again.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from em_lightning import rundir
from em_lightning.sweep.state import RunLock, provenance, read_state, update_state

try:  # submitit is the `analysis` extra; without it RunJob still runs in-process (tests of the job alone)
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover - the extra is installed wherever sweeps run
    Checkpointable, DelayedSubmission = object, None


@dataclass(frozen=True)
class Attempt:
    """One start of the trainer: its command, what it resumes from, its number, the versions before it."""

    cmd: list[str]
    ckpt: Path | None
    number: int
    versions_before: frozenset[Path]


@dataclass
class RunJob(Checkpointable):
    run_dir: str
    cwd: str
    launcher: str = "local"
    python: str = field(default_factory=lambda: sys.executable)
    launch_args: tuple[str, ...] = ()  # launcher-specific trainer arguments (not part of the run's config)
    env: dict = field(default_factory=dict)
    stop_grace_s: float = 60.0

    def __post_init__(self):
        self._proc: subprocess.Popen | None = None
        self._requeued = False

    def __getstate__(self):  # submitit pickles the job: not the trainer process
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    # ------------------------------------------------------------------------------------------ the run
    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        os.chdir(self.cwd)  # the config's relative data paths are relative to where the sweep was invoked
        rank = _global_rank()
        lock = RunLock(run_dir)
        if rank == 0 and not lock.acquire():
            raise RuntimeError(f"{run_dir}: another job holds this run's lock; not starting a second trainer")
        try:
            attempt = self._next_attempt(run_dir)
            if rank == 0:
                self._mark_running(run_dir, attempt)
            rc = self._train(attempt.cmd, train_log(run_dir, rank), attempt.number, lock)
            return self._record_outcome(run_dir, rc, attempt) if rank == 0 else "trained"
        except BaseException as err:
            if rank == 0 and not self._requeued and not isinstance(err, RuntimeError):
                self._stop()
                update_state(run_dir, state="interrupted", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            lock.release()

    def _next_attempt(self, run_dir: Path) -> Attempt:
        ckpt = rundir.newest_checkpoint(run_dir)
        cmd = [
            self.python,
            "-m",
            "em_lightning",
            "fit",
            "--config",
            str(run_dir / rundir.CONFIG),
            *self.launch_args,
            *(["--ckpt_path", str(ckpt)] if ckpt else []),
        ]
        number = ((read_state(run_dir) or {}).get("attempts") or 0) + 1
        return Attempt(cmd, ckpt, number, frozenset(rundir.version_dirs(run_dir)))

    def _mark_running(self, run_dir: Path, attempt: Attempt) -> None:
        update_state(
            run_dir,
            state="running",
            job_id=_job_id(),
            launcher=self.launcher,
            pid=os.getpid(),
            attempts=attempt.number,
            resumed_from=str(attempt.ckpt) if attempt.ckpt else None,
            returncode=None,
            error=None,
            command=shlex.join(attempt.cmd),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            **provenance(),
        )

    def _record_outcome(self, run_dir: Path, rc: int, attempt: Attempt) -> str:
        """``done`` when the trainer exited 0 and wrote its final adapter; else ``failed`` with the log's tail,
        and a RuntimeError for submitit (the job failed)."""
        versions = set(rundir.version_dirs(run_dir))
        version = _newest(versions - attempt.versions_before) or _newest(versions)
        if rc == 0 and _finished(run_dir, version):
            update_state(run_dir, state=rundir.DONE, returncode=rc, version=version.name)
            return rundir.DONE
        log = train_log(run_dir)
        tail = _tail(log)
        final = f"{rundir.ADAPTERS}/{rundir.FINAL_ADAPTER}"
        reason = f"exit status {rc}" if rc else f"the trainer stopped before the end (no {final})"
        lines = [x for x in tail.splitlines() if x.strip()]
        key = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1] if lines else "")
        update_state(
            run_dir,
            state="failed",
            returncode=rc,
            version=version.name if version else None,
            error=f"{reason}: {key.strip()}\n{tail}",
        )
        raise RuntimeError(f"{run_dir.name}: {reason}; see {log}")

    def _train(self, cmd: list[str], log_path: Path, attempt: int, lock: RunLock) -> int:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in self.env.items()}}
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(
                f"\n=== attempt {attempt}, job {_job_id()}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{shlex.join(cmd)}\n"
            )
            log.flush()
            fds = (lock.fd,) if lock.fd is not None else ()  # the trainer holds the run's lock too
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=fds)
            # Poll instead of wait(): a signal handler (submitit's checkpoint) must be able to reap the
            # trainer, and Popen.wait() holds a lock that a nested wait in the handler could never take.
            while self._proc.poll() is None:
                time.sleep(0.2)
            return self._proc.returncode

    # ------------------------------------------------------------------------------------------ requeue
    def checkpoint(self, *args, **kwargs):
        """submitit's hook on its signal: stop the trainer and requeue this run (it resumes from
        last.ckpt)."""
        self._requeued = True
        self._stop()
        update_state(self.run_dir, state="requeued", returncode=None)
        fresh = RunJob(
            self.run_dir, self.cwd, self.launcher, self.python, self.launch_args, self.env, self.stop_grace_s
        )
        return DelayedSubmission(fresh)

    def _stop(self) -> None:
        """SIGTERM (Lightning stops after the current batch), then SIGKILL after ``stop_grace_s``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            while proc.poll() is None:
                time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ helpers
def train_log(run_dir: str | Path, rank: int = 0) -> Path:
    """The trainer's output of a sweep run: ``train.log``, and ``train.rank<N>.log`` for the other ranks of a
    multi-task job (one writer per file)."""
    name = Path(rundir.TRAIN_LOG)
    return Path(run_dir) / (name.name if rank == 0 else f"{name.stem}.rank{rank}{name.suffix}")


def _newest(versions: set[Path]) -> Path | None:
    return max(versions, key=lambda v: int(v.name.rsplit("_", 1)[1])) if versions else None


def _finished(run_dir: Path, version: Path | None) -> bool:
    """A trainer that exits 0 after SIGTERM stopped early: the end of fit is its final adapter dir."""
    if version is None:
        return False
    import yaml

    config = yaml.safe_load((run_dir / rundir.CONFIG).read_text(encoding="utf-8")) or {}
    if not (config.get("adapter_export") or {}).get("enabled", True):
        return True
    return rundir.adapter_dir(version).is_dir()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _job_env():
    try:
        import submitit

        return submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not inside a submitit job (a direct call)
        return None


def _global_rank() -> int:
    env = _job_env()
    return env.global_rank if env is not None else 0


def _job_id() -> str | None:
    env = _job_env()
    return env.job_id if env is not None else None
