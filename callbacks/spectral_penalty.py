"""A loss term that flattens the singular-value spectrum of every LoRA adapter update."""

from __future__ import annotations

import torch

from em_lightning.callbacks.loss_term import LossTermCallback
from em_lightning.errors import InputError
from em_lightning.lora import check_not_fsdp1, find_lora_layers, iter_lora_modules
from em_lightning.spectra import PENALTIES, get_penalty, mean_penalty


class SpectralPenalty(LossTermCallback):
    """Adds ``coefficient(step) × mean over LoRA modules of penalty(σ(s·B·A))`` to the training loss.

    A :class:`~em_lightning.callbacks.loss_term.LossTermCallback`: registered with the module's ``add_loss_term``,
    which evaluates the term once per optimizer step inside ``training_step`` and weights it so the step's
    gradient is ``coefficient · ∇penalty`` whatever the gradient accumulation or world size; precision plugins
    scale it and DDP/FSDP reduce it with the task gradient, with no second ``backward``.

    Every form is **minimised** by a flat spectrum (all r singular values equal):
      * ``frob_nuclear_ratio`` (default; the paper's reported form): ‖σ‖₂/‖σ‖₁, from 1 (rank one) down to 1/√r (flat);
      * ``neg_entropy``: −H(σ/Σσ), from 0 down to −log r;
      * ``log_condition``: log(σ₁/σ_r) (σ_r floored at 1e-6·σ₁), from ≤ 13.8 down to 0;
      * ``inv_stable_rank``: σ₁²/Σσ², from 1 down to 1/r;
      * ``neg_effective_rank``: −exp(H)/r, from −1/r down to −1.
    Modules whose spectrum is all zero (B = 0, LoRA's start) contribute 0 and no gradient, but count in the mean.
    The forms are scale-invariant, so their gradient grows like 1/‖ΔW‖ while the adapter is small: ``warmup_steps``
    ramps the coefficient linearly from 0 over the first optimizer steps.

    Logged by the module (apart from the task loss, so ``train/loss`` stays comparable across runs with and
    without it): ``train/<name>`` (the raw, unweighted mean penalty) and ``train/<name>_coeff``, i.e.
    ``train/spectral_penalty`` and ``train/spectral_penalty_coeff`` by default; ``train/loss_total`` includes
    the weighted term.

    Args:
        form: one of ``frob_nuclear_ratio``, ``neg_entropy``, ``log_condition``, ``inv_stable_rank``,
            ``neg_effective_rank``.
        coeff: weight of the penalty once warmed up (a scientific choice: tune it; the task loss is ~1-3 nats).
        warmup_steps: optimizer steps over which the coefficient rises linearly from 0 to ``coeff``.
        name: the loss-term name, hence the logged tags (two penalties need two names).
        every_n_steps: apply the penalty on every N-th optimizer step only (coefficient 0 on the others).

    Distributed: DDP needs nothing (replicated weights). FSDP2 (DTensor weights) gathers them differentiably on every
    rank. FSDP1 is refused with a clear error (its flat shards carry no autograd outside forward).
    """

    name = "spectral_penalty"

    def __init__(self, form: str = "frob_nuclear_ratio", coeff: float = 0.1, warmup_steps: int = 0,
                 name: str = "spectral_penalty", every_n_steps: int = 1):
        try:
            get_penalty(form)  # fail at config time, naming the choices
        except ValueError as err:
            raise InputError(f"SpectralPenalty.form: {err}") from None
        self.form = form
        super().__init__(coeff=coeff, warmup_steps=warmup_steps, every_n_steps=every_n_steps, name=name)
        self._layers = None  # (model, its LoRA layers): found once, not on every step

    def settings(self) -> dict:
        return {**super().settings(), "form": self.form}

    def release(self) -> None:
        self._layers = None

    def raw(self, module, step: int) -> torch.Tensor:
        """The unweighted mean penalty of the module's adapters, differentiable (the module weights it)."""
        if self._layers is None or self._layers[0] is not module.model:
            check_not_fsdp1(module.model, "SpectralPenalty")
            self._layers = (module.model, find_lora_layers(module.model))
        factors = [(B, A, scale) for *_, B, A, scale in iter_lora_modules(module.model, self._layers[1])]
        if not factors:
            raise InputError("model.lora.target_modules: the model has no active LoRA modules for SpectralPenalty "
                             "to act on")
        return mean_penalty(factors, self.form)


__all__ = ["PENALTIES", "SpectralPenalty"]
