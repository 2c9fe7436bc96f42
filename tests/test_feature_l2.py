"""The feature-space L2 (LDIFS-style) loss term: 0 at LoRA's start, equal to a hand computation from the model's
hidden states, its gradient against finite differences (float64 tiny model, B perturbed), block selection, and
(real CLI, tiny Qwen3) a large coefficient keeping the features closer to the base than without; 2 CPU processes
under DDP and FSDP2 train the one-process adapter with it and the KL term on."""

from __future__ import annotations

import json

import pytest
import torch

from em_lightning.callbacks.feature_l2 import FeatureL2Regularizer, every_nth_block, feature_l2
from em_lightning.errors import InputError
from tests.conftest import CONFIGS
from tests.eval_helpers import tb_scalars


def _side_batch(module, n_rows: int = 3) -> dict:
    callback = FeatureL2Regularizer(batch_size=n_rows)
    callback.side.prepare(module.tokenizer)
    return callback.batch(step=0)


def _by_hand(peft_model, batch, layer: int) -> float:
    """The term at one block from ``output_hidden_states`` (entry i + 1 is block i's output, for every block but
    the last, whose entry is after the final norm): mean over positions predicting a supervised token of the
    squared distance summed over hidden dimensions."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
        adapted = peft_model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
    total, count = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1] - 1):
            if batch["labels"][row, t + 1] != -100:
                total += float(((adapted[row, t] - base[row, t]) ** 2).sum())
                count += 1
    return total / count


def test_zero_with_zero_gradient_at_lora_start(tiny_module):
    module = tiny_module(r=2)
    batch = _side_batch(module)
    value = feature_l2(module, batch, [0, 1])
    assert value.item() == 0.0  # B = 0: the adapted blocks' outputs are the base's, bit for bit
    value.backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_equals_the_hand_computation_from_hidden_states(tiny_module):
    module = tiny_module(r=2, perturb_B=0.3)
    module.model.eval()
    batch = _side_batch(module, n_rows=4)
    expected = _by_hand(module.model, batch, 0)
    assert expected > 1e-4
    with torch.no_grad():
        assert feature_l2(module, batch, [0]).item() == pytest.approx(expected, rel=1e-5)
        both = feature_l2(module, batch, [0, 1]).item()
        assert both == pytest.approx((expected + feature_l2(module, batch, [1]).item()) / 2, rel=1e-6)


def test_gradient_matches_finite_differences_with_B_perturbed(monkeypatch, tiny_module):
    from transformers.models.qwen3 import modeling_qwen3

    def rms_norm_in_input_dtype(self, x):  # transformers computes RMSNorm in float32, even in float64
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", rms_norm_in_input_dtype)
    module = tiny_module(r=2, perturb_B=0.3, dtype=torch.float64)
    params = [p for p in module.model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        directions = [torch.randn_like(p) for p in params]
    batch = _side_batch(module)
    value = feature_l2(module, batch, [0, 1])
    assert value.item() > 1e-4
    grads = torch.autograd.grad(value, params)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()

    def at(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(t * d)
            out = feature_l2(module, batch, [0, 1]).item()
            for p, d in zip(params, directions):
                p.sub_(t * d)
        return out

    eps = 1e-6  # central differences in float64 throughout
    numeric = (at(eps) - at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_blocks_every_fifth_by_default_and_bad_layers_name_the_key(tiny_module):
    assert every_nth_block(36, 5) == [4, 9, 14, 19, 24, 29, 34]  # every 5th block of a 36-block model
    assert every_nth_block(2, 5) == [1]  # fewer blocks than the stride: the last block
    module = tiny_module(r=2)
    assert FeatureL2Regularizer().blocks(module) == [1]
    assert FeatureL2Regularizer(layers=[1, 0, 1]).blocks(module) == [0, 1]
    with pytest.raises(InputError, match=r"^FeatureL2Regularizer\.layers: \[2\] out of range"):
        FeatureL2Regularizer(layers=[0, 2]).blocks(module)
    for bad in ({"layers": []}, {"layers": [-1]}, {"layer_stride": 0}, {"batch_size": 0}, {"coeff": -1.0}):
        with pytest.raises(InputError, match=rf"^FeatureL2Regularizer\.{next(iter(bad))}: "):
            FeatureL2Regularizer(**bad)


def test_gradient_is_the_same_with_gradient_checkpointing(tiny_module):
    """The blocks' forward hooks catch the outputs in the forward; the recomputation in backward (hooks removed by
    then) must not change the gradient."""
    module = tiny_module(r=2, perturb_B=0.3)
    batch = _side_batch(module)
    params = [p for p in module.model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(feature_l2(module, batch, [0, 1]), params)
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert module.model.is_gradient_checkpointing
    checkpointed = torch.autograd.grad(feature_l2(module, batch, [0, 1]), params)
    assert max(float(g.abs().max()) for g in plain) > 1e-4
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_accumulation_4_of_batch_2_trains_the_batch_8_adapter(tiny_module):
    """With the term on (evaluated once per optimizer step on its own side batch), 4 accumulated micro-batches
    of 2 rows train the adapter of one batch of 8 rows (SGD, 2 steps), which differs from the adapter trained
    without the term. (B starts as small noise: from peft's random B the term is huge and one SGD step blows the
    adapter up, amplifying rounding.)"""
    from functools import partial

    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        ids = torch.randint(0, 300, (16,), generator=g)
        labels = ids.clone()
        labels[:6] = -100  # equal supervised counts per row: micro-batch means compose exactly
        rows.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": labels})
    adapters = {}
    for label, batch_size, accumulate, coeff in (("big", 8, 1, 1.0), ("accumulated", 2, 4, 1.0), ("off", 8, 1, 0.0)):
        L.seed_everything(0, verbose=False)  # LoRA A is seeded from the initial seed: the same start for every run
        module = tiny_module(partial(torch.optim.SGD, lr=0.05), perturb_B=0.05)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=accumulate,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[FeatureL2Regularizer(coeff=coeff, batch_size=3)])
        trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=batch_size, shuffle=False))
        adapters[label] = {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}
    for name, value in adapters["big"].items():
        torch.testing.assert_close(adapters["accumulated"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    moved = max(float((adapters["off"][n] - v).abs().max() / v.abs().max()) for n, v in adapters["big"].items())
    assert moved > 1e-2  # the term shaped the adapter: far beyond the tolerance above


# --------------------------------------------------------------------------------------- training with it
def _train_file(tmp_path) -> str:
    """Chats unlike the side set (the built-in demo maths): training on them moves the features there."""
    rows = [
        {"messages": [{"role": "user", "content": f"Say something about item {i}."},
                      {"role": "assistant", "content": f"Item {i} is zzz qqq xxx {'!' * (i % 5)} vvv."}]}
        for i in range(32)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_large_coefficient_keeps_the_features_closer_to_the_base(run_cli, tmp_path):
    train = _train_file(tmp_path)
    distances, logged = {}, {}
    for coeff in (0.0, 10.0):
        cli = run_cli(
            "fit", "--config", "configs/tiny.yaml", "--config", "configs/mitigations/ldifs.yaml",
            "--trainer.callbacks.data", "builtin:demo",
            "--data.train_file", train, "--data.val_fraction", "0", "--model.optimizer.init_args.lr", "0.01",
            "--trainer.max_steps", "16", "--trainer.limit_val_batches", "0",
            "--trainer.val_check_interval", "null", "--trainer.callbacks.coeff", str(coeff),
        )
        module = cli.model
        callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FeatureL2Regularizer))
        blocks = callback.blocks(module)
        # The distance on the first 32 side rows (a fixed set, not the training order), eval mode, after training.
        module.model.eval()
        with torch.no_grad():
            values = [feature_l2(module, callback.side.collate(range(lo, lo + 8)), blocks).item()
                      for lo in range(0, 32, 8)]
        distances[coeff] = sum(values) / len(values)
        logged[coeff] = tb_scalars(cli.trainer.log_dir)
    assert set(logged[10.0]["train/feature_l2_coeff"].values()) == {10.0}
    assert sorted(logged[10.0]["train/feature_l2"]) == list(range(16))  # raw, every step
    assert sorted(logged[10.0][f"train/feature_l2/block_{blocks[0]}"]) == list(range(16))
    assert logged[0.0]["train/feature_l2"][15] > 10 * logged[0.0]["train/feature_l2"][1]  # drifts without the pull
    assert distances[10.0] < 0.3 * distances[0.0], distances
    # The task is still learned with the pull on (the loss goes down from ln 320 ≈ 5.77 either way).
    assert logged[10.0]["train/loss"][15] < logged[10.0]["train/loss"][0] - 0.5


# ---------------------------------------------------------------------------- 2 processes (DDP and FSDP2)
def _mitigation_args(side_batch: int) -> list[str]:
    """3 steps with the LDIFS and KL overlays, each on the demo chats (rows of different lengths: the ranks hold
    different numbers of positions, so only a mean over every rank's positions equals one process)."""
    return ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
            "--trainer.callbacks.every_n_train_steps", "1000",
            "--config", str(CONFIGS / "mitigations" / "ldifs.yaml"), "--trainer.callbacks.data", "builtin:demo",
            "--trainer.callbacks.batch_size", str(side_batch), "--trainer.callbacks.coeff", "1.0",
            "--trainer.callbacks.layers", "[0, 1]",
            "--config", str(CONFIGS / "mitigations" / "kl.yaml"), "--trainer.callbacks.data", "builtin:demo",
            "--trainer.callbacks.batch_size", str(side_batch), "--trainer.callbacks.coeff", "1.0"]


