"""VLLMSidecar's life cycle with the fake server standing in for vLLM (started and stopped as a real one is):
the kill-on-parent-death signal and threads, stop() during an adapter load, and where the server log goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from em_lightning.evaluation import SidecarConfig, VLLMSidecar
from tests.eval_helpers import fake_managed_sidecar
from tests.fake_openai import FakeOpenAI


def test_server_started_from_a_thread_outlives_that_thread(tmp_path):
    """PR_SET_PDEATHSIG fires when the spawning *thread* ends: a server started (or restarted) from a worker
    thread must not die with it."""
    sidecar = VLLMSidecar(SidecarConfig(**fake_managed_sidecar(tmp_path)), log_path=tmp_path / "s.log")
    starter = threading.Thread(target=sidecar.start, name="eval-worker")
    starter.start()
    starter.join()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            sidecar._proc.wait(timeout=2)  # still running after its thread has gone
        assert sidecar.healthy()
    finally:
        pgid = sidecar.pid
        sidecar.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_stop_does_not_wait_for_an_adapter_load_in_flight(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with FakeOpenAI() as fake:
        fake.block_loads = threading.Event()
        sidecar = VLLMSidecar(SidecarConfig(url=fake.url, request_timeout_s=60, max_retries=0)).start()
        errors = []

        def load():
            try:
                sidecar.load_adapter(adapter)
            except Exception as err:  # noqa: BLE001 - the load is expected to fail once the client is closed
                errors.append(err)

        loader = threading.Thread(target=load)
        loader.start()
        while not any(path == "/v1/load_lora_adapter" for path, _, _ in fake.requests):
            threading.Event().wait(0.01)
        sidecar.stop()
        stopped_while_loading = loader.is_alive()
        fake.block_loads.set()
        loader.join(30)
    assert stopped_while_loading  # stop() returned while the load request was still waiting for its answer
    assert sidecar.current_adapter is None


def test_temp_log_is_removed_on_stop_and_kept_when_the_server_fails(tmp_path, caplog):
    """Without a log path the server logs into a temp dir: removed by a normal stop, kept (and named in the
    error) when the server cannot start."""
    sidecar = VLLMSidecar(SidecarConfig(**fake_managed_sidecar(tmp_path))).start()
    log_dir = sidecar.log_path.parent
    assert "Application startup complete" in sidecar.log_path.read_text()
    sidecar.stop()
    assert not log_dir.exists()

    broken = VLLMSidecar(SidecarConfig(python=sys.executable, model=str(tmp_path), startup_timeout_s=60))
    with pytest.raises(RuntimeError, match="exited with code") as info:
        broken.start()
    assert str(broken.log_path) in str(info.value)
    assert "vllm" in broken.log_path.read_text().lower()  # "No module named vllm": the log is still there
    assert str(broken.log_path) in caplog.text  # and the warning says where
    broken.log_path.unlink()
    broken.log_path.parent.rmdir()
