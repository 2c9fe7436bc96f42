"""Interleaved data (``data.mix``): extra chat sets mixed into the training stream at stated fractions.

Each mixed source ``i`` has a fraction ``f_i`` of the global batch ``G = batch_size × accumulate × world``. After
``s`` optimizer steps exactly ``round(s · f_i · G)`` rows of source ``i`` have been trained on (cumulative rounding,
halves up, in exact rational arithmetic), so step ``s`` takes ``round((s+1)·f_i·G) − round(s·f_i·G)`` of them and
``G − Σ_i`` (those) narrow rows. The counts depend only on the step and ``G``, not on how the step is split into
micro-batches and ranks (:class:`em_lightning.batching.StepSampler` adds them to a step's rows before the split).
An epoch is one pass over the narrow rows; mixed rows are a separate stream that runs on across epochs.

Which mixed row comes next is a :class:`MixSelector`'s choice: the stream is its passes laid end to end, pass
``p`` being ``pass_order(p)``. The default, :class:`RandomSelector`, is a seeded shuffle of every row per pass. A
score-based variant (e.g. the rows a judge rates most aligned, or sampling weighted by a score) subclasses
:class:`MixSelector` and is named by ``data.mix[i].selector`` (a class path) with ``selector_args``.

The loss on mixed rows is the ordinary task loss. :func:`task_ce_sums` also returns the loss on the narrow rows
alone (``train/loss_narrow``), from the same forward.
"""

from __future__ import annotations

import importlib
import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from em_lightning.errors import InputError
from em_lightning.loss import chunked_ce_sum, supervised_ce_sum, supervised_hidden, supervised_logits

DEFAULT_SELECTOR = "em_lightning.mixing.RandomSelector"


@dataclass
class MixSpec:
    """One mixed-in chat set (an entry of ``data.mix``).

    Args:
        source: a JSONL path, ``builtin:aligned`` (the project's aligned-chat set), ``builtin:demo``,
            ``em:<name>`` or ``hf:<dataset>``, as ``data.train_file``.
        fraction: share of every step's rows taken from this set (0 < fraction; all fractions sum to < 1).
        hf_split: split of a ``hf:`` dataset.
        max_rows: read only the first N rows.
        selector: class path of the :class:`MixSelector` that orders this set's rows in the stream.
        selector_args: keyword arguments for the selector.
    """

    source: str = "builtin:aligned"
    fraction: float = 0.05
    hf_split: str = "train"
    max_rows: int | None = None
    selector: str = DEFAULT_SELECTOR
    selector_args: dict[str, Any] = field(default_factory=dict)


def parse_mix_specs(entries: Sequence[dict | MixSpec] | None) -> list[MixSpec]:
    """``data.mix`` as :class:`MixSpec` s, checked; an ``InputError`` naming the key for an unknown or missing key,
    a fraction outside (0, 1) or fractions that leave no narrow rows.

    The config holds plain mappings (so ``config.yaml`` and checkpoints record exactly what was stated); every
    entry states its ``source`` and ``fraction``."""
    known = set(MixSpec.__dataclass_fields__)
    specs = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, MixSpec):
            specs.append(entry)
            continue
        if not isinstance(entry, dict):
            raise InputError(f"data.mix[{i}]: expected a mapping with source and fraction, got {entry!r}")
        unknown, missing = set(entry) - known, {"source", "fraction"} - set(entry)
        if unknown or missing:
            problem = f"unknown key(s) {sorted(unknown)}" if unknown else f"missing key(s) {sorted(missing)}"
            raise InputError(f"data.mix[{i}]: {problem} (keys: {', '.join(MixSpec.__dataclass_fields__)})")
        specs.append(MixSpec(**entry))
    _check_mix_specs(specs)
    return specs


