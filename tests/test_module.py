"""The LightningModule: the supervised-only loss path, loss terms, checkpoint checks, a stored-loss regression,
and the command line's error line for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from em_lightning.batching import ChatCollator
from em_lightning.lora import LoRASpec, apply_lora
from em_lightning.loss import supervised_ce_sum
from em_lightning.tiny import tiny_model, tiny_tokenizer
from tests.conftest import CONFIGS
from tests.helpers import GradRecorder, LossRecorder, find


def _tiny_gemma2_with_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0,
                          attn_implementation="eager")
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config)


def _batch():
    tok = tiny_tokenizer()
    rows = []
    for n_prompt, n_answer in ((5, 9), (17, 3), (2, 12)):
        ids = torch.randint(3, 250, (n_prompt + n_answer,), generator=torch.Generator().manual_seed(n_prompt))
        labels = ids.clone()
        labels[:n_prompt] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return ChatCollator(tok.pad_token_id)(rows)


@pytest.mark.parametrize("make", [lambda: tiny_model("tiny-qwen3"), _tiny_gemma2_with_softcap],
                         ids=["tiny-qwen3", "gemma2-softcap"])
def test_supervised_logits_only_equals_the_full_forward(make):
    batch = _batch()
    results = []
    for supervised_only in (True, False):
        base = make()
        torch.manual_seed(1)  # the same LoRA A init in both models
        model = apply_lora(base, LoRASpec(r=4, alpha=8.0))
        with torch.no_grad():  # B away from 0, so the adapter is in the forward and gets gradients everywhere
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        loss, n = supervised_ce_sum(model, batch, supervised_only)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (fast, n_fast, g_fast), (full, n_full, g_full) = results
    assert n_fast == n_full == 9 + 3 + 12 - 0  # every answer token has a previous token to predict it from
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert set(g_fast) == set(g_full)
    for name in g_full:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-4, atol=1e-7)


# The first 5 losses of configs/tiny.yaml (seed 0: seeded LoRA init and row order; tiny Qwen3, AdamW, CPU fp32,
# torch 2.13.0), recorded
# from this code. Tolerance rel 1e-4: summation order may differ across CPUs and torch builds, a changed loss,
# data order or initialisation moves them by far more.
TINY_LOSSES = [5.777916431427002, 5.778707981109619, 5.781486988067627, 5.7171311378479, 5.744199752807617]


def test_tiny_config_reproduces_its_stored_losses(run_cli):
    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "5",
                  "--trainer.callbacks+=tests.helpers.LossRecorder", "--trainer.limit_val_batches", "0")
    losses = [find(cli.trainer, LossRecorder).losses[s] for s in range(1, 6)]
    assert losses == pytest.approx(TINY_LOSSES, rel=1e-4)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_loss_term_adds_weight_times_its_gradient_once_per_step(run_cli, accumulate):
    """Σ lora_A has gradient 1 everywhere, weight 0.5·(step+1): with and without the term, the adapter gradients
    differ by exactly that weight, whatever the accumulation; raw value and coefficient are logged."""
    common = ["fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches",
              "0", "--trainer.accumulate_grad_batches", str(accumulate), "--data.batch_size", "2",
              "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.0",
              "--trainer.callbacks+=tests.helpers.GradRecorder"]
    plain = run_cli(*common)
    with_term = run_cli(*common, "--trainer.callbacks+=tests.helpers.SumOfATerm")
    for step in (0, 1):
        g0, g1 = find(plain.trainer, GradRecorder).grads[step], find(with_term.trainer, GradRecorder).grads[step]
        for name in g1:
            expected = 0.5 * (step + 1) if "lora_A" in name else 0.0
            torch.testing.assert_close(g1[name] - g0.get(name, torch.zeros_like(g1[name])),
                                       torch.full_like(g1[name], expected), rtol=1e-5, atol=1e-6)
    from tbparse import SummaryReader

    scalars = SummaryReader(with_term.trainer.log_dir, pivot=False).scalars
    coeff = scalars[scalars["tag"] == "train/sum_a_coeff"].sort_values("step")["value"].tolist()
    assert coeff == [0.5, 1.0]
    raw = scalars[scalars["tag"] == "train/sum_a"]["value"].tolist()
    a_sum = sum(float(p.sum()) for n, p in with_term.model.trainable_named_parameters() if "lora_A" in n)
    assert raw[-1] == pytest.approx(a_sum, rel=1e-4)  # lr 0: the adapter never moved


@pytest.mark.parametrize(
    "change,key",
    [(["--model.lora.r", "8"], "model.lora.r"), (["--model.lora.target_modules", "[q_proj, v_proj]"],
                                                  "model.lora.target_modules")],
    ids=["rank", "target_modules"],
)
def test_resume_with_another_lora_config_names_the_key(run_cli, change, key):
    """Through the CLI (which would otherwise silently take the checkpoint's hparams) and through
    ``trainer.fit(model, ckpt_path=...)`` (where the tensors' shapes or names disagree)."""
    import lightning as L

    from em_lightning.data import ChatDataModule
    from em_lightning.models import ModelSpec
    from em_lightning.module import CheckpointMismatch, LoRAFineTune

    first = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "2")
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointMismatch, match=key.replace(".", r"\.") + r": .*last\.ckpt was written with"):
        run_cli("fit", "--config", "configs/tiny.yaml", *change, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt))
    lora = LoRASpec(r=8, alpha=8.0) if key == "model.lora.r" else LoRASpec(r=4, alpha=8.0, target_modules=["q_proj"])
    module = LoRAFineTune(base=ModelSpec(name="tiny-qwen3"), lora=lora)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    with pytest.raises(CheckpointMismatch, match=key.replace(".", r"\.")):
        trainer.fit(module, datamodule=ChatDataModule(tokenizer="tiny-qwen3", max_rows=40), ckpt_path=str(ckpt))


