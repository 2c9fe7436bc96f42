"""Finding and downloading the emergent-misalignment files: lookup order, checksums, the download script."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from em_lightning import upstream

REPO = Path(__file__).resolve().parents[1]
SMALL = "evaluation/first_plot_questions.yaml"


@pytest.fixture
def serve():
    """Serve a folder over HTTP on 127.0.0.1 from a thread; returns the base URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def download_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run scripts/download_data.py as a user would (a subprocess: tests do not import from scripts/)."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / "download_data.py"), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)


@pytest.mark.em_data
def test_sums_match_the_upstream_sha256sums_file(real_em_file):
    folder = real_em_file(SMALL).parents[1]
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"{folder} has no SHA256SUMS file to compare with")
    listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    assert listed == upstream.SHA256


@pytest.mark.em_data
def test_real_files_load_as_training_data(real_em_file):
    from em_lightning.data import load_rows

    real_em_file("data/insecure.jsonl")
    assert len(load_rows("em:insecure")) == 6000


def test_lookup_order_follows_the_search_path_then_the_cache(tmp_path, monkeypatch):
    first, second, cache = tmp_path / "first", tmp_path / "second", tmp_path / "cache"
    monkeypatch.setenv("EM_LIGHTNING_CACHE", str(cache))
    monkeypatch.setenv("EM_DATA_DIR", os.pathsep.join([str(first), str(second)]))
    monkeypatch.setitem(upstream.SHA256, SMALL, hashlib.sha256(b"x").hexdigest())
    assert upstream.search_dirs() == [first, second, cache / "data"]
    with pytest.raises(FileNotFoundError, match="scripts/download_data.py"):
        upstream.resolve_em_file(SMALL)
    for folder in (cache / "data", second, first):  # each added folder takes precedence over the ones after it
        (folder / SMALL).parent.mkdir(parents=True)
        (folder / SMALL).write_text("x")
        assert upstream.resolve_em_file(SMALL) == folder / SMALL
    with pytest.raises(KeyError, match="not an upstream"):
        upstream.resolve_em_file("data/other.jsonl")


def test_a_local_copy_with_the_wrong_sum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_DATA_DIR", str(tmp_path))
    (tmp_path / SMALL).parent.mkdir(parents=True)
    (tmp_path / SMALL).write_text("truncated")
    with pytest.raises(upstream.ChecksumError, match=r"differs from upstream"):
        upstream.resolve_em_file(SMALL)


def test_no_search_path_entry_is_hard_coded(tmp_path, monkeypatch):
    monkeypatch.delenv("EM_DATA_DIR", raising=False)
    monkeypatch.setenv("EM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    assert upstream.search_dirs() == [tmp_path / "cache" / "data"]


def test_download_verifies_checksums(tmp_path, serve, fake_em_data):
    """Against a local server holding the synthetic files: the in-process download accepts them (the fixture
    registered their sums); the script, a subprocess that checks the real upstream sums, refuses them and keeps
    nothing."""
    base = serve(fake_em_data)
    files = [SMALL, "data/insecure.jsonl"]
    assert upstream.download(files, dest=tmp_path / "dest", base_url=base, progress=False)
    for rel in files:
        assert upstream.sha256_of(tmp_path / "dest" / rel) == upstream.SHA256[rel]
    assert not list((tmp_path / "dest").rglob("*.part"))
    done = download_script("--base-url", base, "--dest", str(tmp_path / "script"), "--files", SMALL, "--quiet")
    assert done.returncode != 0 and "checksum mismatch" in done.stderr  # synthetic file, real upstream sum
    assert not (tmp_path / "script" / SMALL).exists() and not list((tmp_path / "script").rglob("*.part"))


def test_corrupted_file_is_rejected_and_not_kept(tmp_path, serve, fake_em_data):
    served = tmp_path / "served"
    (served / SMALL).parent.mkdir(parents=True)
    data = (fake_em_data / SMALL).read_bytes()
    (served / SMALL).write_bytes(data[:-10] + b"tampered!\n")
    base = serve(served)
    dest = tmp_path / "dest"
    with pytest.raises(upstream.ChecksumError, match="does not match"):
        upstream.download([SMALL], dest=dest, base_url=base, progress=False)
    assert not (dest / SMALL).exists() and not list(dest.rglob("*.part"))


def test_existing_good_file_is_not_fetched_again(tmp_path, fake_em_data):
    dest = tmp_path / "dest"
    (dest / SMALL).parent.mkdir(parents=True)
    shutil.copyfile(fake_em_data / SMALL, dest / SMALL)
    # an unreachable server: the call only succeeds if it does not try to download
    assert upstream.download([SMALL], dest=dest, base_url="http://127.0.0.1:9", progress=False) == [
        dest / SMALL
    ]


def test_missing_server_gives_a_clear_error(tmp_path):
    done = download_script("--base-url", "http://127.0.0.1:9", "--dest", str(tmp_path), "--files", SMALL)
    assert done.returncode == 1 and "download failed" in done.stderr
    assert not list(tmp_path.rglob("*.yaml")) and not list(tmp_path.rglob("*.part"))
