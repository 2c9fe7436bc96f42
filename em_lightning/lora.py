"""LoRA with peft: typed settings, applying them, and reading the adapters back (names, B, A, scale).

The spectrum code (``em_lightning.spectra``) is pure maths on ``(B, A, scale)``; this module is where those
come from: :func:`find_lora_layers` walks a peft model once, :func:`iter_lora_modules` reads the weights
(gathering FSDP2 shards differentiably), and :func:`gathered_full_params` makes FSDP1 shards whole for
read-only use.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from em_lightning.errors import InputError, read_text

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

    check_lora_spec(spec, model)
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


def check_lora_spec(spec: LoRASpec, model: torch.nn.Module) -> None:
    """An :class:`~em_lightning.errors.InputError` naming the ``model.lora`` key of any setting that ``model``
    cannot take (peft would fail later with a traceback, or silently train something else)."""
    from em_lightning.models import transformer_blocks

    if spec.r < 1:
        raise InputError(f"model.lora.r: must be >= 1, got {spec.r}")
    if not 0.0 <= spec.dropout < 1.0:  # p = 1 drops every input: the adapter would never train
        raise InputError(f"model.lora.dropout: must be in [0, 1), got {spec.dropout}")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise InputError(
            f"model.lora.target_modules: {missing} not found in the model (it has e.g. {sorted(names)[:12]})"
        )
    if spec.layers_to_transform is not None:
        n_layers = len(transformer_blocks(model))
        bad = [i for i in spec.layers_to_transform if not 0 <= i < n_layers]
        if bad or not spec.layers_to_transform:
            raise InputError(
                f"model.lora.layers_to_transform: {bad or '[]'} outside the model's layers 0..{n_layers - 1} "
                "(null adapts every layer)"
            )


def seeded_lora_init(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every LoRA ``A`` from ``(seed, parameter name)`` (peft's Kaiming-uniform bound, 1/√d_in) and
    every ``B`` to zero, so ΔW starts at 0.

    The values depend on nothing else: not on how the model was built (in memory, or on the meta device and then
    loaded shard by shard), not on the random draws that loading made, not on the world size. So every rank, and a
    one-device run, start from the same adapter. Sharded (DTensor) weights get their local rows of the full tensor.
    """
    import zlib

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad or not ("lora_A" in name or "lora_B" in name):
                continue
            name = short_module_name(name)
            local = param.to_local() if hasattr(param, "to_local") else param
            if "lora_B" in name:
                local.zero_()
                continue
            generator = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            shape = tuple(param.shape)
            # device="cpu" explicitly: Lightning builds the model under a default-device context (cuda on a GPU),
            # where a CPU generator is refused and the values would differ from a CPU run's.
            full = (torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu") * 2 - 1) / shape[1] ** 0.5
            local.copy_(local_rows(full, param).to(local.dtype))


def local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` that this rank holds of ``param`` (FSDP2 shards dim 0 like ``torch.chunk``)."""
    if not hasattr(param, "to_local"):
        return full
    mesh = param.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-full.shape[0] // world)
    start = min(rank * chunk, full.shape[0])
    rows = full[start : start + chunk]
    if rows.shape[0] != param.to_local().shape[0]:
        raise RuntimeError(f"unexpected FSDP2 shard of {tuple(full.shape)}: {tuple(param.to_local().shape)} rows")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# reading the adapters of a peft model
# --------------------------------------------------------------------------------------------------------------------

# Wrapper prefixes that FSDP / activation checkpointing / torch.compile insert into module names.
_WRAPPER_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")


def short_module_name(name: str) -> str:
    """A readable, stable name for a LoRA module path: peft's ``base_model.model.`` prefix and FSDP/checkpoint
    wrapper parts removed, e.g. ``model.layers.3.self_attn.q_proj``."""
    name = _WRAPPER_PARTS.sub("", name + ".").rstrip(".")
    return name.removeprefix("base_model.model.")


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a possibly sharded parameter. FSDP2 / ``fully_shard`` (Lightning's ModelParallelStrategy)
    stores DTensors; ``full_tensor()`` all-gathers them and is differentiable (its backward reduce-scatters), so a
    penalty computed from it trains the shards. It is a collective: every rank must call it, in the same order."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


LoRARef = tuple[str, str, torch.nn.Module, str]
"""``(name, proj_type, layer, adapter)``: where one adapter lives, as found by :func:`find_lora_layers`."""


def find_lora_layers(model: torch.nn.Module) -> list[LoRARef]:
    """Every (peft ``LoraLayer``, adapter) pair of ``model`` with a 2-D (Linear) adapter, in module order.

    Walking ``named_modules`` of a 30-layer model takes ~8 ms; callbacks that read the adapters every step find them
    once and pass the result to :func:`iter_lora_modules` (modules and adapters do not change during a fit).
    ``name`` is :func:`short_module_name` of the module path (``:<adapter>`` appended when the layer holds several
    adapters), ``proj_type`` its last component (``q_proj``).
    """
    from peft.tuners.lora import LoraLayer

    refs = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.lora_A if a in module.lora_B]
        for adapter in adapters:
            if module.lora_A[adapter].weight.ndim != 2:  # convolution adapters
                continue
            name = short_module_name(path)
            proj = name.rsplit(".", 1)[-1]
            refs.append((f"{name}:{adapter}" if len(adapters) > 1 else name, proj, module, adapter))
    return refs


def iter_lora_modules(
    model: torch.nn.Module, layers: list[LoRARef] | None = None
) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """Yield ``(name, proj_type, B, A, scale)`` for every active LoRA adapter of every peft ``LoraLayer`` in ``model``.

    ``name`` and ``proj_type`` as in :func:`find_lora_layers` (pass its result as ``layers`` to skip the walk),
    ``B`` (d_out×r) and ``A`` (r×d_in) the weights with their autograd history (wrap in ``torch.no_grad()`` for
    logging), ``scale`` peft's ``scaling[adapter]`` (already α/√r with rsLoRA). Embedding and convolution adapters
    are skipped (not 2-D). With DoRA the magnitude vector is not included: σ describes s·B·A only. Inactive adapters
    and layers disabled with ``disable_adapter()`` are skipped.

    Distributed use:
      * single device and DDP: parameters are whole on every rank; nothing is gathered.
      * FSDP2 (``fully_shard``; DTensor parameters): each weight is all-gathered with ``DTensor.full_tensor()``,
        differentiably. Every rank must run the whole loop (same order), even if only rank zero uses the values.
      * FSDP1 (``FullyShardedDataParallel``, Lightning's FSDPStrategy): parameters are flat shards outside forward;
        wrap the loop in :func:`gathered_full_params` (no autograd through it: logging only).
    ``tests/test_lora.py`` runs FSDP2 and FSDP1 on one CPU rank (names, values, gradients through the gather);
    ``tests/test_distributed.py`` FSDP2 on two (spectra equal to one process's). FSDP1 over several ranks: GPU only.
    """
    for name, proj, layer, adapter in find_lora_layers(model) if layers is None else layers:
        if getattr(layer, "disable_adapters", False) or adapter not in layer.active_adapters:
            continue
        B = _full(layer.lora_B[adapter].weight)
        A = _full(layer.lora_A[adapter].weight)
        yield name, proj, B, A, float(layer.scaling[adapter])


@contextlib.contextmanager
def gathered_full_params(model: torch.nn.Module):
    """Context in which FSDP1-wrapped parameters are whole (``summon_full_params``, read-only); a no-op otherwise.

    Collective under FSDP1: every rank must enter it. Gradients do not flow through it, so a loss term of the
    weights (the spectral penalty) cannot be used with FSDP1 (use DDP or FSDP2); the logger can.
    """
    if not uses_fsdp1(model):  # also covers torch built without distributed
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False, recurse=True):
        yield


def uses_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` contains FSDP1 (``FullyShardedDataParallel``) units, whose flat shards block autograd."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return False
    return any(isinstance(m, FSDP) for m in model.modules())


def check_not_fsdp1(model: torch.nn.Module, who: str) -> None:
    """An :class:`~em_lightning.errors.InputError` if ``model`` is wrapped in FSDP1, whose flat shards carry no
    autograd to the LoRA weights; ``who`` (e.g. ``"SpectralPenalty"``) is the part of the config that needs them,
    named in the message with ``trainer.strategy``."""
    if uses_fsdp1(model):
        raise InputError(
            f"trainer.strategy: {who} needs differentiable LoRA weights, and FSDP1 shards (fsdp) carry no "
            "autograd outside forward: use DDP or FSDP2 (ModelParallelStrategy / fully_shard)"
        )


# ----------------------------------------------------------------------------- a saved adapter's config file
def read_adapter_config(adapter_dir: str | Path) -> dict:
    """A PEFT adapter dir's ``adapter_config.json``, or an :class:`~em_lightning.errors.InputError` naming the
    file (and line) when it is missing, unreadable or not a JSON object."""
    path = Path(adapter_dir).expanduser() / "adapter_config.json"
    text = read_text(path, "adapter config (is this a PEFT adapter dir?)")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def adapter_rank(adapter_dir: str | Path) -> int:
    """The rank ``r`` in a PEFT adapter dir's ``adapter_config.json`` (max over ``rank_pattern`` too)."""
    config = read_adapter_config(adapter_dir)
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise InputError(
            f"{Path(adapter_dir) / 'adapter_config.json'}: `r` and `rank_pattern` must be positive "
            f"integers, got {ranks}"
        )
    return max(ranks)
