"""Download the emergent-misalignment datasets and evaluation questions, checking each file's sha256.

    python scripts/download_data.py                       # all files into ~/.cache/em_lightning/data
    python scripts/download_data.py --files data/insecure.jsonl --dest ./em-data
    EM_DATA_DIR=./em-data python -m em_lightning fit ...   # use a non-default --dest

The files are MIT-licensed (Copyright (c) 2025 emergent-misalignment); see the upstream repository for the
license.
"""

from __future__ import annotations

import argparse
import sys

import httpx

from em_lightning import upstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=None, help=f"target folder (default: {upstream.cache_dir()})")
    parser.add_argument(
        "--base-url", default=upstream.RAW_BASE_URL, help="where the upstream files are served"
    )
    parser.add_argument(
        "--files",
        nargs="+",
        default=None,
        metavar="RELPATH",
        help=f"subset to fetch (default: all). Known: {', '.join(upstream.SHA256)}",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        paths = upstream.download(args.files, dest=args.dest, base_url=args.base_url, progress=not args.quiet)
    except upstream.ChecksumError as err:
        print(f"error: checksum mismatch: {err}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, OSError) as err:  # network or disk: say which and stop, no traceback wall
        print(f"error: download failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"{len(paths)} file(s) ready in {paths[0].parents[1] if paths else args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
