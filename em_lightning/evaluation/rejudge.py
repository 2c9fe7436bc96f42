"""``python -m em_lightning rejudge``: score saved answers again with another judge, without generating them again.

    python -m em_lightning rejudge runs/my_sweep --config configs/judges/gpt4o.yaml
    python -m em_lightning rejudge runs/tiny/version_0/misalignment_samples.jsonl \\
        --judge.label smol-digits --judge.number_tokens digits --judge.answer_prefix "Score: " \\
        --judge_server.model smollm2-135m-instruct

Inputs (``paths``): samples files, run dirs (every ``version_N``) or sweep dirs (every run in them). For each
version dir the output goes to ``version_N/judged/<judge.label>/`` (:func:`em_lightning.rundir.judged_dir`): the
samples file and the summary file, under the names the run's ``config.yaml`` gives them — the layout the
in-training eval writes, so ``analyze`` reads them like the first judge's. The original files are only read.

* Every answer is scored again, those the first judge counted as incoherent or refused included (the coherence
  filter is part of what two judges are compared on). Lines with no answer (a refused generation request) and
  failure lines are skipped.
* The judge prompts come from the question file named in the run's ``config.yaml`` (the ``MisalignmentEval``
  callback's ``questions``) or ``--questions``; without either (``evaluate``'s output dir), from the
  ``question_set`` its samples name.
* Resumable and idempotent: each scored answer is appended as one whole line as soon as its scores are in, keyed
  by its ``answer_id`` (older files without one: ``<samples file>:<line>``); a second call scores only the
  answers not yet in the output, and then (re)writes the summaries from the whole output.
* A judge failure on one answer (a refused or failed request, after the client's retries) is recorded on that
  answer (``error``, its scores None) and the rest goes on; ``--retry_errors true`` scores such answers again.
* ``judge.base_url: null`` starts a vLLM server for the judge (``judge_server``: its model defaults to
  ``judge.model``; a hub revision goes in ``judge_server.extra_args: [--revision, <sha>]`` and is recorded in
  the ``judge`` field).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml

from em_lightning import rundir
from em_lightning.errors import InputError
from em_lightning.evaluation.judge import DEFAULT_LABEL, Judge, JudgeConfig, check_label
from em_lightning.evaluation.questions import REQUIRED_JUDGE_PROMPTS, Question, load_questions
from em_lightning.evaluation.scoring import check_ks, definition_rule, summarise
from em_lightning.evaluation.sidecar import SidecarConfig, VLLMSidecar

log = logging.getLogger(__name__)

EVAL_CALLBACK = "MisalignmentEval"


@dataclass
class Target:
    """One version dir to rejudge: its samples file, where the output goes and what its run's config says."""

    version_dir: Path
    samples: Path
    out_samples: Path
    out_summary: Path
    questions: str | list[str] | None  # the eval callback's `questions` in the run's config
    definition: str
    ks: tuple[int, ...]


# ------------------------------------------------------------------------------------------------ finding
def find_targets(paths: Sequence[str | Path], label: str) -> list[Target]:
    """Every version dir with a samples file under ``paths`` (files, run dirs, sweep dirs), in order."""
    targets: list[Target] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            targets.append(_target(path.parent, label, samples_name=path.name))
            continue
        if not path.is_dir():
            raise InputError(f"{path}: no such samples file, run dir or sweep dir")
        found = [_target(v, label) for v in _version_dirs_under(path)]
        found = [t for t in found if t.samples.is_file()]
        if not found:
            raise InputError(f"{path}: no version dir with a samples file under it")
        targets += found
    return targets


def _version_dirs_under(path: Path) -> Iterator[Path]:
    """The version dirs of a run dir, or of every run dir in a sweep dir; a version dir itself (it holds a
    ``config.yaml`` or samples and no ``version_N``)."""
    versions = rundir.version_dirs(path)
    if versions:
        yield from versions
        return
    if (path / rundir.CONFIG).is_file() or (path / rundir.SAMPLES).is_file():
        yield path
        return
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        yield from rundir.version_dirs(child)


