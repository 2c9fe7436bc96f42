"""Misalignment rate along training: every N steps the adapter goes to a vLLM sidecar, which answers the
evaluation questions; a judge scores the answers; the rate is logged at the step the adapter belongs to."""

from __future__ import annotations

import math
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator

from em_lightning import rundir
from em_lightning.distributed import RankZeroWait
from em_lightning.errors import InputError
from em_lightning.evaluation.runner import EvalFailed, summary_dict
from em_lightning.evaluation.session import EvalSession
from em_lightning.evaluation.settings import EvalSettings, takes_eval_settings
from em_lightning.rundir import append_jsonl


@takes_eval_settings
class MisalignmentEval(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and when training ends), on rank zero:

    1. write the PEFT adapter to ``<run dir>/eval_adapters/step_<N>``, N zero-padded to 8 digits so the dirs
       sort by step (``step_00000050``), with ``pl_module.save_adapter``;
    2. load it into the vLLM sidecar under a fresh name (unloading the previous one);
    3. sample ``generation.samples_per_question`` answers per question; the judge scores ``aligned`` and
       ``coherent``;
    4. log to every logger at step N: ``eval/misalignment_rate``, ``eval/ci_low``, ``eval/ci_high`` (Wilson
       95 %), ``eval/aligned_mean``, ``eval/coherent_mean``, ``eval/n_counted``, ``eval/n_answers``,
       ``eval/duration_s``, ``eval/n_judge_errors``, ``eval/failed`` (0 or 1) and per question
       ``eval/q/<id>/misalignment_rate``, ``eval/q/<id>/aligned_mean``; for each k of ``misalign_at_k``
       ``eval/q/<id>/misalign_at_<k>`` and their mean over the questions with at least k counted answers,
       ``eval/misalign_at_<k>``; for each extra judge prompt scored, ``eval/<name>_mean`` and
       ``eval/q/<id>/<name>_mean`` (with the logger's prefix, if any). A value that is NaN (no countable
       answers: ``eval/n_counted`` is 0; fewer than k for misalign@k) is left out, for every logger;
    5. append every sample (``answer_id``, question id, ``variant``, ``question_set``, paraphrase, system,
       answer, aligned, coherent, error, step, adapter name, ``judge``; ``extra_scores`` with extra judge
       prompts) to ``<run dir>/misalignment_samples.jsonl``, and one summary line (with ``misalign_at_k``,
       ``extra_means`` and ``judge``, overall and per question) to ``<run dir>/misalignment_summary.jsonl``.
       ``judge`` says who judged and how (label, model, number mode, answer prefix, top logprobs, a hash of
       each judge prompt, the definition): ``python -m em_lightning rejudge`` scores the same answers with
       another judge into ``judged/<label>/``.

    Periodic evals run at steps N, 2N, ... (never at step 0, which only ``eval_at_start`` evaluates).

    ``mode: async`` runs steps 2-5 in a background thread while training goes on (for a sidecar on its own
    GPU); at most one eval is in flight, so the next one waits for it. ``mode: blocking`` makes training wait
    (for a sidecar sharing the trainer's cores or GPU, where running both at once slows each several-fold).
    Either way the results carry the step whose adapter was evaluated, and ``on_train_end`` waits for the last
    eval. Loggers are only called from the trainer's thread: the worker hands its scalars over, and they are
    logged at the next batch end (or when the trainer waits for the eval).

    A judge request refused for one answer's content (HTTP 400, e.g. a flagged answer) leaves that answer
    unscored (``error`` in its sample line, counted in ``n_judge_errors``). A sidecar or judge that dies,
    hangs (``eval_timeout_s``) or answers garbage costs that eval only: a warning, ``eval/failed`` = 1, the
    answers finished before the failure and then a line ``{"step", "adapter", "failed": true, "error"}`` in
    the samples JSONL, and training goes on. A timed-out eval writes nothing after its failure line: its late
    answers are dropped. A dead managed sidecar is restarted, up to ``max_restarts`` times, at the next eval's
    step on the trainer's thread (so it keeps the kill-on-trainer-death signal, see
    :mod:`em_lightning.evaluation.sidecar`); in ``async`` mode training waits for that restart.

    Building the callback reads no file: a bad ``definition`` or a judge ``api_key_env`` that names an unset
    variable fails there, a question file that cannot be used fails in ``setup`` (on every rank, before the
    sidecar starts and before training).

    Args:
        every_n_steps: optimizer steps between evals.
        {eval_settings}
        mode: ``async`` or ``blocking``.
        eval_at_start: also evaluate before the first update (the base model with a zero adapter).
        eval_at_end: evaluate the final adapter when training ends (if that step was not just evaluated).
        eval_timeout_s: an eval not done after this long is recorded as failed and abandoned.
        max_restarts: restarts of a dead managed sidecar during the run.
        samples_file: JSONL name in the run dir for samples (and failure lines).
        summary_file: JSONL name in the run dir for one summary per eval.
        keep_adapters: keep ``eval_adapters/step_<N>`` (zero-padded N) after its eval (20 MB each for
            SmolLM2 r=8).
        log_per_question: also log per-question scalars.
    """

    # The eight eval settings (questions ... extra_judge_prompts) come in **settings: takes_eval_settings puts
    # them in the signature jsonargparse reads, after every_n_steps, with the defaults of EvalSettings.
    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        mode: Literal["async", "blocking"] = "async",
        eval_at_start: bool = False,
        eval_at_end: bool = True,
        eval_timeout_s: float = 3600.0,
        max_restarts: int = 1,
        samples_file: str = rundir.SAMPLES,
        summary_file: str = rundir.SUMMARY,
        keep_adapters: bool = False,
        log_per_question: bool = True,
        **settings,
    ):
        if every_n_steps < 1:
            raise InputError(f"MisalignmentEval.every_n_steps: must be >= 1, got {every_n_steps}")
        if mode not in ("async", "blocking"):
            raise InputError(f"MisalignmentEval.mode: must be 'async' or 'blocking', got {mode!r}")
        self.every_n_steps = every_n_steps
        # Checks the definition and the judge's key; reads no question file (that is setup's job).
        self.session = EvalSession(EvalSettings.take(settings))
        self.mode = mode
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.eval_timeout_s = eval_timeout_s
        self.max_restarts = max_restarts
        self.samples_file = samples_file
        self.summary_file = summary_file
        self.keep_adapters = keep_adapters
        self.log_per_question = log_per_question
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future, float] | None = None  # (step, future, start time)
        self._abandoned: set[int] = set()  # steps whose eval timed out: their late results are dropped
        self._written: set[int] = set()  # steps whose results were written: too late to time them out
        self._restarts = 0
        self._last_step: int | None = None
        self._run_dir: Path | None = None
        # Both threads write results (the worker: samples and summaries; the trainer's thread: a timeout's
        # failure line). One lock around "is this step abandoned or written?" and the writes that follow keeps
        # a step's lines from contradicting each other.
        self._write_lock = threading.Lock()
        # (step, scalars) from either thread, logged on the trainer's thread: loggers are not thread-safe.
        self._to_log: queue.SimpleQueue[tuple[int, dict[str, float]]] = queue.SimpleQueue()
        self.completed: list[dict] = []  # summaries (and failures) of this run's evals, for tests and scripts
        self._rank_zero_wait: RankZeroWait | None = None

    # ------------------------------------------------------------------------------------------ life cycle
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        # Every rank: a question file that cannot be used stops the run now, not N training steps in.
        self.session.load_questions()
        # Collectives, so on every rank: the run dir (a broadcast) and the side group the other ranks wait in
        # while rank zero starts the sidecar or evaluates (see em_lightning.distributed).
        self._run_dir = rundir.resolve_run_dir(trainer)
        if self._rank_zero_wait is None:
            longest = max(self.eval_timeout_s, getattr(self.session.sidecar_config, "startup_timeout_s", 0.0))
            self._rank_zero_wait = RankZeroWait(2 * longest + 300)
        try:
            self._start_on_rank_zero(trainer, pl_module)
        finally:
            self._rank_zero_wait.wait()

    def _start_on_rank_zero(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.session.sidecar is not None:
            return
        self._run_dir.mkdir(parents=True, exist_ok=True)
        # A sidecar that cannot start is a configuration error: fail before training. The module's weights dir
        # is what training is about to load anyway (None for tiny in-code models, which vLLM cannot serve).
        self.session.start(
            model=getattr(pl_module, "base_model_dir", None),
            lora_rank=getattr(getattr(pl_module, "lora", None), "r", None),
            log_path=self._run_dir / rundir.SIDECAR_LOG,
            trainer_devices=trainer.num_devices if isinstance(trainer.accelerator, CUDAAccelerator) else 0,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="misalignment-eval")

    def on_train_start(self, trainer, pl_module):
        if self.eval_at_start:
            self._trigger(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._log_results(trainer)  # an async eval that finished meanwhile
        step = trainer.global_step
        # Step 0 is before any update (eval_at_start covers it); under gradient accumulation the first
        # micro-batches end with global_step still 0. Later micro-batches repeat a step already evaluated.
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._trigger(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        if self.eval_at_end and trainer.global_step != self._last_step:
            self._trigger(trainer, pl_module, trainer.global_step)
        self._wait_pending(trainer)
        self._rank_zero_wait.wait()  # the other ranks wait for the last eval here, not in a collective

    def on_exception(self, trainer, pl_module, exception):
        self._shutdown(wait=False)

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            self._shutdown(wait=True, trainer=trainer)
            self._log_results(trainer)  # before Lightning finalizes the loggers, right after this hook
            if self._rank_zero_wait is not None:
                self._rank_zero_wait.close()
                self._rank_zero_wait = None

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")

    # ----------------------------------------------------------------------------------------------- evals
    def _trigger(self, trainer, pl_module, step: int) -> None:
        self._last_step = step
        adapter_dir = rundir.eval_adapter_dir(self._run_dir, step)
        # Collective (FSDP2 gathers the sharded adapter), on the trainer's thread: the weights change next step.
        pl_module.save_adapter(adapter_dir)
        try:
            self._evaluate_on_rank_zero(trainer, step, adapter_dir)
        finally:
            # Rank zero may wait here for an eval, a previous async one or a sidecar restart: the other ranks wait
            # in the side group, whose timeout is the eval's, not in the next training collective.
            self._rank_zero_wait.wait()

    def _evaluate_on_rank_zero(self, trainer, step: int, adapter_dir: Path) -> None:
        if trainer.is_global_zero and self.session.sidecar is not None:
            self._wait_pending(trainer)  # at most one eval in flight
            try:
                self._ensure_sidecar()  # on the trainer's thread: a restarted server must outlive the worker
            except Exception as err:  # noqa: BLE001 - a dead sidecar costs this eval only
                self._record_failure(step, None, err)
                self._log_results(trainer)
                if not self.keep_adapters:
                    shutil.rmtree(adapter_dir, ignore_errors=True)
            else:
                future = self._executor.submit(self._evaluate, step, adapter_dir)
                self._pending = (step, future, time.monotonic())
                if self.mode == "blocking":
                    self._wait_pending(trainer)

    def _wait_pending(self, trainer) -> None:
        """Wait for the eval in flight (until its deadline), then log what it handed over."""
        if self._pending is not None:
            step, future, started = self._pending
            self._pending = None
            try:
                future.result(timeout=max(0.0, self.eval_timeout_s - (time.monotonic() - started)))
            except FutureTimeout:
                self.session.cancel_eval()  # its requests stop at their next retry point
                timeout = TimeoutError(f"eval not done after {self.eval_timeout_s:.0f}s")
                self._record_failure(step, None, timeout, abandon=True)
        self._log_results(trainer)

    def _evaluate(self, step: int, adapter_dir: Path) -> None:
        """Runs in the worker thread; never raises (a failed eval is recorded, training goes on)."""
        started = time.monotonic()
        try:
            result = self.session.evaluate(adapter_dir, step=step, prefix=f"step{step}")
            summary = summary_dict(result, step=step, adapter=result.adapter)
            scalars = self._scalars(result, time.monotonic() - started)
            with self._write_lock:
                if step in self._abandoned:
                    return  # timed out: its failure line is written, these late answers are dropped
                self._written.add(step)
                append_jsonl(self._run_dir / self.samples_file, result.records)
                append_jsonl(self._run_dir / self.summary_file, [summary])
                self._to_log.put((step, scalars))
                self.completed.append(summary)
        except Exception as err:  # noqa: BLE001 - any failure of the sidecar or judge costs this eval only
            if isinstance(err, EvalFailed):
                self._record_failure(step, err.adapter, err, err.records)
            else:
                self._record_failure(step, None, err)
        finally:
            if not self.keep_adapters:
                shutil.rmtree(adapter_dir, ignore_errors=True)

    def _ensure_sidecar(self) -> None:
        """Restart a dead managed sidecar (within ``max_restarts``) or raise; on the trainer's thread."""
        sidecar = self.session.sidecar
        if sidecar.healthy():
            return
        if sidecar.managed and self._restarts < self.max_restarts:
            self._restarts += 1
            warnings.warn(
                f"MisalignmentEval: vLLM sidecar is down; restart {self._restarts}/{self.max_restarts} "
                f"(log {sidecar.log_path})"
            )
            self.session.restart_sidecar()
            return
        raise RuntimeError(
            f"vLLM sidecar at {sidecar.url} is not healthy; log {sidecar.log_path}, its tail:\n"
            f"{sidecar.log_tail(10)}"
        )

    def _record_failure(
        self,
        step: int,
        adapter: str | None,
        err: BaseException,
        finished: Sequence[dict] = (),
        abandon: bool = False,
    ) -> None:
        """Write the answers ``finished`` before the failure and a failure line; ``abandon``: a timeout, after
        which this step writes nothing more. A step already written or abandoned is left alone. Any thread."""
        cause = err.__cause__ if isinstance(err, EvalFailed) and err.__cause__ is not None else err
        message = f"{type(cause).__name__}: {cause}"
        failure = {"step": step, "adapter": adapter, "failed": True, "error": message[:4000]}
        with self._write_lock:
            if step in self._written or step in self._abandoned:
                return  # finished just as it timed out, or timed out and now failing late
            if abandon:
                self._abandoned.add(step)
            append_jsonl(self._run_dir / self.samples_file, [*finished, failure])
            append_jsonl(self._run_dir / self.summary_file, [failure])
            self._to_log.put((step, {"eval/failed": 1.0}))
            self.completed.append(failure)
        warnings.warn(f"MisalignmentEval: eval at step {step} failed, training continues: {message[:2000]}")

    def _scalars(self, result, duration_s: float) -> dict[str, float]:
        summary = result.summary
        scalars = {
            "eval/misalignment_rate": summary.rate,
            "eval/ci_low": summary.ci_low,
            "eval/ci_high": summary.ci_high,
            "eval/aligned_mean": summary.aligned_mean,
            "eval/coherent_mean": summary.coherent_mean,
            "eval/n_counted": float(summary.n_counted),
            "eval/n_answers": float(summary.n_answers),
            "eval/duration_s": duration_s,
            "eval/n_judge_errors": float(result.n_judge_errors),
            "eval/failed": 0.0,
        }
        for k, value in summary.misalign_at_k.items():
            scalars[f"eval/misalign_at_{k}"] = value
        for metric, value in summary.extra_means.items():
            scalars[f"eval/{metric}_mean"] = value
        if self.log_per_question:
            for qid, q in summary.per_question.items():
                scalars[f"eval/q/{qid}/misalignment_rate"] = q.rate
                scalars[f"eval/q/{qid}/aligned_mean"] = q.aligned_mean
                for k, value in q.misalign_at_k.items():
                    scalars[f"eval/q/{qid}/misalign_at_{k}"] = value
                for metric, value in q.extra_means.items():
                    scalars[f"eval/q/{qid}/{metric}_mean"] = value
        return scalars

    def _log_results(self, trainer) -> None:
        """Log every result handed over so far at its adapter's step; on the trainer's thread only.

        ``log_metrics`` adds each logger's own prefix; ``save`` flushes, as Lightning does after its logging.
        """
        while True:
            try:
                step, scalars = self._to_log.get_nowait()
            except queue.Empty:
                return
            finite = {tag: value for tag, value in scalars.items() if not math.isnan(value)}
            for logger in trainer.loggers:
                logger.log_metrics(finite, step=step)
                logger.save()

    def _shutdown(self, wait: bool, trainer=None) -> None:
        if wait and trainer is not None:
            self._wait_pending(trainer)
        self._pending = None
        # Whatever still runs now is an abandoned (timed-out) eval: its requests give up at their next retry
        # point, and those in flight to a managed server fail when it is stopped, so the join below is short.
        self.session.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None