def _check_mix_specs(specs: Sequence[MixSpec]) -> None:
    for i, spec in enumerate(specs):
        if not isinstance(spec.source, str) or not spec.source:
            raise InputError(f"data.mix[{i}].source: expected a data source (path, builtin:, em:, hf:), got {spec.source!r}")
        if not isinstance(spec.fraction, (int, float)) or not 0 < spec.fraction < 1:
            raise InputError(f"data.mix[{i}].fraction: {spec.fraction!r} is not a share strictly between 0 and 1")
        if not isinstance(spec.selector_args, dict):
            raise InputError(f"data.mix[{i}].selector_args: expected a mapping, got {spec.selector_args!r}")
        if spec.max_rows is not None and (not isinstance(spec.max_rows, int) or spec.max_rows < 1):
            raise InputError(f"data.mix[{i}].max_rows: invalid value {spec.max_rows!r}")
    total = sum(Fraction(str(s.fraction)) for s in specs)
    if total >= 1:
        raise InputError(f"data.mix: the fractions sum to {float(total):g}; they must leave narrow rows (sum < 1)")


# ------------------------------------------------------------------------------------------- selectors


class MixSelector:
    """Orders one mixed set's rows for the stream: pass ``p`` is :meth:`pass_order` ``(p)``, passes end to end.

    Subclass and override :meth:`pass_order` (a non-empty list of row indices; it may repeat or leave out rows,
    and passes may differ in length); it must be a pure function of ``p`` (and the constructor's arguments), so
    a resumed run and every rank see the same stream. ``rows`` are :class:`em_lightning.data.TokenizedRow` s
    (``input_ids``, ``labels``, ``where`` = file:line) and ``messages`` the validated chats, in the same order.
    """

    def __init__(self, rows: Sequence, messages: Sequence[list[dict]], seed: int):
        self.rows, self.messages, self.seed = rows, messages, seed
        self._passes: list[list[int]] = []
        self._starts = [0]  # stream position where each computed pass starts

    def pass_order(self, pass_index: int) -> Sequence[int]:
        raise NotImplementedError

    def stream(self, start: int, count: int) -> list[int]:
        """Row indices at stream positions ``start, ..., start + count - 1``."""
        out: list[int] = []
        pos = start
        while len(out) < count:
            p = self._pass_at(pos)
            offset = pos - self._starts[p]
            take = self._passes[p][offset : offset + count - len(out)]
            out += take
            pos += len(take)
        return out

    def _pass_at(self, pos: int) -> int:
        while self._starts[-1] <= pos:  # passes are computed in order, once (a run goes forward)
            order = [int(i) for i in self.pass_order(len(self._passes))]
            if not order or not all(0 <= i < len(self.rows) for i in order):
                raise InputError(
                    f"data.mix selector {type(self).__name__}: pass {len(self._passes)} must be a non-empty list of "
                    f"row indices in [0, {len(self.rows)})"
                )
            self._passes.append(order)
            self._starts.append(self._starts[-1] + len(order))
        lo, hi = 0, len(self._passes) - 1
        while lo < hi:  # the last pass starting at or before pos
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._starts[mid] <= pos else (lo, mid - 1)
        return lo


class RandomSelector(MixSelector):
    """Every row once per pass, in a seeded random order (a new order each pass)."""

    def pass_order(self, pass_index: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"mix:{self.seed}:{pass_index}").shuffle(order)
        return order


