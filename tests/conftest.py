"""Shared fixtures. Tests build tiny models in code (no downloads) and write runs into a temp dir."""

from __future__ import annotations

import os

# OpenMP busy-waiting makes small ops 15-60x slower when other processes compete for the 2 cores; .ci/run sets this
# before Python starts, this is the fallback for a bare `pytest`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run ``python -m em_lightning ...`` in-process with runs written under a temp dir; returns the CLI object."""
    from em_lightning.__main__ import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str):
        args = [str(a).replace("configs/", f"{CONFIGS}/", 1) if str(a).startswith("configs/") else str(a) for a in args]
        return main(list(args))

    return run
