"""An in-process misalignment signal every few steps: how much likelier the current adapter finds misaligned
reference answers than aligned ones (no sampling, no judge, no sidecar; see :mod:`em_lightning.probe`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L

from em_lightning import rundir
from em_lightning.errors import InputError
from em_lightning.probe import NORMALIZATIONS, Normalize, ProbeScorer, ProbeScores, load_probe_set


class MisalignmentProbe(L.Callback):
    """Every ``every_n_steps`` optimizer steps, at the start (step 0: the base model) and at the end, scores
    the probe set's reference answers under the current adapter (:class:`em_lightning.probe.ProbeScorer`) and
    logs

    * to every logger, at the step: ``probe/log_odds`` and ``probe/misaligned_prob`` (means over entries),
      ``probe/aligned_logprob`` and ``probe/misaligned_logprob`` (means over entries of each side's
      logmeanexp), ``probe/duration_s``, and per entry ``probe/q/<id>/log_odds`` (``log_per_question``);
    * one JSON line per probed step to ``<run dir>/<jsonl>`` (``probe.jsonl``; the run dir is resolved in
      ``setup`` on every rank with :func:`em_lightning.rundir.resolve_run_dir`)::

        {"step": 10, "log_odds": -0.41, "misaligned_prob": 0.40, "aligned_logprob": -2.1,
         "misaligned_logprob": -2.5, "questions": {"one_wish": -0.38, ...}, "normalize": "mean",
         "probe_set": "builtin:em", "n_entries": 10, "n_answers": 80, "duration_s": 0.9,
         "answers": {"one_wish": {"aligned": [-2.0, ...], "misaligned": [-2.6, ...]}, ...}}

      (``answers``, each answer's score in file order, only with ``record_answers``; a non-finite value is
      written as null).

    Scoring runs in the trainer's thread under ``torch.no_grad()`` with every module in eval mode (dropout
    off), restores each module's train/eval flag and leaves every ``.grad`` as it was; it goes through the
    module's training forward and the trainer's precision context. Under DDP or FSDP every rank scores the
    whole set (the same forwards on every rank, as sharded forwards need) and rank zero logs and writes. After
    a resume the probe goes on from the checkpointed last probed step; the resumed run writes its own version
    dir's ``probe.jsonl``.

    The probe file is read and tokenised in ``setup`` on every rank: a bad file stops the run before training,
    naming its file and line.

    Args:
        probes: probe set(s): ``builtin:em`` (shipped) or YAML path(s) (format in :mod:`em_lightning.probe`).
        probe_ids: score only these entry ids.
        every_n_steps: optimizer steps between probes.
        normalize: ``mean`` (per-token log-probability of each answer; default) or ``sum``.
        batch_size: answers per forward pass.
        max_length: longest conversation (question + answer) in tokens; a longer one is an error.
        probe_at_start: also probe before the first update (the base model: the reference for the shift).
        probe_at_end: also probe when training ends, if that step was not just probed.
        log_per_question: log ``probe/q/<id>/log_odds`` too.
        jsonl: file name in the run dir; None: no file.
        record_answers: put every answer's score in the JSONL lines.
    """

    def __init__(
        self,
        probes: str | list[str] = "builtin:em",
        probe_ids: list[str] | None = None,
        every_n_steps: int = 10,
        normalize: Normalize = "mean",
        batch_size: int = 16,
        max_length: int = 2048,
        probe_at_start: bool = True,
        probe_at_end: bool = True,
        log_per_question: bool = True,
        jsonl: str | None = rundir.PROBE,
        record_answers: bool = True,
    ):
        for key, value, ok in (
            ("every_n_steps", every_n_steps, every_n_steps >= 1),
            ("batch_size", batch_size, batch_size >= 1),
            ("max_length", max_length, max_length >= 1),
            ("normalize", normalize, normalize in NORMALIZATIONS),
        ):
            if not ok:
                raise InputError(f"MisalignmentProbe.{key}: invalid value {value!r}")
        self.probes, self.probe_ids = probes, probe_ids
        self.every_n_steps, self.normalize = every_n_steps, normalize
        self.batch_size, self.max_length = batch_size, max_length
        self.probe_at_start, self.probe_at_end = probe_at_start, probe_at_end
        self.log_per_question, self.jsonl, self.record_answers = log_per_question, jsonl, record_answers
        self.scorer: ProbeScorer | None = None
        self.history: list[dict] = []  # this fit's records (every rank), for tests and scripts
        self.run_dir: Path | None = None  # resolved in setup, on every rank
        self._last_step: int | None = None

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self._last_step = None
        self.history = []
        entries = load_probe_set(self.probes, self.probe_ids)  # every rank: a bad file fails before training
        self.scorer = ProbeScorer(
            entries, pl_module.tokenizer, self.normalize, self.batch_size, self.max_length
        )
        # Every rank, here: trainer.log_dir is a broadcast from rank zero, so asking for it on rank zero alone
        # (when writing) would leave rank zero waiting for ranks that never join.
        self.run_dir = rundir.resolve_run_dir(trainer) if trainer is not None else None

    def on_train_start(self, trainer, pl_module):
        if self.probe_at_start and trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self.probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.probe_at_end and trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")

    def probe(self, trainer, pl_module) -> ProbeScores:
        """Score the probe set now (every rank), log and write it at ``trainer.global_step`` (rank zero)."""
        step = trainer.global_step
        self._last_step = step
        started = time.perf_counter()
        scores = self.scorer.score(
            pl_module, device=pl_module.device, context=trainer.precision_plugin.forward_context()
        )
        duration = time.perf_counter() - started
        source = self.probes if isinstance(self.probes, str) else list(self.probes)
        record = scores.record(
            step,
            include_answers=self.record_answers,
            probe_set=source,
            n_entries=len(scores.questions),
            n_answers=self.scorer.n_answers,
            duration_s=duration,
        )
        self.history.append(record)
        if trainer.is_global_zero:  # nothing collective below: the run dir was resolved in setup
            self._log(trainer, scores, duration, step)
            if self.jsonl and self.run_dir is not None:
                rundir.append_jsonl(self.run_dir / self.jsonl, [record])  # one line per write: a crash loses nothing
        return scores

    def _log(self, trainer, scores: ProbeScores, duration: float, step: int) -> None:
        metrics = {
            "probe/log_odds": scores.log_odds,
            "probe/misaligned_prob": scores.misaligned_prob,
            "probe/aligned_logprob": scores.aligned_logprob,
            "probe/misaligned_logprob": scores.misaligned_logprob,
            "probe/duration_s": duration,
        }
        if self.log_per_question:
            metrics.update({f"probe/q/{qid}/log_odds": value for qid, value in scores.questions.items()})
        metrics = {tag: value for tag, value in metrics.items() if math.isfinite(value)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
