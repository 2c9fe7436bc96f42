"""Entry point: ``python -m em_lightning {fit,validate,test,evaluate,rejudge,direction,sweep,analyze} ...`` (also
the ``em-lightning`` script)."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None):
    """Run the CLI; ``args`` (without the program name) makes it callable from tests. Returns the CLI object.

    Errors in the user's input (:class:`em_lightning.errors.InputError`) propagate from here; :func:`run` turns
    them into one ``error:`` line.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "evaluate":
        from em_lightning.evaluation.cli import main as evaluate

        return evaluate(argv[1:])
    if argv and argv[0] == "direction":
        from em_lightning.direction import main as direction

        return direction(argv[1:])
    if argv and argv[0] == "rejudge":
        from em_lightning.evaluation.rejudge import main as rejudge

        return rejudge(argv[1:])
    if argv and argv[0] == "sweep":
        from em_lightning.sweep.cli import main as sweep

        return sweep(argv[1:])
    if argv and argv[0] == "analyze":
        from em_lightning.analysis.cli import main as analyze

        return analyze(argv[1:])
    from em_lightning.cli import EMLightningCLI

    return EMLightningCLI(args=args)  # None: LightningCLI reads sys.argv itself


def run() -> int:
    """The command line: bad input (a file, a config value) ends in one ``error:`` line naming the file and line
    or the config key, and exit status 2 — not a traceback. Anything else is a bug and keeps its traceback."""
    from em_lightning.errors import InputError

    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
