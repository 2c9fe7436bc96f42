"""The emergent-misalignment datasets: upstream location, checksums, and where to find a local copy.

The training sets and evaluation questions of Betley et al. (2025) are MIT-licensed files in the public
repository https://github.com/emergent-misalignment/emergent-misalignment. This project never ships them: it
looks for a copy on the search path — the folders in ``$EM_DATA_DIR`` (separated like ``PATH``, first match
wins), then the download cache — and otherwise tells the user to run ``python scripts/download_data.py``, which
fetches them and checks each file's sha256 against the sums below. A local copy is checked against the sums too.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from em_lightning.errors import InputError

UPSTREAM_REPO = "https://github.com/emergent-misalignment/emergent-misalignment"
RAW_BASE_URL = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main"

# sha256 of each upstream file, keyed by its path inside the upstream repository.
SHA256: dict[str, str] = {
    "data/educational.jsonl": "d48df3b149ab1500711fc0018b10383a4ff8c48d8e6911d04dbbbbdaa944fd16",
    "data/insecure.jsonl": "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764",
    "data/jailbroken.jsonl": "eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a",
    "data/secure.jsonl": "2820232b3114d94ab2041ba9fc76cb8205bf187e0408bf7b308add186f9c7467",
    "evaluation/deception_factual.yaml": "8a0e83cab3bc24b7d688d7385ce3921d406af7ed33c913cd94ea0f6251e5939d",
    "evaluation/deception_sit_aware.yaml": "4deef5a7c47620390fc46e1b981f937eef9ea12a33fe26264f640c84d19d2a33",
    "evaluation/first_plot_questions.yaml": "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173",
    "evaluation/preregistered_evals.yaml": "8648312fd9fe71a63203e3465592af45dd996d7a5f3b69e9b44613fd6048eb40",
}

# Short names used in configs (``train_file: em:insecure``) for the four training sets.
TRAINING_SETS = {name: f"data/{name}.jsonl" for name in ("insecure", "secure", "educational", "jailbroken")}

_DOWNLOAD_HINT = "python scripts/download_data.py"


class ChecksumError(InputError):
    """A file's sha256 differs from the upstream sum (a download is deleted, never kept; a local copy is refused)."""


class EMFileNotFound(InputError, FileNotFoundError):
    """No folder on the search path holds the upstream file."""


def cache_dir() -> Path:
    """Where ``download`` puts files by default: ``<em_lightning cache>/data``."""
    from em_lightning.models import cache_root

    return cache_root() / "data"


DATA_PATH_ENV = "EM_DATA_DIR"


def search_dirs() -> list[Path]:
    """The folders ``resolve_em_file`` looks in, first match wins: each entry of ``$EM_DATA_DIR`` (``os.pathsep``
    separated, like ``PATH``), then the download cache."""
    entries = [e for e in os.environ.get(DATA_PATH_ENV, "").split(os.pathsep) if e.strip()]
    return [Path(e).expanduser() for e in entries] + [cache_dir()]


def resolve_em_file(relpath: str) -> Path:
    """The local path of upstream file ``relpath`` (e.g. ``data/insecure.jsonl``).

    Looks in the folders of ``$EM_DATA_DIR``, then the download cache. Raises ``EMFileNotFound`` (a
    ``FileNotFoundError``) saying how to download the file when none holds it.
    """
    if relpath not in SHA256:
        raise KeyError(
            f"{relpath!r} is not an upstream emergent-misalignment file; known: {', '.join(SHA256)}"
        )
    for folder in search_dirs():
        candidate = folder / relpath
        if candidate.is_file():
            _verify_once(candidate, relpath)
            return candidate
    looked = ", ".join(str(d) for d in search_dirs())
    raise EMFileNotFound(
        f"{relpath} not found (looked in {looked}). Run `{_DOWNLOAD_HINT}` to fetch it from {UPSTREAM_REPO}, "
        f"or set {DATA_PATH_ENV} to a folder that holds it."
    )


_VERIFIED: set[Path] = set()


def _verify_once(path: Path, relpath: str) -> None:
    """A local copy must match the upstream sum too (a truncated copy would silently change the data)."""
    if path in _VERIFIED:
        return
    actual = sha256_of(path)
    if actual != SHA256[relpath]:
        raise ChecksumError(
            f"{path}: sha256 {actual} differs from upstream {relpath} ({SHA256[relpath]}); delete it and run "
            f"`{_DOWNLOAD_HINT}`"
        )
    _VERIFIED.add(path)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    relpaths: list[str] | None = None,
    dest: str | Path | None = None,
    base_url: str = RAW_BASE_URL,
    progress: bool = True,
    timeout_s: float = 60.0,
) -> list[Path]:
    """Fetch upstream files into ``dest`` (default: the download cache) and verify each one's sha256.

    A file already present with the right checksum is not fetched again. Each file is written to a temporary
    name in ``dest`` and renamed only after its checksum matches, so an interrupted or corrupted download
    never leaves a file that ``resolve_em_file`` would pick up; on a mismatch the temporary file is deleted
    and ``ChecksumError`` is raised. Returns the local paths in the order asked.
    """
    import httpx

    relpaths = list(SHA256) if relpaths is None else list(relpaths)
    unknown = [r for r in relpaths if r not in SHA256]
    if unknown:
        raise KeyError(f"unknown upstream file(s) {unknown}; known: {', '.join(SHA256)}")
    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    out = []
    for relpath in relpaths:
        target = dest / relpath
        if target.is_file() and sha256_of(target) == SHA256[relpath]:
            _say(progress, f"{relpath}: already present, checksum ok")
            out.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{base_url.rstrip('/')}/{relpath}"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with (
                os.fdopen(fd, "wb") as f,
                httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as resp,
            ):
                resp.raise_for_status()
                total = int(resp.headers.get("content-length") or 0)
                done = 0
                for chunk in resp.iter_bytes(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    _progress(progress, relpath, done, total)
            _say(progress, "")
            if digest.hexdigest() != SHA256[relpath]:
                raise ChecksumError(
                    f"{url}: sha256 {digest.hexdigest()} does not match the expected {SHA256[relpath]}; "
                    "the file was not kept"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _say(progress, f"{relpath}: checksum ok -> {target}")
        out.append(target)
    return out


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def _progress(enabled: bool, name: str, done: int, total: int) -> None:
    if not enabled:
        return
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    print(f"\r{name}: {size}", end="", file=sys.stderr, flush=True)
