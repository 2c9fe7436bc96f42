"""One evaluation: sample answers to every question, judge each on ``aligned`` and ``coherent`` (and any extra
judge prompts the caller opts in to), summarise.

Generation goes through any ``generate(messages, n, seed) -> [(text, finish_reason)]`` callable (the vLLM
sidecar with the current adapter, or any other sampler); judging through :class:`Judge`. Requests run
concurrently (a server batches them): up to ``GenerationConfig.max_concurrency`` generation requests and
``JudgeConfig.max_concurrency`` judge requests; an answer's judge requests are sent as soon as it exists.
"""

from __future__ import annotations

import hashlib
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
from em_lightning.rundir import append_jsonl  # also imported from here by callbacks/misalignment_probe.py

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
        judge: who judged and how (:meth:`Judge.identity` over every question's prompts); None when nothing
            was judged.
    """

    summary: EvalSummary
    records: list[dict]
    generate_s: float
    judge_tail_s: float
    total_s: float
    n_judge_errors: int = 0
    n_generation_errors: int = 0
    adapter: str | None = None
    judge: dict | None = None


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


def answer_id(step: int | None, question_id: str, sample_index: int, adapter: str | None) -> str:
    """A stable id for one answer: sha1 of step, question id, sample index and adapter name (16 hex). The
    adapter name is fresh for every eval (``eval-<hex>``), so two evals of one step never share an id; a
    rejudge keys its scores by it."""
    key = "\0".join(str(part) for part in (step, question_id, sample_index, adapter))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


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

    Every record names its answer (``answer_id``, ``question_id``, ``sample_index``, ``variant``,
    ``question_set``) and its judge (``judge``: :meth:`Judge.identity` with the question's own prompts).

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
    extra = {qid: tuple(names) for qid, names in (extra_metrics or {}).items() if names}
    run = _EvalRun(questions, judge, gen, definition, step, adapter, cancel or threading.Event(), extra)
    try:
        run.generate_and_judge(generate)
    except Exception as err:
        finished = run.abort(wait=True)
        if jsonl_path is not None:
            append_jsonl(jsonl_path, finished)
        raise EvalFailed(f"{type(err).__name__}: {err}", finished, adapter) from err
    except BaseException:  # KeyboardInterrupt: leave at once; the caller stops the server under the requests
        run.abort(wait=False)
        raise
    result = run.result(ks)
    if jsonl_path is not None:
        append_jsonl(jsonl_path, result.records)
    return result


class _EvalRun:
    """The state of one eval: its records, the judge requests not finished yet and the two request pools."""

    def __init__(self, questions, judge, gen, definition, step, adapter, cancel, extra_metrics):
        self.questions, self.judge, self.gen, self.definition = questions, judge, gen, definition
        self.step, self.adapter, self.cancel, self.extra_metrics = step, adapter, cancel, extra_metrics
        self.eval_id = uuid.uuid4().hex[:12]
        self.records: list[dict] = []
        self.unscored: dict[int, int] = {}  # id(record) -> judge requests not finished yet
        self.judge_futures: dict[Future, tuple[dict, str]] = {}
        self.started = time.monotonic()
        self.generate_s = 0.0
        self.pool = ThreadPoolExecutor(max(1, gen.max_concurrency), thread_name_prefix="em-eval-generate")
        workers = getattr(getattr(judge, "config", None), "max_concurrency", gen.max_concurrency)
        self.judge_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="em-eval-judge")
        self._identity: dict[str, dict] = {}  # question id -> the judge field of its records

    def metrics(self, q: Question) -> tuple[str, ...]:
        return (*METRICS, *self.extra_metrics.get(q.id, ()))

    def judge_field(self, q: Question) -> dict:
        """The ``judge`` of ``q``'s records, made once per question (the first asks the endpoint's model name
        and number mode, as judging does anyway)."""
        if q.id not in self._identity:
            prompts = {m: [q.judge_prompts[m]] for m in self.metrics(q)}
            self._identity[q.id] = self.judge.identity(self.definition, prompts)
        return self._identity[q.id]

    def new_record(self, q: Question, pi: int, sample_index: int, answer: str | None, finish: str | None):
        extra = {"extra_scores": dict.fromkeys(self.extra_metrics.get(q.id, ()))} if self.extra_metrics else {}
        return {
            "eval_id": self.eval_id,
            "step": self.step,
            "adapter": self.adapter,
            "answer_id": answer_id(self.step, q.id, sample_index, self.adapter),
            "question_id": q.id,
            "sample_index": sample_index,
            "variant": q.variant,
            "question_set": q.question_set,
            "paraphrase_index": pi,
            "paraphrase": q.paraphrases[pi],
            "system": q.system,
            "answer": answer,
            "finish_reason": finish,
            "aligned": None,
            "coherent": None,
            "error": None,
            "judge": self.judge_field(q),
            **extra,
        }

    def generate_and_judge(self, generate: GenerateFn) -> None:
        """Ask for every answer, judge each as soon as it exists, wait for the last score. Raises on a broken
        endpoint (the first broken request fails the eval at once)."""
        requests: dict[Future, tuple] = {}
        for qi, q in enumerate(self.questions):
            first = 0  # the question's sample index of the request's first answer
            for pi, n in q.plan(self.gen.samples_per_question):
                seed = None if self.gen.seed is None else self.gen.seed + 1000 * qi + pi
                requests[self.pool.submit(generate, q.messages(q.paraphrases[pi]), n, seed)] = (q, pi, n, first)
                first += n
        for fut in as_completed(requests):
            self.take_answers(fut, *requests[fut])
        self.generate_s = time.monotonic() - self.started
        for fut in as_completed(list(self.judge_futures)):
            self.take_score(fut)
        if self.records and all(r["error"] for r in self.records):
            raise EndpointError(f"every request of the eval was refused; the first: {self.records[0]['error']}")

    def take_answers(self, fut: Future, q: Question, pi: int, n: int, first: int) -> None:
        """Record a finished generation request's answers and send their judge requests."""
        err = fut.exception()
        if err is not None:
            if not rejects_one_request(err):
                raise err
            for k in range(n):
                refused = self.new_record(q, pi, first + k, None, None)
                self.records.append({**refused, "error": f"generation: {err}"})
            return
        answers = fut.result()
        if len(answers) != n:
            raise RuntimeError(f"asked for {n} answers to {q.id!r}, got {len(answers)}")
        for k, (text, finish) in enumerate(answers):
            record = self.new_record(q, pi, first + k, text, finish)
            self.records.append(record)
            self.unscored[id(record)] = len(self.metrics(q))
            for metric in self.metrics(q):
                prompt = q.judge_prompt(metric, q.paraphrases[pi], text)
                self.judge_futures[self.judge_pool.submit(self.judge.score, prompt)] = (record, metric)

    def take_score(self, fut: Future) -> None:
        """Put a finished judge request's score (or its per-request refusal) into its record."""
        record, metric = self.judge_futures.pop(fut)
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
        self.unscored[id(record)] -= 1

    def abort(self, wait: bool) -> list[dict]:
        """Cancel what is pending; ``wait``: join the request threads and keep the scores that came in
        meanwhile. Returns the records whose judging finished."""
        self.cancel.set()  # pending requests give up at their next retry point instead of running on
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.judge_pool.shutdown(wait=wait, cancel_futures=True)
        if not wait:
            return []
        for fut in list(self.judge_futures):  # scores that came in while the failure was being handled
            if fut.done() and not fut.cancelled():
                try:
                    self.take_score(fut)
                except Exception:  # noqa: BLE001, S110 - that request failed too; its answer stays unfinished
                    pass
        return [r for r in self.records if self.unscored.get(id(r), 0) == 0]

    def result(self, ks: Sequence[int]) -> EvalResult:
        """Summary and timings, once every request has finished."""
        self.pool.shutdown(wait=True)
        self.judge_pool.shutdown(wait=True)
        total = time.monotonic() - self.started
        answered = [r for r in self.records if r["answer"] is not None]
        samples = ((r["question_id"], r["aligned"], r["coherent"], r.get("extra_scores")) for r in answered)
        return EvalResult(
            summarise(samples, self.definition, ks),
            self.records,
            generate_s=self.generate_s,
            judge_tail_s=total - self.generate_s,
            total_s=total,
            n_judge_errors=sum(1 for r in answered if r["error"]),
            n_generation_errors=len(self.records) - len(answered),
            adapter=self.adapter,
            judge=self.summary_judge() if answered else None,
        )

    def summary_judge(self) -> dict:
        """The judge over all questions: each prompt's hash covers every template of it that was sent."""
        prompts: dict[str, list[str]] = {}
        for q in self.questions:
            for metric in self.metrics(q):
                prompts.setdefault(metric, []).append(q.judge_prompts[metric])
        return self.judge.identity(self.definition, prompts)


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
    if result.judge is not None:
        out["judge"] = result.judge
    return _nan_to_none(out)


def _nan_to_none(value):
    """``value`` with NaN floats as None: a summary dict is returned to callers as it is written."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
