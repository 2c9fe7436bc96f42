"""Small test-only callbacks, wired into CLI runs with ``--trainer.callbacks+=tests.helpers.<Name>``."""

from __future__ import annotations

import lightning as L
import torch


class ParamSnapshot(L.Callback):
    """Copies every parameter when fit starts (after configure_model), to compare with the trained model."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class LossRecorder(L.Callback):
    """Records the training loss returned at each optimizer step, keyed by global step (1-based after the step)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def find(trainer, cls):
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))
