"""How the endpoint fails: every error answers with the OpenAI error body (so the `openai` client raises with our
message), validation errors become one readable sentence naming the field, and the config's request limits
(prompt length, n, max tokens, model id) raise 400/404 with the same body."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bp_ray.config import PipelineConfig
from bp_ray.serve import schemas as S

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump())


def _field_path(loc: Sequence[Any]) -> str:
    """("body", "stop", "list[str]", 2) -> "stop[2]": union-branch tags such as "list[str]" are dropped."""
    path = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and not part.isidentifier()) or part in _TYPE_TAGS:
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "TextPart"}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI/pydantic errors -> one readable sentence and the first offending field.

    A value that fails every branch of a union (`stop`: a string or a list) yields one error per branch: the
    most specific one (a bound, not "should be a valid string") speaks for the field.
    """
    by_field: dict[str, dict[str, Any]] = {}
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", "")
            return f"invalid JSON body{': ' + detail if detail else ''}", None
        field = _field_path(error.get("loc", ()))
        if not field:
            return ("missing JSON body" if error.get("type") == "missing"
                    else "the request body must be a JSON object"), None
        kept = by_field.get(field)
        if kept is None or (kept.get("type", "").endswith("_type") and not error.get("type", "").endswith("_type")):
            by_field[field] = error
    parts = [f"{field}: {str(error.get('msg', 'invalid value')).removeprefix('Value error, ')}"
             for field, error in list(by_field.items())[:3]]
    return "; ".join(parts), next(iter(by_field), None)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.message, error.param, error.code, error.kind)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(error.errors()))
        return _error(400, message, param)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return _error(404, f"no such path: {request.url.path} (see /docs for the API)", kind="not_found_error")
        if error.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path} (see /docs for the API)")
        return _error(error.status_code, str(error.detail))

    @api.exception_handler(Exception)
    async def _crash(_: Request, error: Exception) -> JSONResponse:
        # The error's text can hold a traceback, actor ids, pids and paths: those go to the log under an id the
        # client gets instead.
        request_id = uuid.uuid4().hex[:16]
        logger.exception("request %s failed", request_id)
        return _error(500, f"internal error (request id {request_id}: the server's log has the details)",
                      kind="server_error")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": S.ErrorResponse, "description": text}
    for status, text in ((400, "invalid request"), (404, "unknown model or path"),
                         (413, "request body over serve.max_body_bytes"), (500, "internal error"),
                         (503, "overloaded: the queue is full"), (504, "timed out"))
}


class BodyLimit:
    """ASGI middleware: a request whose Content-Length exceeds the limit gets 413 before its body is read.

    Pure ASGI rather than FastAPI's http middleware, which would wrap every streamed event of an SSE answer."""

    def __init__(self, app: Any, limit: Callable[[], int | None]):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            limit = self.limit()
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if limit and length.isdigit() and int(length) > limit:
                response = _error(413, f"the request body is {int(length)} bytes; the limit is {limit} "
                                       "(serve.max_body_bytes)", code="body_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Limits:
    """The config-dependent checks of a request; each failure is an ApiError(400/404) naming the field and, for a
    limit, its value."""

    def __init__(self, cfg: PipelineConfig):
        self.serve = cfg.serve

    def model(self, name: str | None) -> None:
        if name is not None and name != self.serve.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this endpoint serves {self.serve.model_name!r}",
                           param="model", code="model_not_found", kind="not_found_error")

    def prompt(self, text: str, param: str = "prompt") -> None:
        if len(text) > self.serve.max_prompt_chars:
            raise ApiError(400, f"{param} is {len(text)} characters long; the limit is "
                                f"{self.serve.max_prompt_chars}", param=param)

    def stop(self, stop: str | list[str] | None) -> None:
        for i, text in enumerate([stop] if isinstance(stop, str) else stop or []):
            self.prompt(text, "stop" if isinstance(stop, str) else f"stop[{i}]")

    def chat(self, messages: Sequence[S.ChatMessage]) -> None:
        """The whole conversation: every message is parsed and checked, though only the last user one is used."""
        if len(messages) > self.serve.max_messages:
            raise ApiError(400, f"messages has {len(messages)} messages; the limit is {self.serve.max_messages}",
                           param="messages")
        chars = sum(len(message.text()) for message in messages)
        if chars > self.serve.max_chat_chars:
            raise ApiError(400, f"messages hold {chars} characters in all; the limit is "
                                f"{self.serve.max_chat_chars}", param="messages")

    def n(self, n: int, prompts: int = 1) -> None:
        if n * prompts > self.serve.max_n:
            what = f"n={n}" if prompts == 1 else f"n={n} x {prompts} prompts"
            raise ApiError(400, f"{what} asks for {n * prompts} outputs; the limit is {self.serve.max_n}",
                           param="n")

    def controls(self, body: S.Controls) -> None:
        """Counts and lengths of the control fields (the spec states them too)."""
        controls = self.serve.controls
        for name, limit in (("keep", controls.max_keep), ("avoid", controls.max_avoid)):
            phrases = getattr(body, name) or []
            if len(phrases) > limit:
                raise ApiError(400, f"{name} has {len(phrases)} phrases; the limit is {limit}", param=name)
            for i, phrase in enumerate(phrases):
                self.prompt(phrase, f"{name}[{i}]")
        for name in ("negative_prompt", "text"):
            value = getattr(body, name, None)
            if value is not None:
                self.prompt(value, name)

    def max_new_tokens(self, value: int | None, param: str) -> int:
        if value is None:
            return self.serve.default_max_new_tokens
        if value > self.serve.max_new_tokens:
            raise ApiError(400, f"{param}={value} exceeds the limit of {self.serve.max_new_tokens}", param=param)
        return value
