"""Helpers shared by the misalignment-eval tests: TensorBoard scalars, callback and logger overlays, a logger
that records its calling thread, a fake managed sidecar and a callback that kills the sidecar mid-run."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.loggers import Logger
from tbparse import SummaryReader

from em_lightning.callbacks.misalignment_eval import MisalignmentEval
from em_lightning.evaluation import SidecarConfig

REPO = Path(__file__).resolve().parents[1]


def tb_scalars(run_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in a run dir's TensorBoard event files."""
    df = SummaryReader(str(run_dir)).scalars
    return {tag: dict(zip(g["step"], g["value"])) for tag, g in df.groupby("tag")}


def eval_overlay(path: Path, init_args: dict) -> str:
    """Write a config overlay that adds a ``MisalignmentEval`` with ``init_args`` to the trainer's callbacks."""
    callback = {
        "class_path": "em_lightning.callbacks.misalignment_eval.MisalignmentEval",
        "init_args": init_args,
    }
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": [callback]}}))
    return str(path)


class ThreadRecordingLogger(Logger):
    """Records ``(thread, step, metrics)`` of every ``log_metrics`` call; writes nothing."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[threading.Thread, int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "thread_recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((threading.current_thread(), step, dict(metrics)))


def loggers_overlay(path: Path, tensorboard_prefix: str) -> str:
    """Write a config overlay whose loggers are a TensorBoardLogger with ``prefix`` and a
    :class:`ThreadRecordingLogger`, in that order (the first names the run dir)."""
    tensorboard = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "tiny", "prefix": tensorboard_prefix},
    }
    recorder = {"class_path": "tests.eval_helpers.ThreadRecordingLogger"}
    path.write_text(yaml.safe_dump({"trainer": {"logger": [tensorboard, recorder]}}))
    return str(path)


def fit_with_eval(run_cli, overlay: str, steps: int, *extra: str, base: str = "configs/tiny.yaml"):
    """``fit`` on ``base`` plus the eval ``overlay`` for ``steps`` optimizer steps, validating only at the last
    step; ``extra`` CLI arguments come last, so they override."""
    return run_cli(
        "fit",
        "--config",
        base,
        "--config",
        overlay,
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        *extra,
    )


def fake_vllm_env(tmp_path: Path) -> dict[str, str]:
    """Write a ``vllm.entrypoints.openai.api_server`` shim that runs :func:`tests.fake_openai.serve_as_vllm`;
    returns the environment (``PYTHONPATH``) under which the sidecar's launcher finds it."""
    package = tmp_path / "fake_vllm" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True, exist_ok=True)
    for init in (package, package.parent, package.parent.parent):
        (init / "__init__.py").touch()
    (package / "api_server.py").write_text("from tests.fake_openai import serve_as_vllm\n\nserve_as_vllm()\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake_vllm"), str(REPO)])}


def fake_managed_sidecar(tmp_path: Path, answers: list[str] | None = None, **overrides) -> dict:
    """``SidecarConfig`` fields (a dict, for overlays; ``SidecarConfig(**d)`` in code) for a sidecar that this
    process starts and stops like a vLLM one, but that is the fake server."""
    config = {
        "python": sys.executable,
        "model": str(tmp_path),  # any dir: the fake serves no weights
        "env": fake_vllm_env(tmp_path),
        "extra_args": ["--fake-answers", json.dumps(answers or ["an answer"])],
        "startup_timeout_s": 60,
        "request_timeout_s": 5,
        "max_retries": 0,
        **overrides,
    }
    SidecarConfig(**config)  # fail here on a misspelt field
    return config


class KillSidecarAt(L.Callback):
    """SIGKILLs the MisalignmentEval's managed server (its process group) at ``step``; remembers that group
    and the group of the server running when training ends (a restarted one, if any)."""

    def __init__(self, step: int = 3):
        self.step = step
        self.killed_pgid: int | None = None
        self.final_pgid: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.killed_pgid is None:
            self.killed_pgid = _evaluator(trainer).session.sidecar.pid
            os.killpg(self.killed_pgid, signal.SIGKILL)

    def on_train_end(self, trainer, pl_module):
        self.final_pgid = _evaluator(trainer).session.sidecar.pid


def _evaluator(trainer) -> MisalignmentEval:
    return next(cb for cb in trainer.callbacks if isinstance(cb, MisalignmentEval))
