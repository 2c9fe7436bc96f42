"""One evaluation: sample answers to every question, judge each on ``aligned`` and ``coherent`` (and any extra
judge prompts the caller opts in to), summarise.

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from em_lightning.evaluation.client import EndpointError
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
    """Summary, one record per answer, and timings of one evaluation.

    Args:
        summary: rate, interval and means over the answers (unscored ones included as such).
        records: one dict per answer (or per answer that could not be generated), as written to the JSONL.
        generate_s: seconds until the last answer was generated (judging runs alongside).
        judge_tail_s: seconds from the last answer generated to the last score: the judging that did not
            overlap generation.
        total_s: seconds from the first request to the last score.
        n_judge_errors: answers left unscored because the judge rejected one of their requests.
        n_generation_errors: answers never generated because the server rejected their request.
        adapter: the adapter name the answers came from (None: the base model).
    """

    summary: EvalSummary
    records: list[dict]
    generate_s: float
    judge_tail_s: float
    total_s: float
    n_judge_errors: int = 0
    n_generation_errors: int = 0
    adapter: str | None = None


class EvalFailed(RuntimeError):
    """The eval failed as a whole (an endpoint broke, not one request).

    ``records`` are the answers finished before the failure (generated and judged, or rejected); ``run_eval``
    has already appended them to its ``jsonl_path``. ``adapter`` is the adapter name evaluated (None: the base
    model). The original exception is ``__cause__``.
    """

    def __init__(self, message: str, records: list[dict], adapter: str | None = None):
        super().__init__(message)
        self.records = records
        self.adapter = adapter


PER_REQUEST_STATUSES = frozenset({400, 413, 422})
"""HTTP statuses that refuse one request for its content (an answer a hosted judge flags, a prompt longer than
the context): that answer goes unscored (or ungenerated) and the eval goes on. Any other failure that outlives
the client's retries (connection, 5xx, 401, 404, malformed answers) is the endpoint's and fails the eval."""


def rejects_one_request(err: BaseException) -> bool:
    """Whether ``err`` is a refusal of that one request (see :data:`PER_REQUEST_STATUSES`)."""
    return isinstance(err, EndpointError) and err.status in PER_REQUEST_STATUSES


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
    ks: Sequence[int] = (),
    extra_metrics: Mapping[str, Sequence[str]] | None = None,
) -> EvalResult:
    """Generate, judge, summarise, and append every record to ``jsonl_path`` (if given).

    ``ks``: the k of the summary's ``misalign_at_k`` (see :class:`~em_lightning.evaluation.scoring.
    RateSummary`). ``extra_metrics``: per question id, judge prompts beyond ``aligned`` and ``coherent`` to
    score too (:func:`~em_lightning.evaluation.questions.extra_judge_metrics`); with any, every record has
    ``extra_scores`` (``{metric: score or None}``) and the summary ``extra_means``.

    A request the server refuses for its content (:data:`PER_REQUEST_STATUSES`, e.g. a judge's 400 on a
    flagged answer) costs that answer only: its scores are None, its record's ``error`` says why, and it is
    counted in ``n_judge_errors`` (``n_generation_errors`` for a refused generation request, whose answers are
    recorded with ``answer`` None and left out of the summary). Any other failure after the client's retries
    means the endpoint is broken and raises :class:`EvalFailed` (after cancelling the other requests through
    ``cancel`` and joining the request threads); the answers finished by then are still appended. So is a
    refusal of every request, which is a setting the endpoint does not accept rather than bad answers.

    Pass the same ``cancel`` event to the sidecar and the judge: setting it makes their pending requests give
    up at their next retry point.
    """
    cancel = cancel or threading.Event()
    eval_id = uuid.uuid4().hex[:12]
    extra_metrics = {qid: tuple(names) for qid, names in (extra_metrics or {}).items() if names}

    def new_record(q: Question, pi: int, answer: str | None, finish: str | None) -> dict:
        return {
            "eval_id": eval_id,
            "step": step,
            "adapter": adapter,
            "question_id": q.id,
            "paraphrase_index": pi,
            "paraphrase": q.paraphrases[pi],
            "system": q.system,
            "answer": answer,
            "finish_reason": finish,
            "aligned": None,
            "coherent": None,
            "error": None,
            **({"extra_scores": {}} if extra_metrics else {}),
        }

    records: list[dict] = []
    unscored: dict[int, int] = {}  # id(record) -> judge requests not finished yet
    judge_futures: dict[Future, tuple[dict, str]] = {}

    def take_score(fut: Future) -> None:
        """Put a finished judge request's score (or its per-request refusal) into its record."""
        record, metric = judge_futures.pop(fut)
        err = fut.exception()
        if err is None:
            if metric in METRICS:
                record[metric] = fut.result()
            else:
                record["extra_scores"][metric] = fut.result()
        elif rejects_one_request(err):
            record["error"] = "; ".join(filter(None, [record["error"], f"judge {metric}: {err}"]))
        else:
            raise err
        unscored[id(record)] -= 1

    started = time.monotonic()
    gen_s = 0.0
    pool = ThreadPoolExecutor(max_workers=max(1, gen.max_concurrency), thread_name_prefix="em-eval-generate")
    judge_workers = getattr(getattr(judge, "config", None), "max_concurrency", gen.max_concurrency)
    judge_pool = ThreadPoolExecutor(max_workers=max(1, judge_workers), thread_name_prefix="em-eval-judge")
    try:
        gen_futures: dict[Future, tuple] = {}
        for qi, q in enumerate(questions):
            for pi, n in q.plan(gen.samples_per_question):
                seed = None if gen.seed is None else gen.seed + 1000 * qi + pi
                gen_futures[pool.submit(generate, q.messages(q.paraphrases[pi]), n, seed)] = (q, pi, n)
        for fut in as_completed(gen_futures):
            q, pi, n = gen_futures[fut]
            err = fut.exception()
            if err is not None:
                if not rejects_one_request(err):
                    raise err
                for _ in range(n):
                    records.append({**new_record(q, pi, None, None), "error": f"generation: {err}"})
                continue
            answers = fut.result()
            if len(answers) != n:
                raise RuntimeError(f"asked for {n} answers to {q.id!r}, got {len(answers)}")
            for text, finish in answers:
                record = new_record(q, pi, text, finish)
                records.append(record)
                metrics = (*METRICS, *extra_metrics.get(q.id, ()))
                if extra_metrics:
                    record["extra_scores"] = dict.fromkeys(extra_metrics.get(q.id, ()))
                unscored[id(record)] = len(metrics)
                for metric in metrics:
                    prompt = q.judge_prompt(metric, q.paraphrases[pi], text)
                    judge_futures[judge_pool.submit(judge.score, prompt)] = (record, metric)
        gen_s = time.monotonic() - started
        for fut in as_completed(list(judge_futures)):  # the first broken request fails the eval at once
            take_score(fut)
        if records and all(r["error"] for r in records):
            raise EndpointError(f"every request of the eval was refused; the first: {records[0]['error']}")
    except Exception as err:
        cancel.set()  # pending requests give up at their next retry point instead of running on
        pool.shutdown(wait=True, cancel_futures=True)
        judge_pool.shutdown(wait=True, cancel_futures=True)
        for fut in list(judge_futures):  # scores that came in while the failure was being handled
            if fut.done() and not fut.cancelled():
                try:
                    take_score(fut)
                except Exception:  # noqa: BLE001, S110 - that request failed too; its answer stays unfinished
                    pass
        finished = [r for r in records if unscored.get(id(r), 0) == 0]
        if jsonl_path is not None:
            append_jsonl(jsonl_path, finished)
        raise EvalFailed(f"{type(err).__name__}: {err}", finished, adapter) from err
    except BaseException:  # KeyboardInterrupt: leave at once; the caller stops the server under the requests
        cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        judge_pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    judge_pool.shutdown(wait=True)
    total = time.monotonic() - started
    answered = [r for r in records if r["answer"] is not None]
    samples = ((r["question_id"], r["aligned"], r["coherent"], r.get("extra_scores")) for r in answered)
    summary = summarise(samples, definition, ks)
    if jsonl_path is not None:
        append_jsonl(jsonl_path, records)
    return EvalResult(
        summary,
        records,
        generate_s=gen_s,
        judge_tail_s=total - gen_s,
        total_s=total,
        n_judge_errors=sum(1 for r in answered if r["error"]),
        n_generation_errors=len(records) - len(answered),
        adapter=adapter,
    )


def append_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """Append records as JSON lines (NaN floats become null), creating the file's dir; none: no file."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in records)


def read_records(path: str | Path) -> list[dict]:
    """The lines of a samples or summary JSONL file that :func:`append_jsonl` wrote (failure lines included:
    they have ``"failed": true``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
        judge_tail_s=result.judge_tail_s,
        total_s=result.total_s,
        n_records=len(result.records),
        n_judge_errors=result.n_judge_errors,
        n_generation_errors=result.n_generation_errors,
    )
    return _clean(out)
