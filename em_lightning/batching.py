"""From rows to micro-batches: which rows share an optimizer step, how a step is split, and what the loss needs.

An optimizer step trains on a *global batch* of ``batch_size × accumulate_grad_batches × world_size`` rows. The
global batches of an epoch depend only on (seed, epoch, global batch size): length groups are formed over them,
and only then is each one cut into micro-batches, dealt to accumulation slots and ranks. So the rows of a step do
not depend on how it is split: ``accumulate 4 × batch 2`` trains on the same rows per step as ``batch 8``, and
two ranks × batch 4 as one rank × batch 8. No row is repeated to pad an epoch; the last step may be short.

Each micro-batch carries the supervised-token count of its whole step (``step_supervised_tokens``, known here
on the host when the step is formed, so no collective is needed) and its place in the accumulation window
(``window_pos`` of ``window_len``); :mod:`em_lightning.loss` divides by the former.

With mixed-in data (``data.mix``, :mod:`em_lightning.mixing`) a step's ``G`` rows are its narrow rows plus the
mixed rows the schedule gives that step, joined before the split, so the split still does not change what a step
trains on. An epoch is one pass over the narrow rows; the narrow rows per step vary by the schedule's rounding,
so epochs may differ in length by a step (``ChatDataModule`` has Lightning reload the loader every epoch).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from em_lightning.mixing import MixSchedule, MixSource

IGNORE_INDEX = -100
MEGABATCH_FACTOR = 50  # global batches sorted together when grouping by length


@dataclass(frozen=True)
class MicroBatch:
    """Row indices of one micro-batch and its step's counts (what the sampler yields, the dataset resolves)."""

    rows: tuple[int, ...]
    step_supervised_tokens: int
    window_pos: int
    window_len: int
    mixed_rows_used: int | None = None  # with data.mix: mixed rows trained on once this step is done


class TokenizedDataset(Dataset):
    """Tokenised rows (objects with ``input_ids`` and ``labels``) as a map-style dataset.

    ``dataset[i]`` is one row's dict; ``dataset[micro_batch]`` is ``(list of row dicts, micro_batch)``. With
    ``narrow_rows`` (mixed-in data: the first ``narrow_rows`` rows are the narrow set, the rest mixed rows) each
    row's dict also says whether it is ``mixed``.
    """

    def __init__(self, rows: Sequence, narrow_rows: int | None = None):
        self.rows = list(rows)
        self.narrow_rows = narrow_rows
        # Labels are shifted by one in the loss, so the first token is never predicted.
        self.supervised = [int((r.labels[1:] != IGNORE_INDEX).sum()) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, MicroBatch):
            return [self[i] for i in key.rows], key
        item = {"input_ids": self.rows[key].input_ids, "labels": self.rows[key].labels}
        if self.narrow_rows is not None:
            item["mixed"] = key >= self.narrow_rows
        return item

    def lengths(self) -> list[int]:
        return [len(r.input_ids) for r in self.rows]


