"""The chunked loss (``model.loss_chunk_size``): the same loss and gradients as the one-shot loss (Gemma2-style
logit soft-capping and padding-free batches included), the LM head never sees more than a chunk of positions,
bad values name the key, and the speed options land in ``config.yaml``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from em_lightning.batching import IGNORE_INDEX, ChatCollator
from em_lightning.errors import InputError
from em_lightning.lora import LoRASpec, apply_lora
from em_lightning.loss import supervised_ce_sum
from em_lightning.tiny import tiny_model, tiny_tokenizer
from tests.helpers import LossRecorder, find
from tests.test_module import TINY_LOSSES


def _tiny_gemma2_with_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0,
                          attn_implementation="eager")
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config)


MAKERS = {"tiny-qwen3": lambda: tiny_model("tiny-qwen3"), "tiny-llama": lambda: tiny_model("tiny-llama"),
          "gemma2-softcap": _tiny_gemma2_with_softcap}


def _model(make):
    torch.manual_seed(1)
    model = apply_lora(make(), LoRASpec(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def _batch(padding_free: bool = False):
    rows = []
    for n_prompt, n_answer in ((5, 9), (17, 3), (2, 12), (0, 6)):
        ids = torch.randint(3, 250, (n_prompt + n_answer,), generator=torch.Generator().manual_seed(n_prompt))
        labels = ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels})
    return ChatCollator(tiny_tokenizer().pad_token_id, padding_free)(rows)


def _loss_and_grads(make, batch, chunk_size, autocast: bool = False):
    model = _model(make)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, n = supervised_ce_sum(model, batch, True, chunk_size)
    loss.backward()
    return loss.detach(), n, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_chunked_loss_equals_the_one_shot_loss(name, padding_free):
    ref, n_ref, g_ref = _loss_and_grads(MAKERS[name], _batch(), None)
    assert n_ref == 9 + 3 + 12 + 5
    for chunk in (1, 7, 29, 1000):  # one position, uneven chunks, exactly all, more than all
        loss, n, grads = _loss_and_grads(MAKERS[name], _batch(padding_free), chunk)
        assert n == n_ref
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        assert set(grads) == set(g_ref)
        for key in g_ref:
            torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-4, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_recomputes_in_bf16():
    """The recompute in backward keeps autocast: the gradients are those of the one-shot bf16 loss to float32
    rounding (measured: identical here; a recompute in float32 moves them by ~1.5 %, far outside the tolerance)."""
    ref, _, g_ref = _loss_and_grads(MAKERS["tiny-qwen3"], _batch(), None, autocast=True)
    loss, _, grads = _loss_and_grads(MAKERS["tiny-qwen3"], _batch(), 5, autocast=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for key in g_ref:
        torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-qwen3", "gemma2-softcap"])
def test_the_lm_head_never_sees_more_than_a_chunk(name):
    model = _model(MAKERS[name])
    seen = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    try:
        loss, n = supervised_ce_sum(model, _batch(), True, 8)
        loss.backward()
    finally:
        handle.remove()
    forwards = -(-n // 8)
    assert len(seen) == 2 * forwards  # each chunk once in forward, once recomputed in backward
    assert max(rows for rows, _ in seen) == 8 and sum(rows for rows, _ in seen) == 2 * n
    seen.clear()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():  # scoring: no recompute
            supervised_ce_sum(model, _batch(), True, 8)
        assert len(seen) == forwards
        seen.clear()
        supervised_ce_sum(model, _batch(), True, n)[0].backward()  # one chunk: nothing to recompute
        assert seen == [(n, seen[0][1])]
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "kwargs,key",
    [({"loss_chunk_size": 0}, "model.loss_chunk_size"), ({"loss_chunk_size": 2.5}, "model.loss_chunk_size"),
     ({"loss_chunk_size": 64, "supervised_logits_only": False}, "model.loss_chunk_size"),
     ({"compile": "yes"}, "model.compile")],
    ids=["zero", "float", "full-forward", "compile-not-bool"],
)
def test_bad_speed_options_name_the_key(kwargs, key):
    from em_lightning.models import ModelSpec
    from em_lightning.module import LoRAFineTune

    with pytest.raises(InputError, match=key.replace(".", r"\.") + ":"):
        LoRAFineTune(base=ModelSpec(name="tiny-qwen3"), **kwargs)


def test_bad_padding_free_names_the_key():
    from em_lightning.data import ChatDataModule

    with pytest.raises(InputError, match=r"data\.padding_free:"):
        ChatDataModule(tokenizer="tiny-qwen3", padding_free="yes")


def test_chunked_training_reproduces_the_stored_losses_and_config_records_the_options(run_cli):
    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "5", "--model.loss_chunk_size", "16",
                  "--trainer.callbacks+=tests.helpers.LossRecorder", "--trainer.limit_val_batches", "0")
    losses = [find(cli.trainer, LossRecorder).losses[s] for s in range(1, 6)]
    assert losses == pytest.approx(TINY_LOSSES, rel=1e-4)
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["loss_chunk_size"] == 16
    assert saved["model"]["compile"] is False and saved["data"]["padding_free"] is False
