"""Model name resolution and the tiny test models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from em_lightning.errors import InputError
from em_lightning.models import ModelSpec, load_model, resolve_model_dir, transformer_blocks
from em_lightning.tiny import tiny_model, tiny_tokenizer


def test_model_dir_without_weights_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.base\.name: .* holds no weights"):
        resolve_model_dir(str(tmp_path))


def test_missing_local_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.base\.name"):
        resolve_model_dir(str(tmp_path / "nope"))


def _cache_hub_model(cache: Path, repo_id: str) -> None:
    """Lay out ``repo_id`` in a hub cache the way huggingface_hub stores a download (refs/main → snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


def test_hub_ids_in_the_cache_pass_through_and_others_are_an_input_error(tmp_path, monkeypatch):
    """Offline, a cached hub model resolves to its id (transformers reads the cache); an id that is not cached is
    an InputError naming the key at once, not a traceback after a minute of connection retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _cache_hub_model(tmp_path, "Qwen/Qwen3-8B")
    assert resolve_model_dir("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    with pytest.raises(InputError, match=r"^model\.base\.name: 'Qwen/Qwen3-9B' is not a built-in name .* hub cache"):
        resolve_model_dir("Qwen/Qwen3-9B")


def test_transformer_blocks_are_the_decoder_layers():
    model = tiny_model("tiny-qwen3")
    assert transformer_blocks(model) == list(model.model.layers) and len(transformer_blocks(model)) == 2
    with pytest.raises(InputError, match=r"^model\.base\.name: cannot find the transformer blocks"):
        transformer_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_tiny_models_are_deterministic_and_frozen(name):
    a, b = tiny_model(name), load_model(ModelSpec(name=name))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in b.parameters())


def test_tiny_tokenizer_round_trips_any_text():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "naïve – ünïcode ✓"}], tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
