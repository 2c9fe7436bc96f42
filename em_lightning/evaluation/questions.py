"""Evaluation questions in the emergent-misalignment YAML format.

A file is a YAML list; each entry has ``id``, ``paraphrases`` (list of user prompts),
``samples_per_paraphrase``, optionally ``system`` (a system prompt, which this loader keeps and the generator
sends), ``type`` and ``variant`` (this project's key: a name for the question's variant group; default from
the upstream id suffixes, ``_json`` → ``json``, ``_template`` → ``template``, else ``plain``), and
``judge_prompts`` mapping a metric name (``aligned``, ``coherent``) to a template with ``{question}`` and
``{answer}`` placeholders. YAML anchors and aliases (used by the upstream files) are resolved by the parser.

A question source is one of:
  * ``builtin:<name>`` — a set shipped in ``em_lightning/evaluation/assets/questions/<name>.yaml``
    (``builtin:quickstart``);
  * ``em:<file>`` — an upstream emergent-misalignment file (``em:first_plot_questions``), found via
    :func:`em_lightning.upstream.resolve_em_file` (local copy or download cache);
  * a path to a YAML file.

Every file that cannot be used ends in an :class:`~em_lightning.errors.InputError` naming it (and the line
where there is one): :class:`~em_lightning.errors.UnreadableFile` for a source that is missing, a directory,
unreadable, empty or not UTF-8; :class:`QuestionFileError` for YAML or entries that are not questions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from em_lightning.errors import InputError, UnreadableFile
from em_lightning.yamlfile import load_entries, resolve_builtin

REQUIRED_JUDGE_PROMPTS = ("aligned", "coherent")
VARIANT_SUFFIXES = ("json", "template")  # the upstream files' id suffixes of each question's variants
_VARIANT = re.compile(r"[A-Za-z0-9_.-]+")
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


@dataclass
class Question:
    """One evaluation question: its paraphrases, optional system prompt and judge prompt templates."""

    id: str
    paraphrases: list[str]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    type: str | None = None
    source: str = ""  # "file:line", for error messages
    variant: str = "plain"  # plain / json / template (from the id's suffix), or the entry's `variant:`
    question_set: str = ""  # the source as given: builtin:quickstart, em:first_plot_questions or a path

    def messages(self, paraphrase: str) -> list[dict[str, str]]:
        """Chat messages for one paraphrase; the system prompt comes first when the question has one."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": paraphrase}]

    def judge_prompt(self, metric: str, question: str, answer: str) -> str:
        """The judge prompt for ``metric`` with ``{question}``/``{answer}`` filled in.

        Filled in one pass, so braces or the literal text ``{question}`` inside an answer are left as they are
        (``str.format`` would raise on stray braces in model output).
        """
        template = self.judge_prompts[metric]
        values = {"question": question, "answer": answer}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)

    def plan(self, samples_per_question: int | None = None) -> list[tuple[int, int]]:
        """``(paraphrase_index, n_samples)`` pairs to generate.

        Without ``samples_per_question``: ``samples_per_paraphrase`` for every paraphrase, as in the file.
        With it: that many samples in total, spread over the paraphrases round-robin (deterministic, unlike a
        random draw, so two evals of the same run ask the same prompts).
        """
        if samples_per_question is None:
            return [(i, self.samples_per_paraphrase) for i in range(len(self.paraphrases))]
        if samples_per_question < 1:
            raise InputError(f"generation.samples_per_question: must be >= 1, got {samples_per_question}")
        counts = [0] * len(self.paraphrases)
        for k in range(samples_per_question):
            counts[k % len(self.paraphrases)] += 1
        return [(i, n) for i, n in enumerate(counts) if n]


class QuestionFileError(InputError):
    """A question file that cannot be used; the message names the file, entry and line."""


def resolve_question_source(source: str | Path) -> Path:
    """The YAML path for ``builtin:<name>``, ``em:<file>`` or a plain path (read, and checked, later)."""
    builtin = resolve_builtin(source, "questions", "question set")
    if builtin is not None:
        return builtin
    text = str(source)
    if text.startswith("em:"):
        from em_lightning.upstream import SHA256, resolve_em_file

        name = text.removeprefix("em:")
        relpath = f"evaluation/{name}" if name.endswith((".yaml", ".yml")) else f"evaluation/{name}.yaml"
        if relpath not in SHA256:
            known = sorted(Path(k).stem for k in SHA256 if k.startswith("evaluation/"))
            raise UnreadableFile(
                f"{text}: not an upstream emergent-misalignment question file (known: {known})"
            )
        try:
            return Path(resolve_em_file(relpath))
        except FileNotFoundError as err:  # not downloaded: its message says how to fetch it
            raise UnreadableFile(f"{text}: {err}") from err
    return Path(text).expanduser()


