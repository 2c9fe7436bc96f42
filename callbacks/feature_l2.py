"""A loss term that keeps the adapted model's features near its base's (LDIFS-style): λ · ‖h_adapted − h_base‖²
at chosen decoder blocks, on a separate chat set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from em_lightning.callbacks.loss_term import SideDataLossTerm
from em_lightning.errors import InputError
from em_lightning.side_data import (
    at_least_float32,
    base_block_activations,
    global_position_mean,
    supervised_mask,
)


def feature_l2_sums(module, batch: dict, layers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """Over the supervised positions of ``batch``: the sum of the per-layer mean (over ``layers``) of
    ``‖h_adapted − h_base‖²`` (summed over hidden dimensions), the per-layer sums (detached), and the number of
    positions.

    ``h`` is the output of a decoder block (the residual stream after it) through the module's
    ``block_activations``: the base side with the adapter disabled and no gradient, the adapted side
    differentiable. A position is one whose next token is supervised, as for the task loss and the KL term.
    Float32 at least. Exactly 0 while every LoRA B is 0.
    """
    base = base_block_activations(module, batch, layers)
    adapted = module.block_activations(batch, layers, adapter=True)
    mask = supervised_mask(batch)
    per_layer = {}
    for layer in layers:
        diff = at_least_float32(adapted[layer][:, :-1][mask]) - at_least_float32(base[layer][:, :-1][mask])
        per_layer[layer] = diff.square().sum()
    total = torch.stack(list(per_layer.values())).sum() / len(layers)
    return total, {k: v.detach() for k, v in per_layer.items()}, int(mask.sum())


def feature_l2(module, batch: dict, layers: Sequence[int]) -> torch.Tensor:
    """The mean over the supervised positions of ``batch`` and over ``layers`` of ``‖h_adapted − h_base‖²``."""
    total, _, n = feature_l2_sums(module, batch, layers)
    return total / max(n, 1)


def every_nth_block(n_blocks: int, stride: int) -> list[int]:
    """0-based indices of every ``stride``-th block counting from 1 (blocks stride, 2·stride, ... in 1-based
    terms); the last block alone when the model has fewer than ``stride`` blocks."""
    return list(range(stride - 1, n_blocks, stride)) or [n_blocks - 1]


class FeatureL2Regularizer(SideDataLossTerm):
    """Adds ``coefficient(step) × mean over supervised positions and chosen blocks of ‖h_adapted − h_base‖²``
    (squared L2 over the hidden dimensions) to the training loss, on a batch of a separate chat set: a feature-space
    distance to the base model in the manner of LDIFS (Mukhoti et al. 2023), as compared with KL and other in-training
    defences against emergent misalignment by Kaczér et al. (arXiv 2508.06249).

    A :class:`~em_lightning.callbacks.loss_term.SideDataLossTerm`: evaluated once per optimizer step inside
    ``training_step``, weighted so the step's gradient is ``coefficient · ∇term`` whatever the accumulation; the
    features come from the module's ``block_activations`` (forward hooks on the decoder blocks), the base ones from
    the same model with the adapter disabled (no second copy), so the term costs one no-grad forward and one
    forward + backward of ``batch_size`` rows per step. Side batches: a :class:`~em_lightning.side_data.SideChatSet`
    (the same walk as the KL term's); under DDP / FSDP2 each rank takes its own rows and the term is the mean over
    every rank's positions, so N ranks of ``batch_size`` rows give one process of ``N × batch_size`` rows.

    The module logs ``train/<name>`` (the raw term, squared hidden-state units per position) and
    ``train/<name>_coeff``; this callback adds ``train/<name>/block_<i>`` (this rank's mean over its positions at
    block i, for reading which depth moves). The scale of ‖h‖² grows with the hidden size and depth: tune ``coeff``
    per model (read ``train/<name>`` of an unregularised run first).

    Args:
        coeff: the weight once warmed up.
        layers: 0-based decoder block indices whose outputs are compared; None: every ``layer_stride``-th block.
        layer_stride: with ``layers`` None, use blocks ``stride-1, 2·stride-1, ...`` (0-based; the last block alone
            if the model has fewer blocks).
        data: the chat rows: a JSONL path, ``builtin:demo`` (default), ``em:<name>`` or ``hf:<dataset>``.
        batch_size: rows per evaluation (per rank).
        every_n_steps: compute the term on every N-th optimizer step (coefficient 0 on the others).
        max_length: tokens kept per row (longer rows keep their first ``max_length``).
        max_rows: read only the first N rows of ``data``.
        overlong_rows: a row whose prompt alone fills ``max_length``: ``drop`` (default) or ``error``.
        warmup_steps: optimizer steps over which the coefficient rises linearly from 0 to ``coeff``.
        seed: seed of the row order.
        name: the loss-term name, hence the logged tags.
    """

    name = "feature_l2"

    def __init__(
        self,
        coeff: float = 0.1,
        layers: list[int] | None = None,
        layer_stride: int = 5,
        data: str = "builtin:demo",
        batch_size: int = 4,
        every_n_steps: int = 1,
        max_length: int = 512,
        max_rows: int | None = None,
        overlong_rows: Literal["drop", "error"] = "drop",
        warmup_steps: int = 0,
        seed: int = 0,
        name: str = "feature_l2",
    ):
        self.layers = None if layers is None else list(layers)
        self.layer_stride = layer_stride
        super().__init__(coeff, warmup_steps, every_n_steps, name, data=data, batch_size=batch_size,
                         max_length=max_length, max_rows=max_rows, overlong_rows=overlong_rows, seed=seed)
        self.check(
            ("layers", layers is None or (len(layers) > 0 and all(isinstance(i, int) and i >= 0 for i in layers)),
             "must be a non-empty list of 0-based block indices, or null"),
            ("layer_stride", isinstance(layer_stride, int) and layer_stride >= 1, "must be an integer >= 1"),
        )
        self._blocks: list[int] | None = None  # resolved against the model on the first call

    def settings(self) -> dict:
        return {**super().settings(), "layers": self.layers, "layer_stride": self.layer_stride}

    def release(self) -> None:
        self._blocks = None

    def blocks(self, module) -> list[int]:
        """The 0-based block indices compared, checked against the model (built after ``setup``)."""
        if self._blocks is None:
            n = len(module.decoder_blocks())
            if self.layers is None:
                self._blocks = every_nth_block(n, self.layer_stride)
            else:
                bad = [i for i in self.layers if i >= n]
                if bad:
                    raise InputError(f"FeatureL2Regularizer.layers: {bad} out of range: the model has {n} decoder "
                                     f"blocks (0-based indices 0..{n - 1})")
                self._blocks = sorted(set(self.layers))
        return self._blocks

    def raw(self, module, step: int) -> torch.Tensor:
        total, per_layer, n = feature_l2_sums(module, self.step_batch(module, step), self.blocks(module))
        for layer, value in per_layer.items():
            module.log(f"train/{self.name}/block_{layer}", value / max(n, 1), on_step=True, on_epoch=False)
        return global_position_mean(module, total, n)


__all__ = ["FeatureL2Regularizer", "every_nth_block", "feature_l2", "feature_l2_sums"]