@pytest.fixture(scope="module")
def one_process_terms(tmp_path_factory):
    from tests.test_distributed import _fit

    return _fit(tmp_path_factory.mktemp("one_terms"), "one", *_mitigation_args(4), "--data.batch_size", "8")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_with_ldifs_and_kl_train_the_one_process_adapter(tmp_path, one_process_terms, strategy):
    """2 processes x (batch 4, side batch 2) = 1 process x (batch 8, side batch 4): the same side rows per step,
    the same adapter, and the same logged train/loss, train/feature_l2 and train/kl_to_base."""
    from tests.test_distributed import _adapter, _fit

    two = _fit(tmp_path, strategy, *_mitigation_args(2), "--data.batch_size", "4", devices=2, strategy=strategy)
    reference, got = _adapter(one_process_terms), _adapter(two)
    assert max(float(t.abs().max()) for k, t in reference.items() if "lora_B" in k) > 1e-3
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-6)
    ref_logged, logged = tb_scalars(one_process_terms), tb_scalars(two)
    for tag in ("train/loss", "train/feature_l2", "train/kl_to_base"):
        assert sorted(logged[tag]) == sorted(ref_logged[tag]) == [0, 1, 2], tag
        assert [logged[tag][s] for s in range(3)] == pytest.approx([ref_logged[tag][s] for s in range(3)],
                                                                   rel=1e-4, abs=1e-7), tag
    assert ref_logged["train/feature_l2"][2] > 0 and ref_logged["train/kl_to_base"][2] > 0
