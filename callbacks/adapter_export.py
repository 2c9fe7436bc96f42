"""Write the adapter as a PEFT dir beside every checkpoint and at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from em_lightning import rundir


class AdapterExport(L.Callback):
    """Saves ``<run dir>/adapters/step-<N>/`` whenever a checkpoint is saved, and ``<run dir>/adapters/final/`` when
    fit ends (names from :mod:`em_lightning.rundir`). Each is loadable by ``peft.PeftModel.from_pretrained`` and by a
    vLLM server (``--enable-lora``).

    Args:
        enabled: set False to write no adapter dirs.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage):
        # Every rank: trainer.log_dir is a collective (a broadcast from rank zero).
        self.run_dir = rundir.resolve_run_dir(trainer)

    def _run_dir(self, trainer) -> Path:
        return self.run_dir if self.run_dir is not None else rundir.resolve_run_dir(trainer)

    # Called on every rank: save_adapter is collective (FSDP2 gathers the sharded adapter) and writes on rank zero.
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.enabled:
            pl_module.save_adapter(rundir.adapter_dir(self._run_dir(trainer), trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        if self.enabled:
            pl_module.save_adapter(rundir.adapter_dir(self._run_dir(trainer)))
