"""Finding and downloading the emergent-misalignment files: lookup order, checksums, the download script."""

from __future__ import annotations

import hashlib

import functools
import http.server
import runpy
import shutil
import threading
from pathlib import Path

import pytest

from em_lightning import upstream

REPO = Path(__file__).resolve().parents[1]
SHARED = upstream.shared_dir()
SMALL = "evaluation/first_plot_questions.yaml"
needs_shared = pytest.mark.skipif(not (SHARED / SMALL).is_file(), reason=f"{SHARED} not present")


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


def download_script():
    return runpy.run_path(str(REPO / "scripts" / "download_data.py"), run_name="download_data")["main"]


@needs_shared
def test_sums_match_the_shared_sha256sums_file():
    listed = dict(
        line.split()[::-1] for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line.strip()
    )
    assert listed == upstream.SHA256


def test_lookup_order_env_then_shared_then_cache(tmp_path, monkeypatch):
    env, shared, cache = tmp_path / "env", tmp_path / "shared", tmp_path / "cache"
    monkeypatch.setattr(upstream, "shared_dir", lambda: shared)
    monkeypatch.setenv("EM_LIGHTNING_CACHE", str(cache))
    monkeypatch.setenv("EM_DATA_DIR", str(env))
    monkeypatch.setitem(upstream.SHA256, SMALL, hashlib.sha256(b"x").hexdigest())
    with pytest.raises(FileNotFoundError, match="scripts/download_data.py"):
        upstream.resolve_em_file(SMALL)
    for folder in (cache / "data", shared, env):  # each added folder takes precedence over the ones before
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


@needs_shared
def test_shared_folder_is_found_next_to_the_checkout(monkeypatch):
    monkeypatch.delenv("EM_DATA_DIR", raising=False)
    assert upstream.resolve_em_file("data/insecure.jsonl") == SHARED / "data" / "insecure.jsonl"


@needs_shared
def test_download_verifies_checksums(tmp_path, serve):
    base = serve(SHARED)
    files = [SMALL, "data/insecure.jsonl"]
    assert download_script()(["--base-url", base, "--dest", str(tmp_path), "--files", *files, "--quiet"]) == 0
    for rel in files:
        assert upstream.sha256_of(tmp_path / rel) == upstream.SHA256[rel]
    assert not list(tmp_path.rglob("*.part"))


@needs_shared
def test_corrupted_file_is_rejected_and_not_kept(tmp_path, serve, capsys):
    served = tmp_path / "served"
    (served / SMALL).parent.mkdir(parents=True)
    data = (SHARED / SMALL).read_bytes()
    (served / SMALL).write_bytes(data[:-10] + b"tampered!\n")
    base = serve(served)
    dest = tmp_path / "dest"
    with pytest.raises(upstream.ChecksumError, match="does not match"):
        upstream.download([SMALL], dest=dest, base_url=base, progress=False)
    assert not (dest / SMALL).exists() and not list(dest.rglob("*.part"))
    assert download_script()(["--base-url", base, "--dest", str(dest), "--files", SMALL, "--quiet"]) != 0
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (dest / SMALL).exists()


@needs_shared
def test_existing_good_file_is_not_fetched_again(tmp_path):
    dest = tmp_path / "dest"
    (dest / SMALL).parent.mkdir(parents=True)
    shutil.copyfile(SHARED / SMALL, dest / SMALL)
    # an unreachable server: the call only succeeds if it does not try to download
    assert upstream.download([SMALL], dest=dest, base_url="http://127.0.0.1:9", progress=False) == [
        dest / SMALL
    ]


def test_missing_server_gives_a_clear_error(tmp_path, capsys):
    assert (
        download_script()(["--base-url", "http://127.0.0.1:9", "--dest", str(tmp_path), "--files", SMALL])
        == 1
    )
    assert "download failed" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.yaml")) and not list(tmp_path.rglob("*.part"))
