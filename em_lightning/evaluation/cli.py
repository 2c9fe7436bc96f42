"""``python -m em_lightning evaluate``: the misalignment eval of a saved adapter (or the base model).

Same questions, sidecar, judge and scoring as the in-training callback; writes the same samples JSONL and a
summary:

    python -m em_lightning evaluate --adapter runs/quickstart/version_0/adapters/final \\
        --sidecar.dtype float32 --judge.answer_prefix "Score: "      # SmolLM2 judging itself: a smoke test
    python -m em_lightning evaluate --adapter DIR --questions em:first_plot_questions \\
        --generation.samples_per_question 50 --judge.base_url https://api.openai.com \\
        --judge.model gpt-4o-2024-08-06 --judge.api_key_env OPENAI_API_KEY

``--config`` takes a YAML file with the same keys (``python -m em_lightning evaluate --print_config`` writes
one), e.g. ``{adapter: DIR, generation: {samples_per_question: 50}, judge: {base_url: ..., model: ...}}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from em_lightning import rundir
from em_lightning.evaluation.runner import summary_dict
from em_lightning.evaluation.session import EvalSession
from em_lightning.evaluation.settings import EvalSettings, takes_eval_settings

log = logging.getLogger(__name__)


# The eight eval settings (questions ... extra_judge_prompts) come in **settings: takes_eval_settings puts them
# in the signature jsonargparse reads, after `model`, with the defaults of EvalSettings (the callback's too).
@takes_eval_settings
def evaluate(
    adapter: str | None = None,
    model: str | None = None,
    *,
    output_dir: str | None = None,
    step: int | None = None,
    **settings,
) -> dict:
    """Score one adapter (or the base model) for misalignment.

    Args:
        adapter: PEFT adapter dir (``adapter_config.json`` + weights); None evaluates the base model alone.
        model: base model (built-in name such as ``smollm2-135m-instruct``, a dir, or a hub id); None: the
            adapter's ``base_model_name_or_path``. Not used with ``sidecar.url`` (the server is already
            running) or ``sidecar.model`` (served as given).
        {eval_settings}
        output_dir: where ``misalignment_samples.jsonl`` and ``misalignment_summary.jsonl`` go (both appended,
            one summary line per eval: the training callback's layout, which ``analyze`` and ``rejudge`` read);
            default ``<adapter>/misalignment_eval`` or ``./misalignment_eval_base``.
        step: training step to record with the samples (e.g. the checkpoint's).

    Returns:
        The summary dict that is also appended to ``misalignment_summary.jsonl``.

    A request the judge refuses for one answer leaves that answer unscored (counted in ``n_judge_errors``);
    a broken endpoint raises :class:`~em_lightning.evaluation.runner.EvalFailed` after the answers finished
    so far are appended to the samples file. Bad input (a question file, the adapter's config, a missing API
    key) fails before the sidecar starts.
    """
    config = EvalSettings.take(settings)
    session = EvalSession(config)
    adapter_dir = Path(adapter).expanduser().resolve() if adapter else None
    out = (
        Path(output_dir)
        if output_dir
        else (adapter_dir / "misalignment_eval" if adapter_dir else Path("misalignment_eval_base"))
    )
    session.start(model=model, adapter_dir=adapter_dir, log_path=out / rundir.SIDECAR_LOG)
    try:
        result = session.evaluate(adapter_dir, step=step, jsonl_path=out / rundir.SAMPLES)
        summary = summary_dict(
            result,
            adapter=str(adapter_dir) if adapter_dir else None,
            model=session.sidecar.model_dir or session.sidecar.base_model,
            step=step,
            questions=config.questions,
            judge_model=session.judge.model,
            judge_number_tokens=session.judge.number_tokens,
            generation=vars(config.generation),
        )
    finally:
        session.stop()
    rundir.append_jsonl(out / rundir.SUMMARY, [summary])  # one line per eval, as the training callback writes
    _print_summary(summary, out)
    return summary


def _print_summary(summary: dict, out: Path) -> None:
    def fmt(x):
        return "nan" if x is None else f"{x:.3f}"

    print(
        f"misalignment rate ({summary['definition']}): {fmt(summary['rate'])} "
        f"[{fmt(summary['ci_low'])}, {fmt(summary['ci_high'])}] over {summary['n_counted']} of "
        f"{summary['n_answers']} answers; aligned mean {fmt(summary['aligned_mean'])}, "
        f"coherent mean {fmt(summary['coherent_mean'])}"
    )
    if summary["n_judge_errors"] or summary["n_generation_errors"]:
        print(
            f"  requests refused for their content: {summary['n_judge_errors']} answers unscored by the "
            f"judge, {summary['n_generation_errors']} not generated (see 'error' in the samples)"
        )
    for k, value in (summary.get("misalign_at_k") or {}).items():
        print(f"  misalign@{k} (mean over questions with >= {k} counted answers): {fmt(value)}")
    for metric, value in (summary.get("extra_means") or {}).items():
        print(f"  {metric} mean: {fmt(value)}")
    for qid, q in summary["per_question"].items():
        at_k = "".join(f"  misalign@{k} {fmt(v)}" for k, v in (q.get("misalign_at_k") or {}).items())
        print(f"  {qid:30s} rate {fmt(q['rate'])}  ({q['n_misaligned']}/{q['n_counted']}){at_k}")
    print(f"samples: {out / rundir.SAMPLES}\nsummary: {out / rundir.SUMMARY}")


def main(args: list[str] | None = None) -> dict:
    """Parse ``args`` (after ``evaluate``; None: ``sys.argv``), run :func:`evaluate`; ``--config`` works."""
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return CLI(evaluate, args=args, as_positional=False)
