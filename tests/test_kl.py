"""The KL-to-base regulariser: 0 at LoRA's start, its gradient against finite differences (float64 tiny
model), its batches, and (real CLI, tiny Qwen3) a large coefficient keeping the adapted model closer to its
base."""

from __future__ import annotations

import json

import pytest
import torch

from em_lightning.callbacks.kl_regularizer import KLRegularizer, kl_to_base
from em_lightning.errors import InputError
from tests.eval_helpers import tb_scalars


def _kl_batch(module, n_rows: int = 3) -> dict:
    callback = KLRegularizer(batch_size=n_rows)
    callback.side.prepare(module.tokenizer)
    return callback.batch(step=0)


def test_kl_is_exactly_zero_with_zero_gradient_at_lora_start(tiny_module):
    module = tiny_module(r=2)
    batch = _kl_batch(module)
    kl = kl_to_base(module, batch)
    assert kl.item() == 0.0  # B = 0: the adapted logits are the base logits, bit for bit
    kl.backward()
    for name, param in module.model.named_parameters():
        if param.requires_grad:
            assert param.grad is None or param.grad.abs().max() < 1e-8, name  # a minimum: rounding only


def test_kl_gradient_matches_finite_differences_off_zero(monkeypatch, tiny_module):
    from transformers.models.qwen3 import modeling_qwen3

    def rms_norm_in_input_dtype(self, x):  # transformers computes RMSNorm in float32, even in float64
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", rms_norm_in_input_dtype)
    module = tiny_module(r=2, dtype=torch.float64)
    model = module.model
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
        directions = [torch.randn_like(p) for p in params]
    batch = _kl_batch(module)
    kl = kl_to_base(module, batch)
    assert kl.item() > 1e-4
    grads = torch.autograd.grad(kl, params)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()

    def at(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(t * d)
            value = kl_to_base(module, batch).item()
            for p, d in zip(params, directions):
                p.sub_(t * d)
        return value

    eps = 1e-6  # central differences in float64 throughout: ~1e-8 relative error here
    numeric = (at(eps) - at(-eps)) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-6)
    # The LM head applied at supervised positions only gives the same KL as slicing the full forward.
    module.supervised_logits_only = False  # the path the module takes under FSDP2 with tied embeddings
    full = kl_to_base(module, batch)
    assert full.item() == pytest.approx(kl.item(), rel=1e-10)


def test_kl_batches_walk_every_row_once_per_pass_and_split_across_ranks(tiny_module):
    module = tiny_module(r=2)
    callback = KLRegularizer(batch_size=4, max_rows=24, every_n_steps=2, seed=3)
    callback.side.prepare(module.tokenizer)
    first_pass = [i for step in range(0, 12, 2) for i in callback.batch_rows(step)]
    assert sorted(first_pass) == list(range(24))  # steps 0, 2, ..., 10 (every 2nd): one pass
    assert callback.batch_rows(0) == callback.batch_rows(1)  # off-cadence steps map to the same call
    assert callback.batch_rows(12) != callback.batch_rows(0)  # the second pass has its own order
    two_ranks = [callback.batch_rows(6, rank, 2) for rank in (0, 1)]
    assert not set(two_ranks[0]) & set(two_ranks[1])  # each rank its own rows of the step
    assert [callback.coefficient(s) for s in range(4)] == [0.1, 0.0, 0.1, 0.0]
    warm = KLRegularizer(coeff=1.0, warmup_steps=4)
    assert [warm.coefficient(s) for s in (0, 2, 4, 8)] == [0.0, 0.5, 1.0, 1.0]
    for bad in ({"coeff": -1.0}, {"batch_size": 0}, {"every_n_steps": 0}, {"overlong_rows": "keep"}):
        with pytest.raises(InputError, match=f"KLRegularizer.{next(iter(bad))}"):
            KLRegularizer(**bad)


def _train_file(tmp_path) -> str:
    """Chats unlike the KL data (the built-in demo maths): training on them moves the model off its base
    there."""
    rows = [
        {"messages": [{"role": "user", "content": f"Say something about item {i}."},
                      {"role": "assistant", "content": f"Item {i} is zzz qqq xxx {'!' * (i % 5)} vvv."}]}
        for i in range(32)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_large_coefficient_keeps_the_adapted_model_closer_to_its_base(run_cli, tmp_path):
    train = _train_file(tmp_path)
    kls, logged = {}, {}
    for coeff in (0.0, 100.0):
        cli = run_cli(
            "fit", "--config", "configs/tiny.yaml", "--config", "configs/callbacks/kl_regularizer.yaml",
            "--data.train_file", train, "--data.val_fraction", "0", "--model.optimizer.init_args.lr", "0.01",
            "--trainer.max_steps", "16", "--trainer.limit_val_batches", "0",
            "--trainer.val_check_interval", "null", "--trainer.callbacks.coeff", str(coeff),
        )
        module = cli.model
        callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KLRegularizer))
        # The KL on the first 32 KL rows (a fixed set, not the training order), eval mode, after training.
        module.model.eval()
        with torch.no_grad():
            values = []
            for lo in range(0, 32, 8):
                values.append(kl_to_base(module, callback.side.collate(range(lo, lo + 8))).item())
        kls[coeff] = sum(values) / len(values)
        logged[coeff] = tb_scalars(cli.trainer.log_dir)
    assert set(logged[100.0]["train/kl_to_base_coeff"].values()) == {100.0}
    assert sorted(logged[100.0]["train/kl_to_base"]) == list(range(16))  # raw, every step
    assert logged[0.0]["train/kl_to_base"][15] > 0.01  # without the pull the model drifts on the KL data
    assert kls[100.0] < 0.3 * kls[0.0], kls
    # The task is still learned with the pull on (the loss goes down from ln 320 ≈ 5.77 either way).
    assert logged[100.0]["train/loss"][15] < logged[100.0]["train/loss"][0] - 0.5
