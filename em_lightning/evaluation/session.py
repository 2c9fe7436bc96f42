"""The one owner of an evaluation's moving parts: the vLLM sidecar, the judge and their cancel event.

Both entry points go through :class:`EvalSession`: the training callback
(:class:`~em_lightning.callbacks.misalignment_eval.MisalignmentEval`, one eval per adapter along a run) and
``python -m em_lightning evaluate`` (one eval). So the questions, the served model, the generation settings,
the judge and the scoring are chosen the same way in both, here.

Building a session checks what is cheap to check (the misalignment definition, the judge's API key) and reads
nothing, so building a config never touches a question file; :meth:`~EvalSession.load_questions` reads them,
:meth:`~EvalSession.start` starts (or attaches to) the server, :meth:`~EvalSession.evaluate` scores one
adapter, :meth:`~EvalSession.stop` ends it all.
"""

from __future__ import annotations

import threading
from pathlib import Path

from em_lightning.errors import InputError
from em_lightning.evaluation.client import api_key_from_env
from em_lightning.evaluation.judge import DEFAULT_LABEL, Judge, JudgeConfig, check_label
from em_lightning.evaluation.questions import Question, extra_judge_metrics, load_questions
from em_lightning.evaluation.runner import EvalResult, GenerationConfig, run_eval, sidecar_generate
from em_lightning.evaluation.scoring import check_ks, definition_rule
from em_lightning.evaluation.settings import EvalSettings
from em_lightning.evaluation.sidecar import SidecarConfig, VLLMSidecar
from em_lightning.lora import adapter_rank, read_adapter_config


def served_model_dir(sidecar: SidecarConfig, model: str | None, adapter_dir: Path | None) -> str | None:
    """The base model a managed sidecar serves, as a dir or hub id; None when there is nothing to decide.

    ``sidecar.url`` (someone else's server) and ``sidecar.model`` (served as given) need no base model. Else
    ``model`` (training's base weights, or ``evaluate --model``), else the ``base_model_name_or_path`` of the
    adapter's config, resolved like a training run's ``model.base.name``.
    """
    if sidecar.url or sidecar.model:
        return None
    if model is None and adapter_dir is not None:
        model = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not model:
        raise InputError(
            "sidecar.model: not set, and no base model to serve is known (the training module's weights "
            "dir, evaluate's --model, or the adapter's base_model_name_or_path); set sidecar.model to a dir "
            "or hub id, or sidecar.url to a running server. Tiny in-code models cannot be served by vLLM."
        )
    from em_lightning.models import resolve_model_dir

    return resolve_model_dir(model)


