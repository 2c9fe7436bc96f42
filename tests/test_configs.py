"""Every YAML under configs/ parses against the code's signatures, and builds — alone or stacked on its base — with
the values it states, without reading any data or question file."""

from __future__ import annotations

import importlib

import pytest
import yaml

from tests.conftest import CONFIGS

# Sweep files and judge overlays are not trainer configs: the sweep tests and tests/test_eval_rejudge.py read them.
ALL = sorted(
    p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("sweeps", "judges")
)
PARSE_ONLY = {"strategy/fsdp1.yaml"}  # Lightning refuses FSDPStrategy on CPU, so it is parsed but not built here
BASES = {"tiny.yaml", "quickstart.yaml", "paper/qwen3_8b_insecure.yaml"}
# The base each overlay is made for (its header's command says so); every other overlay goes on tiny.yaml.
BASE_OF = {
    "quickstart_eval.yaml": "quickstart.yaml",
    "paper/llama32_1b_insecure.yaml": "paper/qwen3_8b_insecure.yaml",
}


def _stack(rel: str) -> list[str]:
    return [rel] if rel in BASES else [BASE_OF.get(rel, "tiny.yaml"), rel]


def _args(rel: str) -> list[str]:
    return [arg for part in _stack(rel) for arg in ("--config", str(CONFIGS / part))]


def _leaves(tree, prefix=""):
    """(dotted key, value) of every leaf of a YAML mapping, lists kept whole."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def test_there_are_configs():
    assert {"tiny.yaml", "quickstart.yaml"} <= set(ALL)
    assert {f"optim/{n}.yaml" for n in ("sgd", "adam", "adamw", "lion", "muon")} <= set(ALL)
    assert set(BASE_OF) <= set(ALL) and set(BASE_OF.values()) <= BASES


@pytest.mark.parametrize("rel", ALL)
def test_config_parses(rel):
    from em_lightning.cli import EMLightningCLI

    yaml.safe_load((CONFIGS / rel).read_text())  # plain YAML first, for a clear error
    # --print_config parses and validates everything (class paths, types) without building models.
    with pytest.raises(SystemExit) as exit_info:
        EMLightningCLI(args=["fit", *_args(rel), "--print_config"])
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("rel", sorted(set(ALL) - PARSE_ONLY))
def test_config_instantiates_with_its_values_and_reads_no_file(rel, tmp_path, monkeypatch):
    """The trainer, every callback, the module and the data module are built; every model/data value the YAML
    states is the one the built objects hold; and nothing reads a data or question file (the search path and the
    cache are empty, so any read would fail)."""
    from em_lightning.cli import EMLightningCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EM_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("EM_LIGHTNING_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-not-used")  # the eval overlay names its judge key's variable
    cli = EMLightningCLI(args=[*_args(rel), "--trainer.accelerator", "cpu"], run=False)
    stated = {}
    for part in _stack(rel):  # later files override earlier ones, as in the CLI
        stated.update(_leaves(yaml.safe_load((CONFIGS / part).read_text())))
    for key, value in stated.items():
        if key.startswith(("model.", "data.")) and not key.startswith("model.optimizer"):
            assert cli.config[key] == value, key
    optimizer = stated.get("model.optimizer.class_path")
    if optimizer:
        assert cli.config["model.optimizer.class_path"] == optimizer
        for key, value in stated.items():
            if key.startswith("model.optimizer.init_args."):
                held = cli.config[key]
                assert (list(held) if isinstance(held, tuple) else held) == value, key  # YAML has no tuples
    classes = {f"{type(cb).__module__}.{type(cb).__name__}" for cb in cli.trainer.callbacks}
    assert {"em_lightning.callbacks.training_monitor.TrainingMonitor",
            "em_lightning.callbacks.adapter_export.AdapterExport"} <= classes
    for part in _stack(rel):
        callbacks = yaml.safe_load((CONFIGS / part).read_text()).get("trainer", {})
        for entry in callbacks.get("callbacks", []) + callbacks.get("callbacks+", []):
            module, name = entry["class_path"].rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            assert any(type(cb) is cls for cb in cli.trainer.callbacks), entry["class_path"]
    assert cli.trainer.max_steps == stated.get("trainer.max_steps", -1)
