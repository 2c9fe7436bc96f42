"""A side chat set for loss terms that need data (KL to base, feature-space L2), and the base model's forward on it.

Loss terms are evaluated once per optimizer step (see ``LoRAFineTune.add_loss_term``), so they never see the
training micro-batch; a term that needs data draws its own batch from a :class:`SideChatSet`. The rows of a draw
follow from the draw number, rank and world size alone, so a resumed run picks the same rows and accumulation does
not change them. The base side of a term comes from the same model with its adapter disabled (no second copy of the
weights) under ``torch.no_grad()``: :func:`base_supervised_logits` and :func:`base_block_activations`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch

from em_lightning.batching import ChatCollator
from em_lightning.data import TokenizedRow, load_rows, tokenize_rows
from em_lightning.errors import InputError


class SideChatSet:
    """Chat rows tokenised once with the model's chat template (loss positions as in training: assistant content
    and end-of-turn token), walked in a seeded order that is reshuffled every pass.

    Draw ``d`` is the ``batch_size × world`` rows at positions ``d · batch_size · world ...`` of a stream of seeded
    permutations of all rows (one permutation per pass); each rank takes its own contiguous ``batch_size`` of them
    (DDP averages the gradients, so the world's draw is one ``batch_size × world`` batch).

    Args:
        data: the chat rows: a JSONL path, ``builtin:demo``, ``em:<name>`` or ``hf:<dataset>``.
        batch_size: rows per draw (per rank).
        max_length: tokens kept per row (longer rows keep their first ``max_length``).
        max_rows: read only the first N rows of ``data``.
        overlong_rows: a row whose prompt alone fills ``max_length``: ``drop`` or ``error``.
        seed: seed of the row order.
        owner: the config section the arguments come from (``KLRegularizer``), named in errors.
    """

    def __init__(self, data: str = "builtin:demo", batch_size: int = 4, max_length: int = 512,
                 max_rows: int | None = None, overlong_rows: Literal["drop", "error"] = "drop", seed: int = 0,
                 owner: str = "SideChatSet"):
        for key, value, ok in (
            ("data", data, isinstance(data, str) and bool(data)),
            ("batch_size", batch_size, batch_size >= 1),
            ("max_length", max_length, max_length >= 2),
            ("max_rows", max_rows, max_rows is None or max_rows >= 1),
            ("overlong_rows", overlong_rows, overlong_rows in ("drop", "error")),
        ):
            if not ok:
                raise InputError(f"{owner}.{key}: invalid value {value!r}")
        self.data, self.batch_size, self.max_length, self.max_rows = data, batch_size, max_length, max_rows
        self.overlong_rows, self.seed, self.owner = overlong_rows, seed, owner
        self.rows: list[TokenizedRow] | None = None  # prepare()
        self._collate: ChatCollator | None = None
        self._orders: dict[int, list[int]] = {}  # pass -> row order (seeded)

    def settings(self) -> dict:
        """What decides the rows of every draw (for a loss term's resume check)."""
        return {"data": self.data, "batch_size": self.batch_size, "max_length": self.max_length,
                "max_rows": self.max_rows, "overlong_rows": self.overlong_rows, "seed": self.seed}

    def prepare(self, tokenizer) -> None:
        """Read and tokenise the rows (once; later calls do nothing). Bad data raises naming file:line."""
        if self.rows is None:
            rows = load_rows(self.data, self.max_rows)
            self.rows = tokenize_rows(rows, tokenizer, self.max_length, self.overlong_rows).rows
            self._collate = ChatCollator(tokenizer.pad_token_id)

    def batch_rows(self, draw: int, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the rows this rank uses in draw ``draw``."""
        if self.rows is None:
            raise RuntimeError("SideChatSet.prepare(tokenizer) must run before drawing batches")
        start = draw * self.batch_size * world + rank * self.batch_size
        n = len(self.rows)
        out = []
        for i in range(start, start + self.batch_size):
            epoch, pos = divmod(i, n)
            if epoch not in self._orders:
                order = list(range(n))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                self._orders = {epoch: order}  # one pass at a time: memory stays O(rows)
            out.append(self._orders[epoch][pos])
        return out

    def collate(self, indices: Sequence[int], device=None) -> dict:
        """The padded batch of rows ``indices``, its tensors on ``device``."""
        batch = self._collate([{"input_ids": self.rows[i].input_ids, "labels": self.rows[i].labels}
                               for i in indices])
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def batch(self, draw: int, rank: int = 0, world: int = 1, device=None) -> dict:
        """The padded batch of :meth:`batch_rows`, on ``device``."""
        return self.collate(self.batch_rows(draw, rank, world), device)


def global_position_mean(module, local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
    """This rank's differentiable term for the mean over **every rank's** positions of a per-position quantity
    whose sum over this rank's positions is ``local_sum`` (``local_count`` positions).

    Its value is the global mean ``Σ_ranks sum / Σ_ranks count`` on every rank, and its gradient is ``world ×
    ∇local_sum / Σ count``, so the data-parallel average of the ranks' gradients (DDP and FSDP2 average) is the
    gradient of the global mean: 2 ranks of B rows give the term of one process of 2B rows, as the task loss's
    ``step_tokens`` normalisation does, even when the ranks' rows hold different numbers of positions. Collective
    (one all-reduce of two numbers) when the world is larger than 1: call it on every rank.
    """
    world = module.trainer.world_size
    if world == 1:
        return local_sum / max(local_count, 1)
    totals = torch.stack([local_sum.detach().to(torch.float64),
                          torch.tensor(float(local_count), dtype=torch.float64, device=local_sum.device)])
    totals = module.trainer.strategy.reduce(totals, reduce_op="sum")
    others = (totals[0] - world * local_sum.detach().to(torch.float64)).to(local_sum.dtype)
    return (world * local_sum + others) / totals[1].clamp(min=1).to(local_sum.dtype)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or its own dtype when wider: loss terms reduce in float32 whatever the training precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def supervised_mask(batch: dict) -> torch.Tensor:
    """``[rows, seq - 1]``: the positions whose next token is supervised, as :func:`em_lightning.loss.supervised_logits`
    orders them (a hidden state at position t predicts token t + 1)."""
    return batch["labels"][:, 1:] != -100


def base_supervised_logits(module, batch: dict) -> torch.Tensor:
    """The base model's next-token logits at ``batch``'s supervised positions: the module's own forward path
    (``supervised_logits``) with the adapter disabled, no gradient."""
    with torch.no_grad(), module.adapter_disabled():
        return module.supervised_logits(batch)


def base_block_activations(module, batch: dict, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The base model's outputs of decoder blocks ``layers`` on ``batch`` (adapter disabled), no gradient."""
    with torch.no_grad():
        return module.block_activations(batch, layers, adapter=False)


__all__ = ["SideChatSet", "at_least_float32", "base_block_activations", "base_supervised_logits",
           "global_position_mean", "supervised_mask"]
