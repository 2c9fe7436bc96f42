"""LoRA settings reach peft as configured."""

from __future__ import annotations

import math

import pytest

from em_lightning.lora import LoRASpec, apply_lora
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
