"""The task loss: next-token cross-entropy summed over supervised (assistant) tokens, and how a step divides it.

``loss_normalization`` (``model.loss_normalization``, recorded in ``config.yaml`` and the hparams):

* ``step_tokens`` (default): the mean over every supervised token of the optimizer step — all micro-batches of the
  accumulation window on all ranks. The divisor is the step's actual supervised-token count, which the data module
  computes when it forms the step's rows (``batch["step_supervised_tokens"]``), so no collective is needed and a
  short last window divides by its own count. Accumulating k micro-batches then equals one batch k times larger.
* ``micro_batch``: the mean over each micro-batch's supervised tokens, averaged over micro-batches and ranks (what
  most trainers do): a token in a short micro-batch weighs more than one in a long micro-batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossNormalization = Literal["step_tokens", "micro_batch"]
LOSS_NORMALIZATIONS = ("step_tokens", "micro_batch")


def supervised_ce_sum(peft_model, batch: dict, supervised_logits_only: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised tokens of ``batch``, and their count.

    With ``supervised_logits_only`` the LM head is applied only where a label exists: the same sum with less compute
    and memory (the vocab projection of prompt tokens is wasted work).
    """
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    if supervised_logits_only:
        lm = peft_model.get_base_model()
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        hidden = hidden.last_hidden_state[:, :-1][mask]
        logits = _apply_softcap(lm.get_output_embeddings()(hidden), lm.config)
    else:
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1][mask]
    # The collator counts supervised tokens on the host; recounting here would cost a device sync.
    n_tokens = batch["n_supervised"] if "n_supervised" in batch else int(mask.sum())
    return F.cross_entropy(logits.float(), labels[mask], reduction="sum"), n_tokens


def micro_batch_divisor(
    normalization: LossNormalization, batch: dict, n_tokens: int, accumulate: int, world_size: int
) -> float:
    """What this micro-batch's summed loss is divided by, so that after Lightning divides by ``accumulate`` and DDP
    averages over ``world_size`` the step's gradient is that of the chosen mean."""
    if normalization == "micro_batch":
        return float(max(n_tokens, 1))
    step_tokens = batch.get("step_supervised_tokens")
    if step_tokens is None:
        raise ValueError(
            "model.loss_normalization: 'step_tokens' needs batches from em_lightning's ChatDataModule (they carry "
            "the step's supervised-token count, step_supervised_tokens); use 'micro_batch' with other data"
        )
    return max(int(step_tokens), 1) / (accumulate * world_size)


def _apply_softcap(logits: torch.Tensor, config) -> torch.Tensor:
    """Gemma-style final logit soft-capping, so the supervised-only path matches the model's own forward."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
