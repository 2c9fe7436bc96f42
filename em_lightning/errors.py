"""The one base class for errors in what a user gave us (a file, a config value).

Every such error names the file and 1-based line (``insecure.jsonl:17: ...``) or the config key
(``data.max_length: ...``). ``python -m em_lightning`` prints it as one ``error:`` line and exits with status 2
instead of a traceback: the message is the whole story, the stack is ours.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input; the message names the file (and line) or the config key."""


class UnreadableFile(InputError, FileNotFoundError):
    """A named input file that is missing, a directory, unreadable, empty or not UTF-8 text."""


def read_text(path: str | Path, what: str = "file", allow_empty: bool = False) -> str:
    """The UTF-8 text of ``path``, or an :class:`UnreadableFile` naming it (and the line of a bad byte).

    ``what`` says what the file is for (``"data file"``, ``"question file"``), so the message reads
    ``questions.yaml: question file is empty``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UnreadableFile(f"{path}: {what} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableFile(f"{path}: {what} does not exist") from None
    except OSError as err:  # permissions, a broken mount, ...
        raise UnreadableFile(f"{path}: {what} cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise UnreadableFile(
            f"{path}:{line}: {what} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column})"
        ) from None
    if not allow_empty and not text.strip():
        raise UnreadableFile(f"{path}: {what} is empty")
    return text.removeprefix("\ufeff")  # a byte-order mark is not content
