"""Streamed answers of the endpoint: streamed requests batched with each other (`@serve.batch`'s streaming form
over one `generate` per batch), their deltas relayed as server-sent events in the OpenAI chunk formats."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from bp_ray.config import PipelineConfig
from bp_ray.serve import schemas as S
from bp_ray.serve.batch_gate import BatchGate
from bp_ray.serve.errors import ApiError
from bp_ray.serve.generation import GenerationRequest, rows_in


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def until_deadline(first: Any, rest: AsyncIterator[Any], deadline: float,
                         timeout: ApiError) -> AsyncIterator[Any]:
    """`first`, then `rest` until the monotonic `deadline`; a stream cut there ends with `timeout` as its last
    item, so the client hears why its choices stopped (after the 200 the status line cannot say it)."""
    if first is None:
        return
    yield first
    async for delta in rest:
        if time.monotonic() > deadline:  # the batch goes on for its other requests
            await rest.aclose()
            yield timeout
            return
        yield delta


async def stream_chunks(deltas: AsyncIterator[Any], n: int, completion_id: str, created: int, model: str,
                        chat: bool, prefix: str = "", fit: Callable[[str], str] | None = None) -> AsyncIterator[str]:
    """The SSE events of a stream of deltas: OpenAI chunks, an OpenAI error event if the stream was cut (an
    ApiError item; the openai client raises it), then [DONE]."""
    started = [False] * n
    sent, cut = [""] * n, [False] * n
    async for delta in deltas:
        if isinstance(delta, ApiError):
            yield sse(S.ErrorResponse(error=S.ErrorDetail(message=delta.message, type=delta.kind, param=delta.param,
                                                          code=delta.code)).model_dump())
            break
        if cut[delta.index]:
            continue
        text, finish = delta.text, delta.finish_reason
        if chat:  # as the plain answer, which loses them (ControlPlan.finish)
            text = S.NOT_TEXT.sub("", text)
        if chat and not started[delta.index]:
            text = text.lstrip()  # as beautified_text trims the whole answer
            started[delta.index] = bool(text)
            if prefix and (text or delta.finish_reason):
                text = f"{prefix} {text}" if text else prefix.rstrip(",")
                started[delta.index] = True
        if fit is not None:
            whole = sent[delta.index] + text
            fitted = fit(whole)
            if fitted != whole:
                text, finish, cut[delta.index] = fitted[len(sent[delta.index]):], "length", True
            sent[delta.index] += text
        if chat:
            chunk = S.ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[
                S.ChatDeltaChoice(index=delta.index, delta=S.AssistantMessage(content=text), finish_reason=finish)])
        else:
            chunk = S.CompletionResponse(id=completion_id, created=created, model=model, choices=[
                S.CompletionChoice(index=delta.index, text=text, finish_reason=finish)])
        yield sse(chunk.model_dump())
    yield sse("[DONE]")


class StreamRelay:
    """The ingress's streaming half: one per ingress replica."""

    def __init__(self, cfg: PipelineConfig, generator: DeploymentHandle, timeout: Callable[[str], ApiError]):
        self.serve_cfg, self.model_name = cfg.serve, cfg.serve.model_name
        self.generator = generator
        self._timeout = timeout
        # Streamed requests ride batches of their own, whole (n rows each): mixed into the plain batches, every
        # row's every step would travel through the stream.
        self._batch = serve.batch(max_batch_size=cfg.serve.max_batch_size,
                                  batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
                                  max_concurrent_batches=cfg.serve.max_concurrent_batches,
                                  batch_size_fn=rows_in)(self._run_batch)
        self._gate = BatchGate(cfg.serve.max_concurrent_batches)

    async def _run_batch(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        """serve.batch's streaming form: per step one item per request, its list of deltas, then StopIteration
        once all its outputs have finished."""
        requests = list(requests)
        finished = [0] * len(requests)
        with self._gate.held():
            async for step in self.generator.options(stream=True).stream_batch.remote(requests):
                items: list[Any] = []
                for i, deltas in enumerate(step):
                    if finished[i] >= requests[i].n:
                        items.append(StopIteration)
                        continue
                    items.append(deltas)
                    finished[i] += sum(1 for d in deltas if d.finish_reason is not None or d.refused)
                    if any(d.refused for d in deltas):
                        finished[i] = requests[i].n
                yield items

    def _rows(self, request: GenerationRequest) -> AsyncIterator[list[Any]]:
        if request.n > self.serve_cfg.max_batch_size:  # more rows than any batch holds: a batch of its own
            async def alone() -> AsyncIterator[list[Any]]:
                async for step in self.generator.options(stream=True).stream_batch.remote([request]):
                    yield step[0]
            return alone()

        async def gated() -> AsyncIterator[list[Any]]:
            await self._gate.wait()
            async for step in self._batch(request):
                yield step
        return gated()

    async def _deltas(self, request: GenerationRequest, param: str) -> AsyncIterator[Any]:
        """The generator's deltas, the first one awaited before this returns: a refused prompt (400) or a timeout
        before the first token (504) is still answered with its status, not inside a 200 stream."""
        deadline = time.monotonic() + self.serve_cfg.request_timeout_s
        steps = self._rows(request)

        async def deltas() -> AsyncIterator[Any]:
            async for step in steps:
                for delta in step:
                    yield delta

        flat = deltas()
        try:
            first = await asyncio.wait_for(flat.__anext__(), timeout=self.serve_cfg.request_timeout_s)
        except asyncio.TimeoutError:
            await flat.aclose()
            raise self._timeout("generation") from None
        except StopAsyncIteration:
            first = None
        if first is not None and first.refused:
            raise ApiError(400, f"{param}: {first.refused}", param=param)

        return until_deadline(first, flat, deadline, self._timeout("generation"))

    async def events(self, request: GenerationRequest, param: str, completion_id: str, created: int, chat: bool,
                     prefix: str = "", fit: Callable[[str], str] | None = None) -> StreamingResponse:
        """SSE chunks of the generation; `prefix` (keep_prompt: the user prompt) opens each choice's answer. `fit`
        returns the part of a choice's text within its token budget: the choice ends there ("length")."""
        deltas = await self._deltas(request, param)
        chunks = stream_chunks(deltas, request.n, completion_id, created, self.model_name, chat, prefix, fit)
        return StreamingResponse(chunks, media_type="text/event-stream")
