"""A run's full config, resolved by the training CLI's own parser, and its hash.

The ``fit`` parser of the training CLI (:func:`em_lightning.cli.resolve_fit_config`, the text ``fit ...
--print_config`` would print) stacks the base files, the overlays and the run's keys, so a run's ``config.yaml``
is exactly what ``python -m em_lightning fit --config <run>/config.yaml`` trains, and an unknown key or a bad
value is the parser's error, prefixed with the run it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from em_lightning import rundir
from em_lightning.errors import InputError
from em_lightning.sweep.spec import RunSpec, Sweep, SweepError

# Where a run writes: not part of what it trains, so not part of its hash (a moved sweep keeps its hashes).
OUTPUT_KEYS = (
    ("trainer", "default_root_dir"),
    ("trainer", "logger", "init_args", "save_dir"),
    ("trainer", "logger", "init_args", "name"),
    ("trainer", "logger", "init_args", "version"),
    ("ckpt_path",),
)


# ``trainer.callbacks.<arg>`` in a sweep file sets ``<arg>`` of the last callback of the stacked files, as
# ``--trainer.callbacks.<arg>`` does on the command line (a YAML key cannot address one entry of the list): e.g.
# the direction file of the steering overlay that a `mitigation` axis entry adds.
LAST_CALLBACK = "trainer.callbacks."


@dataclass(frozen=True)
class Resolved:
    run: RunSpec
    dir: Path
    text: str  # the config.yaml to write
    config: dict
    hash: str


def resolve(sweep: Sweep, run: RunSpec) -> Resolved:
    run_dir = (sweep.root / run.name).resolve()
    last_callback = {k: v for k, v in run.overrides.items() if k.startswith(LAST_CALLBACK)}
    overlay = nested({**_without(run.overrides, last_callback), **output_keys(run_dir)})
    with tempfile.TemporaryDirectory(prefix="em-sweep-") as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
        files = [*sweep.base, *run.configs, str(path)]
        args = [a for f in files for a in ("--config", f)]
        # after every file: the training CLI's own form, an init arg of the last callback in the list
        args += [f"--{key}={_cli_value(value)}" for key, value in last_callback.items()]
        text, config = _resolve_config(sweep, run, args)
    logger = (config.get("trainer") or {}).get("logger")
    if not (isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("TensorBoardLogger")):
        raise SweepError(
            f"{sweep.path}: run {run.name}: trainer.logger must be a TensorBoardLogger (the analysis "
            f"reads its event files and every run dir is its save_dir); the config gives {logger!r}"
        )
    header = (
        f"# Run {run.name} of sweep {sweep.name} ({sweep.path}), written by `python -m em_lightning sweep`.\n"
        f"# Train it alone: python -m em_lightning fit --config {run_dir / rundir.CONFIG}\n"
    )
    return Resolved(run, run_dir, header + text, config, config_hash(config))


def output_keys(run_dir: Path) -> dict[str, Any]:
    return {
        "trainer.default_root_dir": str(run_dir),
        "trainer.logger.init_args.save_dir": str(run_dir),
        "trainer.logger.init_args.name": "",  # versions directly in the run dir: <run>/version_N/
        "trainer.logger.init_args.version": None,
    }


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(_strip(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, limit: int = 3) -> list[str]:
    """``key: old → new`` for the first keys (outputs excluded) where two configs differ."""
    a, b = _flat(_strip(old)), _flat(_strip(new))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    return [f"{k}: {a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r}" for k in keys[:limit]] + (
        [f"... {len(keys) - limit} more"] if len(keys) > limit else []
    )


def nested(dotted: dict[str, Any]) -> dict:
    """``{"a.b": 1, "a.c": 2}`` → ``{"a": {"b": 1, "c": 2}}`` (later keys win; dict values merge)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def _resolve_config(sweep: Sweep, run: RunSpec, config_args: list[str]) -> tuple[str, dict]:
    from em_lightning.cli import ConfigRejected, resolve_fit_config  # Lightning and the module: only here

    try:
        return resolve_fit_config(config_args)
    except ConfigRejected as error:
        reason = str(error)
        reason = reason if len(reason) <= 600 else reason[:600] + " ..."
        raise SweepError(
            f"{sweep.path}: run {run.name}: the training CLI rejects its config: {reason}"
        ) from None
    except InputError as error:  # the CLI's own checks (e.g. an old class path), already naming file:line
        raise SweepError(f"{sweep.path}: run {run.name}: {error}") from None


def _cli_value(value) -> str:
    """A value as a command-line argument: a string as it is (the parser keeps quotes of a str-typed
    argument), anything else as JSON, which the parser reads as YAML."""
    return value if isinstance(value, str) else json.dumps(value)


def _without(mapping: dict, keys) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def _strip(config: dict) -> dict:
    config = json.loads(json.dumps(config, default=str))
    for path in OUTPUT_KEYS:
        node = config
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return config


def _flat(node, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
