"""Misalignment evaluation: questions, an LLM judge, a vLLM sidecar, rates and a torchmetrics metric.

Entry points:
  * :func:`score_from_logprobs` — the judge's expected 0-100 score from first-token logprobs;
  * :func:`summarise` — misalignment rate (``em`` or ``mo``), Wilson interval, means, per question;
  * :func:`load_questions` — question files in the emergent-misalignment YAML format;
  * :class:`Judge` / :class:`JudgeConfig` — any OpenAI-compatible endpoint, whole-number or digit tokenizers;
  * :class:`VLLMSidecar` / :class:`SidecarConfig` — a vLLM server that hot-loads adapters;
  * :func:`run_eval` / :class:`GenerationConfig` — generate, judge, summarise, append samples to JSONL
    (:func:`read_records` reads them back); :class:`EvalFailed` when an endpoint breaks;
  * :class:`MisalignmentRate` — the rate as a torchmetrics metric that reduces across ranks;
  * ``python -m em_lightning evaluate`` — :func:`em_lightning.evaluation.cli.main`.
"""

from em_lightning.evaluation.judge import Judge, JudgeConfig
from em_lightning.evaluation.metric import MisalignmentRate
from em_lightning.evaluation.questions import Question, QuestionFileError, load_questions
from em_lightning.evaluation.runner import (
    EvalFailed,
    EvalResult,
    GenerationConfig,
    read_records,
    run_eval,
    sidecar_generate,
)
from em_lightning.evaluation.scoring import (
    EvalSummary,
    classify,
    score_from_logprobs,
    summarise,
    wilson_interval,
)
from em_lightning.evaluation.sidecar import SidecarConfig, VLLMSidecar

__all__ = [
    "EvalFailed",
    "EvalResult",
    "EvalSummary",
    "GenerationConfig",
    "Judge",
    "JudgeConfig",
    "MisalignmentRate",
    "Question",
    "QuestionFileError",
    "SidecarConfig",
    "VLLMSidecar",
    "classify",
    "load_questions",
    "read_records",
    "run_eval",
    "score_from_logprobs",
    "sidecar_generate",
    "summarise",
    "wilson_interval",
]
