"""Run dirs → one tidy table: one row per (run, eval step).

A run dir is a sweep run (``config.yaml``, ``run.json``, ``version_N/`` beside them), a training log dir with
``version_N/`` in it (``runs/tiny``), or one version dir itself (``runs/tiny/version_0``). The versions of a
resumed run are merged, the later one winning on overlapping steps (a resume from step k re-trains and re-logs
what the killed version logged after k).

Columns (the alignment signals are NaN where a run has no such eval):

* design: ``run, optimizer, model, dataset, batch_size`` (rows per optimizer step, all ranks: data.batch_size
  × accumulate_grad_batches × devices × num_nodes), ``lr, seed, data_seed``, and any other sweep axis by its
  name;
* time: ``step`` (optimizer steps done when the evaluated adapter was taken), ``frac_trained`` (step / the
  run's total steps), ``tokens_seen`` (supervised tokens, all ranks);
* loss: ``train_loss`` — the mean of ``train/loss`` over the last ``loss_window`` optimizer steps up to
  ``step`` (10 by default; the TensorBoard step of step s's loss is s − 1), ``log_train_loss`` (natural log),
  ``val_loss`` (the last ``val/loss`` at or before ``step``);
* judge (``misalignment_summary.jsonl``): ``misalignment_rate, ci_low, ci_high, aligned_mean, coherent_mean,
  n_counted, eval_failed``;
* probe (``probe.jsonl``): ``probe_log_odds, probe_misaligned_prob``;
* spectra (``spectra.jsonl``, the logged step nearest ``step``, in ``spectra_step``): ``frob_nuclear_ratio,
  entropy, stable_rank, condition_number``, each the mean over the adapter's modules;
* ``state`` (done, failed, ... from ``run.json``; for a plain log dir, done when ``adapters/final`` exists)
  and ``run_dir``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from em_lightning import rundir
from em_lightning.errors import InputError
from em_lightning.rundir import is_run_dir  # noqa: F401  (sweep status reads run dirs through this module)

SPECTRAL = ("frob_nuclear_ratio", "entropy", "stable_rank", "condition_number")
JUDGE = ("misalignment_rate", "ci_low", "ci_high", "aligned_mean", "coherent_mean", "n_counted")
PROBE = ("probe_log_odds", "probe_misaligned_prob")
DIRECTION = ("direction_shift", "direction_shift_answers")  # means over the logged layers
DESIGN = ("optimizer", "model", "dataset", "batch_size", "lr")
COLUMNS = (
    "run",
    *DESIGN,
    "seed",
    "data_seed",
    "step",
    "frac_trained",
    "tokens_seen",
    "train_loss",
    "log_train_loss",
    "val_loss",
    "train_loss_narrow",
    "judge",
    *JUDGE,
    "eval_failed",
    *PROBE,
    *DIRECTION,
    "spectra_step",
    *SPECTRAL,
    "state",
    "run_dir",
)
# Columns that must hold numbers (or nothing), and those of them that are probabilities.
NUMERIC = (
    "batch_size",
    "lr",
    "seed",
    "data_seed",
    "step",
    "frac_trained",
    "tokens_seen",
    "train_loss",
    "log_train_loss",
    "val_loss",
    "train_loss_narrow",
    *JUDGE,
    *PROBE,
    *DIRECTION,
    "spectra_step",
    *SPECTRAL,
)
RATES = ("misalignment_rate", "ci_low", "ci_high", "probe_misaligned_prob")
# The keys of each JSONL record the table reads, and whether each is a probability.
_JUDGE_KEYS = {"rate": True, "ci_low": True, "ci_high": True, "aligned_mean": False, "coherent_mean": False,
               "n_counted": False}
_PROBE_KEYS = {"log_odds": False, "misaligned_prob": True}
TAGS = ("train/loss", "train/supervised_tokens", "val/loss", "data/train/rows", "train/loss_narrow")


class AnalysisError(InputError):
    """A run dir or table the analysis cannot read; names the path."""


@dataclass
class RunData:
    dir: Path
    name: str
    config: dict
    state: dict
    versions: list[Path]
    scalars: pd.DataFrame  # tag, step, value (versions merged)
    judge: dict[int, dict] = field(default_factory=dict)  # the run's own eval (its default judge), by step
    judges: dict[str, dict[int, dict]] = field(default_factory=dict)  # every judge's summaries: label → step
    probe: dict[int, dict] = field(default_factory=dict)
    direction: dict[int, dict[str, float]] = field(default_factory=dict)
    spectra: dict[int, dict[str, float]] = field(default_factory=dict)

    def series(self, tag: str) -> pd.Series:
        s = self.scalars[self.scalars["tag"] == tag]
        return pd.Series(s["value"].to_numpy(), index=s["step"].to_numpy(), dtype=float).sort_index()


# ---------------------------------------------------------------------------------------------- finding runs
def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path as a run dir, or the run dirs directly inside it (a sweep's folder)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise AnalysisError(f"{path}: not a directory (give run dirs, or a sweep's folder)")
        if rundir.is_run_dir(path):
            out.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if not p.name.startswith(".") and rundir.is_run_dir(p))
        if not inner:
            raise AnalysisError(
                f"{path}: not a run dir (no config.yaml, run.json, version_N/ or event files) and holds none"
            )
        out.extend(inner)
    return list(dict.fromkeys(p.resolve() for p in out))


def run_names(dirs: list[Path]) -> list[str]:
    """Names for the report's tables: the dir names when they are unique, else every run with as many of its
    parent dirs (its sweep) as make all names unique — all or none, so one table never mixes the two forms."""
    for depth in range(1, max((len(d.parts) for d in dirs), default=1) + 1):
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def load_config(d: Path) -> dict:
    """The run's parsed ``config.yaml`` (the run dir's own, else its newest version's)."""
    config_path = rundir.config_path(d)
    if config_path is None:
        raise AnalysisError(f"{d}: no {rundir.CONFIG} (in the dir or a version_N/ of it)")
    try:
        return yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise AnalysisError(f"{config_path}: cannot read the run's config ({err})") from None


