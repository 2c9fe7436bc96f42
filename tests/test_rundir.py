"""The run-dir module: JSONL lines survive a torn write, versions sort numerically, configured file names are
read back from config.yaml, and no other module of the package spells the run dir's file names."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from em_lightning import rundir

PACKAGE = Path(rundir.__file__).resolve().parent
CALLBACKS = PACKAGE.parent / "callbacks"


def test_append_then_read_round_trips_and_nonfinite_becomes_null(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    rundir.append_jsonl(path, [{"step": 1, "v": math.nan}, {"step": 2, "v": [math.inf, 1.0]}])
    rundir.append_jsonl(path, [])  # nothing to write: the file is left as it was
    assert rundir.read_jsonl(path) == [{"step": 1, "v": None}, {"step": 2, "v": [None, 1.0]}]


def test_a_torn_last_line_is_skipped_but_a_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "log_o')
    assert [r["step"] for r in rundir.read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(rundir.RunDirError, match=r"probe\.jsonl:2: not a JSON line"):
        rundir.read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(rundir.RunDirError, match=r"probe\.jsonl:2: not a JSON object"):
        rundir.read_jsonl(path)


def test_a_complete_last_line_that_is_not_json_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"step": 1}\nbroken\n')  # ends with a newline: written whole, so not a torn write
    with pytest.raises(rundir.RunDirError, match=r"s\.jsonl:2"):
        rundir.read_jsonl(path)


def test_versions_sort_numerically_and_later_versions_win(tmp_path):
    for n in (10, 2, 1):
        v = tmp_path / f"version_{n}"
        v.mkdir()
        rundir.append_jsonl(v / rundir.PROBE, [{"step": 5, "from": n}, {"step": n, "from": n}])
    (tmp_path / "version_x").mkdir()  # not a version dir
    versions = rundir.version_dirs(tmp_path)
    assert [v.name for v in versions] == ["version_1", "version_2", "version_10"]
    by_step = rundir.records_by_step(versions, rundir.PROBE)
    assert by_step[5]["from"] == 10 and sorted(by_step) == [1, 2, 5, 10]


def test_a_line_without_a_step_names_file_and_line(tmp_path):
    v = tmp_path / "version_0"
    rundir.append_jsonl(v / rundir.SPECTRA, [{"step": 1}, {"no_step": True}])
    with pytest.raises(rundir.RunDirError, match=r"spectra\.jsonl:2: a line without an integer 'step'"):
        rundir.records_by_step([v], rundir.SPECTRA)


def test_file_names_come_from_the_runs_config():
    config = {
        "trainer": {
            "callbacks": [
                {"class_path": "em_lightning.callbacks.misalignment_probe.MisalignmentProbe",
                 "init_args": {"jsonl": "my_probe.jsonl"}},
                {"class_path": "em_lightning.callbacks.spectrum_logger.SpectrumLogger", "init_args": {"jsonl": None}},
                {"class_path": "em_lightning.callbacks.misalignment_eval.MisalignmentEval",
                 "init_args": {"samples_file": "s.jsonl"}},
            ]
        }
    }
    names = rundir.file_names(config)
    assert names["probe"] == "my_probe.jsonl"
    assert names["spectra"] == rundir.SPECTRA  # no file written: the default name (absent) is looked for
    assert names["samples"] == "s.jsonl" and names["summary"] == rundir.SUMMARY
    assert rundir.file_names(None) == rundir.file_names({})


def test_newest_checkpoint_and_final_adapter(tmp_path):
    assert rundir.newest_checkpoint(tmp_path) is None and not rundir.has_final_adapter(tmp_path)
    for n in (0, 1):
        (tmp_path / f"version_{n}" / rundir.CHECKPOINTS).mkdir(parents=True)
    (tmp_path / "version_0" / rundir.CHECKPOINTS / rundir.LAST_CHECKPOINT).write_text("x")
    assert rundir.newest_checkpoint(tmp_path) == tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    rundir.adapter_dir(tmp_path / "version_1").mkdir(parents=True)
    assert rundir.has_final_adapter(tmp_path)


def _string_literals(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                docstrings.add(id(node.body[0].value))
    return {
        n.value for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }


def test_run_dir_file_names_are_spelled_in_one_module_only():
    """Writers and readers take the names from em_lightning.rundir: a renamed file cannot hide from analyze.
    (Docstrings and comments may mention them; code may not.) Callback defaults are the one exception that
    must equal rundir's (config keys show them in --print_config), checked below."""
    names = {rundir.SPECTRA, rundir.PROBE, rundir.DIRECTION, rundir.SAMPLES, rundir.SUMMARY, rundir.STATE,
             "misalignment_summary.json"}
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *CALLBACKS.rglob("*.py")]:
        if path.name == "rundir.py":
            continue
        hits = {s for s in _string_literals(path) if s in names}
        if hits:
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {sorted(hits)}")
    assert not offenders, "file names spelled outside em_lightning/rundir.py:\n" + "\n".join(offenders)


def test_no_module_of_the_package_imports_main():
    pattern = re.compile(r"^\s*(from\s+em_lightning(\.__main__|\s+import\s+__main__)|import\s+em_lightning\.__main__)",
                         re.MULTILINE)
    offenders = [str(p) for p in [*PACKAGE.rglob("*.py"), *CALLBACKS.rglob("*.py")]
                 if p.name != "__main__.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"modules importing em_lightning.__main__: {offenders}"


def test_records_are_one_json_object_per_line(tmp_path):
    path = tmp_path / "x.jsonl"
    rundir.append_jsonl(path, [{"a": "é"}, {"b": 1}])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"a": "é"}, {"b": 1}]
