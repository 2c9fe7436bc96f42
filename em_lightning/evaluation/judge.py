"""An LLM judge on any OpenAI-compatible chat endpoint, scoring answers 0-100 from its token probabilities.

The judge is asked for one token at temperature 0 with the top 20 logprobs, and the score is the expectation
over the number tokens (:func:`score_from_logprobs`). That assumes every number 0..100 is one token, true for
GPT-4o or Llama 3. Qwen, Gemma and SmolLM2 spell numbers digit by digit, so the first token only ever carries
0-9 and the rule would read "85" as "8". For such judges (``number_tokens: digits``) the same expectation is
computed by walking the digit tree: after a prefix such as "8" the endpoint is asked to continue the assistant
message "8" (vLLM's ``continue_final_message``), which gives P(next digit | "8") and, as the rest of the mass,
P(the number ends | "8"). P("85") = P("8")·P("5" | "8")·P(end | "85"); prefixes that leave 0..100 ("07",
"150") are dropped, as a whole-number judge's "150" token would be. Prefixes are expanded most likely first;
those below ``digit_min_prob``, or beyond ``digit_max_requests`` continuation requests, are taken to end where
they are (with a peaked judge that is 2-6 requests per score). ``auto`` asks the server's ``/tokenize`` how it
splits "57" and "100".
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from em_lightning.errors import InputError
from em_lightning.evaluation.client import EndpointError, OpenAIClient
from em_lightning.evaluation.scoring import _ASCII_INT, expected_score, score_from_logprobs

log = logging.getLogger(__name__)

NumberTokens = Literal["whole", "digits", "auto"]
DEFAULT_LABEL = "default"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_label(label: str) -> str:
    """``label`` if it can name a folder (``judged/<label>/``), else an InputError naming ``judge.label``."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise InputError(f"judge.label: letters, digits, _ . - (starting with a letter or digit), got {label!r}")
    return label


def templates_sha256(templates: Iterable[str]) -> str:
    """The hash of a judge prompt: of the template itself when all questions share one, else of the sorted
    distinct templates (so two evals hash alike exactly when they sent the same prompts)."""
    text = "\n\0\n".join(sorted(set(templates)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class JudgeConfig:
    """Where the judge runs and how numbers are read from it.

    Args:
        label: the judge's name in results (``judge.label`` of every samples and summary line, the folder
            ``judged/<label>/`` of ``rejudge``); None: ``default`` (the run's own judge).
        base_url: OpenAI-compatible server (``https://api.openai.com``, ``http://host:8001``); None: the
            evaluation's own vLLM sidecar (a smoke-test judge when that serves a small model).
        model: judge model name; None: the base model the endpoint lists first.
        api_key_env: name of the environment variable holding the API key (the key is never logged).
        number_tokens: ``whole`` (one token per number 0-100), ``digits`` (numbers split into digits) or
            ``auto`` (ask the server's ``/tokenize``; endpoints without it (404/405), like hosted APIs,
            count as ``whole``).
        top_logprobs: how many alternatives per token (OpenAI and vLLM allow at most 20).
        digit_min_prob: in digit mode, prefixes less likely than this are taken to end without another request
            (0: expand every prefix; exact, but a diffuse judge then needs many requests).
        digit_max_requests: in digit mode, at most this many continuation requests per score.
        timeout_s: per-request timeout.
        max_retries: retries for transient failures per request.
        max_concurrency: judge requests in flight at once.
        answer_prefix: text the judge's reply is made to start with (an assistant prefill that the endpoint
            continues, vLLM's ``continue_final_message``), e.g. ``"Score: "``. A small local judge such as
            SmolLM2 starts with prose otherwise and puts < 25 % on numbers; this changes the judging protocol,
            so leave it None to replicate published numbers.
    """

    label: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    number_tokens: NumberTokens = "auto"
    top_logprobs: int = 20
    digit_min_prob: float = 0.01
    digit_max_requests: int = 24
    timeout_s: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 8
    answer_prefix: str | None = None


def top_logprobs_of_first_token(data: dict) -> dict[str, float]:
    """token → logprob of a chat completion's first token (alternatives of equal text are merged)."""
    try:
        content = data["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise EndpointError(
            f"judge answer has no logprobs (does the endpoint support top_logprobs?): {str(data)[:300]}"
        ) from err
    if not content:
        return {}
    out: dict[str, float] = {}
    for entry in content[0].get("top_logprobs") or []:
        try:
            token, logprob = str(entry["token"]), float(entry["logprob"])
        except (KeyError, TypeError, ValueError) as err:
            raise EndpointError(f"malformed top_logprobs entry {entry!r}") from err
        out[token] = _logaddexp(out[token], logprob) if token in out else logprob
    return out


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi)) if lo > -math.inf else hi


def detect_number_tokens(client: OpenAIClient, model: str) -> Literal["whole", "digits"]:
    """``whole`` if the server's tokenizer has single tokens for "57" and "100", ``digits`` if it splits them.

    Uses vLLM's ``/tokenize``. An endpoint that has no such route (HTTP 404 or 405: hosted APIs, whose
    tokenizers have whole numbers) counts as ``whole``, with a warning. Anything else (a server that is down,
    5xx after the client's retries, a malformed answer) raises: guessing ``whole`` for a digit judge would
    read "85" as "8" for the whole run.
    """
    counts = []
    for text in ("57", "100"):
        try:
            data = client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
        except EndpointError as err:
            if err.status not in (404, 405):
                raise
            log.warning(
                "judge: %s has no /tokenize (HTTP %d); assuming one token per number 0-100 (set "
                "judge.number_tokens to digits for a Qwen, Gemma or SmolLM2 judge)",
                client.base_url,
                err.status,
            )
            return "whole"
        try:
            counts.append(len(data["tokens"]))
        except (KeyError, TypeError) as err:
            raise EndpointError(
                f"{client.base_url}/tokenize: unexpected answer {str(data)[:200]}; set judge.number_tokens"
            ) from err
    return "whole" if all(c == 1 for c in counts) else "digits"