def test_bad_input_on_the_command_line_is_one_error_line(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    done = subprocess.run(
        [sys.executable, "-m", "em_lightning", "fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.train_file",
         str(bad), "--trainer.max_steps", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {bad}:1: row has no assistant turn, so nothing would be trained on"


def test_an_old_callbacks_class_path_names_the_new_one(tmp_path):
    overlay = tmp_path / "old.yaml"
    overlay.write_text("trainer:\n  callbacks+:\n    - class_path: callbacks.spectrum_logger.SpectrumLogger\n")
    from em_lightning.__main__ import main
    from em_lightning.errors import InputError

    with pytest.raises(InputError, match=rf"{overlay}:3: .*em_lightning\.callbacks\.spectrum_logger\.SpectrumLogger"):
        main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(overlay)])


# ------------------------------------------------------------------------ the module's forward-path extension points


def _lora_module(name: str = "tiny-qwen3", perturb: float = 0.2, **kwargs):
    """A configured tiny LoRA module whose B matrices are moved off 0 (fixed seed), so the adapter acts."""
    from em_lightning.models import ModelSpec
    from em_lightning.module import LoRAFineTune

    module = LoRAFineTune(base=ModelSpec(name=name), lora=LoRASpec(r=4, alpha=8.0), **kwargs)
    module.configure_model()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for pname, param in module.model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, perturb)
    return module


@pytest.mark.parametrize("only", [True, False])
def test_module_supervised_logits_and_logprobs_follow_its_one_forward_path_decision(only):
    from em_lightning.loss import supervised_logits

    module = _lora_module("tiny-qwen3-tied", supervised_logits_only=only)
    batch = _batch()
    full = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(module.supervised_logits(batch), full[:, :-1][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.supervised_logits(batch), supervised_logits(module.model, batch, only))
    sums, counts = module.supervised_logprob_per_row(batch)
    picked = full[:, :-1].float().log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1))[..., 0]
    torch.testing.assert_close(sums, (picked * mask).sum(1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == mask.sum(1).tolist()
    # The decision is the module's: flipping its flag changes which path the callbacks get.
    module.supervised_logits_only = not only
    torch.testing.assert_close(module.supervised_logits(batch), full[:, :-1][mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("only", [True, False], ids=["decoder-only", "full-forward"])
def test_block_activations_are_the_blocks_outputs_with_the_adapter_on_or_off(only):
    """Hooked block outputs equal transformers' hidden states (entry i+1 is block i's output, except the last,
    which is after the final norm), the adapter-off activations equal the same base weights without any LoRA,
    and gradient flows to the adapter with the adapter on."""
    from em_lightning.tiny import tiny_model

    module = _lora_module(supervised_logits_only=only)
    module.model.eval()
    batch = _batch()
    blocks = module.decoder_blocks()
    assert len(blocks) == 2 and all(type(b).__name__ == "Qwen3DecoderLayer" for b in blocks)
    acts = module.block_activations(batch, [1, 0])
    assert sorted(acts) == [0, 1] and acts[0].shape == (*batch["input_ids"].shape, 64)
    with torch.no_grad():
        hidden = module.model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                              output_hidden_states=True).hidden_states
        final_norm = module.model.get_base_model().get_decoder().norm
        torch.testing.assert_close(acts[0], hidden[1])
        torch.testing.assert_close(final_norm(acts[1]), hidden[2])
        plain = tiny_model("tiny-qwen3").eval()
        plain_hidden = plain(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                             output_hidden_states=True).hidden_states
    hooks_before = [len(b._forward_hooks) for b in blocks]  # transformers adds some for output_hidden_states
    base = module.block_activations(batch, [0, 1], adapter=False)
    torch.testing.assert_close(base[0], plain_hidden[1])
    assert not torch.allclose(base[0], acts[0])  # the adapter acts, and adapter=False really turned it off
    assert [len(b._forward_hooks) for b in blocks] == hooks_before  # ours removed
    acts[1].pow(2).mean().backward()
    grads = [p.grad for n, p in module.model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_adapter_disabled_gives_the_base_logits_and_bad_layers_name_the_range():
    from em_lightning.errors import InputError
    from em_lightning.tiny import tiny_model

    module = _lora_module().eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        with module.adapter_disabled():
            base = module.model(input_ids=ids).logits
        adapted = module.model(input_ids=ids).logits
        plain = tiny_model("tiny-qwen3").eval()(input_ids=ids).logits
    torch.testing.assert_close(base, plain)
    assert not torch.allclose(adapted, plain)
    with pytest.raises(InputError, match=r"layers: \[2\] must be 0-based block indices in \[0, 1\]"):
        module.block_activations(_batch(), [2])
