"""FSDP2 for a LoRA model: which modules become sharded units, in what precision, and checkpoints of the adapter only.

Used when the trainer's strategy is :class:`AdapterModelParallelStrategy` (``configs/strategy/fsdp2.yaml``), which
gives the module a device mesh; :meth:`LoRAFineTune.configure_model` then calls :func:`shard_lora_model` after LoRA
is applied (peft must see the whole, unsharded layers: LoRA added after sharding would size ``lora_B`` by the local
shard of the output features).

Units (``FSDPSpec.lora_units``):

* ``own`` (default): every ``lora_A`` / ``lora_B`` linear is a unit of its own, then every transformer block, then
  the decoder (embeddings, final norm) and the LM head. A block unit then holds only frozen weights, so FSDP keeps no
  gradient buffers for them, and the fp32 adapter never shares a unit (one flat dtype) with a bf16 base.
* ``block``: the adapter weights are sharded with their block (fewer, larger all-gathers). Needs base and adapter in
  one dtype (FSDP2 refuses a unit of mixed original dtypes).

A model whose LM head reuses the embedding matrix (tied, e.g. SmolLM2) has one root unit for both instead, and its
loss takes the model's full forward (the LM head on every position): the supervised-only shortcut would call the
head outside the unit that gathers its weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from em_lightning.errors import InputError
from em_lightning.models import transformer_blocks

Dtype = Literal["float32", "bfloat16", "float16"]
ParamDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class FSDPSpec:
    """How the LoRA model is sharded when the strategy is FSDP2 (ignored otherwise).

    Args:
        lora_units: ``own`` (adapter linears as their own units; default) or ``block`` (with their block).
        param_dtype: dtype of the all-gathered parameters in forward/backward. ``auto`` (default) follows
            ``trainer.precision``, which owns precision (see :func:`gather_dtype`); an explicit value must agree
            with it; None: as stored.
        reduce_dtype: dtype of the gradient reduce-scatter; fp32 keeps the adapter's gradient sums exact.
        reshard_after_forward: free the gathered block weights after forward (less memory, one more all-gather in
            backward).
    """

    lora_units: Literal["own", "block"] = "own"
    param_dtype: ParamDtype | None = "auto"
    reduce_dtype: Dtype | None = "float32"
    reshard_after_forward: bool = True


# trainer.precision → (what ``auto`` gathers in, every explicit param_dtype that agrees). None: as stored. Under
# 32-true a one-process run computes every layer in its stored dtype (fp32 for an fp32 model; a bf16 base stays
# bf16), so gathering as stored gives its numbers; under *-mixed autocast computes in the half dtype anyway; under
# *-true Lightning has already converted the weights to the half dtype.
_PRECISION_GATHER: dict[str, tuple[str | None, tuple[str | None, ...]]] = {
    "32-true": (None, (None, "float32")),
    "bf16-mixed": ("bfloat16", ("bfloat16",)),
    "16-mixed": ("float16", ("float16",)),
    "bf16-true": (None, (None, "bfloat16")),
    "16-true": (None, (None, "float16")),
}


def gather_dtype(param_dtype: str | None, precision: str) -> torch.dtype | None:
    """The dtype FSDP2 all-gathers parameters in under ``trainer.precision`` = ``precision``; None: as stored.

    ``auto`` follows the precision (32-true → as stored, i.e. fp32 for an fp32 model; bf16-mixed → bf16;
    bf16-true / 16-true → the stored dtype, which Lightning has made bf16 / fp16), so the strategy overlay changes
    how, not what, is computed. An explicit value that contradicts the precision (bf16 gathers in a 32-true run)
    is an :class:`~em_lightning.errors.InputError` naming ``model.fsdp.param_dtype``.
    """
    precision = str(precision)
    auto, agreeing = _PRECISION_GATHER.get(precision, (None, None))
    if param_dtype == "auto":
        chosen = auto
    elif agreeing is not None and param_dtype not in agreeing:
        raise InputError(
            f"model.fsdp.param_dtype: {param_dtype!r} contradicts trainer.precision {precision!r}, which owns "
            f"precision; use auto (gathers {auto or 'as stored'}) or set trainer.precision instead"
        )
    else:
        chosen = param_dtype
    return getattr(torch, chosen) if chosen else None


def lora_linears(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The trainable ``lora_A`` / ``lora_B`` linears under ``module``."""
    return [m for name, m in module.named_modules() if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"])
            and any(p.requires_grad for p in m.parameters(recurse=False))]


