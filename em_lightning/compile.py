"""``model.compile``: ``torch.compile`` of the model's transformer blocks, in place.

Each decoder block is compiled with :meth:`torch.nn.Module.compile` (regional compilation): the block keeps its
class, parameters and place in the module tree, only its call goes through the compiled code. So nothing about the
model's structure changes — the state dict and checkpoint keys carry no ``_orig_mod.`` prefix, peft's
``get_base_model()`` / ``save_pretrained`` and the adapter walkers (spectra, penalty, probe) see the same modules,
and a compiled run's checkpoint resumes uncompiled and vice versa. The blocks share one compiled graph (they run
the same code), so compile time does not grow with depth. Embeddings, mask creation, the final norm, the LM head
and the loss stay eager: the head runs on a data-dependent number of supervised positions.

``dynamic=True`` from the first call: rows change length every batch, and a first static graph would only be
thrown away at the second batch (measured on the tiny model: 4 graphs static-first, 2 dynamic). The first block
sees an input that needs no gradient (frozen embeddings), the others one that does, and training, validation and
the probe run in different grad and train/eval modes: one graph each, so the recompile limit is raised to
:data:`RECOMPILE_LIMIT` (torch's default 8 would silently fall back to eager on a model with two block kinds).
"""

from __future__ import annotations

import torch

BACKEND = "inductor"  # tests switch to "aot_eager" (same tracing, no code generation) for speed
RECOMPILE_LIMIT = 64


def compile_blocks(peft_model: torch.nn.Module, backend: str | None = None) -> int:
    """Compile every transformer block of ``peft_model`` (a ``PeftModel`` or a plain causal LM) in place; returns
    how many were compiled."""
    import torch._dynamo.config as dynamo_config

    from em_lightning.models import transformer_blocks

    for key in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), RECOMPILE_LIMIT))
            break
    lm = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    blocks = transformer_blocks(lm)
    for block in blocks:
        block.compile(backend=backend or BACKEND, dynamic=True)
    return len(blocks)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether any sub-module of ``module`` runs through ``torch.compile`` (set by :func:`compile_blocks`)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def check_speed_options(loss_chunk_size, supervised_logits_only: bool, compile: bool) -> None:
    """``InputError`` naming the key for a bad ``model.loss_chunk_size`` or ``model.compile``."""
    from em_lightning.errors import InputError

    if loss_chunk_size is not None:
        if isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1:
            raise InputError(f"model.loss_chunk_size: {loss_chunk_size!r} is not a positive integer (or null)")
        if not supervised_logits_only:
            raise InputError("model.loss_chunk_size: chunks the supervised-logits path; it needs "
                             "model.supervised_logits_only: true (or set model.loss_chunk_size: null)")
    if not isinstance(compile, bool):
        raise InputError(f"model.compile: {compile!r} is not true or false")
