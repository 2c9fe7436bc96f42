"""``python -m em_lightning {fit,validate,test}``: the LightningCLI of this project.

The optimiser is an argument of the module (``model.optimizer``), not the CLI's top-level ``optimizer``: the CLI
would build that from ``model.parameters()`` before ``configure_model`` has created the LoRA adapter.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from em_lightning.callbacks.adapter_export import AdapterExport
from em_lightning.callbacks.training_monitor import TrainingMonitor
from em_lightning.data import ChatDataModule
from em_lightning.errors import InputError
from em_lightning.module import CheckpointMismatch, LoRAFineTune

# Class paths of configs written before callbacks/ was installed as em_lightning.callbacks.
_OLD_CALLBACK_PATH = re.compile(r"(?<![\w.])callbacks\.(\w+)\.(\w+)")


class EMLightningCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, parser_kwargs: dict | None = None, **kwargs):
        check_class_paths(sys.argv[1:] if args is None else args)
        super().__init__(
            LoRAFineTune,
            ChatDataModule,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},  # re-running into a run dir must not abort
            parser_kwargs={"default_env": False, **(parser_kwargs or {})},
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's config with the hyperparameters saved in ``--ckpt_path``, silently; an
        adapter of another shape must instead be an error that names the key the user set differently."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            import torch

            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            # Every LoRA setting shapes the adapter; of the base, only the model itself (dtype, attention kernel or
            # checkpointing may change between a run and its resume).
            for group, keys in (("lora", None), ("base", {"name"})):
                given = self.config[sub]["model"].get(group)
                given = vars(given) if given is not None and not isinstance(given, dict) else given or {}
                for key, value in (saved.get(group) or {}).items():
                    if key in given and (keys is None or key in keys) and _plain(given[key]) != _plain(value):
                        raise CheckpointMismatch(
                            f"model.{group}.{key}: {ckpt_path} was written with {value!r}, this run sets "
                            f"{given[key]!r}; resume with the checkpoint's setting (or start a new run)"
                        )
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        # jsonargparse wraps an error raised while building a callback (one of a Union-typed list) in a ValueError
        # of its own with a page of type hints; the user's error is the InputError inside it, naming the key.
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = _input_error_inside(err)
            if cause is None or cause is err:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data is tokenised with the model's own tokenizer and chat template.
        parser.link_arguments("model.base.name", "data.tokenizer")
        parser.link_arguments("model.base.trust_remote_code", "data.trust_remote_code")
        # Always-on callbacks, configurable under their own keys (monitor.*, adapter_export.*).
        parser.add_lightning_class_args(TrainingMonitor, "monitor")
        parser.add_lightning_class_args(AdapterExport, "adapter_export")


def resolve_fit_config(args: list[str]) -> tuple[str, dict]:
    """The config that ``fit <args>`` would train, as ``fit <args> --print_config`` writes it (the text) and
    as a plain dict, without training, seeding, instantiating anything or exiting. A config the parser rejects
    raises :class:`InputError` with the parser's message (on one line)."""
    from jsonargparse import ArgumentError

    check_class_paths(args)
    parser = _fit_parser()
    try:
        config = parser.parse_args(list(args), env=False)
        text = parser.dump(config, skip_unset=False)  # as --print_config writes it: nulls kept
    except ArgumentError as error:
        raise ConfigRejected(" ".join(str(error).split())) from None  # jsonargparse's message spans lines
    return text, yaml.safe_load(text)


class ConfigRejected(InputError):
    """The training CLI's parser refused a config (unknown key, bad value); the message is the parser's."""


class _ParserBuilt(Exception):
    def __init__(self, cli: LightningCLI):
        super().__init__("parser built")
        self.cli = cli


class _ParserOnly(EMLightningCLI):
    """LightningCLI's constructor builds its parser, then always parses, seeds and instantiates; this one stops
    at its ``parse_arguments`` hook, with the parser built exactly as for the command line."""

    def parse_arguments(self, parser, args) -> None:
        raise _ParserBuilt(self)


@functools.cache
def _fit_parser():
    """The ``fit`` subcommand's parser, in jsonargparse's no-exit mode (errors raise ``ArgumentError``). Built
    once per process: building it introspects every class (seconds); parsing with it is cheap and leaves it
    unchanged."""
    no_exit = {"exit_on_error": False, "default_env": False}
    try:
        _ParserOnly(args=[], parser_kwargs={**no_exit, "fit": dict(no_exit)})
    except _ParserBuilt as built:
        return built.cli._subcommand_parsers["fit"]
    raise RuntimeError("LightningCLI did not call parse_arguments")


def check_class_paths(argv) -> None:
    """Refuse the pre-rename ``callbacks.<file>.<Class>`` class paths in config files and arguments, naming the
    file:line and the new path (jsonargparse's own error would list every way a callback can be given instead)."""
    argv = [str(a) for a in argv]
    sources = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            sources.append(argv[i + 1])
        elif arg.startswith("--config="):
            sources.append(arg.split("=", 1)[1])
        elif _OLD_CALLBACK_PATH.search(arg) and not arg.startswith("--config"):
            raise InputError(f"argument {arg!r}: {_renamed(_OLD_CALLBACK_PATH.search(arg))}")
    for source in sources:
        path = Path(source)
        if not path.is_file():
            continue  # jsonargparse reports a missing config (or parses an inline YAML string)
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            match = _OLD_CALLBACK_PATH.search(line.split("#", 1)[0])
            if match:
                raise InputError(f"{path}:{lineno}: {_renamed(match)}")


def _input_error_inside(err: BaseException) -> InputError | None:
    """The first :class:`InputError` in ``err``'s chain of causes (``err`` itself included), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _renamed(match: re.Match) -> str:
    return (
        f"class path {match.group(0)} names the old top-level package; the callbacks are now "
        f"em_lightning.callbacks: write em_lightning.callbacks.{match.group(1)}.{match.group(2)}"
    )
