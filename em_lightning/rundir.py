"""The run dir: the one place that names its files, finds its versions, and reads and writes its JSONL lines.

A run dir is what a training run writes (``trainer.log_dir``: ``runs/<name>/version_N/``) or a sweep run
(``config.yaml`` and ``run.json`` beside ``version_N/`` dirs, one per attempt). Every writer (the callbacks, the
sweep's job, ``evaluate``, ``rejudge``) and every reader (``analyze``, ``sweep --status``) takes the names from
here, so renaming a file cannot hide it from the analysis. Callbacks whose file name is a setting (the probe's
and the spectrum logger's ``jsonl``, the eval's ``samples_file`` / ``summary_file``) record it in the run's
``config.yaml``; :func:`file_names` reads it back from there.

Layout of one version dir (``version_N/``)::

    config.yaml                      the resolved config (LightningCLI's SaveConfigCallback)
    events.out.tfevents.*            TensorBoard
    checkpoints/last.ckpt            adapter-only checkpoints
    adapters/step-N/, adapters/final PEFT adapter dirs
    eval_adapters/step_N/            what the in-training eval served
    spectra.jsonl                    per-step singular values (SpectrumLogger)
    probe.jsonl                      per-step probe scores (MisalignmentProbe)
    direction.jsonl                  per-step activation-direction shift (DirectionSignal)
    misalignment_samples.jsonl       every judged answer (MisalignmentEval, evaluate)
    misalignment_summary.jsonl       one line per eval (MisalignmentEval, evaluate)
    judged/<judge label>/            the same two eval files scored again by another judge (rejudge)

JSONL files are appended one whole line per ``write`` call and flushed before the file is closed: a crash loses at
most the line being written, and a reader skips a torn last line (any other bad line is an error naming the file
and line).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from em_lightning.errors import InputError

# ------------------------------------------------------------------------------------------------- the layout
CONFIG = "config.yaml"
STATE = "run.json"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
ADAPTERS = "adapters"
FINAL_ADAPTER = "final"
EVAL_ADAPTERS = "eval_adapters"
SPECTRA = "spectra.jsonl"
PROBE = "probe.jsonl"
DIRECTION = "direction.jsonl"
SAMPLES = "misalignment_samples.jsonl"
SUMMARY = "misalignment_summary.jsonl"
JUDGED = "judged"
SIDECAR_LOG = "vllm_sidecar.log"
TRAIN_LOG = "train.log"  # a sweep job's trainer output, in the sweep run dir

# run.json states. pending: dir written, not launched; submitted: queued (job id known); running: a job trains
# it; requeued: its job was signalled and requeued itself; failed: the trainer exited without finishing;
# interrupted: stopped by the user; unknown: a plain log dir without adapters/final. Every state but done is
# resumed by the next `sweep` invocation unless its job is alive.
DONE = "done"
UNKNOWN = "unknown"
STATES = ("pending", "submitted", "running", "requeued", "failed", "interrupted", DONE)

# Which callback setting names which file, and its default (the callbacks use these defaults).
_SETTING_FILES = {
    "probe": ("MisalignmentProbe", "jsonl", PROBE),
    "spectra": ("SpectrumLogger", "jsonl", SPECTRA),
    "direction": ("DirectionSignal", "jsonl", DIRECTION),
    "samples": ("MisalignmentEval", "samples_file", SAMPLES),
    "summary": ("MisalignmentEval", "summary_file", SUMMARY),
}
_VERSION = re.compile(r"version_(\d+)")


class RunDirError(InputError):
    """A run dir or one of its files that cannot be read; the message names the path (and line)."""


# ------------------------------------------------------------------------------------------------ where it is
def resolve_run_dir(trainer) -> Path:
    """The dir this fit writes to (``trainer.log_dir``, else ``default_root_dir``).

    ``trainer.log_dir`` is a collective under DDP/FSDP (a broadcast from rank zero): call this on **every**
    rank, in ``setup``, and keep the result — never inside ``if trainer.is_global_zero``, where the other ranks
    would never join and rank zero would hang.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def adapter_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """``adapters/final`` (``step`` None) or ``adapters/step-<step>``."""
    return Path(run_dir) / ADAPTERS / (FINAL_ADAPTER if step is None else f"step-{step}")


def eval_adapter_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / EVAL_ADAPTERS / f"step_{step:08d}"


