"""A small client for OpenAI-compatible HTTP endpoints (vLLM, hosted APIs): timeouts and bounded retries.

Every request has a timeout; transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried a
bounded number of times with exponential backoff; other HTTP errors and malformed JSON raise at once. A shared
``threading.Event`` lets a caller abandon an eval between requests (e.g. when it hangs past its deadline).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import httpx

from em_lightning.errors import InputError

log = logging.getLogger(__name__)


def api_key_from_env(env: str | None) -> str | None:
    """The API key in the environment variable named ``env`` (None: no key), or an
    :class:`~em_lightning.errors.InputError` naming the config key when that variable is unset or empty.

    The one check of the judge's key: :class:`~em_lightning.evaluation.session.EvalSession` calls it when an
    eval is configured (seconds, not after a server start-up), the client when it is built.
    """
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise InputError(
            f"judge.api_key_env is {env!r}, but the environment variable {env} is not set or empty: "
            f"export {env}=... before starting (the key never goes in a config)"
        )
    return key


class EndpointError(RuntimeError):
    """A request that failed for good (after retries), or an answer that is not what the API promises.

    ``status`` is the HTTP status when the server refused the request outright (a 4xx other than 429), else
    None: callers tell a request rejected for its content (400, e.g. a flagged answer) from a broken endpoint.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Cancelled(EndpointError):
    """The caller's cancel event was set."""


class OpenAIClient:
    """Thread-safe JSON client for one base URL.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (with or without a trailing ``/v1``; paths below add it).
        api_key_env: name of an environment variable holding the API key, sent as a bearer token. The key
            itself is never stored in config, logged, or put in an exception message.
        timeout_s: per-request timeout (connect, read, write).
        max_retries: retries after the first attempt for transient failures.
        cancel: when set, requests raise :class:`Cancelled` before they start and between retries.
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        cancel: threading.Event | None = None,
    ):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.max_retries = max_retries
        self.cancel = cancel or threading.Event()
        key = api_key_from_env(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def __repr__(self) -> str:  # never show headers
        return f"OpenAIClient({self.base_url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        payload: dict | None = None,
        retries: int | None = None,
        json_answer: bool = True,
    ) -> Any:
        """Body of ``method path`` (parsed JSON, or text with ``json_answer=False``) with bounded retries.

        Raises :class:`EndpointError` when it cannot.
        """
        attempts = 1 + (self.max_retries if retries is None else retries)
        last: str = ""
        for attempt in range(attempts):
            if self.cancel.is_set():
                raise Cancelled(f"{method} {path}: cancelled")
            try:
                response = self._http.request(method, path, json=payload)
            except httpx.TransportError as err:  # connection refused/reset, timeouts
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                elif response.status_code >= 400:
                    raise EndpointError(
                        f"{method} {self.base_url}{path}: HTTP {response.status_code}: {response.text[:500]}",
                        status=response.status_code,
                    )
                elif not json_answer:
                    return response.text
                else:
                    try:
                        return response.json()
                    except ValueError as err:
                        raise EndpointError(
                            f"{method} {self.base_url}{path}: answer is not JSON: {response.text[:200]!r}"
                        ) from err
            if attempt + 1 < attempts:
                delay = min(8.0, 0.5 * 2**attempt)
                log.debug("%s %s failed (%s); retry %d in %.1fs", method, path, last, attempt + 1, delay)
                if self.cancel.wait(delay):
                    raise Cancelled(f"{method} {path}: cancelled")
        raise EndpointError(f"{method} {self.base_url}{path}: failed after {attempts} attempts: {last}")

    def post(self, path: str, payload: dict, retries: int | None = None, json_answer: bool = True) -> Any:
        """POST JSON, see :meth:`request`."""
        return self.request("POST", path, payload, retries, json_answer)

    def get(self, path: str, retries: int | None = None) -> Any:
        """GET, see :meth:`request`."""
        return self.request("GET", path, None, retries)

    def list_models(self) -> list[dict]:
        """``/v1/models`` entries."""
        data = self.get("/v1/models")
        try:
            return list(data["data"])
        except (KeyError, TypeError) as err:
            raise EndpointError(f"{self.base_url}/v1/models: unexpected answer {str(data)[:200]}") from err

    def base_model_name(self) -> str:
        """The served base model's name (the entry without a parent adapter)."""
        models = self.list_models()
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise EndpointError(f"{self.base_url}/v1/models lists no base model: {models}")
        return bases[0]

    def chat(self, model: str, messages: list[dict], **params: Any) -> dict:
        """``/v1/chat/completions``; checks that the answer has ``choices``."""
        data = self.post("/v1/chat/completions", {"model": model, "messages": messages, **params})
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise EndpointError(
                f"{self.base_url}/v1/chat/completions: no choices in answer {str(data)[:300]}"
            )
        return data

    def chat_texts(self, model: str, messages: list[dict], **params: Any) -> list[tuple[str, str | None]]:
        """``(text, finish_reason)`` of every choice of a chat completion, in index order."""
        data = self.chat(model, messages, **params)
        out = []
        for choice in sorted(data["choices"], key=lambda c: c.get("index", 0)):
            content = (choice.get("message") or {}).get("content")
            if not isinstance(content, str):
                raise EndpointError(f"chat completion choice without text content: {str(choice)[:300]}")
            out.append((content, choice.get("finish_reason")))
        return out