class Judge:
    """Scores answers 0-100 with a judge model; see the module docstring.

    Args:
        config: :class:`JudgeConfig`.
        base_url: used when ``config.base_url`` is None (the sidecar's URL).
        cancel: shared cancel event (abandons pending requests).
    """

    def __init__(
        self, config: JudgeConfig, base_url: str | None = None, cancel: threading.Event | None = None
    ):
        url = config.base_url or base_url
        if not url:
            raise InputError("judge.base_url: not set, and there is no sidecar URL to fall back on")
        check_label(config.label or DEFAULT_LABEL)
        if not 1 <= config.top_logprobs <= 20:
            raise InputError(f"judge.top_logprobs: must be in 1..20, got {config.top_logprobs}")
        self.config = config
        self.client = OpenAIClient(url, config.api_key_env, config.timeout_s, config.max_retries, cancel)
        self._model = config.model
        self._mode = None if config.number_tokens == "auto" else config.number_tokens
        self._lock = threading.Lock()
        self.revision: str | None = None  # the served judge's hub revision, where one was pinned (rejudge)

    @property
    def model(self) -> str:
        """The judge model's name (asked from the endpoint once when not configured)."""
        with self._lock:
            if self._model is None:
                self._model = self.client.base_model_name()
            return self._model

    @property
    def number_tokens(self) -> Literal["whole", "digits"]:
        """The resolved number mode (``auto`` is detected on first use)."""
        model = self.model
        with self._lock:
            if self._mode is None:
                self._mode = detect_number_tokens(self.client, model)
                log.info("judge %s: numbers are %s tokens", model, self._mode)
            return self._mode

    @property
    def label(self) -> str:
        return check_label(self.config.label or DEFAULT_LABEL)

    def identity(self, definition: str, prompts: Mapping[str, Iterable[str]]) -> dict:
        """The ``judge`` field of samples and summary lines: who judged, and how (see ``rundir`` and the
        README): label, model as the endpoint names it, resolved number mode, answer prefix, top logprobs, the
        hash of each judge prompt (``prompts``: metric -> the templates sent) and the rate's definition."""
        return {
            "label": self.label,
            "model": self.model,
            "number_tokens": self.number_tokens,
            "answer_prefix": self.config.answer_prefix,
            "top_logprobs": self.config.top_logprobs,
            "prompt_sha256": {metric: templates_sha256(t) for metric, t in prompts.items()},
            "definition": definition,
            **({"revision": self.revision} if self.revision else {}),
        }

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    def _first_token(self, messages: list[dict], continuation: str = "") -> dict[str, float]:
        """Top logprobs of the judge's next token after ``answer_prefix + continuation`` in its reply."""
        reply = (self.config.answer_prefix or "") + continuation
        extra = {}
        if reply:
            messages = [*messages, {"role": "assistant", "content": reply}]
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        data = self.client.chat(
            self.model,
            messages,
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=self.config.top_logprobs,
            **extra,
        )
        return top_logprobs_of_first_token(data)

    def score(self, prompt: str) -> float | None:
        """The judge's expected number for ``prompt`` (a filled template), or None if it gave no number."""
        messages = [{"role": "user", "content": prompt}]
        if self.number_tokens == "whole":
            return score_from_logprobs(self._first_token(messages))
        return expected_score(self.digit_distribution(messages))

    def digit_distribution(self, messages: list[dict]) -> dict[int, float]:
        """P(answer is the number k) for k in 0..100, assembled digit by digit (see the module docstring)."""
        probs: dict[int, float] = {}
        frontier: list[tuple[float, str]] = []  # max-heap by probability (negated)
        for prefix, p in _digit_children("", 1.0, self._first_token(messages)):
            heapq.heappush(frontier, (-p, prefix))
        requests = 0
        while frontier:
            neg_p, prefix = heapq.heappop(frontier)
            p = -neg_p
            if (len(prefix) > 1 and prefix.startswith("0")) or int(prefix) > 100:
                continue  # "07" or "150" are not numbers on the scale
            if p < self.config.digit_min_prob or requests >= self.config.digit_max_requests:
                probs[int(prefix)] = probs.get(int(prefix), 0.0) + p  # taken to end here
                continue
            requests += 1
            children = _digit_children(prefix, p, self._first_token(messages, continuation=prefix))
            probs[int(prefix)] = probs.get(int(prefix), 0.0) + max(0.0, p - sum(q for _, q in children))
            for child in children:
                heapq.heappush(frontier, (-child[1], child[0]))
        return probs


def _digit_children(prefix: str, p_prefix: float, top: dict[str, float]) -> list[tuple[str, float]]:
    """(prefix + digits, probability) for every all-digit token among ``top``.

    At the start of the answer leading whitespace is ignored (" 7" reads as "7"); after a digit, whitespace
    ends the number, so " 7" is not a continuation.
    """
    children: dict[str, float] = {}
    for token, logprob in top.items():
        piece = token.strip() if not prefix else token
        if _ASCII_INT.fullmatch(piece):
            children[prefix + piece] = children.get(prefix + piece, 0.0) + p_prefix * math.exp(logprob)
    return list(children.items())