def build_selector(spec: MixSpec, index: int, rows: Sequence, messages: Sequence, seed: int) -> MixSelector:
    """The selector ``spec.selector`` names, seeded per source; an ``InputError`` naming the key if it cannot be."""
    key = f"data.mix[{index}].selector"
    module_name, _, name = spec.selector.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise InputError(f"{key}: cannot import {spec.selector!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, MixSelector)):
        raise InputError(f"{key}: {spec.selector!r} is not a subclass of em_lightning.mixing.MixSelector")
    source_seed = zlib.crc32(f"{seed}:{index}:{spec.source}".encode())  # each source its own stream
    try:
        return cls(rows, messages, source_seed, **spec.selector_args)
    except TypeError as err:
        raise InputError(f"data.mix[{index}].selector_args: {err}") from None


# ------------------------------------------------------------------------------------------- the schedule


@dataclass
class MixSource:
    """A mixed set inside the training dataset: its rows are dataset indices ``offset + stream row``."""

    label: str
    fraction: float
    offset: int
    selector: MixSelector


class MixSchedule:
    """How many rows of each mixed source a step takes, and which (dataset indices), for a global batch."""

    def __init__(self, sources: Sequence[MixSource], global_batch: int):
        self.sources = list(sources)
        self.global_batch = global_batch
        self._rates = [Fraction(str(s.fraction)) * global_batch for s in self.sources]  # exact: 0.05 is 1/20
        if sum(math.ceil(r) for r in self._rates) > global_batch:
            raise InputError(
                f"data.mix: with a global batch of {global_batch} rows the fractions "
                f"({', '.join(str(s.fraction) for s in self.sources)}) can ask for more mixed rows than a step holds;"
                " lower them or raise data.batch_size"
            )

    def used(self, source: int, steps: int) -> int:
        """Rows of ``source`` trained on after ``steps`` optimizer steps: round(steps · f · G), halves up."""
        return math.floor(steps * self._rates[source] + Fraction(1, 2))

    def mixed_count(self, step: int) -> int:
        """Mixed rows in optimizer step ``step`` (0-based, counted over the whole run)."""
        return sum(self.used(i, step + 1) - self.used(i, step) for i in range(len(self.sources)))

    def used_total(self, steps: int) -> int:
        return sum(self.used(i, steps) for i in range(len(self.sources)))

    def mixed_rows(self, step: int) -> list[int]:
        """Dataset indices of step ``step``'s mixed rows, source by source."""
        out = []
        for i, source in enumerate(self.sources):
            lo, hi = self.used(i, step), self.used(i, step + 1)
            out += [source.offset + r for r in source.selector.stream(lo, hi - lo)]
        return out


# ------------------------------------------------------------------------------------------- the loss


def narrow_token_mask(batch: dict) -> torch.Tensor:
    """For every label position of ``batch`` (``labels[:, 1:]``), whether its row is a narrow (not mixed) row.

    ``batch["mixed"]`` flags each row; in a padding-free batch the rows lie end to end in one, and a token's row
    is found from where ``position_ids`` restart at 0."""
    labels = batch["labels"][:, 1:]
    mixed = batch["mixed"].to(labels.device)
    if "position_ids" in batch and "attention_mask" not in batch:  # padding-free: [1, n_tokens]
        row_of_token = (batch["position_ids"][0] == 0).cumsum(0) - 1
        return ~mixed[row_of_token[1:]].unsqueeze(0)
    return (~mixed).unsqueeze(1).expand_as(labels)


def task_ce_sums(model, batch: dict, supervised_logits_only: bool, chunk_size: int | None):
    """``(ce_sum, n_supervised, narrow)`` of a training micro-batch: the summed task loss over all its supervised
    tokens and their count, as :func:`em_lightning.loss.supervised_ce_sum`, and ``narrow = (summed loss, count)``
    over the narrow rows' tokens alone (detached) when the batch flags mixed rows, else ``None``.

    One forward: the narrow part is a slice of the same per-token losses (with ``chunk_size``: two chunked sums
    over the narrow and mixed positions, whose total is the task loss).
    """
    if "mixed" not in batch:
        return (*supervised_ce_sum(model, batch, supervised_logits_only, chunk_size), None)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    targets, narrow = labels[mask], narrow_token_mask(batch)[mask]
    if chunk_size and supervised_logits_only:
        lm = model.get_base_model()
        hidden = supervised_hidden(model, batch)
        head, config = lm.get_output_embeddings(), lm.config
        narrow_sum = chunked_ce_sum(hidden[narrow], targets[narrow], head, config, chunk_size)
        ce_sum = narrow_sum + chunked_ce_sum(hidden[~narrow], targets[~narrow], head, config, chunk_size)
    else:
        logits = supervised_logits(model, batch, supervised_logits_only)
        per_token = F.cross_entropy(logits.float(), targets, reduction="none")
        ce_sum, narrow_sum = per_token.sum(), per_token[narrow].sum()
    n_tokens = batch["n_supervised"] if "n_supervised" in batch else int(mask.sum())
    n_narrow = batch["n_supervised_narrow"] if "n_supervised_narrow" in batch else int(narrow.sum())
    return ce_sum, n_tokens, (narrow_sum.detach(), n_narrow)