def shard_lora_model(peft_model: torch.nn.Module, mesh, spec: FSDPSpec, precision: str) -> torch.nn.Module:
    """Apply ``fully_shard`` to the adapter linears (``own``), every block, and the root, over ``mesh``; parameters
    are gathered in :func:`gather_dtype` of ``spec.param_dtype`` under ``precision`` (``trainer.precision``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=gather_dtype(spec.param_dtype, precision),
        reduce_dtype=getattr(torch, spec.reduce_dtype) if spec.reduce_dtype else None,
    )
    kwargs = {"mesh": mesh, "mp_policy": policy}
    lm = peft_model.get_base_model()
    for block in transformer_blocks(lm):
        if spec.lora_units == "own":
            for linear in lora_linears(block):
                fully_shard(linear, reshard_after_forward=spec.reshard_after_forward, **kwargs)
        fully_shard(block, reshard_after_forward=spec.reshard_after_forward, **kwargs)
    if has_tied_embeddings(peft_model):
        # One weight in two places: it must live in their common unit, the root (so the loss takes the full forward).
        fully_shard(peft_model, **kwargs)
        return peft_model
    # The decoder (embeddings, blocks, final norm) and the LM head are the two top units, not one root around the
    # whole model: the supervised-only loss calls them one after the other (em_lightning.loss), and each call must
    # run its own unit's all-gather. The full forward calls the same two.
    fully_shard(lm.get_decoder(), **kwargs)
    fully_shard(lm.get_output_embeddings(), **kwargs)
    return peft_model


def has_tied_embeddings(peft_model: torch.nn.Module) -> bool:
    """Whether the LM head reuses the input embedding matrix (SmolLM2, Gemma): under FSDP2 the supervised-only loss,
    which calls the decoder and the head separately, is then not possible and the full forward is used."""
    lm = peft_model.get_base_model()
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


class AdapterModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 over a device mesh) with checkpoints of the adapter only.

    The parent gathers the whole model's state dict — the frozen base included — before the module can filter it,
    and its distributed load refuses a checkpoint without the base. Here the state dict is taken with
    ``ignore_frozen_params`` (only the adapter is ever gathered), saved as one ordinary ``.ckpt`` file by rank zero
    (the adapter and its optimizer state are small), and loaded on every rank into the sharded model with
    ``strict=False`` for the absent base. Use ``save_distributed_checkpoint: false`` (the default here).
    """

    def __init__(self, data_parallel_size: int | Literal["auto"] = "auto", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = False, **kwargs):
        # Checked in setup_environment, not here: jsonargparse buries an error raised while it builds the strategy
        # (a Union-typed argument) in a page of type hints instead of letting it through as one error line.
        self._distributed_checkpoint_asked = save_distributed_checkpoint
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        if self._distributed_checkpoint_asked:
            raise InputError("trainer.strategy.save_distributed_checkpoint: the adapter-only checkpoint is one file")
        if self._tensor_parallel_size != 1:
            raise InputError("trainer.strategy.tensor_parallel_size: only 1 (FSDP2 data parallel) is supported")
        # The parent's "auto" shards over the nodes only (it assumes tensor parallelism inside a node); with tensor
        # parallelism 1 every device of every node is one data-parallel (sharding) rank.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The full optimizer state of the adapter, keyed by parameter name (rank zero; empty elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = self.broadcast(str(checkpoint_path))
        checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        self.lightning_module.on_load_checkpoint(checkpoint)  # checks the adapter's keys and shapes first
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
        # A copy: set_model_state_dict fills the dict it is given in place (the base's keys too), and Lightning hands
        # this checkpoint to the module's on_load_checkpoint again afterwards.
        set_model_state_dict(self.model, dict(checkpoint["state_dict"]), options=options)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(self.model, optimizer, state, options=options)
        return checkpoint


# ------------------------------------------------------------------------------------------- loading big models


