"""The package as a user installs it: a non-editable ``pip install .`` ships the callbacks as
``em_lightning.callbacks`` and claims no top-level ``callbacks`` name in site-packages."""

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
        "print(m.__file__); print(importlib.util.find_spec('callbacks'))"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    where, callbacks_spec = done.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(target) and callbacks_spec == "None"
