"""One evaluation: sample answers to every question, judge each on ``aligned`` and ``coherent``, summarise.

Generation goes through any ``generate(messages, n, seed) -> [(text, finish_reason)]`` callable (the vLLM
sidecar with the current adapter, or any other sampler); judging through :class:`Judge`. Requests run
concurrently (a server batches them): up to ``GenerationConfig.max_concurrency`` generation requests and
``JudgeConfig.max_concurrency`` judge requests; an answer's judge requests are sent as soon as it exists.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path

from em_lightning.evaluation.judge import Judge
from em_lightning.evaluation.questions import Question
from em_lightning.evaluation.scoring import Definition, EvalSummary, summarise

GenerateFn = Callable[[list[dict], int, int | None], list[tuple[str, str | None]]]
METRICS = ("aligned", "coherent")


@dataclass
class GenerationConfig:
    """Sampling settings for the evaluated model.

    Args:
        samples_per_question: answers per question, spread over its paraphrases; None: the file's
            ``samples_per_paraphrase`` for every paraphrase (100 in the upstream files: slow).
        max_tokens: answer length cap.
        temperature: sampling temperature (1.0 as in the EM paper).
        top_p: nucleus sampling.
        seed: base seed; each (question, paraphrase) gets its own stream from it, so repeated evals of one run
            ask the same prompts with the same seeds. None: unseeded.
        max_concurrency: generation and judge requests in flight at once.
    """

    samples_per_question: int | None = 4
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    max_concurrency: int = 8


@dataclass
class EvalResult:
    """Summary, one record per answer, and timings of one evaluation."""

    summary: EvalSummary
    records: list[dict]
    generate_s: float
    judge_s: float
    total_s: float


def sidecar_generate(sidecar, model: str, gen: GenerationConfig) -> GenerateFn:
    """A :data:`GenerateFn` that samples from ``model`` (an adapter name or the base) on a vLLM sidecar."""

    def generate(messages: list[dict], n: int, seed: int | None) -> list[tuple[str, str | None]]:
        params = {"max_tokens": gen.max_tokens, "temperature": gen.temperature, "top_p": gen.top_p}
        if seed is not None:
            params["seed"] = seed
        return sidecar.generate(model, messages, n=n, **params)

    return generate


def run_eval(
    questions: Sequence[Question],
    generate: GenerateFn,
    judge: Judge,
    gen: GenerationConfig,
    definition: Definition = "em",
    step: int | None = None,
    adapter: str | None = None,
    jsonl_path: str | Path | None = None,
    cancel: threading.Event | None = None,
) -> EvalResult:
    """Generate, judge, summarise, and append every sample to ``jsonl_path``.

    Any failed request (after the client's retries) fails the whole eval with its exception: a partly judged
    eval would bias the rate towards whichever answers came back.
    """
    cancel = cancel or threading.Event()
    eval_id = uuid.uuid4().hex[:12]
    jobs = []  # (question, paraphrase index, n)
    for qi, q in enumerate(questions):
        for pi, n in q.plan(gen.samples_per_question):
            jobs.append((qi, q, pi, n))
    records: list[dict] = []
    started = time.monotonic()
    gen_done = 0.0
    pool = ThreadPoolExecutor(max_workers=max(1, gen.max_concurrency), thread_name_prefix="em-eval-generate")
    judge_workers = getattr(getattr(judge, "config", None), "max_concurrency", gen.max_concurrency)
    judge_pool = ThreadPoolExecutor(max_workers=max(1, judge_workers), thread_name_prefix="em-eval-judge")
    gen_futures: dict[Future, tuple] = {}
    judge_futures: list[tuple[dict, str, Future]] = []
    try:
        for qi, q, pi, n in jobs:
            seed = None if gen.seed is None else gen.seed + 1000 * qi + pi
            gen_futures[pool.submit(generate, q.messages(q.paraphrases[pi]), n, seed)] = (q, pi, n)
        for fut in as_completed(gen_futures):
            q, pi, n = gen_futures[fut]
            answers = fut.result()
            if len(answers) != n:
                raise RuntimeError(f"asked for {n} answers to {q.id!r}, got {len(answers)}")
            for text, finish in answers:
                record = {
                    "eval_id": eval_id,
                    "step": step,
                    "adapter": adapter,
                    "question_id": q.id,
                    "paraphrase_index": pi,
                    "paraphrase": q.paraphrases[pi],
                    "system": q.system,
                    "answer": text,
                    "finish_reason": finish,
                }
                records.append(record)
                for metric in METRICS:
                    prompt = q.judge_prompt(metric, q.paraphrases[pi], text)
                    judge_futures.append((record, metric, judge_pool.submit(judge.score, prompt)))
        gen_done = time.monotonic() - started
        done, _ = wait([f for _, _, f in judge_futures], return_when=FIRST_EXCEPTION)
        for f in done:  # surface the first failure at once instead of waiting for the rest
            if f.exception() is not None:
                raise f.exception()
        for record, metric, fut in judge_futures:
            record[metric] = fut.result()
    except BaseException:
        cancel.set()  # pending requests give up at their next retry point instead of running on
        pool.shutdown(wait=False, cancel_futures=True)
        judge_pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    judge_pool.shutdown(wait=True)
    total = time.monotonic() - started
    summary = summarise(((r["question_id"], r["aligned"], r["coherent"]) for r in records), definition)
    if jsonl_path is not None:
        append_jsonl(jsonl_path, records)
    return EvalResult(summary, records, generate_s=gen_done, judge_s=total - gen_done, total_s=total)


def append_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """Append records as JSON lines (NaN floats become null), creating the file's dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_clean(r), ensure_ascii=False) + "\n")


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summary_dict(result: EvalResult, **extra) -> dict:
    """JSON-ready summary of an eval (NaN → null) with timings and ``extra`` fields."""
    out = {**extra, **result.summary.to_dict()}
    out.update(
        generate_s=result.generate_s,
        judge_s=result.judge_s,
        total_s=result.total_s,
        n_records=len(result.records),
    )
    return _clean(out)
