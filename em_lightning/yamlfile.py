"""YAML lists of entries with ids, read with the line of every entry: the one reader of question sets
(:mod:`em_lightning.evaluation.questions`) and probe sets (:mod:`em_lightning.probe`).

A source is ``builtin:<name>`` (``em_lightning/evaluation/assets/<kind>/<name>.yaml``, one folder per kind of
set, so a probe set is never offered as a question set) or a path. Every problem is an
:class:`~em_lightning.errors.InputError` naming the file and line: the caller's own subclass for the YAML and
its entries, :class:`~em_lightning.errors.UnreadableFile` for a source that cannot be read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import yaml

from em_lightning.errors import InputError, UnreadableFile, read_text

ASSETS = Path(__file__).parent / "evaluation" / "assets"
BUILTIN = "builtin:"

T = TypeVar("T")


def builtin_names(kind: str) -> list[str]:
    """The names ``builtin:<name>`` offers for ``kind`` (``questions``, ``probes``)."""
    return sorted(p.stem for p in (ASSETS / kind).glob("*.yaml"))


def resolve_builtin(source: str | Path, kind: str, what: str) -> Path | None:
    """The asset path of ``builtin:<name>`` in ``assets/<kind>/``; None when ``source`` is not ``builtin:``.

    ``what`` names the set in the error (``question set``), which lists the names there are.
    """
    text = str(source)
    if not text.startswith(BUILTIN):
        return None
    name = text.removeprefix(BUILTIN)
    path = ASSETS / kind / f"{name}.yaml"
    if not path.is_file() or "/" in name:
        raise UnreadableFile(f"{text}: no built-in {what} {name!r} (available: {builtin_names(kind)})")
    return path


def read_yaml_list(path: Path, what: str, error: type[InputError]) -> list[tuple[object, str]]:
    """``(entry, "file:line")`` for each entry of the YAML list in ``path``.

    ``what`` is the file's role in messages (``question file``); ``error`` the class raised for YAML that does
    not parse or is not a list (the file's own problems; an unreadable file is an ``UnreadableFile``).
    """
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # the same document again, for the line of each entry
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        # An unclosed bracket is found where the file ends: say where what it interrupts began.
        context = (
            f" ({err.context}, line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
        )
        raise error(f"{where}: not valid YAML: {err.problem or err.context}{context}") from None
    except yaml.YAMLError as err:  # e.g. a control character, which the reader refuses before any parsing
        raise error(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, list):
        got = "no document (only comments?)" if data is None else f"a {type(data).__name__}"
        entries = what.removesuffix(" file")
        raise error(f"{path}: expected a YAML list of {entries} entries, got {got}")
    lines = [node.start_mark.line + 1 for node in root.value]
    return list(zip(data, (f"{path}:{line}" for line in lines)))


def load_entries(
    sources: str | Path | Sequence[str | Path],
    resolve: Callable[[str | Path], Path],
    parse: Callable[[object, str, str], T],
    noun: str,
    error: type[InputError],
    ids: Iterable[str] | None = None,
) -> list[T]:
    """The entries of every source in order, each parsed by ``parse(entry, "file:line", source)`` (``source``
    as given, e.g. ``builtin:em``: which set the entry came from).

    Ids are unique across all sources (a repeat names both places); ``ids`` keeps only those (every one must
    exist); no entry left is an error. ``noun`` names an entry in messages (``question``, ``probe``); parsed
    entries have ``id`` and ``source`` (``file:line``).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    names = [str(s) for s in sources]
    entries: list[T] = []
    seen: dict[str, str] = {}
    for source in sources:
        for raw, where in read_yaml_list(resolve(source), f"{noun} file", error):
            entry = parse(raw, where, str(source))
            if entry.id in seen:
                raise error(f"{entry.source}: {noun} id {entry.id!r} already defined at {seen[entry.id]}")
            seen[entry.id] = entry.source
            entries.append(entry)
    if ids is not None:
        wanted = list(ids)
        missing = [i for i in wanted if i not in seen]
        if missing:
            raise error(f"{noun} ids {missing} not found in {names}")
        entries = [e for e in entries if e.id in set(wanted)]
    if not entries:
        raise error(f"no {noun} entries in {names}")
    return entries