class ChatCollator:
    """Pads rows to the longest one (right padding): ``input_ids``, ``attention_mask``, ``labels``, plus host-side
    counts ``n_tokens`` (non-padding) and ``n_supervised``, and for a :class:`MicroBatch` its step's counts.

    With ``padding_free`` the micro-batch's rows are laid end to end in one row of width ``n_tokens`` instead
    (the same rows; nothing is packed up to ``max_length``): ``input_ids``, ``labels`` and ``position_ids``
    (restarting at 0 at every row), ``[1, n_tokens]``, and no ``attention_mask``, so transformers masks attention
    block-diagonally from the position ids (see :mod:`em_lightning.loss`). The label at each row's start is
    ``-100``: it would otherwise be predicted from the previous row's last token. The counts are those of the
    padded layout.

    With mixed-in data the batch also has ``mixed`` (bool, one per row, in row order), ``n_supervised_narrow``
    (supervised tokens of the narrow rows) and ``mixed_rows_used`` (mixed rows trained on once the step is done).
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, items) -> dict:
        micro = None
        if isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], MicroBatch):
            items, micro = items
        batch = self._flat(items) if self.padding_free else self._padded(items)
        if micro is not None:
            batch.update(step_supervised_tokens=micro.step_supervised_tokens, window_pos=micro.window_pos,
                         window_len=micro.window_len)
            if micro.mixed_rows_used is not None:
                batch["mixed_rows_used"] = micro.mixed_rows_used
        if "mixed" in items[0]:
            batch["mixed"] = torch.tensor([it["mixed"] for it in items], dtype=torch.bool)
            batch["n_supervised_narrow"] = sum(
                int((it["labels"][1:] != IGNORE_INDEX).sum()) for it in items if not it["mixed"]
            )
        return batch

    @staticmethod
    def _flat(items) -> dict:
        labels = [it["labels"].clone() for it in items]
        for row in labels:
            row[0] = IGNORE_INDEX  # never predicted from the previous row (nor, in row 0, at all)
        labels = torch.cat(labels)
        lengths = [len(it["input_ids"]) for it in items]
        return {"input_ids": torch.cat([it["input_ids"] for it in items]).unsqueeze(0),
                "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
                "labels": labels.unsqueeze(0), "n_tokens": sum(lengths),
                "n_supervised": int((labels != IGNORE_INDEX).sum())}

    def _padded(self, items) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        n_tokens = n_supervised = 0
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[i, :n] = it["input_ids"]
            labels[i, :n] = it["labels"]
            attention_mask[i, :n] = 1
            n_tokens += n
            n_supervised += int((it["labels"][1:] != IGNORE_INDEX).sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "n_tokens": n_tokens, "n_supervised": n_supervised}


class StepSampler(DistributedSampler):
    """Yields this rank's :class:`MicroBatch` es for an epoch, in training order (see the module doc).

    With ``group_by_length``: shuffle all rows (seed + epoch), cut them into mega-batches of ``MEGABATCH_FACTOR``
    global batches, sort each by length, cut it into global batches and shuffle the full ones; the one short
    global batch (if any) comes last. Each global batch, longest rows first, is cut into contiguous micro-batches:
    micro-batch ``j`` goes to accumulation slot ``j // world`` on rank ``j % world``, so the ranks of one slot get
    rows of similar length. Without grouping: a seeded shuffle, cut the same way.

    A short last step of n rows has ``m = ceil(n / (batch_size · world))`` micro-batches per rank. When
    ``n < world · m`` (only with ``batch_size`` 1, or fewer rows than ranks) some rank would get an empty one: the
    step keeps ``world · (n // world)`` rows and the rest are dropped, with a warning.

    With ``mix`` (:mod:`em_lightning.mixing`) only the dataset's narrow rows (its first ``narrow_rows``) are
    shuffled and cut as above, into chunks of ``G`` minus the step's mixed rows; each step's mixed rows are then
    added before the split. Steps are numbered over the whole run (``epoch_start_step``), so the mixed counts run
    on across epochs.

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP instead of replacing it. ``skip_batches``
    makes the next iteration start that many micro-batches in (set by :class:`ResumableDataLoader`).
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        accumulate: int = 1,
        group_by_length: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        mix: Sequence[MixSource] = (),
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths = dataset.lengths()
        self.supervised = dataset.supervised
        self.batch_size, self.accumulate = batch_size, accumulate
        self.group_by_length = group_by_length
        self.skip_batches = 0
        self._warned = False
        # Narrow rows are the dataset's first rows; mixed rows (after them) enter only through the schedule.
        self.narrow_rows = len(dataset) if dataset.narrow_rows is None else dataset.narrow_rows
        self.schedule = MixSchedule(mix, self.global_batch_size) if mix else None
        self._epoch_starts = [0]  # optimizer step at which each epoch starts, computed as far as needed

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.accumulate * self.num_replicas

    def narrow_per_step(self, step: int) -> int:
        return self.global_batch_size - (self.schedule.mixed_count(step) if self.schedule else 0)

    def epoch_plan(self, start: int) -> tuple[list[int], int]:
        """Narrow rows of each full step of an epoch that starts at optimizer step ``start``, and the rows of its
        short last step (0 when there is none)."""
        full, left, step = [], self.narrow_rows, start
        while left > 0 and self.narrow_per_step(step) <= left:
            full.append(self.narrow_per_step(step))
            left -= full[-1]
            step += 1
        return full, left

    def epoch_start_step(self, epoch: int) -> int:
        """The optimizer step (counted over the whole run) at which ``epoch`` starts."""
        while len(self._epoch_starts) <= epoch:
            full, short = self.epoch_plan(self._epoch_starts[-1])
            self._epoch_starts.append(self._epoch_starts[-1] + len(full) + (1 if short else 0))
        return self._epoch_starts[epoch]

    def step_rows(self) -> list[list[int]]:
        """Every optimizer step's rows for the current epoch (the same on every rank, for any split)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(self.narrow_rows))
        rng.shuffle(order)
        if self.group_by_length:
            mega = MEGABATCH_FACTOR * self.global_batch_size
            order = [
                i
                for lo in range(0, len(order), mega)
                for i in sorted(order[lo : lo + mega], key=lambda k: self.lengths[k], reverse=True)
            ]
        start = self.epoch_start_step(self.epoch)
        sizes, short = self.epoch_plan(start)
        # Step j trains on chunk pick[j] of the order; grouped, the full chunks go to steps in a shuffled order
        # (else every epoch would go from long to short within each mega-batch). Chunk k is cut to the size of
        # the step it goes to; the short chunk (if any) comes last.
        pick = list(range(len(sizes)))
        if self.group_by_length:
            rng.shuffle(pick)
        cut_sizes = [0] * len(sizes)
        for j, k in enumerate(pick):
            cut_sizes[k] = sizes[j]
        bounds = [0]
        for n in cut_sizes:
            bounds.append(bounds[-1] + n)
        chunks = [order[bounds[k] : bounds[k + 1]] for k in range(len(sizes))]
        steps = [chunks[k] for k in pick] + ([order[bounds[-1] :]] if short else [])
        if self.schedule is None:
            return steps
        return [self._with_mixed(rows, start + j) for j, rows in enumerate(steps)]

    def _with_mixed(self, rows: list[int], step: int) -> list[int]:
        rows = rows + self.schedule.mixed_rows(step)
        if not self.group_by_length:  # (grouping sorts the step by length in split)
            random.Random(f"{self.seed}:{step}").shuffle(rows)  # mixed rows spread over the micro-batches
        return rows

    def split(self, rows: list[int]) -> list[list[int]]:
        """One step's rows cut into micro-batches in (slot, rank) order: index ``slot * world + rank``."""
        world, n = self.num_replicas, len(rows)
        if self.group_by_length:
            rows = sorted(rows, key=lambda k: self.lengths[k], reverse=True)
        per_rank = math.ceil(n / (self.batch_size * world))
        if n < world * per_rank:
            per_rank = n // world
            if not self._warned:
                warnings.warn(f"the last step's {n} rows cannot give each of {world} ranks a row per micro-batch: "
                              f"{n - world * per_rank} rows are left out of it", stacklevel=2)
                self._warned = True
            rows = rows[: world * per_rank]
        count = world * per_rank
        if count == 0:
            return []
        bounds = [round(j * len(rows) / count) for j in range(count + 1)]  # as even as possible, each <= size
        return [rows[bounds[j] : bounds[j + 1]] for j in range(count)]

    def epoch_micro_batches(self) -> list[MicroBatch]:
        """This rank's micro-batches for the current epoch."""
        out = []
        start = self.epoch_start_step(self.epoch)
        for j, rows in enumerate(self.step_rows()):
            micro = self.split(rows)
            mine = micro[self.rank :: self.num_replicas]
            tokens = sum(self.supervised[i] for b in micro for i in b)
            used = self.schedule.used_total(start + j + 1) if self.schedule else None
            out += [MicroBatch(tuple(b), tokens, pos, len(mine), used) for pos, b in enumerate(mine)]
        return out

    def __iter__(self) -> Iterator[MicroBatch]:
        # A generator: the order is computed at the first ``next``, after Lightning has called ``set_epoch``.
        skip, self.skip_batches = self.skip_batches, 0
        yield from self.epoch_micro_batches()[skip:]

    def __len__(self) -> int:
        return len(self.epoch_micro_batches())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StepSampler` that Lightning checkpoints mid-epoch.

    Lightning saves ``state_dict()`` (epoch and micro-batches handed out) with the loop state; after
    ``load_state_dict`` the next iteration of the same epoch skips the micro-batches already trained on, so a run
    resumed from a mid-epoch checkpoint sees the same batch at the next step as an uninterrupted run.
    """

    _resume: tuple[int, int] | None = None
    _handed_out: int = 0

    def __init__(self, dataset: TokenizedDataset, sampler: StepSampler, collate_fn, num_workers: int = 0):
        # batch_size=None: the sampler yields whole micro-batches (MicroBatch), which the dataset resolves.
        super().__init__(dataset, batch_size=None, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)

    def __iter__(self):
        sampler = self.sampler
        skip = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == sampler.epoch and done < len(self):  # a checkpoint at an epoch's end skips nothing
                skip = done
        sampler.skip_batches = skip
        self._handed_out = skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


def padding_fraction(loader: DataLoader) -> float:
    """Share of token positions in one pass over ``loader`` that are padding (0 = none; padding-free batches)."""
    pad = total = 0
    for batch in loader:
        mask = batch.get("attention_mask")
        pad += 0 if mask is None else int((mask == 0).sum())  # padding-free batches have none
        total += batch["input_ids"].numel()
    return pad / total if total else 0.0
