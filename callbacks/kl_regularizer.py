"""A loss term that keeps the adapted model near its base: KL(p_base ‖ p_adapted) on a separate chat set."""

from __future__ import annotations

import math
import random
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from em_lightning.batching import ChatCollator
from em_lightning.data import load_rows, tokenize_rows
from em_lightning.errors import InputError
from em_lightning.loss import supervised_logits


def kl_to_base(peft_model, batch: dict, supervised_logits_only: bool = True) -> torch.Tensor:
    """Mean over the supervised positions of ``batch`` of KL(p_base ‖ p_adapted) over the vocabulary, in nats.

    The base distribution comes from the same model with its adapter disabled (peft's ``disable_adapter()``,
    under ``torch.no_grad()``: no second copy of the weights, no gradient through it); the adapted one from
    the training forward, differentiable. Both in float32 at least. Exactly 0 while every LoRA B is 0.
    """
    with torch.no_grad(), peft_model.disable_adapter():
        base = _at_least_float32(supervised_logits(peft_model, batch, supervised_logits_only))
    adapted = _at_least_float32(supervised_logits(peft_model, batch, supervised_logits_only))
    n = adapted.shape[0]
    if n == 0:
        return adapted.sum() * 0.0
    log_p = F.log_softmax(base, dim=-1)
    log_q = F.log_softmax(adapted, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = Σ p (log p − log q)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class KLRegularizer(L.Callback):
    """Adds ``coefficient(step) × KL(p_base ‖ p_adapted)`` to the training loss, the mean over the
    supervised (assistant) positions of a batch of a separate chat dataset: the KL-to-reference baseline that
    the spectral penalty is compared with.

    Registered with the module's ``add_loss_term`` (see ``callbacks/README.md``): evaluated once per optimizer
    step inside ``training_step``, weighted so the step's gradient is ``coefficient · ∇KL`` whatever the
    accumulation, summed into the loss (precision plugins, DDP and FSDP treat it like the task loss). The base
    logits come from the same model with the adapter disabled (:func:`kl_to_base`), so the term costs one
    no-grad forward and one forward + backward of ``batch_size`` rows per step, and no second model.
    The module logs ``train/<name>`` (raw KL, nats per position) and ``train/<name>_coeff``.

    Batches: the KL rows are tokenised once in ``setup`` with the model's chat template (loss positions as
    in training: assistant content and end-of-turn token) and walked in a seeded order, reshuffled every pass;
    the rows of a step follow from the step alone, so a resumed run picks the same rows. Under DDP each rank
    takes its own ``batch_size`` rows of the step's ``batch_size × world size`` (DDP averages the gradients).

    ``every_n_steps`` > 1 computes the term on every N-th optimizer step only (its cost too); on the other
    steps the raw term is 0 and not computed and its coefficient is 0, so read ``train/<name>`` where
    ``train/<name>_coeff`` is non-zero. The coefficient of an active step is ``coeff`` (not ``coeff × N``).

    Args:
        coeff: weight of the KL once warmed up (nats per supervised position; the task loss is ~1-3 nats).
        data: the chat rows: a JSONL path, ``builtin:demo`` (default), ``em:<name>`` or ``hf:<dataset>``.
        batch_size: rows per evaluation (per rank).
        every_n_steps: compute the term on every N-th optimizer step.
        max_length: tokens kept per row (longer rows keep their first ``max_length``).
        max_rows: read only the first N rows of ``data``.
        overlong_rows: a row whose prompt alone fills ``max_length``: ``drop`` (default) or ``error``.
        warmup_steps: optimizer steps over which the coefficient rises linearly from 0 to ``coeff``.
        seed: seed of the row order.
        name: the loss-term name, hence the logged tags.
    """

    def __init__(
        self,
        coeff: float = 0.1,
        data: str = "builtin:demo",
        batch_size: int = 4,
        every_n_steps: int = 1,
        max_length: int = 512,
        max_rows: int | None = None,
        overlong_rows: Literal["drop", "error"] = "drop",
        warmup_steps: int = 0,
        seed: int = 0,
        name: str = "kl_to_base",
    ):
        for key, value, ok in (
            ("coeff", coeff, coeff >= 0 and math.isfinite(coeff)),
            ("batch_size", batch_size, batch_size >= 1),
            ("every_n_steps", every_n_steps, every_n_steps >= 1),
            ("max_length", max_length, max_length >= 2),
            ("max_rows", max_rows, max_rows is None or max_rows >= 1),
            ("overlong_rows", overlong_rows, overlong_rows in ("drop", "error")),
            ("warmup_steps", warmup_steps, warmup_steps >= 0),
        ):
            if not ok:
                raise InputError(f"KLRegularizer.{key}: invalid value {value!r}")
        self.coeff, self.data, self.batch_size = coeff, data, batch_size
        self.every_n_steps, self.max_length, self.max_rows = every_n_steps, max_length, max_rows
        self.overlong_rows, self.warmup_steps, self.seed, self.name = overlong_rows, warmup_steps, seed, name
        self.rows: list | None = None  # tokenised KL rows (setup)
        self._collate: ChatCollator | None = None
        self._orders: dict[int, list[int]] = {}  # pass -> row order (seeded)

    # ------------------------------------------------------------------------------------------ life cycle
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        if not hasattr(pl_module, "add_loss_term"):
            raise TypeError(f"KLRegularizer needs a module with add_loss_term(); got {type(pl_module)}")
        self.prepare(pl_module.tokenizer)  # every rank: bad data fails before training, naming file:line
        pl_module.add_loss_term(self.name, self.raw_term, weight=self.coefficient)

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit" and hasattr(pl_module, "remove_loss_term"):
            pl_module.remove_loss_term(self.name)

    def prepare(self, tokenizer) -> None:
        """Read and tokenise the KL rows (once)."""
        if self.rows is None:
            rows = load_rows(self.data, self.max_rows)
            self.rows = tokenize_rows(rows, tokenizer, self.max_length, self.overlong_rows).rows
            self._collate = ChatCollator(tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------- the term
    def active(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def coefficient(self, step: int) -> float:
        """The weight at optimizer step ``step``: 0 off-cadence, else ``coeff`` after a linear warm-up."""
        if not self.active(step):
            return 0.0
        return self.coeff * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.coeff

    def batch_rows(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the KL rows this rank uses at ``step``: the step's ``batch_size × world`` rows of a
        stream of seeded permutations of all rows (one per pass), this rank's contiguous share of them."""
        call = step // self.every_n_steps
        per_call = self.batch_size * world
        start = call * per_call + rank * self.batch_size
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

    def batch(self, step: int, rank: int = 0, world: int = 1, device=None) -> dict:
        """The padded batch of :meth:`batch_rows`, on ``device``."""
        items = [{"input_ids": self.rows[i].input_ids, "labels": self.rows[i].labels}
                 for i in self.batch_rows(step, rank, world)]
        batch = self._collate(items)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def raw_term(self, module) -> torch.Tensor:
        """The raw, differentiable KL at the module's current step (the module weights and logs it)."""
        trainer = module.trainer
        step = trainer.global_step
        if not self.active(step):
            return torch.zeros((), device=module.device)
        batch = self.batch(step, trainer.global_rank, trainer.world_size, module.device)
        return kl_to_base(module.model, batch)
