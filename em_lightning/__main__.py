"""Entry point: ``python -m em_lightning {fit,validate,test,evaluate} ...`` (also the ``em-lightning`` script)."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None):
    """Run the CLI; ``args`` (without the program name) makes it callable from tests. Returns the CLI object."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "evaluate":
        from em_lightning.evaluation.cli import main as evaluate

        return evaluate(argv[1:])
    from em_lightning.cli import EMLightningCLI

    return EMLightningCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