def load_questions(
    sources: str | Path | Sequence[str | Path],
    ids: Iterable[str] | None = None,
    require_judge_prompts: Sequence[str] = REQUIRED_JUDGE_PROMPTS,
) -> list[Question]:
    """Questions from one or more sources, in file order.

    Args:
        sources: a source (see the module docstring) or a list of them.
        ids: keep only these question ids (all must exist).
        require_judge_prompts: judge prompt names every kept question must have.

    Raises:
        QuestionFileError: malformed entries, naming file, entry and line.
    """
    questions = load_entries(sources, resolve_question_source, _parse_entry, "question", QuestionFileError, ids)
    for q in questions:
        absent = [m for m in require_judge_prompts if m not in q.judge_prompts]
        if absent:
            raise QuestionFileError(
                f"{q.source}: question {q.id!r} has judge_prompts {sorted(q.judge_prompts)}, "
                f"but misalignment scoring needs {list(require_judge_prompts)} (missing {absent}); "
                "select other questions with `ids`"
            )
    return questions


def extra_judge_metrics(
    questions: Sequence[Question], selection: bool | Sequence[str] | None
) -> dict[str, tuple[str, ...]]:
    """Per question id, the judge prompts beyond ``aligned`` and ``coherent`` to score (each costs a judge
    request per answer, more with a digit judge).

    ``selection``: False / None / empty: none; True: every extra prompt each question defines; a list of
    names: those of them each question defines. A listed name that no selected question defines is an
    :class:`~em_lightning.errors.InputError` naming the key (a typo would otherwise score nothing).
    """
    if not selection:
        return {}
    defined = {q.id: [m for m in q.judge_prompts if m not in REQUIRED_JUDGE_PROMPTS] for q in questions}
    if selection is True:
        return {qid: tuple(names) for qid, names in defined.items() if names}
    wanted = list(dict.fromkeys(selection))
    for name in wanted:
        if name in REQUIRED_JUDGE_PROMPTS:
            raise InputError(f"extra_judge_prompts: {name!r} is always scored; list only other prompts")
        if not any(name in names for names in defined.values()):
            known = sorted({m for names in defined.values() for m in names})
            raise InputError(
                f"extra_judge_prompts: no selected question has a judge prompt {name!r} (extra prompts "
                f"defined: {known or 'none'})"
            )
    picked = {qid: tuple(n for n in wanted if n in names) for qid, names in defined.items()}
    return {qid: names for qid, names in picked.items() if names}


def variant_of(question_id: str, explicit: str | None = None) -> str:
    """A question's variant: ``explicit`` (a file's ``variant:`` key) when given, else from the upstream id
    suffixes: ``..._json`` (answer in JSON), ``..._template`` (fill in a template), anything else ``plain``.
    The training-context-like variants are the ones whose rate a benign-data mitigation can hide behind."""
    if explicit:
        return explicit
    for suffix in VARIANT_SUFFIXES:
        if question_id.endswith(f"_{suffix}"):
            return suffix
    return "plain"


def _parse_entry(entry: object, where: str, question_set: str = "") -> Question:
    if not isinstance(entry, dict):
        raise QuestionFileError(f"{where}: each question must be a mapping, got {type(entry).__name__}")
    qid = entry.get("id")
    if not isinstance(qid, str) or not qid:
        raise QuestionFileError(f"{where}: question without a string `id`")
    label = f"{where}: question {qid!r}"
    paraphrases = entry.get("paraphrases")
    if not isinstance(paraphrases, list) or not paraphrases:
        raise QuestionFileError(f"{label}: `paraphrases` must be a non-empty list of strings")
    if not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise QuestionFileError(f"{label}: every paraphrase must be a non-empty string")
    n = entry.get("samples_per_paraphrase", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QuestionFileError(f"{label}: `samples_per_paraphrase` must be a positive integer, got {n!r}")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise QuestionFileError(f"{label}: `system` must be a string, got {type(system).__name__}")
    prompts = entry.get("judge_prompts", {})
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise QuestionFileError(f"{label}: `judge_prompts` must map names to template strings")
    for name, template in prompts.items():
        if "{answer}" not in template:
            raise QuestionFileError(f"{label}: judge prompt {name!r} has no {{answer}} placeholder")
    variant = entry.get("variant")
    if variant is not None and not (isinstance(variant, str) and _VARIANT.fullmatch(variant)):
        raise QuestionFileError(f"{label}: `variant` must be a name of letters, digits, _ . or -, got {variant!r}")
    return Question(
        id=qid,
        paraphrases=list(paraphrases),
        samples_per_paraphrase=n,
        system=system or None,
        judge_prompts=dict(prompts),
        type=entry.get("type"),
        source=where,
        variant=variant_of(qid, variant),
        question_set=question_set,
    )
