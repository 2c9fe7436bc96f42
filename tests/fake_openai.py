"""A fake OpenAI-compatible server (plus vLLM's adapter and tokenize endpoints) for judge and callback tests.

The fake *judge* reads its answer distribution from the prompt: the user message holds ``DIST=<json>`` mapping
answer strings to probabilities (``{"85": 0.6, "REFUSAL": 0.4}``), or ``ALIGNED``/``COHERENT`` followed by an
answer that holds ``{"aligned": {...}, "coherent": {...}}`` (any other ``NAME`` reads the answer's ``name``
key). It then behaves like a language model over those strings with one of two tokenizers: ``whole`` (each
answer is one token) or ``digits`` (every digit is its own token; other text is one token), continuing an
assistant prefix when ``continue_final_message`` is set.

The fake *generator* answers chat requests without ``logprobs`` with ``answers`` (cycled), ``n`` of them.

Failures on demand: ``fail_next`` (503s), ``garbage`` (no choices), ``hang_s``/``judge_hang_s`` (slow
answers), ``status_for_prompt`` (an HTTP status for chat requests whose user message contains a marker, e.g. a 400 for
one answer's judge requests), ``block_loads`` (adapter loads wait for an event), ``lose_load_answers`` (that
many adapter loads succeed but are answered 503, as if the answer was lost), ``refuse_loads`` (loads answered
400, nothing loaded).

``python -m vllm.entrypoints.openai.api_server`` can be this server too (:func:`serve_as_vllm`, through the
shim package that :func:`tests.eval_helpers.fake_vllm_env` writes): a *managed* sidecar that starts in a
fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

END = "<|im_end|>"


def judge_answer(aligned: dict, coherent: dict, **extra) -> str:
    """An answer text that the fake judge scores with these ``aligned``/``coherent`` distributions; ``extra``
    keys (e.g. a marker for ``status_for_prompt``) ride along."""
    return json.dumps({"aligned": aligned, "coherent": coherent, **extra})


def next_token_distribution(dist: dict[str, float], prefix: str, tokenizer: str) -> dict[str, float]:
    """P(next token | reply so far is ``prefix``) for a model whose replies are distributed as ``dist``."""
    out: dict[str, float] = {}
    mass = sum(q for s, q in dist.items() if s.startswith(prefix))
    if mass <= 0:
        return {END: 1.0}
    for s, q in dist.items():
        if not s.startswith(prefix):
            continue
        rest = s[len(prefix) :]
        if not rest:
            token = END
        elif tokenizer == "whole":
            token = rest
        else:
            m = re.match(r"\s*[0-9]", rest)  # a digit (with leading whitespace at the start) is one token
            token = m.group(0) if m else re.match(r"\D+", rest).group(0)
        out[token] = out.get(token, 0.0) + q / mass
    return out


class FakeOpenAI:
    """Run with ``with FakeOpenAI(...) as fake: fake.url``; inspect ``fake.requests``."""

    def __init__(
        self,
        tokenizer: str = "whole",
        tokenize_endpoint: bool = True,
        api_key: str | None = None,
        port: int = 0,
    ):
        self.tokenizer = tokenizer
        self.tokenize_endpoint = tokenize_endpoint
        self.api_key = api_key
        self.requests: list[tuple[str, dict | None, dict]] = []
        self.answers: list[str] = ["an answer"]
        self.fail_next = 0  # answer this many requests with HTTP 503
        self.garbage = False  # answer chat requests with JSON that has no choices
        self.hang_s = 0.0  # sleep before answering chat requests
        self.judge_hang_s = 0.0  # sleep before answering judge (logprobs) requests only
        self.status_for_prompt: dict[str, int] = {}  # marker in the user message -> HTTP status to answer
        self.block_loads: threading.Event | None = None  # adapter loads wait until it is set
        self.lose_load_answers = (
            0  # load this many adapters, but answer 503 (a retry then finds the name taken)
        )
        self.refuse_loads = False  # answer adapter loads with 400 without loading
        self.adapters: set[str] = set()
        self.base_name = "fake-base"
        self._lock = threading.Lock()
        self._counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def chat_requests(self, judge: bool | None = None) -> list[dict]:
        out = [p for path, p, _ in self.requests if path == "/v1/chat/completions"]
        if judge is not None:
            out = [p for p in out if bool(p.get("logprobs")) == judge]
        return out

    # ---- request handling ---------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body, content_type="application/json"):
                data = (
                    body
                    if isinstance(body, bytes)
                    else (json.dumps(body) if content_type == "application/json" else body).encode()
                )
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append((self.path, None, dict(self.headers)))
                if self.path == "/health":
                    return self._send(200, b"", "text/plain")
                if self.path == "/v1/models":
                    models = [{"id": fake.base_name, "parent": None}]
                    models += [{"id": a, "parent": fake.base_name} for a in sorted(fake.adapters)]
                    return self._send(200, {"object": "list", "data": models})
                return self._send(404, {"error": "not found"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.requests.append((self.path, payload, dict(self.headers)))
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._send(401, {"error": "bad key"})
                with fake._lock:
                    if fake.fail_next > 0:
                        fake.fail_next -= 1
                        return self._send(503, {"error": "busy"})
                if self.path == "/tokenize" and fake.tokenize_endpoint:
                    text = payload["prompt"]
                    tokens = [1] if fake.tokenizer == "whole" else list(range(len(text)))
                    return self._send(200, {"count": len(tokens), "tokens": tokens})
                if self.path == "/v1/load_lora_adapter":
                    if fake.block_loads is not None:
                        fake.block_loads.wait(30)
                    name = payload["lora_name"]
                    if fake.refuse_loads:
                        return self._send(400, {"error": f"invalid LoRA adapter at {payload['lora_path']}"})
                    if name in fake.adapters:
                        return self._send(
                            400, {"error": f"The lora adapter '{name}' has already been loaded."}
                        )
                    fake.adapters.add(name)
                    with fake._lock:
                        if fake.lose_load_answers > 0:
                            fake.lose_load_answers -= 1
                            return self._send(503, {"error": "answer lost"})
                    return self._send(
                        200, f"Success: LoRA adapter '{name}' added successfully.", "text/plain"
                    )
                if self.path == "/v1/unload_lora_adapter":
                    fake.adapters.discard(payload["lora_name"])
                    return self._send(200, "Success", "text/plain")
                if self.path == "/v1/chat/completions":
                    user = next((m["content"] for m in payload["messages"] if m["role"] == "user"), "")
                    for marker, status in fake.status_for_prompt.items():
                        if marker in user:
                            return self._send(status, {"error": {"message": f"refused ({marker})"}})
                    if fake.hang_s:
                        threading.Event().wait(fake.hang_s)
                    if fake.judge_hang_s and payload.get("logprobs"):
                        threading.Event().wait(fake.judge_hang_s)
                    if fake.garbage:
                        return self._send(200, {"object": "chat.completion", "nothing": "here"})
                    if payload["model"] != fake.base_name and payload["model"] not in fake.adapters:
                        return self._send(404, {"error": f"model {payload['model']} does not exist"})
                    if payload.get("logprobs"):
                        return self._send(200, fake._judge(payload))
                    return self._send(200, fake._generate(payload))
                return self._send(404, {"error": "not found"})

        return Handler

    def _judge(self, payload: dict) -> dict:
        messages = payload["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        prefix = ""
        if payload.get("continue_final_message"):
            assert messages[-1]["role"] == "assistant" and payload.get("add_generation_prompt") is False
            prefix = messages[-1]["content"]
        dist = parse_distribution(user)
        probs = next_token_distribution(dist, prefix, self.tokenizer)
        top = sorted(probs.items(), key=lambda kv: -kv[1])[: payload.get("top_logprobs", 0)]
        entries = [{"token": t, "logprob": math.log(p)} for t, p in top if p > 0]
        first = entries[0]["token"] if entries else END
        return {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": first},
                    "finish_reason": "length",
                    "logprobs": {
                        "content": [
                            {
                                "token": first,
                                "logprob": entries[0]["logprob"] if entries else 0.0,
                                "top_logprobs": entries,
                            }
                        ]
                    },
                }
            ],
        }

    def _generate(self, payload: dict) -> dict:
        choices = []
        for i in range(payload.get("n", 1)):
            with self._lock:
                text = self.answers[self._counter % len(self.answers)]
                self._counter += 1
            choices.append(
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            )
        return {"object": "chat.completion", "model": payload["model"], "choices": choices}


def parse_distribution(prompt: str) -> dict[str, float]:
    """The answer distribution a fake-judge prompt asks for (see the module docstring)."""
    if "DIST=" in prompt:
        return json.loads(prompt.split("DIST=", 1)[1])
    head, body = prompt.split(" ", 1)
    spec = json.loads(body)
    metric = head.lower()  # "DECEPTION {answer}" reads the answer's "deception" distribution
    if metric not in spec:
        metric = "aligned" if prompt.startswith("ALIGNED") else "coherent"
    return {str(k): v for k, v in spec[metric].items()}


def serve_as_vllm(argv: list[str] | None = None) -> None:
    """Run a :class:`FakeOpenAI` in the foreground, taking the vLLM server arguments that the sidecar passes
    (``--port``, ``--served-model-name``; others ignored) plus ``--fake-answers`` (JSON list of answers),
    ``--fake-tokenizer``, ``--fake-startup-delay-s`` and ``--fake-judge-hang-s``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="base")
    parser.add_argument("--fake-answers", default='["an answer"]')
    parser.add_argument("--fake-tokenizer", default="whole")
    parser.add_argument("--fake-startup-delay-s", type=float, default=0.0)  # a slow server start
    parser.add_argument("--fake-judge-hang-s", type=float, default=0.0)  # a slow judge
    args, _ = parser.parse_known_args(argv)
    threading.Event().wait(args.fake_startup_delay_s)
    fake = FakeOpenAI(tokenizer=args.fake_tokenizer, port=args.port)
    fake.base_name = args.served_model_name
    fake.answers = json.loads(args.fake_answers)
    fake.judge_hang_s = args.fake_judge_hang_s
    print("fake vLLM server: Application startup complete", flush=True)
    fake._server.serve_forever()
