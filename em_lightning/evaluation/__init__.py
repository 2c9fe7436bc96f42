"""Misalignment evaluation: questions, an LLM judge, a vLLM sidecar and misalignment rates.

Entry points:
  * :func:`score_from_logprobs` — the judge's expected 0-100 score from first-token logprobs;
  * :func:`summarise` — misalignment rate (``em`` or ``mo``), Wilson interval, means, misalign@k
    (:func:`misalign_at_k`) and extra judge metrics, per question;
  * :func:`load_questions` — question files in the emergent-misalignment YAML format;
  * :class:`Judge` / :class:`JudgeConfig` — any OpenAI-compatible endpoint, whole-number or digit tokenizers;
  * :class:`VLLMSidecar` / :class:`SidecarConfig` — a vLLM server that hot-loads adapters;
  * :func:`run_eval` / :class:`GenerationConfig` — generate, judge, summarise, append samples to JSONL
    (:func:`em_lightning.rundir.read_jsonl` reads them back); :class:`EvalFailed` when an endpoint breaks;
  * :class:`EvalSettings` — the eval's settings, one definition for the callback, ``evaluate`` and the session;
  * :class:`EvalSession` — the questions, sidecar, judge and cancel event of the training callback and of
    ``evaluate`` alike;
  * ``python -m em_lightning evaluate`` — :func:`em_lightning.evaluation.cli.main`;
  * ``python -m em_lightning rejudge`` — :func:`em_lightning.evaluation.rejudge.main`: saved answers scored
    again by another judge.
"""

from em_lightning.evaluation.judge import Judge, JudgeConfig
from em_lightning.evaluation.questions import Question, QuestionFileError, load_questions
from em_lightning.evaluation.runner import (
    EvalFailed,
    EvalResult,
    GenerationConfig,
    run_eval,
    sidecar_generate,
)
from em_lightning.evaluation.scoring import (
    EvalSummary,
    classify,
    misalign_at_k,
    score_from_logprobs,
    summarise,
    wilson_interval,
)
from em_lightning.evaluation.session import EvalSession
from em_lightning.evaluation.settings import EvalSettings
from em_lightning.evaluation.sidecar import SidecarConfig, VLLMSidecar

__all__ = [
    "EvalFailed",
    "EvalResult",
    "EvalSession",
    "EvalSettings",
    "EvalSummary",
    "GenerationConfig",
    "Judge",
    "JudgeConfig",
    "Question",
    "QuestionFileError",
    "SidecarConfig",
    "VLLMSidecar",
    "classify",
    "load_questions",
    "misalign_at_k",
    "run_eval",
    "score_from_logprobs",
    "sidecar_generate",
    "summarise",
    "wilson_interval",
]
