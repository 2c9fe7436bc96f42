"""Utilities for benchmarks and serving tests (``scripts/bench_eval.py``, ``tests/test_eval_vllm.py``), not
used by training or evaluation themselves.

Needs torch and the SmolLM2 weights (converted on first use, see :mod:`em_lightning.models`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from em_lightning.lora import LoRASpec, apply_lora
from em_lightning.models import SMOLLM2, ModelSpec, load_model


def random_adapters(out_dir: str | Path, seeds: Iterable[int], b_scale: float = 0.05):
    """Seeded random LoRA adapters of SmolLM2 (r=8, alpha 16, all seven projections), saved as PEFT dirs that
    vLLM loads, ``<out_dir>/adapter_<seed>``; returns the peft model (holding the last one's weights, in eval
    mode) and the dirs.

    A is scaled like a unit-variance projection, B by ``b_scale``: a trained-looking adapter starts at B = 0,
    which would serve the base model's answers; 0.05 changes greedy answers and keeps them fluent.
    """
    model = apply_lora(load_model(ModelSpec(name=SMOLLM2)), LoRASpec(r=8, alpha=16.0))
    dirs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    scale = p.shape[1] ** -0.5 if "lora_A" in name else b_scale
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        path = Path(out_dir) / f"adapter_{seed}"
        model.save_pretrained(str(path))
        dirs.append(path)
    return model.eval(), dirs