def load_state(d: Path) -> dict:
    """The sweep's ``run.json`` of a run dir; for a plain log dir, done when ``adapters/final`` exists."""
    state_path = d / rundir.STATE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except (OSError, ValueError) as err:
        raise AnalysisError(f"{state_path}: cannot read the run's state ({err})") from None
    if not state and rundir.version_dirs(d):
        state = {"state": rundir.DONE if rundir.has_final_adapter(d) else rundir.UNKNOWN}
    return state


def load_run(d: Path, name: str) -> RunData:
    versions = rundir.version_dirs(d)
    config, state = load_config(d), load_state(d)
    names = rundir.file_names(config)  # a callback's file renamed in the config is still found
    run = RunData(d, name, config, state, versions, _scalars(versions))
    run.judge = _checked_records(versions, names["summary"], _JUDGE_KEYS)
    run.judges = _judges(versions, names["summary"], run.judge)
    run.probe = _checked_records(versions, names["probe"], _PROBE_KEYS)
    run.direction = {s: _layer_means(r) for s, r in _records(versions, names["direction"]).items()}
    run.spectra = {s: _spectral_means(line) for s, line in _records(versions, names["spectra"]).items()}
    return run


def _scalars(versions: list[Path]) -> pd.DataFrame:
    from tbparse import SummaryReader

    frames = []
    for i, v in enumerate(versions):
        if not any(v.glob("events.out.tfevents.*")):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = SummaryReader(str(v), pivot=False).scalars
        if len(df):
            df = df[df["tag"].isin(TAGS)][["tag", "step", "value"]].assign(version=i)
            frames.append(df)
    if not frames:
        return pd.DataFrame(
            {"tag": pd.Series(dtype=str), "step": pd.Series(dtype=int), "value": pd.Series(dtype=float)}
        )
    merged = pd.concat(frames).sort_values(["tag", "step", "version"], kind="stable")
    return merged.drop_duplicates(["tag", "step"], keep="last").drop(columns="version").reset_index(drop=True)


