"""Model name resolution and the tiny test models."""

from __future__ import annotations

import pytest
import torch

from em_lightning.models import ModelSpec, load_model, resolve_model_dir
from em_lightning.tiny import tiny_model, tiny_tokenizer


def test_model_dir_without_weights_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.base\.name: .* holds no weights"):
        resolve_model_dir(str(tmp_path))


def test_missing_local_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.base\.name"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_hub_ids_pass_through():
    assert resolve_model_dir("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_tiny_models_are_deterministic_and_frozen(name):
    a, b = tiny_model(name), load_model(ModelSpec(name=name))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in b.parameters())


def test_tiny_tokenizer_round_trips_any_text():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "naïve – ünïcode ✓"}], tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
