"""Every bad config value ends in one ``error:`` line naming its key and exit status 2, never a traceback.

The command line runs in this process as ``python -m em_lightning`` does (``cli_error``: the same
``em_lightning.__main__.run`` and its InputError handling; test_module.py runs the real subprocess once). Each
row of the table is one key with one bad value on top of the tiny config; the run would otherwise train.
"""

from __future__ import annotations

import pytest
import torch

from em_lightning.errors import InputError
from em_lightning.sharding import gather_dtype

TINY = ["fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
SPECTRUM = ["--config", "configs/callbacks/spectrum.yaml"]
PENALTY = ["--config", "configs/callbacks/spectral_penalty.yaml"]

# key → the arguments that set it to a bad value (after TINY)
BAD_VALUES = {
    "model.lora.r": ["--model.lora.r", "0"],
    "model.lora.dropout": ["--model.lora.dropout", "1.0"],
    "model.lora.target_modules": ["--model.lora.target_modules", "[nope_proj]"],
    "model.lora.layers_to_transform": ["--model.lora.layers_to_transform", "[2]"],  # tiny-qwen3: layers 0, 1
    "model.schedule.warmup_steps": ["--model.schedule.warmup_steps", "-1"],
    "model.schedule.warmup_ratio": ["--model.schedule.warmup_ratio", "-0.1"],
    "model.schedule.min_lr_ratio": ["--model.schedule.min_lr_ratio", "1.5"],
    "model.base.name": ["--model.base.name", "no-such-org/no-such-model"],
    "SpectrumLogger.every_n_steps": [*SPECTRUM, "--trainer.callbacks.every_n_steps", "0"],
    "SpectrumLogger.subspace_k": [*SPECTRUM, "--trainer.callbacks.subspace_k", "0"],
    "SpectrumLogger.metrics": [*SPECTRUM, "--trainer.callbacks.metrics", "[entropy, nonsense]"],
    "SpectralPenalty.form": [*PENALTY, "--trainer.callbacks.form", "nonsense"],
    "trainer.strategy.tensor_parallel_size": ["--config", "configs/strategy/fsdp2.yaml",
                                              "--trainer.strategy.init_args.tensor_parallel_size", "2"],
}


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub requests: a name that is not in the hub cache must fail at once, naming the key."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("key", list(BAD_VALUES))
def test_a_bad_value_is_one_error_line_naming_its_key(key, cli_error, tmp_path, monkeypatch, offline_hub):
    monkeypatch.chdir(tmp_path)
    from tests.conftest import CONFIGS

    args = [str(CONFIGS / a.removeprefix("configs/")) if a.startswith("configs/") else a
            for a in TINY + BAD_VALUES[key]]
    try:
        code, lines = cli_error(*args)
    except SystemExit as exit_:  # the parser's own errors (types, choices) exit here, after printing one line
        pytest.fail(f"{key}: the parser exited with {exit_.code} instead of an InputError")
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, lines[-5:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}:"), lines[-5:]
    assert "Traceback" not in "\n".join(lines)


def test_a_good_value_of_every_checked_key_trains(cli_error, tmp_path, monkeypatch):
    """The same command with the values in range runs (so the rows above fail for their value alone)."""
    monkeypatch.chdir(tmp_path)
    from tests.conftest import CONFIGS

    good = ["--model.lora.dropout", "0.5", "--model.lora.layers_to_transform", "[1]",
            "--model.schedule.warmup_steps", "0", "--model.schedule.warmup_ratio", "0.5",
            "--model.schedule.min_lr_ratio", "1.0"]
    args = [str(CONFIGS / a.removeprefix("configs/")) if a.startswith("configs/") else a for a in TINY + good]
    code, lines = cli_error(*args)
    assert code == 0, lines[-5:]


# ------------------------------------------------------------------------- FSDP2 gathers as trainer.precision says
@pytest.mark.parametrize("precision,expected", [
    ("32-true", None),  # as stored: what a one-process 32-true run computes in
    ("bf16-mixed", torch.bfloat16),
    ("bf16-true", None),  # Lightning has made the weights bf16 already
    ("16-true", None),
])
def test_auto_gather_dtype_follows_the_precision(precision, expected):
    assert gather_dtype("auto", precision) is expected


@pytest.mark.parametrize("precision,agreeing,contradicting", [
    ("32-true", ["float32", None], ["bfloat16", "float16"]),
    ("bf16-mixed", ["bfloat16"], ["float32", "float16", None]),
    ("bf16-true", ["bfloat16", None], ["float32", "float16"]),
    ("16-true", ["float16", None], ["float32", "bfloat16"]),
])
def test_an_explicit_gather_dtype_must_agree_with_the_precision(precision, agreeing, contradicting):
    for value in agreeing:
        assert gather_dtype(value, precision) == (getattr(torch, value) if value else None)
    for value in contradicting:
        with pytest.raises(InputError, match=rf"^model\.fsdp\.param_dtype: .*{precision}"):
            gather_dtype(value, precision)