def _target(version_dir: Path, label: str, samples_name: str | None = None) -> Target:
    config = _run_config(version_dir)
    names = rundir.file_names(config)
    init_args = _eval_init_args(config)
    out = rundir.judged_dir(version_dir, label)
    return Target(
        version_dir=version_dir,
        samples=version_dir / (samples_name or names["samples"]),
        out_samples=out / (samples_name or names["samples"]),
        out_summary=out / names["summary"],
        questions=init_args.get("questions"),
        definition=init_args.get("definition") or "em",
        ks=check_ks(init_args.get("misalign_at_k")),
    )


def _run_config(version_dir: Path) -> dict | None:
    """The parsed ``config.yaml`` of the version dir, else of its run dir (a sweep run); None without one."""
    for candidate in (version_dir / rundir.CONFIG, version_dir.parent / rundir.CONFIG):
        if candidate.is_file():
            try:
                return yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise InputError(f"{candidate}: not valid YAML: {err}") from None
    return None


def _eval_init_args(config: dict | None) -> dict:
    callbacks = ((config or {}).get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == EVAL_CALLBACK:
            return cb.get("init_args") or {}
    return {}


# ------------------------------------------------------------------------------------------------ scoring
def answer_key(record: dict, samples: Path, line: int) -> str:
    """The answer's id: its ``answer_id``, or for files written before there was one, file name and line."""
    return record.get("answer_id") or f"{samples.name}:{line}"


def drop_failed_lines(path: Path) -> int:
    """Remove the lines whose judging failed from ``path`` (written whole to a temp file, then renamed over it,
    so a kill leaves the old file or the new one); returns how many."""
    records = rundir.read_jsonl(path)
    kept = [r for r in records if not r.get("error")]
    if len(kept) < len(records):
        temp = path.with_name(path.name + ".tmp")
        temp.unlink(missing_ok=True)
        temp.touch()
        rundir.append_jsonl(temp, kept)
        os.replace(temp, path)
    return len(records) - len(kept)


def pending_answers(target: Target) -> tuple[list[tuple[str, int, dict]], int]:
    """``(key, line, record)`` of every answer of ``target`` not yet in its output, and how many are there.
    Refuses to start on pending answers whose question is unknown (before any request)."""
    done = {}
    if target.out_samples.exists():
        for _, record in rundir.iter_jsonl(target.out_samples):
            done[record["answer_id"]] = record
    todo, seen = [], set()
    for line, record in rundir.iter_jsonl(target.samples):
        if record.get("failed") or record.get("answer") is None:
            continue  # a failure line, or an answer that was never generated
        key = answer_key(record, target.samples, line)
        if key in seen:
            raise InputError(f"{target.samples}:{line}: answer_id {key!r} appears twice in the file")
        seen.add(key)
        if key not in done:
            todo.append((key, line, record))
    return todo, len(done)


def rejudged_record(
    record: dict, key: str, question: Question, judge: Judge, definition: str, extra: Sequence[str]
) -> dict:
    """``record`` scored again by ``judge``: its scores, ``error`` and ``judge`` replaced. Any failure of a
    request is recorded on this answer (the endpoint's own retries are behind it)."""
    metrics = (*REQUIRED_JUDGE_PROMPTS, *extra)
    scores: dict[str, float | None] = dict.fromkeys(metrics)
    errors = []
    for metric in metrics:
        prompt = question.judge_prompt(metric, record.get("paraphrase") or "", record["answer"])
        try:
            scores[metric] = judge.score(prompt)
        except Exception as err:  # noqa: BLE001 - recorded on this answer; the rejudge goes on
            errors.append(f"judge {metric}: {type(err).__name__}: {err}"[:2000])
    out = {**record, "answer_id": key, "aligned": scores["aligned"], "coherent": scores["coherent"]}
    if extra:
        out["extra_scores"] = {m: scores[m] for m in extra}
    out["error"] = "; ".join(errors) or None
    out["judge"] = judge.identity(definition, {m: [question.judge_prompts[m]] for m in metrics})
    return out


def write_summaries(target: Target, judge: Judge, questions: dict[str, Question]) -> list[dict]:
    """One summary line per eval (``eval_id``, step and adapter) of the output samples, by step; written whole to a temp file and renamed over the old one, so a rerun replaces rather than appends."""
    groups: dict[tuple, list[dict]] = {}
    for _, record in rundir.iter_jsonl(target.out_samples):
        groups.setdefault((record.get("eval_id"), record.get("step"), record.get("adapter")), []).append(record)
    summaries = []
    for (eval_id, step, adapter), records in groups.items():
        samples = ((r["question_id"], r["aligned"], r["coherent"], r.get("extra_scores")) for r in records)
        summary = summarise(samples, target.definition, target.ks)
        used = {q: questions[q] for q in dict.fromkeys(r["question_id"] for r in records) if q in questions}
        prompts: dict[str, list[str]] = {}
        for q in used.values():
            for metric in REQUIRED_JUDGE_PROMPTS:
                prompts.setdefault(metric, []).append(q.judge_prompts[metric])
        summaries.append({
            "step": step, "adapter": adapter, "eval_id": eval_id, **summary.to_dict(),
            "n_records": len(records), "n_judge_errors": sum(1 for r in records if r.get("error")),
            "rejudged_from": str(target.samples), "judge": judge.identity(target.definition, prompts),
        })  # fmt: skip
    summaries.sort(key=lambda s: (s["step"] is None, s["step"] or 0))
    temp = target.out_summary.with_name(target.out_summary.name + ".tmp")
    temp.unlink(missing_ok=True)
    rundir.append_jsonl(temp, summaries)
    if summaries:
        os.replace(temp, target.out_summary)
    return rundir.read_jsonl(target.out_summary)  # as written: JSON keys, NaN as null


# ---------------------------------------------------------------------------------------------- the command
def rejudge(
    paths: list[str] | None = None,
    judge: JudgeConfig = JudgeConfig(),  # noqa: B008 - never mutated; jsonargparse shows the fields
    judge_server: SidecarConfig = SidecarConfig(),  # noqa: B008
    questions: str | list[str] | None = None,
    definition: Literal["em", "mo"] | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Score the saved answers under ``paths`` again with ``judge`` (module docstring).

    Args:
        paths: samples files, run dirs or sweep dirs (on the command line: the arguments before the first
            option, ``rejudge runs/a runs/b --judge.label x``).
        judge: the judge (``label`` names the output folder and must differ from ``default``, the run's own
            judge; ``base_url: null`` serves ``model`` with ``judge_server``).
        judge_server: the vLLM server for a judge without ``base_url`` (``model`` defaults to ``judge.model``;
            pin a hub revision with ``extra_args: [--revision, <sha>]``).
        questions: question source(s) with the judge prompts; default: each run's eval ``questions``.
        definition: ``em`` or ``mo`` for the summaries; default: each run's eval ``definition``.
        retry_errors: score again the answers of the output whose judging failed.
        progress: a progress bar over the answers.

    Returns:
        Every summary written.
    """
    if not paths:
        raise InputError("paths: give samples files, run dirs or sweep dirs to rejudge")
    if not judge.label or judge.label == DEFAULT_LABEL:
        raise InputError(
            f"judge.label: name the new judge (its output goes to judged/<label>/; {DEFAULT_LABEL!r} is the run's "
            "own judge)"
        )
    label = check_label(judge.label)
    if definition is not None:
        definition_rule(definition)
    targets = find_targets(paths, label)
    plans = [(t, _questions_for(t, questions)) for t in targets]
    plans = [(replace(t, definition=definition or t.definition), q) for t, q in plans]
    cancel = threading.Event()
    server = _judge_server(judge, judge_server, cancel)
    try:
        scorer = Judge(_served_config(judge, server), base_url=server.url if server else None, cancel=cancel)
        scorer.revision = revision_of(judge_server.extra_args) if server else None
        try:
            return _run(plans, scorer, retry_errors, progress, cancel)
        finally:
            scorer.close()
    finally:
        if server is not None:
            server.stop()


def _questions_for(target: Target, override: str | list[str] | None) -> dict[str, Question]:
    """The questions by id: ``--questions``, else the run's eval ``questions``, else the ``question_set`` its
    samples name (``evaluate``'s output dir has no config.yaml)."""
    source = override or target.questions or _sets_named_in(target.samples)
    if not source:
        raise InputError(
            f"questions: {target.version_dir} has no MisalignmentEval in its config.yaml and its samples name "
            "no question_set to take the judge prompts from; pass --questions"
        )
    return {q.id: q for q in load_questions(source)}


def _sets_named_in(samples: Path) -> list[str]:
    sets = {r.get("question_set") for _, r in rundir.iter_jsonl(samples)} if samples.is_file() else set()
    return sorted(s for s in sets if s)


def _judge_server(judge: JudgeConfig, server: SidecarConfig, cancel: threading.Event) -> VLLMSidecar | None:
    if judge.base_url:
        return None
    model = server.model or judge.model
    if not model and not server.url:
        raise InputError("judge.model: set it (or judge_server.model) to serve a judge, or judge.base_url")
    from em_lightning.models import resolve_model_dir

    config = replace(server, model=resolve_model_dir(model) if model else None,
                     served_model_name=judge.model or server.served_model_name)  # fmt: skip
    return VLLMSidecar(config, cancel=cancel).start()


def _served_config(judge: JudgeConfig, server: VLLMSidecar | None) -> JudgeConfig:
    """The judge config as requests use it: a served judge is asked by its served name."""
    if server is None:
        return judge
    return replace(judge, model=server.config.served_model_name)


def revision_of(extra_args: Sequence[str]) -> str | None:
    """The ``--revision`` among a vLLM command line's extra arguments."""
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--revision" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--revision="):
            return arg.split("=", 1)[1]
    return None


def _run(plans, judge: Judge, retry_errors: bool, progress: bool, cancel: threading.Event) -> list[dict]:
    work = []
    for target, questions in plans:
        if retry_errors and target.out_samples.exists():
            drop_failed_lines(target.out_samples)
        todo, n_done = pending_answers(target)
        if n_done:
            print(f"{target.out_samples}: {n_done} answers already judged, {len(todo)} to go")
        for key, line, record in todo:
            if record["question_id"] not in questions:
                raise InputError(
                    f"{target.samples}:{line}: question {record['question_id']!r} is not in the question file; "
                    "pass the one the answers came from with --questions"
                )
            work.append((target, questions, key, record))
    _score_all(work, judge, progress, cancel)
    summaries = []
    for target, questions in plans:
        if target.out_samples.exists():
            summaries += write_summaries(target, judge, questions)
            print(f"judged: {target.out_samples}\nsummary: {target.out_summary}")
    return summaries


def _score_all(work: list[tuple], judge: Judge, progress: bool, cancel: threading.Event) -> None:
    """Score every answer on the judge's threads; each is appended (one line, flushed) once scored. Killed or
    interrupted, what was appended stays and the requests in flight give up (``cancel``)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(work), desc=f"rejudge ({judge.label})", unit="answer", disable=not progress)
    pool = ThreadPoolExecutor(max(1, judge.config.max_concurrency), thread_name_prefix="em-rejudge")
    try:
        futures: dict[Future, Target] = {}
        for target, questions, key, record in work:
            question = questions[record["question_id"]]
            extra = [m for m in (record.get("extra_scores") or {}) if m in question.judge_prompts]
            fut = pool.submit(rejudged_record, record, key, question, judge, target.definition, extra)
            futures[fut] = target
        for fut in as_completed(futures):
            rundir.append_jsonl(futures[fut].out_samples, [fut.result()])
            bar.update()
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def main(args: list[str] | None = None) -> list[dict]:
    """Parse ``args`` (after ``rejudge``; None: ``sys.argv``), run :func:`rejudge`; ``--config`` works. The
    arguments before the first option are the ``paths``."""
    import json
    import sys

    from jsonargparse import CLI

    args = list(sys.argv[2:] if args is None else args)
    n_paths = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    if n_paths:
        args = [*args[n_paths:], "--paths", json.dumps(args[:n_paths])]

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return CLI(rejudge, args=args, as_positional=False)
