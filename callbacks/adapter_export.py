"""Write the adapter as a PEFT dir beside every checkpoint and at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class AdapterExport(L.Callback):
    """Saves ``<run dir>/adapters/step-<N>/`` whenever a checkpoint is saved, and ``<run dir>/adapters/final/`` when
    fit ends. Each is loadable by ``peft.PeftModel.from_pretrained`` and by a vLLM server (``--enable-lora``).

    Args:
        enabled: set False to write no adapter dirs.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @staticmethod
    def adapters_dir(trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapters"

    # Called on every rank: save_adapter is collective (FSDP2 gathers the sharded adapter) and writes on rank zero.
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.enabled:
            pl_module.save_adapter(self.adapters_dir(trainer) / f"step-{trainer.global_step}")

    def on_train_end(self, trainer, pl_module):
        if self.enabled:
            pl_module.save_adapter(self.adapters_dir(trainer) / "final")
