"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests: deterministic "model", scriptable failures.

    with OpenAIStubServer(rate_limit_first=3) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY")

It speaks the wire format the official client parses (`POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`, OpenAI-style error bodies), so tests exercise the real client over real HTTP.
Run it by hand against the pipeline with `python -m tests.openai_stub_server --port 8000`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

HOST = "127.0.0.1"
EXPANSION_SUFFIX = ", highly detailed, digital painting, trending on artstation, 8k"
SUMMARY_WORDS = 4
_PROMPT_LINE = re.compile(r"Prompt:[ \t]*(.*)")
_DESCRIPTION_LINE = re.compile(r"Description:[ \t]*(.*)")


def stub_reply(instruction: str) -> str:
    """The stub "model": summarise -> first 4 words after `Prompt:`; describe -> expand with tags; else echo."""
    if "Summarise" in instruction or "Summary:" in instruction:
        match = _PROMPT_LINE.search(instruction)
        return " ".join(match.group(1).split()[:SUMMARY_WORDS]) if match else ""
    match = _DESCRIPTION_LINE.search(instruction)
    if match:
        return match.group(1).strip() + EXPANSION_SUFFIX
    return instruction


@dataclass
class StubRequest:
    """One request as the server saw it."""

    path: str
    prompt: str | None
    authorization: str | None
    status: int


def _error(status: int, message: str, error_type: str, code: str | None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _usage(prompt: str, text: str) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(prompt.split()), len(text.split())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _message_text(content: Any) -> str:
    """Text of a chat message whose content is a string or a list of content parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


class OpenAIStubServer:
    """uvicorn in a background thread serving the stub app; a context manager that starts and stops it.

    Failure knobs, applied in this order to every request:
      require_api_key: 401 unless `Authorization: Bearer <key>`;
      rate_limit_first: the first N requests get 429 with `rate_limit_headers` (default `retry-after: 0`);
      fail_5xx_first: the next N requests get 500;
      bad_request_if_contains: 400 for prompts containing this text.
    delay_s sleeps before answering any request (for client timeouts).
    """

    def __init__(self, *, model: str = "stub-model", rate_limit_first: int = 0,
                 rate_limit_headers: Mapping[str, str] | None = None, fail_5xx_first: int = 0,
                 bad_request_if_contains: str | None = None, delay_s: float = 0.0,
                 require_api_key: str | None = None, port: int = 0) -> None:
        self.model = model
        self.rate_limit_first = rate_limit_first
        self.rate_limit_headers = {"retry-after": "0"} if rate_limit_headers is None else dict(rate_limit_headers)
        self.fail_5xx_first = fail_5xx_first
        self.bad_request_if_contains = bad_request_if_contains
        self.delay_s = delay_s
        self.require_api_key = require_api_key
        self.requests: list[StubRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._rate_limited = 0
        self._failed_5xx = 0
        self._lock = threading.Lock()
        # Bound here (not by uvicorn) so the port is known before start and no other process can take it meanwhile.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((HOST, port))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(self._build_app(), log_level="warning", access_log=False, lifespan="off",
                                loop="asyncio", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"openai-stub-{self.port}", daemon=True)

    @property
    def base_url(self) -> str:
        """What to pass as the client's base_url."""
        return f"http://{HOST}:{self.port}/v1"

    @property
    def total_requests(self) -> int:
        """Requests received so far, failed ones included."""
        with self._lock:
            return len(self.requests)

    def count(self, text: str) -> int:
        """Requests whose prompt contains text."""
        with self._lock:
            return sum(text in (r.prompt or "") for r in self.requests)

    def start(self, timeout_s: float = 10.0) -> OpenAIStubServer:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"OpenAI stub server did not start on {HOST}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask uvicorn to exit, force it if requests are still sleeping, and join the thread (bounded)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> OpenAIStubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the app -----------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="openai-stub")

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            return await self._handle(request, None, lambda: {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "bp-ray-tests"}]})

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> JSONResponse:
            body = await _json_body(request)
            messages = body.get("messages") or []
            prompt = _message_text(messages[-1].get("content")) if messages else ""
            return await self._handle(request, prompt, lambda: self._chat_response(body, prompt))

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await _json_body(request)
            prompt = body.get("prompt", "")
            prompt = str(prompt[0] if isinstance(prompt, list) and prompt else prompt or "")
            return await self._handle(request, prompt, lambda: self._completion_response(body, prompt))

        return app

    async def _handle(self, request: Request, prompt: str | None, respond: Any) -> JSONResponse:
        """Count the request, apply the delay and failure knobs, else answer with respond()."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        status = 500  # what the client sees if the stub itself breaks (or the wait is cancelled at shutdown)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            response = self._failure(request, prompt) or JSONResponse(respond())
            status = response.status_code
        finally:
            with self._lock:
                self.in_flight -= 1
                self.requests.append(StubRequest(path=request.url.path, prompt=prompt,
                                                 authorization=request.headers.get("authorization"), status=status))
        return response

    def _failure(self, request: Request, prompt: str | None) -> JSONResponse | None:
        """The scripted failure for this request, or None to answer normally."""
        if self.require_api_key is not None and request.headers.get("authorization") != (
                f"Bearer {self.require_api_key}"):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        with self._lock:
            rate_limited = self._rate_limited < self.rate_limit_first
            self._rate_limited += rate_limited
            failed_5xx = not rate_limited and self._failed_5xx < self.fail_5xx_first
            self._failed_5xx += failed_5xx
        if rate_limited:
            return _error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded",
                          self.rate_limit_headers)
        if failed_5xx:
            return _error(500, "The server had an error while processing your request.", "server_error", None)
        if self.bad_request_if_contains and self.bad_request_if_contains in (prompt or ""):
            return _error(400, "This prompt was rejected by the stub.", "invalid_request_error", "invalid_prompt")
        return None

    def _chat_response(self, body: dict[str, Any], prompt: str) -> dict[str, Any]:
        text = stub_reply(prompt)
        return {
            "id": f"chatcmpl-stub-{self.total_requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model), "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text, "refusal": None}}],
            "usage": _usage(prompt, text),
        }

    def _completion_response(self, body: dict[str, Any], prompt: str) -> dict[str, Any]:
        text = stub_reply(prompt)
        return {
            "id": f"cmpl-stub-{self.total_requests}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model", self.model), "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "text": text}],
            "usage": _usage(prompt, text),
        }


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def main() -> None:
    """Serve the stub in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    with OpenAIStubServer(port=args.port, delay_s=args.delay_s) as server:
        print(f"OpenAI stub serving at {server.base_url} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
