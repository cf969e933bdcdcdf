"""A stream cut at its deadline tells the client why: an OpenAI error event before [DONE], which the real openai
client raises, instead of choices that just stop."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from bp_ray.serve.errors import ApiError
from bp_ray.serve.generation import StreamDelta
from bp_ray.serve.streaming import stream_chunks, until_deadline

TIMEOUT = ApiError(504, "generation did not finish within the request timeout of 3 s; retry later or ask for fewer "
                        "tokens", code="request_timeout", kind="timeout_error")


async def slow_deltas(count: int, pause_s: float, closed: list[bool]):
    try:
        for i in range(count):
            await asyncio.sleep(pause_s)
            yield StreamDelta(index=0, text=f" w{i}")
    finally:
        closed.append(True)


async def collect(items) -> list:
    return [item async for item in items]


def test_a_stream_past_its_deadline_ends_with_the_timeout_and_stops_reading():
    closed: list[bool] = []
    deadline = time.monotonic() + 0.12
    items = asyncio.run(collect(until_deadline(StreamDelta(index=0, text="a"), slow_deltas(50, 0.03, closed),
                                               deadline, TIMEOUT)))
    assert items[0].text == "a" and items[-1] is TIMEOUT
    assert 2 <= len(items) - 2 < 10  # a few deltas in the 0.12 s, not the 50 of the whole answer
    assert closed == [True]  # the generator's stream was closed, its batch goes on without this request


def test_a_stream_within_its_deadline_is_passed_through_whole():
    closed: list[bool] = []
    items = asyncio.run(collect(until_deadline(StreamDelta(index=0, text="a"), slow_deltas(5, 0.0, closed),
                                               time.monotonic() + 60, TIMEOUT)))
    assert [d.text for d in items] == ["a", " w0", " w1", " w2", " w3", " w4"]


async def cut_stream():
    yield StreamDelta(index=0, text="a cat")
    yield TIMEOUT


def events(chat: bool) -> list[str]:
    body = asyncio.run(collect(stream_chunks(cut_stream(), 1, "chatcmpl-1", 0, "bp-ray", chat=chat)))
    return [event.removeprefix("data: ").strip() for event in body]


def test_the_cut_is_an_openai_error_event_then_done():
    chunk, error, done = events(chat=True)
    assert json.loads(chunk)["choices"][0]["delta"]["content"] == "a cat"
    assert json.loads(error) == {"error": {"message": TIMEOUT.message, "type": "timeout_error", "param": None,
                                           "code": "request_timeout"}}
    assert done == "[DONE]"
    assert len(events(chat=False)) == 3


def test_the_real_openai_client_raises_the_timeout_after_the_text_it_got():
    body = "".join(asyncio.run(collect(stream_chunks(cut_stream(), 1, "chatcmpl-1", 0, "bp-ray", chat=True))))
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(200, content=body.encode(), request=request,
                              headers={"content-type": "text/event-stream"})
    client = openai.OpenAI(api_key="EMPTY", base_url="http://127.0.0.1:9/v1")
    stream = openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client)
    received = []
    with pytest.raises(openai.APIError, match="request timeout of 3 s"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["a cat"]