def judged_dir(version_dir: str | Path, label: str) -> Path:
    """Where ``rejudge`` writes a judge's samples and summary for one version dir."""
    return Path(version_dir) / JUDGED / label


def version_dirs(d: str | Path) -> list[Path]:
    """The ``version_N`` dirs of ``d`` in numeric order; ``[d]`` when ``d`` itself is a version dir (it holds
    event files and no ``version_N``); ``[]`` when it is neither."""
    d = Path(d)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
    if found:
        return sorted(found, key=lambda p: int(_VERSION.fullmatch(p.name).group(1)))
    return [d] if any(d.glob("events.out.tfevents.*")) or (d / CONFIG).exists() and (d / ADAPTERS).exists() else []


def is_run_dir(d: str | Path) -> bool:
    d = Path(d)
    return d.is_dir() and ((d / STATE).exists() or (d / CONFIG).exists() or bool(version_dirs(d)))


def config_path(d: str | Path) -> Path | None:
    """The run's ``config.yaml``: the run dir's own (a sweep run), else the newest version's."""
    d = Path(d)
    if (d / CONFIG).exists():
        return d / CONFIG
    return next((v / CONFIG for v in reversed(version_dirs(d)) if (v / CONFIG).exists()), None)


def newest_checkpoint(d: str | Path) -> Path | None:
    """The newest ``version_N/checkpoints/last.ckpt`` of a run (what a resume starts from)."""
    for v in reversed(version_dirs(d)):
        ckpt = v / CHECKPOINTS / LAST_CHECKPOINT
        if ckpt.is_file():
            return ckpt
    return None


def has_final_adapter(d: str | Path) -> bool:
    versions = version_dirs(d)
    return bool(versions) and (versions[-1] / ADAPTERS / FINAL_ADAPTER).is_dir()


# ---------------------------------------------------------------------------------------- configured names
def file_names(config: dict | None) -> dict[str, str]:
    """The file name of each kind (``probe``, ``spectra``, ``direction``, ``samples``, ``summary``) a run's
    ``config.yaml`` (parsed) says its callbacks wrote; defaults where the config names no such callback. A kind
    whose callback was configured with no file (``jsonl: null``) maps to the default too (the file is absent)."""
    names = {kind: default for kind, (_, _, default) in _SETTING_FILES.items()}
    callbacks = ((config or {}).get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    for cb in callbacks:
        if not isinstance(cb, dict):
            continue
        cls = str(cb.get("class_path", "")).rsplit(".", 1)[-1]
        args = cb.get("init_args") or {}
        for kind, (owner, key, _) in _SETTING_FILES.items():
            if cls == owner and isinstance(args.get(key), str) and args[key]:
                names[kind] = args[key]
    return names


# --------------------------------------------------------------------------------------------------- JSONL
def append_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """Append ``records`` as JSON lines (non-finite floats become null), creating the file's dir; none: no file.

    Each line goes out in one ``write`` and the file is flushed and closed before returning: a crash loses at
    most the line being written, which readers skip (see :func:`read_jsonl`).
    """
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")  # noqa: FURB122 (one write per line)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each line of ``path``; blank lines skipped. A torn last line (a writer
    killed mid-line) is skipped; any other line that is not a JSON object is a :class:`RunDirError` naming
    ``path:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise RunDirError(f"{path}: cannot be read ({err.strerror or err})") from None
    lines = text.splitlines()
    torn_tail = bool(text) and not text.endswith("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if lineno == len(lines) and torn_tail:
                return
            raise RunDirError(f"{path}:{lineno}: not a JSON line") from None
        if not isinstance(record, dict):
            raise RunDirError(f"{path}:{lineno}: not a JSON object")
        yield lineno, record


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of ``path`` (see :func:`iter_jsonl`); a missing file is empty."""
    path = Path(path)
    return [r for _, r in iter_jsonl(path)] if path.exists() else []


def records_by_step(versions: Iterable[Path], name: str) -> dict[int, dict]:
    """The lines of ``name`` across version dirs keyed by their ``step``; later versions and later lines win (a
    resumed run writes again the steps its first attempt wrote after the checkpoint)."""
    out: dict[int, dict] = {}
    for v in versions:
        path = Path(v) / name
        if not path.exists():
            continue
        for lineno, record in iter_jsonl(path):
            try:
                out[int(record["step"])] = record
            except (KeyError, TypeError, ValueError):
                raise RunDirError(f"{path}:{lineno}: a line without an integer 'step'") from None
    return out


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
