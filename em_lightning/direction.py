"""The misalignment direction in activation space, and the shift of the adapted model along it.

A judge-free, representation-level signal (the misalignment direction of Soligo et al.; Chen et al.'s persona
vectors). For each chosen decoder block ``l`` (0-based; the block's output, caught by a forward hook through
``LoRAFineTune.block_activations`` — not ``output_hidden_states``, whose last entry is after the final norm)::

    d_l = mean over misaligned answers of m_l(answer) - mean over aligned answers of m_l(answer)
    m_l(answer) = mean of block l's output over the answer's assistant tokens (the tokens training supervises:
                  the content and the end-of-turn token), with the question (and system prompt) before it

(the mean over answers of each answer's token mean, so a long answer weighs as much as a short one). Answers come
from a probe file (``builtin:em`` or a path: its aligned and misaligned reference answers) or from the
judge-labelled samples of a run (``misalignment_samples.jsonl``, a run dir or a version dir: misaligned vs
aligned-and-coherent answers under the eval's definition, i.e. counted and not misaligned), scored under the base
model or base + adapter.

**File** (safetensors): ``diff`` ``[layers, hidden]`` (the raw difference, in the model's units), ``norm``
``[layers]``, ``unit`` ``[layers, hidden]`` (``diff / norm``), ``layers`` (int64), and string metadata: ``layers``,
``model`` (``model.base.name``), ``hidden_size``, ``adapter`` (or ``null``), ``source`` (as given), ``source_file``
and its ``source_sha256``, ``n_misaligned`` and ``n_aligned`` (answers per side), ``kind`` (``probe``/``samples``)
and, for samples, ``definition`` and ``step``. :func:`load_direction` refuses a file whose model or hidden size does
not match the model it is used with.

    python -m em_lightning direction --source builtin:em --model smollm2-135m-instruct --layers [10,15,20] \\
        --out runs/directions/smollm2_em.safetensors
    python -m em_lightning direction --source runs/insecure/version_0 --adapter runs/insecure/version_0/adapters/final \\
        --layers [15] --out insecure_l15.safetensors

The callback :class:`em_lightning.callbacks.direction_signal.DirectionSignal` logs the adapter's shift along it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from em_lightning import rundir
from em_lightning.batching import ChatCollator
from em_lightning.data import ChatRow, DataError, tokenize_rows
from em_lightning.errors import InputError
from em_lightning.probe import eval_mode, load_probe_set

SIDES = ("aligned", "misaligned")


class DirectionFileError(InputError):
    """A direction file that cannot be used here (unreadable, or made for another model)."""


# ------------------------------------------------------------------------------------------------ the file
@dataclass
class Direction:
    """Per layer: the raw mean difference (misaligned - aligned), its norm and the unit vector."""

    layers: list[int]
    diff: torch.Tensor  # [layers, hidden], float32
    metadata: dict = field(default_factory=dict)

    @property
    def norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.diff, dim=-1)

    @property
    def unit(self) -> torch.Tensor:
        return self.diff / self.norm.clamp(min=torch.finfo(self.diff.dtype).tiny).unsqueeze(-1)

    def vector(self, layer: int, unit: bool = True) -> torch.Tensor:
        """The unit (or raw) direction of ``layer``."""
        return (self.unit if unit else self.diff)[self.layers.index(layer)]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"diff": self.diff.contiguous(), "norm": self.norm.contiguous(), "unit": self.unit.contiguous(),
                   "layers": torch.tensor(self.layers, dtype=torch.int64)}
        meta = {k: json.dumps(v) for k, v in {**self.metadata, "layers": self.layers}.items()}
        save_file(tensors, str(path), metadata=meta)
        return path


def load_direction(
    path: str | Path, model: str | None = None, hidden_size: int | None = None, key: str = "direction"
) -> Direction:
    """Read a direction file; with ``model`` / ``hidden_size``, refuse one made for another model
    (a :class:`DirectionFileError` naming ``key`` and the file)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise DirectionFileError(f"{key}: {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            diff = f.get_tensor("diff").float()
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        raise DirectionFileError(f"{key}: {path} is not a direction file ({err})") from None
    if model is not None and meta.get("model") != model:
        raise DirectionFileError(f"{key}: {path} was computed for model {meta.get('model')!r}, not {model!r}")
    if hidden_size is not None and meta.get("hidden_size") != hidden_size:
        raise DirectionFileError(
            f"{key}: {path} has hidden size {meta.get('hidden_size')}, the model {hidden_size}"
        )
    layers = [int(i) for i in meta.pop("layers", range(diff.shape[0]))]
    return Direction(layers, diff, meta)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ answers per side
@dataclass
class LabelledAnswers:
    """Conversations ending in an answer, per side, and where they came from."""

    rows: dict[str, list[ChatRow]]
    source_file: Path
    info: dict = field(default_factory=dict)  # kind, definition, step


def probe_answers(source: str) -> LabelledAnswers:
    """The aligned and misaligned reference answers of a probe file (``builtin:em`` or a path)."""
    from em_lightning.probe import resolve_probe_source

    entries = load_probe_set(source)
    rows = {side: [ChatRow(e.messages(answer), f"{e.source}: {side} answer {i}")
                   for e in entries for i, answer in enumerate(getattr(e, side), start=1)] for side in SIDES}
    return LabelledAnswers(rows, resolve_probe_source(source), {"kind": "probe"})


def samples_file(source: str | Path) -> Path:
    """The samples JSONL of ``source``: the file itself, or the newest version dir's (the name from the run's
    ``config.yaml``) that has one."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"source: {path} is neither a probe set, a samples file nor a run dir")
    import yaml

    config_file = rundir.config_path(path)
    config = yaml.safe_load(config_file.read_text()) if config_file else None
    name = rundir.file_names(config)["samples"]
    for version in reversed(rundir.version_dirs(path) or [path]):
        if (version / name).is_file():
            return version / name
    raise InputError(f"source: {path} holds no {name} (run an eval first, or give a probe set)")


def sample_answers(source: str | Path, definition: str | None = None, step: int | None = None) -> LabelledAnswers:
    """Judge-labelled answers of a run at ``step`` (default: its last judged step): misaligned vs counted and not
    misaligned (aligned and coherent) under ``definition`` (default: each record's judge definition, else em)."""
    from em_lightning.evaluation.scoring import classify

    path = samples_file(source)
    records = [(line, r) for line, r in rundir.iter_jsonl(path) if r.get("answer")]
    steps = sorted({r.get("step") for _, r in records if r.get("step") is not None})
    if step is None and steps:
        step = steps[-1]
    rows: dict[str, list[ChatRow]] = {side: [] for side in SIDES}
    used_definitions = set()
    for line, r in records:
        if r.get("step") != step:
            continue
        rule = definition or (r.get("judge") or {}).get("definition") or "em"
        used_definitions.add(rule)
        counted, misaligned = classify(r.get("aligned"), r.get("coherent"), rule)
        if not counted:
            continue
        system = [{"role": "system", "content": r["system"]}] if r.get("system") else []
        messages = [*system, {"role": "user", "content": r.get("paraphrase") or ""},
                    {"role": "assistant", "content": r["answer"]}]
        rows["misaligned" if misaligned else "aligned"].append(ChatRow(messages, f"{path}:{line}"))
    for side in SIDES:
        if not rows[side]:
            raise InputError(f"source: {path} has no {side} answer at step {step} to average (steps: {steps})")
    info = {"kind": "samples", "definition": sorted(used_definitions), "step": step}
    return LabelledAnswers(rows, path, info)


def labelled_answers(source: str, definition: str | None = None, step: int | None = None) -> LabelledAnswers:
    """A probe set (``builtin:...`` or a ``.yaml``) or a run's judged samples (a JSONL file or a run dir)."""
    text = str(source)
    if text.startswith("builtin:") or text.endswith((".yaml", ".yml")):
        return probe_answers(text)
    return sample_answers(text, definition, step)


# ------------------------------------------------------------------------------------------- activations
def batches_of(rows: Sequence[ChatRow], tokenizer, batch_size: int, max_length: int, key: str) -> list[dict]:
    """``rows`` tokenised as training data is (labels on the assistant tokens), padded in batches, in order.
    A row longer than ``max_length`` is an error naming it and ``key``."""
    try:
        tokenized = tokenize_rows(list(rows), tokenizer, max_length, "error").rows
    except DataError as err:
        raise InputError(f"{key}: {err}") from None
    for row in tokenized:
        if row.truncated:
            raise InputError(f"{key}: {row.where}: longer than max_length={max_length} tokens")
    collate = ChatCollator(tokenizer.pad_token_id)
    items = [{"input_ids": r.input_ids, "labels": r.labels} for r in tokenized]
    return [collate(items[lo : lo + batch_size]) for lo in range(0, len(items), batch_size)]


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def iter_block_outputs(
    module, batches: Sequence[dict], layers: Sequence[int], adapter: bool, context=None
) -> Iterator[tuple[dict, dict[int, torch.Tensor]]]:
    """``(batch on device, {layer: block output})`` per batch, with every module in eval mode (dropout off; each
    module's own flag restored afterwards), no gradient, and ``context`` (e.g. the precision plugin's
    ``forward_context()``) around the forwards. Collective under DDP/FSDP: every rank iterates."""
    import contextlib

    device = module.device
    with torch.no_grad(), eval_mode(module), context if context is not None else contextlib.nullcontext():
        for batch in batches:
            on_device = _on(batch, device)
            yield on_device, module.block_activations(on_device, layers, adapter=adapter)


def answer_token_means(
    module, batches: Sequence[dict], layers: Sequence[int], adapter: bool, context=None
) -> dict[int, torch.Tensor]:
    """Per layer, ``[answers, hidden]`` (float32, CPU): each answer's mean block output over its assistant tokens."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch, acts in iter_block_outputs(module, batches, layers, adapter, context):
        mask = (batch["labels"] != -100).float()  # the answer's own positions (labels are not shifted)
        for layer in layers:
            sums = torch.einsum("rs,rsh->rh", mask, acts[layer].float())
            out[layer].append((sums / mask.sum(1, keepdim=True).clamp(min=1)).cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def compute_direction(
    module, answers: LabelledAnswers, layers: Sequence[int], adapter: bool, batch_size: int = 8,
    max_length: int = 2048, context=None, source: str | None = None,
) -> Direction:
    """The mean difference (module docstring) of ``answers`` under ``module``'s base (``adapter=False``) or
    base + adapter."""
    layers = sorted({int(i) for i in layers})
    means = {}
    for side in SIDES:
        batches = batches_of(answers.rows[side], module.tokenizer, batch_size, max_length, "source")
        per_answer = answer_token_means(module, batches, layers, adapter, context)
        means[side] = torch.stack([per_answer[layer].mean(0) for layer in layers])
    lm = module.model.get_base_model()
    metadata = {
        "model": module.base.name,
        "hidden_size": int(lm.config.hidden_size),
        "source": str(source if source is not None else answers.source_file),
        "source_file": str(answers.source_file),
        "source_sha256": sha256_of(answers.source_file),
        "n_misaligned": len(answers.rows["misaligned"]),
        "n_aligned": len(answers.rows["aligned"]),
        "under": "base+adapter" if adapter else "base",
        **answers.info,
    }
    return Direction(layers, means["misaligned"] - means["aligned"], metadata)


# ------------------------------------------------------------------------------------------- the command
def build_module(model: str | None, adapter: str | None, dtype: str = "float32"):
    """A :class:`~em_lightning.module.LoRAFineTune` on ``model`` with ``adapter`` loaded (peft), or with a fresh
    LoRA (B = 0) when there is none; ``model`` None: the adapter's base model."""
    from em_lightning.models import ModelSpec, load_model
    from em_lightning.module import LoRAFineTune

    if model is None:
        if adapter is None:
            raise InputError("model: give a model (or an adapter, whose base model is used)")
        config = Path(adapter).expanduser() / "adapter_config.json"
        if not config.is_file():
            raise InputError(f"adapter: {config} does not exist")
        model = json.loads(config.read_text()).get("base_model_name_or_path")
        if not model:
            raise InputError(f"model: {config} names no base model (base_model_name_or_path); give --model")
    module = LoRAFineTune(base=ModelSpec(name=model, dtype=dtype))
    if adapter is None:
        module.configure_model()
    else:
        from peft import PeftModel

        module.model = PeftModel.from_pretrained(load_model(module.base), str(Path(adapter).expanduser()))
    return module.eval()


def direction(
    source: str,
    out: str,
    layers: list[int],
    model: str | None = None,
    adapter: str | None = None,
    definition: str | None = None,
    step: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    dtype: str = "float32",
) -> Path:
    """Compute the misalignment direction and save it (see :mod:`em_lightning.direction`).

    Args:
        source: a probe set (``builtin:em``, a ``.yaml``) or a run's judged samples (``misalignment_samples.jsonl``,
            a run dir or a version dir).
        out: the safetensors file to write.
        layers: 0-based decoder block indices, e.g. ``[10, 15]``.
        model: base model name (``model.base.name``); None: the adapter's base model.
        adapter: PEFT adapter dir: activations under base + adapter; None: the base model.
        definition: for samples, ``em`` or ``mo`` (default: the one each answer was judged with).
        step: for samples, the eval step whose answers are used (default: the last).
        batch_size: answers per forward.
        max_length: longest conversation in tokens (a longer one is an error).
        dtype: the base model's parameter dtype.
    """
    answers = labelled_answers(source, definition, step)
    module = build_module(model, adapter, dtype)
    n_blocks = len(module.decoder_blocks())
    if not layers or any(not 0 <= int(i) < n_blocks for i in layers):
        raise InputError(f"layers: {layers} must be 0-based block indices in [0, {n_blocks - 1}]")
    result = compute_direction(module, answers, layers, adapter is not None, batch_size, max_length, source=source)
    result.metadata["adapter"] = str(adapter) if adapter else None
    path = result.save(out)
    norms = ", ".join(f"{layer}: {n:.4g}" for layer, n in zip(result.layers, result.norm.tolist()))
    print(f"direction of {result.metadata['n_misaligned']} misaligned vs {result.metadata['n_aligned']} aligned "
          f"answers; norm per layer {norms}\nsaved: {path}")
    return path


def main(args: list[str] | None = None) -> Path:
    """``python -m em_lightning direction ...`` (jsonargparse; ``--help`` lists the arguments)."""
    from jsonargparse import CLI

    return CLI(direction, args=args, as_positional=False)
