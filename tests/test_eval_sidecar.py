"""VLLMSidecar's life cycle with the fake server standing in for vLLM (started and stopped as a real one is):
the kill-on-parent-death signal and threads, stop() during an adapter load, where the server log goes, adapter
loads whose answer is lost, and adapter configs that cannot be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from em_lightning.errors import InputError, UnreadableFile
from em_lightning.evaluation import SidecarConfig, VLLMSidecar
from em_lightning.evaluation.client import EndpointError
from em_lightning.lora import adapter_rank
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


def _adapter_dir(tmp_path, config_text: str = '{"r": 4}'):
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(config_text)
    return adapter


def test_a_load_whose_answer_was_lost_counts_as_loaded_and_a_refused_one_raises(tmp_path):
    """The first attempt loads the adapter but its answer is lost (503); the retry is refused as a duplicate.
    The server lists the fresh name, so the load succeeded. A load refused outright (400) is an error."""
    adapter = _adapter_dir(tmp_path)
    with FakeOpenAI() as fake:
        sidecar = VLLMSidecar(SidecarConfig(url=fake.url, max_retries=1)).start()
        fake.lose_load_answers = 1
        name = sidecar.load_adapter(adapter)
        loads = [p for path, p, _ in fake.requests if path == "/v1/load_lora_adapter"]
        assert [p["lora_name"] for p in loads] == [name, name]  # answered 503, then 400 "already loaded"
        assert sidecar.current_adapter == name and fake.adapters == {name}

        fake.refuse_loads = True
        with pytest.raises(EndpointError, match="HTTP 400.*invalid LoRA adapter"):
            sidecar.load_adapter(adapter)
        assert sidecar.current_adapter is None and fake.adapters == set()  # the previous one was unloaded
        sidecar.stop()


def test_adapter_config_that_cannot_be_read_names_the_file(tmp_path):
    config = tmp_path / "adapter" / "adapter_config.json"
    (tmp_path / "adapter").mkdir()
    with pytest.raises(UnreadableFile, match=rf"{config}: adapter config .* does not exist"):
        adapter_rank(tmp_path / "adapter")
    for text, needle in [
        ('{"r": 4,\n "lora_alpha": }', rf"{config}:2: not valid JSON"),
        ("[4]", rf"{config}: expected a JSON object, got list"),
        ('{"r": "four"}', rf"{config}: `r` and `rank_pattern` must be positive integers"),
        ("", rf"{config}: adapter config .* is empty"),
    ]:
        _adapter_dir(tmp_path, text)
        with pytest.raises(InputError, match=needle):
            adapter_rank(tmp_path / "adapter")
    _adapter_dir(tmp_path, '{"r": 4, "rank_pattern": {"q_proj": 16}}')
    assert adapter_rank(tmp_path / "adapter") == 16


def test_sidecar_gpus_come_from_the_jobs_own_list_after_trainings(monkeypatch):
    from em_lightning.evaluation.sidecar import sidecar_visible_devices

    assert sidecar_visible_devices("4,5,6", gpus=1, trainer_devices=2) == "6"  # a SLURM job's GPUs 4-6
    assert sidecar_visible_devices(" 3, 7 ", gpus=1, trainer_devices=1) == "7"
    with pytest.raises(InputError, match=r"sidecar\.gpus: 2 GPUs .* sees 3 .* first 2"):
        sidecar_visible_devices("4,5,6", gpus=2, trainer_devices=2)
    sidecar = VLLMSidecar(SidecarConfig(gpus=2, tensor_parallel_size=2, extra_args=["--enforce-eager"]),
                          model_dir="m", lora_rank=8, trainer_devices=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert sidecar.environment()["CUDA_VISIBLE_DEVICES"] == "3,5"
    command = sidecar.command(port=1234)
    assert command[command.index("--tensor-parallel-size") + 1] == "2" and command[-1] == "--enforce-eager"
    both = VLLMSidecar(SidecarConfig(gpus=1, env={"CUDA_VISIBLE_DEVICES": "1"}), model_dir="m", lora_rank=8)
    with pytest.raises(InputError, match="keep one"):
        both.environment()