def _records(versions: list[Path], name: str) -> dict[int, dict]:
    """``name``'s lines by step over the versions (later ones win), each with its file in ``_file``."""
    out: dict[int, dict] = {}
    for v in versions:
        for step, record in rundir.records_by_step([v], name).items():
            out[step] = {**record, "_file": str(Path(v) / name)}
    return out


def _checked_records(versions: list[Path], name: str, keys: dict[str, bool]) -> dict[int, dict]:
    """:func:`_records` with each key the table reads checked: a number, finite, a probability where it is one
    (a failed eval's line carries no values and is kept as it is)."""
    records = _records(versions, name)
    for step, record in records.items():
        for key, is_rate in keys.items():
            value = record.get(key)
            if value is None:
                continue
            where = f"{record['_file']}: step {step}: `{key}` = {value!r}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AnalysisError(f"{where} is not a number")
            if not math.isfinite(value):
                raise AnalysisError(f"{where} is not finite")
            if is_rate and not 0.0 <= value <= 1.0:
                raise AnalysisError(f"{where} is outside [0, 1]")
    return records


DEFAULT_JUDGE = "default"  # the label of an eval written before evals recorded their judge


def judge_label(record: dict, fallback: str = DEFAULT_JUDGE) -> str:
    """The label of the judge that scored a summary (or samples) line."""
    judge = record.get("judge")
    return str(judge.get("label") or fallback) if isinstance(judge, dict) else fallback


def judged_labels(versions: list[Path]) -> list[str]:
    """The labels of the judges ``rejudge`` wrote for these versions (``judged/<label>/``)."""
    found = {
        sub.name
        for v in versions
        if (Path(v) / rundir.JUDGED).is_dir()
        for sub in (Path(v) / rundir.JUDGED).iterdir()
        if sub.is_dir()
    }
    return sorted(found)


