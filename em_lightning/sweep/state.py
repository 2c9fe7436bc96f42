"""A run's state file (``run.json``), its locks, and the provenance recorded with each attempt.

Only the standard library (and :mod:`em_lightning.rundir`, which names the run dir's files and is standard
library too) here: the module is imported inside every job (a submitit task), which must start fast and must not
need torch to decide what to run.

Locks are ``flock`` locks: the kernel drops them when the holding process dies, however it dies (SIGKILL, OOM,
a node reboot), so "is this run's job still alive?" is "can I take its lock?" — no pid file that outlives its
process. The trainer subprocess inherits the job's lock, so the lock is held while either of them lives.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from em_lightning import rundir
from em_lightning.errors import InputError

# The lock files are the sweep's own (not part of what a run wrote); the run's files are named in rundir.
RUN_LOCK = ".run.lock"
SWEEP_LOCK = ".sweep.lock"
STATE_LOCK = ".state.lock"
LIBRARIES = ("em-lightning", "torch", "lightning", "transformers", "peft", "submitit")


class SweepLocked(InputError):
    """Another ``sweep`` invocation is planning or running this sweep."""


def read_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / rundir.STATE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: the run's state file cannot be read ({err}); fix or delete it") from None


def write_state(run_dir: str | Path, state: dict) -> None:
    """Write ``run.json`` atomically (a reader never sees half a file)."""
    path = Path(run_dir) / rundir.STATE
    tmp = path.with_name(f".{rundir.STATE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def update_state(run_dir: str | Path, only_if: tuple[str, ...] | None = None, **fields) -> dict:
    """Read-modify-write ``run.json`` under a lock (the sweep process and the job both write it). A change of
    ``state`` is appended to ``history``. With ``only_if``, the state changes only from one of those states
    (the sweep's "submitted" must not overwrite a fast job's "running")."""
    with _flocked(Path(run_dir) / STATE_LOCK):
        state = read_state(run_dir) or {}
        if only_if is not None and state.get("state") not in only_if:
            fields.pop("state", None)
        new = fields.get("state")
        if new is not None and new != state.get("state"):
            entry = {"state": new, "time": _now()}
            entry.update({k: fields[k] for k in ("job_id", "returncode") if fields.get(k) is not None})
            state.setdefault("history", []).append(entry)
        state.update(fields, updated=_now())
        write_state(run_dir, state)
        return state


class RunLock:
    """The lock a job holds on its run dir while it (or its trainer) lives."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RUN_LOCK
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # a filesystem without flock: liveness then rests on the scheduler alone
            pass
        os.set_inheritable(fd, True)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_lock_held(run_dir: str | Path) -> bool:
    """Whether a live process holds the run's lock (its job or trainer is running)."""
    path = Path(run_dir) / RUN_LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)  # opening changes no file (a finished run's files stay untouched)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextmanager
def sweep_lock(root: Path):
    """Held by a ``sweep`` invocation while it plans and launches: two invocations at once would both see a
    run as not started and both launch it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / SWEEP_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
            raise SweepLocked(
                f"{path}: another `sweep` invocation ({holder}) is running this sweep; wait for it "
                "to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode())
        yield
    finally:
        os.close(fd)


@contextmanager
def _flocked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def provenance() -> dict:
    """Git commit (+ dirty flag) of the code that trains, library versions, host and python."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = sys.version.split()[0]
    return {"git": git_info(), "versions": versions, "host": socket.gethostname()}


def git_info() -> dict:
    """Commit and dirty flag of the checkout em_lightning is imported from (None where it is not a
    checkout)."""
    src = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
