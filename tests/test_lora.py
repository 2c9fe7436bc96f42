"""LoRA settings reach peft as configured; the walker reads every adapter back (names, B, A, scale)."""

from __future__ import annotations

import math

import pytest
import torch

from em_lightning.errors import InputError
from em_lightning.lora import (
    LoRASpec,
    apply_lora,
    check_not_fsdp1,
    find_lora_layers,
    gathered_full_params,
    iter_lora_modules,
    short_module_name,
    uses_fsdp1,
)
from em_lightning.spectra import mean_penalty
from em_lightning.tiny import tiny_model


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_defaults_adapt_all_seven_projections_of_every_layer():
    layers = _lora_layers(apply_lora(tiny_model("tiny-llama"), LoRASpec(r=4, alpha=8)))
    assert len(layers) == 7 * 2
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(m.scaling["default"] == pytest.approx(8 / 4) for m in layers.values())


def test_rslora_scale_and_single_layer_rank_one():
    layers = _lora_layers(
        apply_lora(tiny_model("tiny-qwen3"), LoRASpec(r=1, alpha=4, use_rslora=True, layers_to_transform=[1],
                                                      target_modules=["down_proj"]))
    )
    assert list(layers) == ["base_model.model.model.layers.1.mlp.down_proj"]
    layer = layers["base_model.model.model.layers.1.mlp.down_proj"]
    assert layer.scaling["default"] == pytest.approx(4 / math.sqrt(1))
    assert layer.lora_A["default"].weight.shape[0] == 1


def test_unknown_target_module_names_the_key():
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules: \['attn_proj'\]"):
        apply_lora(tiny_model("tiny-qwen3"), LoRASpec(target_modules=["attn_proj"]))