class EvalSession:
    """Questions, a vLLM sidecar, a judge and one cancel event, for any number of evals in turn.

    Args:
        settings: the eval's settings (:class:`~em_lightning.evaluation.settings.EvalSettings`: questions,
            generation, judge, sidecar, definition, misalign@k, extra judge prompts).

    ``cancel`` is shared by the sidecar's and the judge's requests: setting it (:meth:`cancel_eval`) makes
    those in flight give up at their next retry point. Each :meth:`evaluate` clears it first: evals run one at
    a time, so one cancelled before has finished by then.
    """

    def __init__(self, settings: EvalSettings | None = None):
        self.settings = settings = settings or EvalSettings()
        # The cheap checks now, not at the first eval (N training steps in) or after a server start-up.
        definition_rule(settings.definition)
        self.misalign_at_k = check_ks(settings.misalign_at_k)
        api_key_from_env(settings.judge.api_key_env)
        check_label(settings.judge.label or DEFAULT_LABEL)
        self.extra_metrics: dict[str, tuple[str, ...]] = {}
        self.questions: list[Question] | None = None
        self.sidecar: VLLMSidecar | None = None
        self.judge: Judge | None = None
        self.cancel = threading.Event()

    # The parts other code reads, by their old names.
    @property
    def generation(self) -> GenerationConfig:
        return self.settings.generation

    @property
    def judge_config(self) -> JudgeConfig:
        return self.settings.judge

    @property
    def sidecar_config(self) -> SidecarConfig:
        return self.settings.sidecar

    @property
    def definition(self) -> str:
        return self.settings.definition

    def load_questions(self) -> list[Question]:
        """Read the question files (once): a bad one raises an InputError naming the file and line."""
        if self.questions is None:
            questions = load_questions(self.settings.questions, ids=self.settings.question_ids)
            self.extra_metrics = extra_judge_metrics(questions, self.settings.extra_judge_prompts)
            self.questions = questions
        return self.questions

    def start(
        self,
        model: str | None = None,
        adapter_dir: Path | None = None,
        lora_rank: int | None = None,
        log_path: Path | None = None,
        trainer_devices: int = 0,
    ) -> EvalSession:
        """Read the questions, then start (or attach to) the sidecar and build the judge.

        Args:
            model: the base model the adapters belong to (see :func:`served_model_dir`).
            adapter_dir: an adapter to come, whose config gives the base model when ``model`` is None and the
                rank when ``lora_rank`` is None.
            lora_rank: rank of the adapters to come (sizes ``--max-lora-rank``).
            log_path: the server's log file when ``sidecar.log_file`` is not set.
            trainer_devices: GPUs training uses, the first of the job's (``sidecar.gpus`` takes the next ones).

        Call it from the main thread where possible (the server's kill-on-parent-death signal, see
        :mod:`em_lightning.evaluation.sidecar`).
        """
        self.load_questions()
        if lora_rank is None and adapter_dir is not None:
            lora_rank = adapter_rank(adapter_dir)
        model_dir = served_model_dir(self.sidecar_config, model, adapter_dir)
        self.cancel.clear()
        sidecar = VLLMSidecar(
            self.sidecar_config,
            model_dir=model_dir,
            lora_rank=lora_rank,
            log_path=log_path,
            cancel=self.cancel,
            trainer_devices=trainer_devices,
        )
        sidecar.start()  # stops itself and raises with the log's tail if the server does not come up
        self.sidecar = sidecar
        try:
            self.judge = Judge(self.judge_config, base_url=sidecar.url, cancel=self.cancel)
        except BaseException:
            self.stop()
            raise
        return self

    def evaluate(
        self,
        adapter_dir: Path | None = None,
        step: int | None = None,
        prefix: str = "eval",
        jsonl_path: Path | None = None,
    ) -> EvalResult:
        """Load ``adapter_dir`` under a fresh name ``<prefix>-<hex>`` (None: the base model), generate, judge
        and summarise (see :func:`~em_lightning.evaluation.runner.run_eval`, which appends the samples to
        ``jsonl_path`` if given). Raises :class:`~em_lightning.evaluation.runner.EvalFailed` when an endpoint
        breaks; any thread, one eval at a time."""
        if self.sidecar is None or self.judge is None:
            raise RuntimeError("EvalSession.evaluate before start()")
        self.cancel.clear()
        adapter = self.sidecar.load_adapter(adapter_dir, prefix=prefix) if adapter_dir is not None else None
        return run_eval(
            self.load_questions(),
            sidecar_generate(self.sidecar, adapter or self.sidecar.base_model, self.generation),
            self.judge,
            self.generation,
            self.definition,
            step=step,
            adapter=adapter,
            jsonl_path=jsonl_path,
            cancel=self.cancel,
            ks=self.misalign_at_k,
            extra_metrics=self.extra_metrics,
        )

    def cancel_eval(self) -> None:
        """Make the requests of the eval in flight give up at their next retry point."""
        self.cancel.set()

    def restart_sidecar(self) -> None:
        """Restart a managed server on the same port (the judge's client keeps its URL); adapters are gone."""
        self.cancel.clear()  # a cancelled eval set it, which would abort the start-up at once
        self.sidecar.restart()

    def stop(self) -> None:
        """Cancel requests in flight, close the judge, stop a managed server. Idempotent."""
        self.cancel.set()
        judge, self.judge = self.judge, None
        sidecar, self.sidecar = self.sidecar, None
        if judge is not None:
            judge.close()
        if sidecar is not None:
            sidecar.stop()
