"""LLM rewrites through any OpenAI-compatible endpoint (paper Section 3, pair sources ii and iii).

Plain Python, no Ray: the rewriter actor in the data pipeline owns one `OpenAIRewriter` and calls `complete()` per
batch. Every item gets its own retries, so one bad prompt never fails a batch; it comes back as `text=None` with a
short `error` whose first word is the kind (`rate_limited`, `server_error`, `connection_error`, `timeout`,
`bad_request`, `auth_error`, `permission_denied`, `not_found`, `unprocessable`, `http_error`, `bad_response`,
`empty_output`).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai

from bp_ray.data.prompt_rules import first_line

logger = logging.getLogger(__name__)

API_KINDS = ("chat", "completions")
MAX_DELAY_S = 60.0
"""Cap on any one retry delay, whether from Retry-After or from the exponential schedule."""
JITTER_FRACTION = 0.1
"""Exponential delays grow by up to this fraction, so items rate-limited together do not retry in lockstep."""
MAX_ERROR_CHARS = 200

# Status errors that are worth another attempt; any other 4xx fails its item at once (the request itself is wrong).
_RETRYABLE_STATUS_ERRORS = (openai.RateLimitError, openai.InternalServerError)
_NON_RETRYABLE_KINDS: tuple[tuple[type[openai.APIStatusError], str], ...] = (
    (openai.BadRequestError, "bad_request"),
    (openai.AuthenticationError, "auth_error"),
    (openai.PermissionDeniedError, "permission_denied"),
    (openai.NotFoundError, "not_found"),
    (openai.UnprocessableEntityError, "unprocessable"),
)


@dataclass(frozen=True)
class OpenAISettings:
    """Endpoint, request and retry settings of one rewriter; see `DataConfig.openai_*` for each field."""

    base_url: str
    model: str
    api: str = "chat"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (never the key itself)."""
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_new_tokens: int = 64
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.api not in API_KINDS:
            raise ValueError(f"api must be one of {API_KINDS}, got {self.api!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    @classmethod
    def from_config(cls, data_cfg: Any) -> OpenAISettings:
        """Settings from a `DataConfig` (its `openai_*` fields and `max_new_tokens`)."""
        return cls(
            base_url=data_cfg.openai_base_url,
            model=data_cfg.openai_model,
            api=data_cfg.openai_api,
            api_key_env=data_cfg.openai_api_key_env,
            concurrency=data_cfg.openai_concurrency,
            timeout_s=data_cfg.openai_timeout_s,
            max_retries=data_cfg.openai_max_retries,
            backoff_s=data_cfg.openai_backoff_s,
            max_new_tokens=data_cfg.max_new_tokens,
        )


@dataclass
class RewriteResult:
    """Outcome of one instruction: the rewrite, or None and why, after `attempts` requests."""

    text: str | None
    """First non-empty line of the model output, stripped; None when the request failed for good."""
    error: str | None
    """Short reason starting with its kind, e.g. "rate_limited: gave up after 5 retries"; None on success."""
    attempts: int


def retry_after_s(headers: Any) -> float | None:
    """Server-requested delay from `retry-after-ms` or `retry-after` (seconds or HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def _api_message(exc: openai.APIStatusError) -> str:
    """The server's own error message (OpenAI-style `{"error": {"message": ...}}` body) or the raw body."""
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else body
    return " ".join(str(message or "").split())[:MAX_ERROR_CHARS]


class OpenAIRewriter:
    """Sends one request per instruction text, `concurrency` at a time, with retries."""

    def __init__(self, settings: OpenAISettings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._sleep = sleep
        api_key = os.environ.get(settings.api_key_env)
        self._key_missing = not api_key
        if self._key_missing:
            # Local endpoints (vLLM, llama.cpp, the test stub) take any key; a real service answers 401 later.
            logger.warning("$%s is not set; sending requests to %s without an API key",
                           settings.api_key_env, settings.base_url)
        # "EMPTY": the client refuses to construct without some key. max_retries=0: our own loop retries instead,
        # so attempts are counted per item and Retry-After is honoured (the client ignores `retry-after: 0`).
        self._client = openai.OpenAI(base_url=settings.base_url, api_key=api_key or "EMPTY",
                                     timeout=settings.timeout_s, max_retries=0)
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="openai-rewriter")

    def complete(self, instructions: Sequence[str]) -> list[RewriteResult]:
        """One rewrite per instruction, in input order; never raises for a failed item."""
        return list(self._pool.map(self._complete_one, instructions))

    def close(self) -> None:
        """Wait for requests in flight, then release the worker threads and HTTP connections."""
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> OpenAIRewriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, instruction: str) -> str | None:
        """One HTTP request; the raw text of the first choice."""
        s = self.settings
        if s.api == "chat":
            chat = self._client.chat.completions.create(
                model=s.model, messages=[{"role": "user", "content": instruction}],
                max_tokens=s.max_new_tokens, temperature=s.temperature)
            return chat.choices[0].message.content
        completion = self._client.completions.create(
            model=s.model, prompt=instruction, max_tokens=s.max_new_tokens, temperature=s.temperature)
        return completion.choices[0].text

    def _backoff_s(self, attempt: int, rng: random.Random, exc: Exception) -> float:
        """Delay before retry number attempt + 1: the server's Retry-After if sent, else backoff_s * 2**attempt."""
        response = getattr(exc, "response", None)
        requested = retry_after_s(response.headers) if response is not None else None
        if requested is not None:
            return min(requested, MAX_DELAY_S)
        delay = self.settings.backoff_s * 2**attempt
        return min(delay + rng.uniform(0, JITTER_FRACTION * delay), MAX_DELAY_S)

    def _complete_one(self, instruction: str) -> RewriteResult:
        """Request with retries until a rewrite, a non-retryable error, or max_retries retries."""
        max_retries = self.settings.max_retries
        # Seeded by the instruction so a rerun (and a test) sees the same jitter whatever the thread interleaving.
        rng = random.Random(instruction)
        for attempt in range(max_retries + 1):
            attempts = attempt + 1
            try:
                output = self._request(instruction)
            # APITimeoutError subclasses APIConnectionError, so it is caught first to keep its own kind.
            except (openai.APITimeoutError, openai.APIConnectionError, *_RETRYABLE_STATUS_ERRORS) as exc:
                if attempt < max_retries:
                    self._sleep(self._backoff_s(attempt, rng, exc))
                    continue
                return self._give_up(instruction, self._retry_error(exc, max_retries), attempts)
            except openai.APIStatusError as exc:
                return self._give_up(instruction, self._status_error(exc), attempts)
            except Exception as exc:  # malformed responses and anything else: fail the item, not the batch
                return self._give_up(instruction, f"bad_response: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS],
                                     attempts)
            text = first_line(output)
            if not text:
                return RewriteResult(text=None, error="empty_output", attempts=attempts)
            return RewriteResult(text=text, error=None, attempts=attempts)
        raise AssertionError("unreachable: the last attempt always returns")

    @staticmethod
    def _retry_error(exc: Exception, max_retries: int) -> str:
        """Reason for giving up on a retryable error."""
        gave_up = f"gave up after {max_retries} {'retry' if max_retries == 1 else 'retries'}"
        if isinstance(exc, openai.APITimeoutError):
            return "timeout"
        if isinstance(exc, openai.APIConnectionError):
            return f"connection_error: {gave_up}"
        if isinstance(exc, openai.RateLimitError):
            return f"rate_limited: {gave_up}"
        assert isinstance(exc, openai.APIStatusError)
        return f"server_error: {exc.status_code} {_api_message(exc)}; {gave_up}"

    def _status_error(self, exc: openai.APIStatusError) -> str:
        """Reason for a non-retryable HTTP error, naming the key variable on 401/403."""
        kind = next((name for cls, name in _NON_RETRYABLE_KINDS if isinstance(exc, cls)), "http_error")
        reason = f"{kind}: {exc.status_code} {_api_message(exc)}"
        if kind in ("auth_error", "permission_denied"):
            state = "unset" if self._key_missing else "set"
            reason += f" (API key from ${self.settings.api_key_env}, which is {state})"
        return reason

    def _give_up(self, instruction: str, error: str, attempts: int) -> RewriteResult:
        logger.warning("openai rewrite failed after %d attempt(s): %s | instruction: %.80r", attempts, error,
                       instruction)
        return RewriteResult(text=None, error=error, attempts=attempts)
