"""The task loss: next-token cross-entropy summed over supervised (assistant) tokens, and how a step divides it.

``loss_normalization`` (``model.loss_normalization``, recorded in ``config.yaml`` and the hparams):

* ``step_tokens`` (default): the mean over every supervised token of the optimizer step — all micro-batches of the
  accumulation window on all ranks. The divisor is the step's actual supervised-token count, which the data module
  computes when it forms the step's rows (``batch["step_supervised_tokens"]``), so no collective is needed and a
  short last window divides by its own count. Accumulating k micro-batches then equals one batch k times larger.
* ``micro_batch``: the mean over each micro-batch's supervised tokens, averaged over micro-batches and ranks (what
  most trainers do): a token in a short micro-batch weighs more than one in a long micro-batch.

The same forward path serves callbacks that score text rather than train on it: :func:`supervised_logits`
(the next-token logits at the supervised positions; the KL-to-base regulariser) and
:func:`supervised_logprob_per_row` (each row's summed log-probability of its supervised tokens; the
misalignment probe). Going through the model's own forward, as training does, keeps them right under DDP and
FSDP (every rank runs the same forwards).

**Padding-free batches** (``data.padding_free``; :class:`em_lightning.batching.ChatCollator`) hold a micro-batch's
rows end to end in one row with ``position_ids`` restarting at 0 and no ``attention_mask``. The model gets what the
batch holds (:func:`model_inputs`); with no ``attention_mask``, transformers finds the rows from the position ids
(``masking_utils.find_packed_sequence_indices``) and masks attention within each row: a block-diagonal causal
mask for ``sdpa``/``eager`` (dense, tokens × tokens), FlexAttention's document mask for ``flex_attention``, varlen
kernels for ``flash_attention_2``. Passing an all-ones ``attention_mask`` instead would let rows attend to each other.

**Chunked loss** (``model.loss_chunk_size``, :func:`chunked_ce_sum`): the LM head and cross-entropy run on at most
``chunk_size`` supervised positions at a time, each chunk's logits recomputed in backward (activation
checkpointing), so ``supervised tokens × vocab`` logits never exist at once; the same sum up to float rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from em_lightning.errors import InputError

LossNormalization = Literal["step_tokens", "micro_batch"]
LOSS_NORMALIZATIONS = ("step_tokens", "micro_batch")


def supervised_logits(peft_model, batch: dict, supervised_logits_only: bool = True) -> torch.Tensor:
    """The next-token logits at every supervised position of ``batch``: ``[n_supervised, vocab]``, rows in
    row-major order (all of row 0's positions first), predicting ``batch["labels"][:, 1:][labels != -100]``.

    With ``supervised_logits_only`` the LM head is applied only at those positions (the same values with less
    compute and memory); otherwise the model's full forward is sliced. Logits keep the model's dtype.
    """
    mask = batch["labels"][:, 1:] != -100
    if supervised_logits_only:
        lm = peft_model.get_base_model()
        return _apply_softcap(lm.get_output_embeddings()(supervised_hidden(peft_model, batch)), lm.config)
    out = peft_model(**model_inputs(batch), use_cache=False)
    return out.logits[:, :-1][mask]


def model_inputs(batch: dict) -> dict:
    """What the model's forward gets from ``batch``: ``input_ids``, and ``attention_mask`` and ``position_ids``
    where the batch has them (a padding-free batch has position ids and no mask; see the module doc)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def supervised_hidden(peft_model, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states at the positions that predict a supervised token: ``[n_supervised,
    hidden]``, in the order of :func:`supervised_logits` (the LM head is not applied)."""
    mask = batch["labels"][:, 1:] != -100
    out = peft_model.get_base_model().get_decoder()(**model_inputs(batch), use_cache=False)
    return out.last_hidden_state[:, :-1][mask]


def chunked_ce_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, config, chunk_size: int
) -> torch.Tensor:
    """``Σ cross_entropy(softcap(head(hidden)), targets)`` (float32), ``chunk_size`` rows at a time.

    Each chunk's logits are dropped after its loss and recomputed in backward (non-reentrant activation
    checkpointing, which keeps autocast and RNG state), so at most ``chunk_size × vocab`` logits exist at once;
    the price is one more LM-head forward on the supervised positions. One chunk (``len(targets) <= chunk_size``)
    or no gradient: nothing is recomputed. ``head`` is called as a module, so a LoRA on the head, autocast and
    FSDP hooks apply as in :func:`supervised_logits`.
    """
    from torch.utils.checkpoint import checkpoint

    recompute = torch.is_grad_enabled() and len(targets) > chunk_size
    total = None
    for lo in range(0, max(len(targets), 1), chunk_size):  # one (empty) chunk when nothing is supervised
        part = (hidden[lo : lo + chunk_size], targets[lo : lo + chunk_size], head, config)
        part = checkpoint(_chunk_ce, *part, use_reentrant=False) if recompute else _chunk_ce(*part)
        total = part if total is None else total + part
    return total


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, config) -> torch.Tensor:
    return F.cross_entropy(_apply_softcap(head(hidden), config).float(), targets, reduction="sum")


def supervised_ce_sum(
    peft_model, batch: dict, supervised_logits_only: bool = True, chunk_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised tokens of ``batch``, and their count.

    With ``supervised_logits_only`` the LM head is applied only where a label exists: the same sum with less compute
    and memory (the vocab projection of prompt tokens is wasted work). With ``chunk_size`` too, head and loss run
    ``chunk_size`` positions at a time (:func:`chunked_ce_sum`); the full forward path is never chunked.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    if chunk_size and supervised_logits_only:
        lm = peft_model.get_base_model()
        hidden = supervised_hidden(peft_model, batch)
        ce = chunked_ce_sum(hidden, labels[mask], lm.get_output_embeddings(), lm.config, chunk_size)
    else:
        logits = supervised_logits(peft_model, batch, supervised_logits_only)
        ce = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
    # The collator counts supervised tokens on the host; recounting here would cost a device sync.
    n_tokens = batch["n_supervised"] if "n_supervised" in batch else int(mask.sum())
    return ce, n_tokens


def supervised_logprob_per_row(
    peft_model, batch: dict, supervised_logits_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``batch``: the summed log-probability of its supervised tokens (float32, ``[rows]``) and how
    many there are (int64, ``[rows]``), through the same forward as :func:`supervised_ce_sum` (whose sum is
    ``-logprob.sum()``). A row without supervised tokens gets 0 and 0. Differentiable; wrap in
    ``torch.no_grad()`` to score.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logits = supervised_logits(peft_model, batch, supervised_logits_only)
    logprob = -F.cross_entropy(logits.float(), labels[mask], reduction="none")
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(mask.shape[0], dtype=logprob.dtype, device=logprob.device).index_add(0, rows, logprob)
    return sums, mask.sum(dim=1)


def micro_batch_divisor(
    normalization: LossNormalization, batch: dict, n_tokens: int, accumulate: int, world_size: int
) -> float:
    """What this micro-batch's summed loss is divided by, so that after Lightning divides by ``accumulate`` and DDP
    averages over ``world_size`` the step's gradient is that of the chosen mean."""
    if normalization == "micro_batch":
        return float(max(n_tokens, 1))
    step_tokens = batch.get("step_supervised_tokens")
    if step_tokens is None:
        raise InputError(
            "model.loss_normalization: 'step_tokens' needs batches from em_lightning's ChatDataModule (they carry "
            "the step's supervised-token count, step_supervised_tokens); use 'micro_batch' with other data"
        )
    return max(int(step_tokens), 1) / (accumulate * world_size)


def _apply_softcap(logits: torch.Tensor, config) -> torch.Tensor:
    """Gemma-style final logit soft-capping, so the supervised-only path matches the model's own forward."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
