"""A loss term that keeps the adapted model near its base: KL(p_base ‖ p_adapted) on a separate chat set."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from em_lightning.callbacks.loss_term import SideDataLossTerm
from em_lightning.side_data import at_least_float32, base_supervised_logits, global_position_mean


def kl_to_base(module, batch: dict) -> torch.Tensor:
    """Mean over the supervised positions of ``batch`` of KL(p_base ‖ p_adapted) over the vocabulary, in nats.

    ``module`` is the ``LoRAFineTune``: both sides go through its ``supervised_logits`` (its one forward-path
    decision). The base distribution comes from the same model with its adapter disabled, under no grad
    (:func:`~em_lightning.side_data.base_supervised_logits`: no second copy of the weights, no gradient through
    it); the adapted one from the training forward, differentiable. Both in float32 at least. Exactly 0 while
    every LoRA B is 0.
    """
    total, n = kl_to_base_sum(module, batch)
    return total / max(n, 1)


def kl_to_base_sum(module, batch: dict) -> tuple[torch.Tensor, int]:
    """The sum over the supervised positions of ``batch`` of KL(p_base ‖ p_adapted), and their number."""
    base = at_least_float32(base_supervised_logits(module, batch))
    adapted = at_least_float32(module.supervised_logits(batch))
    n = adapted.shape[0]
    if n == 0:
        return adapted.sum() * 0.0, 0
    log_p = F.log_softmax(base, dim=-1)
    log_q = F.log_softmax(adapted, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = Σ p (log p − log q)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum"), n


class KLRegularizer(SideDataLossTerm):
    """Adds ``coefficient(step) × KL(p_base ‖ p_adapted)`` to the training loss, the mean over the
    supervised (assistant) positions of a batch of a separate chat dataset: the KL-to-reference baseline that
    the spectral penalty is compared with.

    A :class:`~em_lightning.callbacks.loss_term.SideDataLossTerm` (see ``callbacks/README.md``): evaluated once per
    optimizer step inside ``training_step``, weighted so the step's gradient is ``coefficient · ∇KL`` whatever the
    accumulation, summed into the loss (precision plugins, DDP and FSDP treat it like the task loss). The base
    logits come from the same model with the adapter disabled (:func:`kl_to_base`), so the term costs one
    no-grad forward and one forward + backward of ``batch_size`` rows per step, and no second model.
    The module logs ``train/<name>`` (raw KL, nats per position) and ``train/<name>_coeff``.

    Batches: a :class:`~em_lightning.side_data.SideChatSet`, tokenised once in ``setup`` and walked in a seeded
    order, reshuffled every pass; the rows of a step follow from the step alone, so a resumed run picks the same
    rows. Under DDP and FSDP2 each rank takes its own ``batch_size`` rows of the step's ``batch_size × world size``,
    and the term is the mean over all of the step's positions (one all-reduce of two numbers), so N ranks of
    ``batch_size`` rows give the term of one process of ``N × batch_size`` rows.

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

    name = "kl_to_base"

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
        super().__init__(coeff, warmup_steps, every_n_steps, name, data=data, batch_size=batch_size,
                         max_length=max_length, max_rows=max_rows, overlong_rows=overlong_rows, seed=seed)

    def raw(self, module, step: int) -> torch.Tensor:
        """The raw, differentiable KL at optimizer ``step``, the mean over every rank's positions of the step's
        rows (the module weights and logs it)."""
        return global_position_mean(module, *kl_to_base_sum(module, self.step_batch(module, step)))
