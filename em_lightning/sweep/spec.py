"""The sweep file and its expansion into runs.

A sweep file (YAML; examples in ``configs/sweeps/``)::

    name: tiny                        # folder under `out` (default: the file's stem)
    out: runs/sweeps                  # runs go to <out>/<name>/<run name>/ (relative to the cwd)
    base: [configs/tiny.yaml]         # config file(s) every run stacks first
    set: {trainer.max_steps: 30}      # config keys every run sets
    axes:                             # the grid: every combination of one choice per axis
      data.batch_size: [4, 8]         #   a config key and its values
      config: [configs/optim/sgd.yaml, configs/optim/adamw.yaml]   # overlay files (named by their stem)
      optimizer:                      #   zipped: each entry's keys go together (an overlay with its lr)
        - {name: sgd, config: configs/optim/sgd.yaml, model.optimizer.init_args.lr: 0.01}
        - {name: adamw, config: configs/optim/adamw.yaml, model.optimizer.init_args.lr: 0.001}
      lr_level: [low, high]           #   a label only: sets nothing itself, `rules` give it meaning
    seeds: [0, 1, 2]                  # or a count; each sets seed_everything (LoRA init) and data.seed
    rules:                            # keys for the runs whose labels match (applied after the axes)
      - {when: {optimizer: sgd, lr_level: high}, set: {model.optimizer.init_args.lr: 0.03}}
    launcher: {kind: local}           # see em_lightning.sweep.launchers.LauncherConfig

Priority, lowest first: the base files, the axes' overlay files (in axis order), ``set``, the axes' keys, the
rules, the seed. Keys ``launcher.<field>`` in ``set``-like places (zipped entries, rules) change the launcher
for those runs only (e.g. more GPUs or time for a larger model). A key ``trainer.callbacks.<arg>`` sets ``<arg>``
of the last callback the stacked files give (as ``--trainer.callbacks.<arg>`` does on the command line), e.g.
``{name: steer, config: configs/mitigations/steer.yaml, trainer.callbacks.direction: v.safetensors}``. Paths are relative to the working directory,
like ``--config`` of the training CLI. Every error names the sweep file, its line and the key.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from em_lightning.errors import InputError, read_text

TOP_KEYS = ("name", "out", "base", "set", "axes", "seeds", "rules", "launcher", "description")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepError(InputError):
    """A sweep file (or a run dir it points at) that cannot be used; names the file:line and the key."""


@dataclass(frozen=True)
class Choice:
    """One value of an axis: its label (in the run's dir name and ``values``) and what it sets."""

    label: str
    configs: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    label: str
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class Rule:
    when: dict[str, tuple[str, ...]]
    where: str  # file:line, for "matches no run"
    configs: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """One run before resolution: its name, labels and what it stacks on the base."""

    name: str
    values: dict[str, Any]
    configs: tuple[str, ...]
    overrides: dict[str, Any]
    launcher: dict[str, Any]


@dataclass
class Sweep:
    path: Path
    name: str
    out: Path
    base: tuple[str, ...]
    set: dict[str, Any]
    axes: list[Axis]
    seeds: list[int] | None
    rules: list[Rule]
    launcher: dict[str, Any]
    lines: dict[tuple, int]

    @property
    def root(self) -> Path:
        return self.out / self.name

    def where(self, *path) -> str:
        """``file:line: dotted.key`` for error messages."""
        line = None
        for n in range(len(path), 0, -1):  # the deepest part of the path that has a line
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                break
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        return f"{self.path}:{line}: {key}" if line else f"{self.path}: {key}"

    def runs(self) -> list[RunSpec]:
        """Every run of the grid (axes in file order, seeds last), with the rules applied."""
        runs, used = [], [False] * len(self.rules)
        seeds = self.seeds if self.seeds is not None else [None]
        for combo in itertools.product(*(a.choices for a in self.axes)):
            for seed in seeds:
                labels = {a.label: c.label for a, c in zip(self.axes, combo)}
                if seed is not None:
                    labels["seed"] = str(seed)
                configs = [f for c in combo for f in c.configs]
                overrides, launcher = dict(self.set), {}
                for choice in combo:
                    overrides.update(choice.overrides)
                    launcher.update(choice.launcher)
                for i, rule in enumerate(self.rules):
                    if all(labels.get(k) in v for k, v in rule.when.items()):
                        used[i] = True
                        configs += rule.configs
                        overrides.update(rule.overrides)
                        launcher.update(rule.launcher)
                if seed is not None:
                    overrides.update({"seed_everything": seed, "data.seed": seed})
                name = ",".join(f"{k}={v}" for k, v in labels.items()) or "default"
                values = {k: _value(v) for k, v in labels.items()}
                runs.append(RunSpec(name, values, tuple(configs), overrides, launcher))
        for rule, hit in zip(self.rules, used):
            if not hit:
                raise SweepError(f"{rule.where}: matches no run of the grid (check the labels)")
        return runs


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and check a sweep file; ``out`` overrides its ``out``."""
    path = Path(path)
    text = read_text(path, "sweep file")
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SweepError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise SweepError(
            f"{path}: a sweep file is a mapping (name, base, axes, ...), not {type(raw).__name__}"
        )
    sweep = Sweep(path, path.stem, Path("runs/sweeps"), (), {}, [], None, [], {}, lines)
    for key in raw:
        if key not in TOP_KEYS:
            raise SweepError(f"{sweep.where(key)}: unknown key; a sweep file has {', '.join(TOP_KEYS)}")
    sweep.name = str(raw.get("name") or path.stem)
    if _SAFE.sub("", sweep.name) != sweep.name or sweep.name.startswith("."):
        raise SweepError(f"{sweep.where('name')}: {sweep.name!r} is not a plain folder name")
    sweep.out = Path(out if out is not None else raw.get("out") or "runs/sweeps")
    sweep.base = tuple(_files(sweep, raw.get("base"), ("base",), required=True))
    sweep.set = _keys(sweep, raw.get("set") or {}, ("set",), allow=())[0]
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise SweepError(f"{sweep.where('axes')}: a mapping of axis name to its list of values")
    sweep.axes = [_axis(sweep, key, values) for key, values in axes.items()]
    sweep.seeds = _seeds(sweep, raw.get("seeds"))
    labels = [a.label for a in sweep.axes] + (["seed"] if sweep.seeds is not None else [])
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise SweepError(f"{sweep.where('axes')}: two axes are labelled {dup!r} in run names; rename one")
    sweep.rules = [
        _rule(sweep, i, r, dict(zip(labels, [None] * len(labels))))
        for i, r in enumerate(raw.get("rules") or [])
    ]
    launcher = raw.get("launcher") or {}
    if not isinstance(launcher, dict):
        raise SweepError(f"{sweep.where('launcher')}: a mapping (kind: local | slurm, ...)")
    sweep.launcher = launcher
    return sweep


# ------------------------------------------------------------------------------------------------ parts
def _axis(sweep: Sweep, key: str, values) -> Axis:
    path = ("axes", key)
    if not isinstance(values, list) or not values:
        raise SweepError(f"{sweep.where(*path)}: an axis is a non-empty list of values")
    if key == "config":  # overlay files, named by their stem
        files = _files(sweep, values, path, required=True)
        choices = [Choice(_label(Path(f).stem), configs=(f,)) for f in files]
    elif all(isinstance(v, dict) for v in values) and "." not in key:  # zipped entries
        choices = []
        for i, entry in enumerate(values):
            overrides, configs, launcher, name = _keys(sweep, entry, (*path, i), allow=("name", "config"))
            if name is None:  # the entry's values, in order, make its label
                parts = [Path(f).stem for f in configs] + [_label(v) for v in overrides.values()]
                name = "-".join(parts) or str(i)
            choices.append(Choice(_label(name), tuple(configs), overrides, launcher))
    elif any(isinstance(v, dict) for v in values) and "." not in key:
        raise SweepError(
            f"{sweep.where(*path)}: mix of mappings and plain values; a zipped axis lists mappings"
        )
    elif "." in key or key in ("seed_everything",):  # a config key
        if key.startswith("launcher."):
            choices = [Choice(_label(v), launcher={key.split(".", 1)[1]: v}) for v in values]
        else:
            choices = [Choice(_label(v), overrides={key: v}) for v in values]
    else:  # a label the rules give meaning to
        choices = [Choice(_label(v)) for v in values]
    labels = [c.label for c in choices]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise SweepError(
                f"{sweep.where(*path, i)}: two values give the run-name label {label!r}; "
                "name them (zipped entries take `name:`)"
            )
    short = key.rsplit(".", 1)[-1] if "." in key else key
    return Axis(short, tuple(choices))


def _keys(sweep: Sweep, entry, path: tuple, allow: tuple[str, ...]):
    """(config overrides, overlay files, launcher overrides, name) of a mapping of keys."""
    if not isinstance(entry, dict):
        raise SweepError(f"{sweep.where(*path)}: a mapping of config keys to values")
    overrides, launcher, configs, name = {}, {}, [], None
    for key, value in entry.items():
        if key == "name" and "name" in allow:
            name = str(value)
        elif key == "config" and "config" in allow:
            configs = _files(sweep, value, (*path, key), required=False)
        elif key.startswith("launcher."):
            launcher[key.split(".", 1)[1]] = value
        elif key in ("name", "config"):
            raise SweepError(f"{sweep.where(*path, key)}: not allowed here")
        else:
            overrides[str(key)] = value
    return overrides, configs, launcher, name


def _rule(sweep: Sweep, i: int, rule, labels: dict) -> Rule:
    path = ("rules", i)
    if not isinstance(rule, dict) or not isinstance(rule.get("when"), dict) or not rule["when"]:
        raise SweepError(f"{sweep.where(*path)}: a rule is {{when: {{axis: value, ...}}, set: {{...}}}}")
    extra = set(rule) - {"when", "set", "config"}
    if extra:
        raise SweepError(f"{sweep.where(*path, min(extra))}: unknown key; a rule has when, set, config")
    when = {}
    for label, value in rule["when"].items():
        if label not in labels:
            raise SweepError(
                f"{sweep.where(*path, 'when', label)}: no axis is labelled {label!r} "
                f"(labels: {', '.join(labels)})"
            )
        when[label] = tuple(_label(v) for v in (value if isinstance(value, list) else [value]))
    overrides, _, launcher, _ = _keys(sweep, rule.get("set") or {}, (*path, "set"), allow=())
    configs = _files(sweep, rule.get("config"), (*path, "config"), required=False)
    return Rule(when, sweep.where(*path), tuple(configs), overrides, launcher)


def _files(sweep: Sweep, value, path: tuple, required: bool) -> list[str]:
    if value is None and not required:
        return []
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise SweepError(f"{sweep.where(*path)}: a config file path or a list of them")
    for i, item in enumerate(items):
        if not Path(item).is_file():
            sub = (*path, i) if isinstance(value, list) else path
            raise SweepError(
                f"{sweep.where(*sub)}: {item} does not exist (paths are relative to the working "
                f"directory, {Path.cwd()})"
            )
    return list(items)


def _seeds(sweep: Sweep, value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
        and len(set(value)) == len(value)
    ):
        return list(value)
    raise SweepError(f"{sweep.where('seeds')}: a count (seeds: 5) or a list of distinct integers")


def _label(value) -> str:
    """A value as it appears in a run's dir name: short and safe in paths and shells."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return _SAFE.sub("-", text.replace("/", "-").replace(":", "-")).strip("-") or "_"


def _value(label: str):
    """The label as a number where it reads as one (values in run.json and the analysis table)."""
    for cast in (int, float):
        try:
            return cast(label)
        except ValueError:
            pass
    return label


def _line_map(node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Key path → 1-based line of every mapping key and list item of the YAML document."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _line_map(item, (*path, i), out)
    return out
