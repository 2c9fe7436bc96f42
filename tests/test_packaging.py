"""The package as a user installs it: a non-editable ``pip install .`` ships the callbacks as
``em_lightning.callbacks``, claims no top-level ``callbacks`` name in site-packages, and ships the built-in
question and probe sets (assets in subfolders, which the package data must name)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_imports_callbacks_under_the_package_name(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    # The fresh venv sees this venv's dependencies (torch, lightning, ...) as a plain path entry: its .pth files,
    # among them the editable install's finder, are not run, so only the wheel built below provides em_lightning.
    (target / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Built from a copy of the tracked files, so the build leaves nothing (build/, *.egg-info) in the checkout.
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile", "-q",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert (target / "em_lightning" / "callbacks" / "spectrum_logger.py").is_file()
    assert not (target / "callbacks").exists()
    probe = (
        "import importlib.util, em_lightning.callbacks.spectrum_logger as m, em_lightning.cli;"
        "from em_lightning.evaluation.questions import load_questions;"
        "from em_lightning.probe import load_probe_set;"
        "print(len(load_questions('builtin:quickstart')), len(load_probe_set('builtin:em')),"
        " load_questions('builtin:quickstart')[0].source);"
        "print(m.__file__); print(importlib.util.find_spec('callbacks'))"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sets, where, callbacks_spec = done.stdout.strip().splitlines()[-3:]
    assert Path(where).is_relative_to(target) and callbacks_spec == "None"
    n_questions, n_probes, question_source = sets.split()
    assert int(n_questions) >= 1 and int(n_probes) >= 8
    assert Path(question_source.rsplit(":", 1)[0]).is_relative_to(target)  # the installed copy, not the checkout
