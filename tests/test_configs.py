"""Every YAML under configs/ parses against the code's signatures (alone or stacked on its base config)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import CONFIGS

ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
BASES = {"tiny.yaml", "quickstart.yaml", "paper/qwen3_8b_insecure.yaml"}


def _stack(rel: str) -> list[str]:
    """A base config is parsed alone; an overlay is stacked on the base its header comment names (or tiny.yaml)."""
    if rel in BASES:
        return [rel]
    header = (CONFIGS / rel).read_text()
    for base in sorted(BASES, key=len, reverse=True):
        if f"configs/{base}" in header and base != rel:
            return [base, rel]
    return ["tiny.yaml", rel]


def test_there_are_configs():
    assert {"tiny.yaml", "quickstart.yaml"} <= set(ALL)
    assert {f"optim/{n}.yaml" for n in ("sgd", "adam", "adamw", "lion", "muon")} <= set(ALL)


@pytest.mark.parametrize("rel", ALL)
def test_config_parses(rel):
    from em_lightning.cli import EMLightningCLI

    yaml.safe_load((CONFIGS / rel).read_text())  # plain YAML first, for a clear error
    args = []
    for part in _stack(rel):
        args += ["--config", str(CONFIGS / part)]
    # --print_config parses and validates everything (class paths, types) without building models.
    with pytest.raises(SystemExit) as exit_info:
        EMLightningCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("rel", ALL)
def test_config_instantiates(rel, tmp_path, monkeypatch):
    """Beyond parsing: the trainer, every callback, the module and the data module are built (no model loaded)."""
    from em_lightning.cli import EMLightningCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-not-used")  # the eval overlay names its judge key's variable
    args = []
    for part in _stack(rel):
        args += ["--config", str(CONFIGS / part)]
    cli = EMLightningCLI(args=[*args, "--trainer.accelerator", "cpu"], run=False)
    assert cli.model.model is None  # models load in configure_model, not at parse time
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"TrainingMonitor", "AdapterExport"} <= names
    text = (CONFIGS / rel).read_text()
    for class_path in [line.split("class_path:")[1].strip() for line in text.splitlines() if "class_path:" in line]:
        if class_path.startswith("callbacks."):
            assert class_path.rsplit(".", 1)[1] in names, class_path
