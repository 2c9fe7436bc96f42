"""A loss term that flattens the singular-value spectrum of every LoRA adapter update."""

from __future__ import annotations

import lightning as L
import torch

from em_lightning.spectra import PENALTIES, check_not_fsdp1, find_lora_layers, get_penalty, spectral_penalty


class SpectralPenalty(L.Callback):
    """Adds ``coeff(step) × mean over LoRA modules of penalty(σ(s·B·A))`` to the training loss.

    The term is registered with the module's ``add_loss_term``, so it is summed into the loss *inside*
    ``training_step``: gradient accumulation divides it like the task loss, precision plugins scale it, DDP/FSDP
    reduce its gradient with the task gradient, and there is never a second ``backward``.

    Every form is **minimised** by a flat spectrum (all r singular values equal):
      * ``frob_nuclear_ratio`` (default; the paper's reported form): ‖σ‖₂/‖σ‖₁, from 1 (rank one) down to 1/√r (flat);
      * ``neg_entropy``: −H(σ/Σσ), from 0 down to −log r;
      * ``log_condition``: log(σ₁/σ_r) (σ_r floored at 1e-6·σ₁), from ≤ 13.8 down to 0;
      * ``inv_stable_rank``: σ₁²/Σσ², from 1 down to 1/r;
      * ``neg_effective_rank``: −exp(H)/r, from −1/r down to −1.
    Modules whose spectrum is all zero (B = 0, LoRA's start) contribute 0 and no gradient, but count in the mean.
    The forms are scale-invariant, so their gradient grows like 1/‖ΔW‖ while the adapter is small: ``warmup_steps``
    ramps the coefficient linearly from 0 over the first optimizer steps.

    Logged (separately from the task loss, so ``train/loss`` stays comparable across runs with and without it):
    ``train/spectral_penalty`` (the raw, unweighted mean penalty) and ``train/spectral_penalty_coeff``; the module's
    ``train/loss_total`` includes the weighted term.

    Args:
        form: one of ``frob_nuclear_ratio``, ``neg_entropy``, ``log_condition``, ``inv_stable_rank``,
            ``neg_effective_rank``.
        coeff: weight of the penalty once warmed up (a scientific choice: tune it; the task loss is ~1-3 nats).
        warmup_steps: optimizer steps over which the coefficient rises linearly from 0 to ``coeff``.
        name: the loss-term name (two penalties need two names).

    Distributed: DDP needs nothing (replicated weights). FSDP2 (DTensor weights) gathers them differentiably on every
    rank. FSDP1 is refused with a clear error (its flat shards carry no autograd outside forward). Neither
    distributed path can be tested on the single-CPU test machine.
    """

    def __init__(self, form: str = "frob_nuclear_ratio", coeff: float = 0.1, warmup_steps: int = 0,
                 name: str = "spectral_penalty"):
        get_penalty(form)  # fail at config time, naming the choices
        if coeff < 0:
            raise ValueError(f"SpectralPenalty.coeff must be >= 0, got {coeff}")
        if warmup_steps < 0:
            raise ValueError(f"SpectralPenalty.warmup_steps must be >= 0, got {warmup_steps}")
        self.form, self.coeff, self.warmup_steps, self.name = form, coeff, warmup_steps, name
        self._value: torch.Tensor | None = None
        self._coeff = 0.0
        self._layers = None  # (model, its LoRA layers): found once, not on every step

    def coefficient(self, step: int) -> float:
        """The coefficient at optimizer step ``step`` (0-based): linear warm-up from 0, then ``coeff``."""
        if self.warmup_steps == 0:
            return self.coeff
        return self.coeff * min(1.0, step / self.warmup_steps)

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        if not hasattr(pl_module, "add_loss_term"):
            raise TypeError(f"SpectralPenalty needs a LightningModule with add_loss_term(); got {type(pl_module)}")
        pl_module.add_loss_term(self.name, self._loss_term)

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit" and hasattr(pl_module, "remove_loss_term"):
            pl_module.remove_loss_term(self.name)  # a second fit() with this callback registers afresh
        self._layers = None

    def _loss_term(self, module) -> torch.Tensor:
        """Called by ``training_step`` for every (micro-)batch; returns the weighted, differentiable term."""
        self._coeff = self.coefficient(module.trainer.global_step)
        if self._layers is None or self._layers[0] is not module.model:
            check_not_fsdp1(module.model)
            self._layers = (module.model, find_lora_layers(module.model))
        value = spectral_penalty(module.model, self.form, self._layers[1])
        self._value = value.detach()
        return self._coeff * value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._value is None:
            return
        pl_module.log("train/spectral_penalty", self._value, on_step=True, on_epoch=False)
        pl_module.log("train/spectral_penalty_coeff", self._coeff, on_step=True, on_epoch=False)


__all__ = ["SpectralPenalty", "PENALTIES"]