# ------------------------------------------------------------------------------------ reading adapters back
def _tiny_lora(use_rslora=False, r=4, alpha=8, seed=0):
    """tiny-qwen3 with LoRA on q/v/down (2 layers × 3 = 6 adapters), every adapter weight random (B ≠ 0)."""
    torch.manual_seed(seed)
    model = apply_lora(tiny_model("tiny-qwen3"), LoRASpec(r=r, alpha=alpha, use_rslora=use_rslora,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_walker_yields_every_lora_module_with_its_delta(use_rslora):
    model = _tiny_lora(use_rslora=use_rslora)
    found = list(iter_lora_modules(model))
    assert len(found) == 2 * 3  # 2 layers × 3 targets
    cached = list(iter_lora_modules(model, find_lora_layers(model)))
    assert [(n, p, B, A, s) for n, p, B, A, s in cached] == found
    assert [n for n, *_ in found] == [f"model.layers.{i}.{part}" for i in range(2)
                                      for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    expected_scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    modules = dict(model.named_modules())
    for name, proj, B, A, scale in found:
        assert name.rsplit(".", 1)[-1] == proj
        assert scale == pytest.approx(expected_scale)
        layer = modules["base_model.model." + name]
        torch.testing.assert_close(scale * B @ A, layer.get_delta_weight("default"))
        assert B.requires_grad and A.requires_grad


def test_walker_skips_disabled_adapters():
    model = _tiny_lora()
    with model.disable_adapter():
        assert list(iter_lora_modules(model)) == []
    assert len(list(iter_lora_modules(model))) == 6


def test_several_adapters_are_named_apart_and_only_the_active_one_is_read():
    from peft import LoraConfig

    model = _tiny_lora()
    targets = ["q_proj", "v_proj", "down_proj"]
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    refs = find_lora_layers(model)
    assert len(refs) == 12 and {n.rsplit(":", 1)[1] for n, *_ in refs} == {"default", "second"}
    assert [n for n, *_ in iter_lora_modules(model, refs)] == [n for n, *_ in refs if n.endswith(":default")]
    model.set_adapter("second")
    second = list(iter_lora_modules(model, refs))
    assert [n for n, *_ in second] == [n for n, *_ in refs if n.endswith(":second")]
    assert all(B.shape[1] == 2 and A.shape[0] == 2 and s == 1.0 for _, _, B, A, s in second)


@pytest.mark.parametrize("path,short", [
    ("base_model.model.model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.q_proj"),
    (("_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module."
      "mlp.down_proj"), "model.layers.0.mlp.down_proj"),
    ("_orig_mod.base_model.model.model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.v_proj"),
    ("module.base_model.model.model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.v_proj"),
    ("base_model.model.encoder_module.q_proj", "encoder_module.q_proj"),  # only whole components are wrappers
])
def test_short_module_name_drops_peft_and_wrapper_parts(path, short):
    """peft's prefix and the parts FSDP1, activation checkpointing, torch.compile and DDP insert."""
    assert short_module_name(path) == short


# --------------------------------------------------------------- FSDP, on one CPU rank (a gloo group of 1)
@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, so FSDP1 and FSDP2 (fully_shard) wrap a model on the CPU test machine."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_fsdp2_weights_are_gathered_differentiably(one_rank_group):
    """Under fully_shard the LoRA weights are DTensors: the walker returns whole tensors (the same values as
    the plain model's) whose gradient reaches the sharded parameters, equal to the plain model's gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain, sharded = _tiny_lora(seed=1), _tiny_lora(seed=1)
    mesh = init_device_mesh("cpu", (1,))
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    lora = {n: p for n, p in sharded.named_parameters() if "lora_" in n}
    assert all(isinstance(p, DTensor) for p in lora.values())

    got, want = list(iter_lora_modules(sharded)), list(iter_lora_modules(plain))
    assert [n for n, *_ in got] == [n for n, *_ in want]
    for (_, _, B, A, _), (_, _, B0, A0, _) in zip(got, want):
        assert not isinstance(B, DTensor) and not isinstance(A, DTensor)
        torch.testing.assert_close(B, B0)
        torch.testing.assert_close(A, A0)
    mean_penalty([(B, A, s) for *_, B, A, s in got], "neg_entropy").backward()
    mean_penalty([(B, A, s) for *_, B, A, s in want], "neg_entropy").backward()
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if "lora_" in n}
    for n, p in lora.items():
        assert plain_grads[n].abs().sum() > 0, n
        torch.testing.assert_close(p.grad.full_tensor(), plain_grads[n], msg=n)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_fsdp1_is_refused_for_a_loss_term_and_gathered_for_logging(one_rank_group):
    from functools import partial

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    plain, wrapped = _tiny_lora(seed=2), _tiny_lora(seed=2)
    layer_cls = type(plain.base_model.model.model.layers[0])
    policy = partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, layer_cls))
    wrapped = FSDP(wrapped, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy)
    assert uses_fsdp1(wrapped) and not uses_fsdp1(plain)
    check_not_fsdp1(plain, "SpectralPenalty")  # no error without FSDP1
    with pytest.raises(InputError, match=r"trainer.strategy: SpectralPenalty needs differentiable LoRA weights.*FSDP2"):
        check_not_fsdp1(wrapped, "SpectralPenalty")

    paths = [p for p, _ in wrapped.named_modules() if p.endswith("q_proj")]
    assert all("_fsdp_wrapped_module" in p for p in paths)  # the names below really had wrapper parts to drop
    with torch.no_grad(), gathered_full_params(wrapped):
        got = list(iter_lora_modules(wrapped))
        got = [(n, p, B.clone(), A.clone(), s) for n, p, B, A, s in got]
    want = list(iter_lora_modules(plain))
    assert [(n, p, s) for n, p, _, _, s in got] == [(n, p, s) for n, p, _, _, s in want]
    for (_, _, B, A, _), (_, _, B0, A0, _) in zip(got, want):
        torch.testing.assert_close(B, B0)
        torch.testing.assert_close(A, A0)


def test_seeded_init_ignores_a_default_device_context():
    """Lightning builds the model under a default-device context (cuda on a GPU: a CPU generator was refused there,
    found on an H100). Under such a context the adapter must come out as without one."""
    from em_lightning.lora import seeded_lora_init

    plain = apply_lora(tiny_model("tiny-qwen3"), LoRASpec(r=4, alpha=8))
    seeded_lora_init(plain, seed=3)
    in_context = apply_lora(tiny_model("tiny-qwen3"), LoRASpec(r=4, alpha=8))
    with torch.device("meta"):  # the CPU stand-in for a cuda default device: factory calls land there
        seeded_lora_init(in_context, seed=3)
    got, want = dict(in_context.named_parameters()), dict(plain.named_parameters())
    lora = [n for n in want if "lora_" in n]
    assert lora and all(torch.equal(got[n], want[n]) for n in lora)
    assert any(want[n].abs().sum() > 0 for n in lora if "lora_A" in n)
