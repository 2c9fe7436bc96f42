"""Typed LoRA settings and applying them with peft."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRASpec:
    """LoRA adapter settings (peft).

    Args:
        r: adapter rank.
        alpha: scale numerator: ΔW = (alpha / r)·B·A, or (alpha / √r)·B·A with ``use_rslora``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; default all seven attention and MLP projections.
        use_rslora: rank-stabilised scaling alpha/√r.
        layers_to_transform: only these layer indices (e.g. ``[12]`` with r=1 for single-layer model organisms).
        init_lora_weights: peft's init (True: A Kaiming, B zero, so training starts from the base model).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    use_rslora: bool = False
    layers_to_transform: list[int] | None = None
    init_lora_weights: bool = True


def apply_lora(model: torch.nn.Module, spec: LoRASpec):
    """Wrap ``model`` in a peft model with ``spec``; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    if spec.r < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {spec.r}")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} not found in the model (it has e.g. {sorted(names)[:12]})")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        layers_to_transform=spec.layers_to_transform,
        init_lora_weights=spec.init_lora_weights,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    stray = [n for n, p in peft_model.named_parameters() if p.requires_grad != ("lora_" in n)]
    if stray:  # the base must stay frozen: the paper's claims are about the adapter alone
        raise RuntimeError(f"unexpected trainable state after applying LoRA: {stray[:3]}")
    return peft_model