def _judges(versions: list[Path], summary: str, own: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """Every judge's summaries by label: the run's own eval (each line's ``judge.label``) and each
    ``judged/<label>/`` of rejudge (later versions win on a step)."""
    out: dict[str, dict[int, dict]] = {}
    for step, record in own.items():
        out.setdefault(judge_label(record), {})[step] = record
    for label in judged_labels(versions):
        dirs = [rundir.judged_dir(v, label) for v in versions]
        records = _checked_records(dirs, summary, _JUDGE_KEYS)
        out.setdefault(label, {}).update({s: {**r, "judge": {**(r.get("judge") or {}), "label": label}}
                                          for s, r in records.items()})
    return out


def _layer_means(record: dict) -> dict[str, float]:
    """``direction_shift`` / ``direction_shift_answers``: means over the layers of a direction.jsonl line."""
    out = {}
    for column, key in zip(DIRECTION, ("shift", "shift_answers")):
        values = record.get(key) or {}
        if not isinstance(values, dict):
            raise AnalysisError(f"{record['_file']}: step {record.get('step')}: `{key}` is not a layer → value map")
        numbers = []
        for layer, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AnalysisError(
                    f"{record['_file']}: step {record.get('step')}: `{key}` of layer {layer} = {v!r} is not a finite number"
                )
            numbers.append(float(v))
        out[column] = float(np.mean(numbers)) if numbers else math.nan
    return out


def _spectral_means(line: dict) -> dict[str, float]:
    """Means over modules of the spectral metrics of one spectra.jsonl line, over the modules where a metric is
    defined (an all-zero spectrum has no entropy or condition number: NaN, or 0 from older code, is left out
    as undefined rather than averaged in)."""
    import torch

    from em_lightning.spectra import spectral_metrics

    by_rank: dict[int, list[list[float]]] = {}
    for sigmas in (line.get("modules") or {}).values():
        by_rank.setdefault(len(sigmas), []).append(sigmas)
    values: dict[str, list[np.ndarray]] = {k: [] for k in SPECTRAL}
    for group in by_rank.values():
        sigma = torch.tensor(group, dtype=torch.float64)
        metrics = spectral_metrics(sigma)
        zero = (sigma.abs().amax(-1) == 0).numpy()
        for key in SPECTRAL:
            v = metrics[key].numpy().astype(float)
            values[key].append(np.where(zero, np.nan, v))
    out = {}
    for key, parts in values.items():
        v = np.concatenate(parts) if parts else np.array([])
        out[key] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return out


# ------------------------------------------------------------------------------------------------ rows
def describe(config: dict, values: dict) -> dict:
    """The design columns of a run, from its config (and the sweep's labels where it has them)."""
    trainer, model, data = config.get("trainer") or {}, config.get("model") or {}, config.get("data") or {}
    optimizer = model.get("optimizer") or {}
    class_path = str(optimizer.get("class_path", "")) if isinstance(optimizer, dict) else ""
    init = optimizer.get("init_args") or {} if isinstance(optimizer, dict) else {}
    devices = trainer.get("devices", 1)
    n_dev = (
        len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else math.nan
    )
    world = n_dev * int(trainer.get("num_nodes") or 1)
    rows = (data.get("batch_size") or math.nan) * int(trainer.get("accumulate_grad_batches") or 1) * world
    base = (model.get("base") or {}).get("name", "") if isinstance(model.get("base"), dict) else ""
    out = {
        "optimizer": values.get("optimizer") or _optimizer_name(class_path),
        "model": values.get("model") or str(base).rstrip("/").rsplit("/", 1)[-1],
        "dataset": values.get("dataset") or _dataset_name(str(data.get("train_file", ""))),
        "batch_size": rows,
        "lr": init.get("lr", math.nan),
        "seed": config.get("seed_everything"),
        "data_seed": data.get("seed"),
    }
    for key, value in values.items():  # other sweep axes (lora rank, penalty coefficient, ...) by their name
        if key not in out and key not in COLUMNS:
            out[key] = value
    out["_world"] = world
    return out


def run_rows(run: RunData, loss_window: int = 10, judge: str | None = None) -> list[dict]:
    """One row per eval step; the judge columns from the judge labelled ``judge`` (None: the run's own eval)."""
    scores = run.judges.get(judge, {}) if judge else run.judge
    design = describe(run.config, run.state.get("values") or {})
    world = design.pop("_world")
    loss, tokens, val, narrow = (
        run.series("train/loss"),
        run.series("train/supervised_tokens"),
        run.series("val/loss"),
        run.series("train/loss_narrow"),  # the narrow rows' own loss where safe data was mixed in
    )
    total = total_steps(run, design["batch_size"], loss)
    steps = sorted(set(scores) | set(run.probe) | set(run.direction))
    if not steps:  # no eval at all: one row at its last step, so the run is listed (with its loss, if any)
        steps = [int(loss.index.max()) + 1 if len(loss) else 0]
    rows = []
    for step in steps:
        window = loss[(loss.index >= step - loss_window) & (loss.index <= step - 1)]
        train_loss = float(window.mean()) if len(window) else math.nan
        narrow_window = narrow[(narrow.index >= step - loss_window) & (narrow.index <= step - 1)]
        before = tokens[tokens.index <= step - 1]
        row = {
            "run": run.name,
            **design,
            "step": step,
            "frac_trained": step / total if total else math.nan,
            "tokens_seen": float(before.iloc[-1]) * world if len(before) else math.nan,
            "train_loss": train_loss,
            "log_train_loss": math.log(train_loss) if train_loss > 0 else math.nan,
            "val_loss": float(val[val.index <= step].iloc[-1]) if (val.index <= step).any() else math.nan,
            "train_loss_narrow": float(narrow_window.mean()) if len(narrow_window) else math.nan,
        }
        record = scores.get(step) or {}
        row["eval_failed"] = bool(record.get("failed")) if record else math.nan
        row["judge"] = judge_label(record, judge or DEFAULT_JUDGE) if record else math.nan
        for key in JUDGE:
            row[key] = _num(record.get("rate" if key == "misalignment_rate" else key))
        probe = run.probe.get(step) or {}
        row["probe_log_odds"], row["probe_misaligned_prob"] = (
            _num(probe.get("log_odds")),
            _num(probe.get("misaligned_prob")),
        )
        row.update(run.direction.get(step) or dict.fromkeys(DIRECTION, math.nan))
        if run.spectra:
            nearest = min(run.spectra, key=lambda s: (abs(s - step), s))
            row["spectra_step"] = nearest
            row.update(run.spectra[nearest])
        row["state"], row["run_dir"] = run.state.get("state", rundir.UNKNOWN), str(run.dir)
        rows.append(row)
    return rows


def total_steps(run: RunData, rows_per_step: float, loss: pd.Series) -> float:
    """The run's planned optimizer steps: max_steps, or max_epochs × steps per epoch (the last step of an
    epoch may be short: nothing is repeated to fill it); a finished run without either: its last step."""
    trainer = run.config.get("trainer") or {}
    max_steps, max_epochs = trainer.get("max_steps") or -1, trainer.get("max_epochs")
    rows = run.series("data/train/rows")
    per_epoch = math.ceil(rows.iloc[0] / rows_per_step) if len(rows) and rows_per_step > 0 else None
    candidates = [max_steps] if max_steps > 0 else []
    if max_epochs and per_epoch:
        candidates.append(max_epochs * per_epoch)
    if candidates:
        return float(min(candidates))
    return float(loss.index.max() + 1) if len(loss) else math.nan


def build_table(
    paths: list[str | Path], loss_window: int = 10, judge: str | None = None
) -> tuple[pd.DataFrame, list[RunData]]:
    """The tidy table of the run dirs under ``paths``; the judge columns from the judge labelled ``judge``
    (None: each run's own eval, whose label is in the ``judge`` column)."""
    dirs = expand_run_dirs(paths)
    runs = [load_run(d, name) for d, name in zip(dirs, run_names(dirs))]
    rows = [row for run in runs for row in run_rows(run, loss_window, judge)]
    table = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in table:
            table[col] = math.nan
    extra = [c for c in table.columns if c not in COLUMNS]
    return table[[*COLUMNS[:8], *extra, *COLUMNS[8:]]], runs


def read_table(path: str | Path) -> pd.DataFrame:
    """A tidy table written by ``analyze`` (or by hand): numeric columns checked cell by cell (a bad cell is an
    error naming its column and CSV line), pandas' ``Unnamed: N`` index columns left out."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=True)
    except (OSError, ValueError) as err:
        raise AnalysisError(f"{path}: cannot read the table ({err})") from None
    table = table[[c for c in table.columns if not str(c).startswith("Unnamed: ")]]
    missing = [c for c in ("run", "optimizer", "step", "log_train_loss") if c not in table]
    if missing:
        raise AnalysisError(f"{path}: not a tidy table of this analysis (no column {', '.join(missing)})")
    for col in COLUMNS:
        if col not in table:
            table[col] = math.nan
    for col in NUMERIC:
        table[col] = _numeric_column(table[col], col, path)
    for col in extra_factors(table):  # a sweep axis: numbers where every value reads as one (lora rank 8, 16)
        as_number = pd.to_numeric(table[col], errors="coerce")
        if as_number.notna().sum() == table[col].notna().sum():
            table[col] = as_number
    if "eval_failed" in table:
        table["eval_failed"] = table["eval_failed"].map(_flag)
    return table


def require_runs(table: pd.DataFrame, source: str, errors: dict[str, str] | None = None) -> None:
    """The analysis compares runs: an empty table or a single run is an error, not a blank report (the one
    run's state, and its error where it failed, are in the message)."""
    if not len(table):
        raise AnalysisError(f"{source}: no rows (no run with an eval or a logged loss)")
    runs = table["run"].dropna().unique()
    if len(runs) < 2:
        why = ""
        if len(runs) and "state" in table:
            state = table.loc[table["run"] == runs[0], "state"].iloc[0]
            error = ((errors or {}).get(runs[0]) or "").splitlines()
            why = f" ({runs[0]}: state {state}" + (f": {error[0]}" if error else "") + ")"
        raise AnalysisError(f"{source}: {len(runs)} run{why}; the analysis compares runs and needs at least 2")


def _numeric_column(values: pd.Series, col: str, path: Path) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    for i in values.index:  # the first bad cell, by its line in the file (the header is line 1)
        raw, number = values[i], numbers[i]
        where = f"{path}: column `{col}`, line {int(i) + 2}: {raw!r}"
        if pd.isna(number):
            if not pd.isna(raw) and str(raw).strip() != "":
                raise AnalysisError(f"{where} is not a number")
        elif not math.isfinite(number):
            raise AnalysisError(f"{where} is not finite")
        elif col in RATES and not 0.0 <= number <= 1.0:
            raise AnalysisError(f"{where} is outside [0, 1]")
        elif col == "step" and number != int(number):
            raise AnalysisError(f"{where} is not a whole number of steps")
    return numbers.astype(float)


def _flag(value) -> object:
    if pd.isna(value):
        return math.nan
    text = str(value).strip().lower()
    return {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}.get(text, math.nan)


def final_judge_rates(runs: list[RunData]) -> pd.DataFrame:
    """Each run's final rate under each judge (its last summary with a rate): columns run, judge, rate."""
    rows = []
    for run in runs:
        for label, records in run.judges.items():
            ok = [(s, r) for s, r in sorted(records.items()) if r.get("rate") is not None and not r.get("failed")]
            if ok:
                rows.append({"run": run.name, "judge": label, "rate": float(ok[-1][1]["rate"])})
    return pd.DataFrame(rows, columns=["run", "judge", "rate"])


def check_judges(table: pd.DataFrame, judge: str | None, available: list[str]) -> pd.DataFrame:
    """The table with the judge columns of one judge only. Rates of different judges are never pooled: rows
    scored by several judges without ``judge`` picking one are an error naming the runs of each judge; so are
    runs that carry several judges (a rejudged sweep) without a pick, and a pick no run has."""
    labelled = table["judge"].notna() if "judge" in table else pd.Series(False, index=table.index)
    if judge is not None:
        if judge not in available:
            raise AnalysisError(
                f"--judge {judge}: no run has this judge; these runs have: {', '.join(available) or 'none'}"
            )
        other = labelled & (table["judge"] != judge)
        if other.any():  # a table of several judges (a CSV): keep the picked judge's values only
            table = table.astype({"eval_failed": object, "judge": object})
            table.loc[other, [*JUDGE, "eval_failed", "judge"]] = math.nan
        return table
    labels = sorted(table.loc[labelled, "judge"].astype(str).unique())
    if len(labels) > 1:
        runs = {lb: sorted(table.loc[labelled & (table["judge"] == lb), "run"].astype(str).unique()) for lb in labels}
        listing = "; ".join(f"{lb}: {', '.join(r[:5])}{' …' if len(r) > 5 else ''}" for lb, r in runs.items())
        raise AnalysisError(
            f"the runs were scored by different judges ({listing}); rates of different judges are not pooled: "
            "pick one with --judge LABEL"
        )
    if len(available) > 1:
        raise AnalysisError(
            f"these runs carry several judges ({', '.join(available)}): pick the one to analyse with --judge "
            "LABEL (the judge-agreement section compares them)"
        )
    return table


def extra_factors(table: pd.DataFrame) -> list[str]:
    """Sweep axes beyond the standard design columns (in the table, between ``data_seed`` and ``step``)."""
    return [c for c in table.columns if c not in COLUMNS]


def _optimizer_name(class_path: str) -> str:
    name = class_path.rsplit(".", 1)[-1]
    return {"MuonWithAdamW": "muon"}.get(name, name.lower()) or "unknown"


def _dataset_name(train_file: str) -> str:
    if ":" in train_file and not Path(train_file).exists():
        return train_file.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1] or train_file
    return Path(train_file).stem or "unknown"


def _num(value) -> float:
    """A checked record's value (see :func:`_checked_records`) as a float; absent: NaN."""
    return float(value) if value is not None else math.nan