def load_sharded_lora_model(base, lora, mesh, spec: FSDPSpec, device: torch.device, seed: int, precision: str):
    """Build ``base`` with ``lora`` on the meta device, shard it, and fill each rank's shards from the saved weights.

    No rank ever holds the whole model: the architecture is built without storage, LoRA is applied (peft needs the
    whole layers), ``fully_shard`` splits every weight's rows over the mesh, ``to_empty`` allocates only the local
    rows, and each rank reads just those rows of each tensor from the ``.safetensors`` files (memory-mapped slices).
    The frozen base comes from the files, never from ``reset_parameters``; rotary-embedding buffers (not in the files)
    are recomputed; the adapter is initialised by :func:`em_lightning.lora.seeded_lora_init`, identical on every
    rank and to a one-device run with the same seed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from em_lightning.lora import apply_lora, seeded_lora_init
    from em_lightning.models import resolve_model_dir

    model_dir = _local_model_dir(resolve_model_dir(base.name))
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=base.trust_remote_code)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, base.dtype), attn_implementation=base.attn_implementation,
            trust_remote_code=base.trust_remote_code,
        )
    lm.requires_grad_(False)
    peft_model = shard_lora_model(apply_lora(lm, lora), mesh, spec, precision)
    peft_model.to_empty(device=device)
    _load_local_rows(peft_model, model_dir)
    _recompute_rotary_buffers(peft_model, device)
    if lora.init_lora_weights:
        seeded_lora_init(peft_model, seed)
    if base.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    return peft_model


def _local_model_dir(name_or_dir: str):
    from pathlib import Path

    path = Path(name_or_dir)
    if path.is_dir():
        return path
    from huggingface_hub import (
        snapshot_download,  # a hub id: the local snapshot (downloaded once, then cached)
    )

    return Path(snapshot_download(name_or_dir, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _checkpoint_key(param_name: str) -> str:
    """The name a weight has in the model's own files: peft's wrapper parts removed."""
    name = param_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _load_local_rows(peft_model: torch.nn.Module, model_dir) -> None:
    import json

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        weight_map = dict.fromkeys(_safetensors_header(model_dir / "model.safetensors")[0], "model.safetensors")
    else:
        raise InputError(f"model.base.name: {model_dir} has no .safetensors weights (needed for sharded loading)")
    targets = {}
    for name, param in peft_model.named_parameters():  # a tied weight appears once, under its first name
        if param.requires_grad:
            continue  # the adapter: initialised, not loaded
        key = _checkpoint_key(name)
        if key not in weight_map:
            raise InputError(f"model.base.name: {model_dir} holds no weight {key!r} (for {name})")
        targets.setdefault(weight_map[key], []).append((key, param))
    with torch.no_grad():
        for file, params in targets.items():
            header, data_start = _safetensors_header(model_dir / file)
            with open(model_dir / file, "rb", buffering=0) as f:
                for key, param in params:
                    _read_rows_into(f, header[key], data_start, param, f"{model_dir / file}: {key}")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _safetensors_header(path) -> tuple[dict, int]:
    """The tensor table of a ``.safetensors`` file (name → dtype, shape, byte range) and where its data starts."""
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_rows_into(f, entry: dict, data_start: int, param: torch.Tensor, where: str) -> None:
    """Read this rank's rows of one saved tensor straight into its local shard.

    Plain reads of the rows' byte range, not a memory map: mapped pages would count as the process's resident memory
    (a map of the whole file on every rank is what sharded loading must avoid). Rows of a row-major tensor are one
    contiguous range; FSDP2 gives each rank ``torch.chunk``'s rows of dim 0.
    """
    import math

    local = param.to_local() if hasattr(param, "to_local") else param
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    shape = entry["shape"]
    if dtype is None or tuple(shape) != tuple(param.shape):
        raise InputError(f"{where}: saved as {entry['dtype']} {shape}, the model expects {tuple(param.shape)}")
    n = shape[0] if shape else 1
    if hasattr(param, "to_local"):
        mesh = param.device_mesh
        chunk = -(-n // mesh.size())
        start = min(mesh.get_local_rank() * chunk, n)
    else:
        start = 0
    rows = local.shape[0] if local.dim() else 1
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    buffer = torch.empty(local.shape, dtype=dtype) if (dtype != local.dtype or local.device.type != "cpu") else local
    f.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
    view = memoryview(buffer.view(torch.uint8).numpy()).cast("B") if buffer.numel() else memoryview(b"")
    if f.readinto(view) != rows * row_bytes:
        raise InputError(f"{where}: the file ended before the tensor's rows {start}..{start + rows}")
    if buffer is not local:
        local.copy_(buffer)


def _recompute_rotary_buffers(peft_model: torch.nn.Module, device: torch.device) -> None:
    """``to_empty`` left every buffer uninitialised; the decoders' only buffers are the rotary frequencies, which the
    files do not hold: rebuild each rotary module on the host and copy them. Any other buffer is an error."""
    handled = set()
    for name, module in peft_model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            fresh = type(module)(config=module.config)
            for buffer_name, value in fresh.named_buffers(recurse=False):
                getattr(module, buffer_name).copy_(value.to(device))
                handled.add(f"{name}.{buffer_name}")
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    unknown = [n for n, _ in peft_model.named_buffers() if n not in handled]
    if unknown:
        raise InputError(
            f"model.base.name: sharded loading does not know how to initialise the buffers {unknown[:4]}; "
            "use the DDP strategy for this model"
        )
