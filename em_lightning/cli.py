"""``python -m em_lightning {fit,validate,test}``: the LightningCLI of this project.

The optimiser is an argument of the module (``model.optimizer``), not the CLI's top-level ``optimizer``: the CLI
would build that from ``model.parameters()`` before ``configure_model`` has created the LoRA adapter.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from em_lightning.callbacks.adapter_export import AdapterExport
from em_lightning.callbacks.training_monitor import TrainingMonitor
from em_lightning.data import ChatDataModule
from em_lightning.module import LoRAFineTune


class EMLightningCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
        super().__init__(
            LoRAFineTune,
            ChatDataModule,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},  # re-running into a run dir must not abort
            parser_kwargs={"default_env": False},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data is tokenised with the model's own tokenizer and chat template.
        parser.link_arguments("model.base.name", "data.tokenizer")
        parser.link_arguments("model.base.trust_remote_code", "data.trust_remote_code")
        # Always-on callbacks, configurable under their own keys (monitor.*, adapter_export.*).
        parser.add_lightning_class_args(TrainingMonitor, "monitor")
        parser.add_lightning_class_args(AdapterExport, "adapter_export")
