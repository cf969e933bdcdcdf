"""The beautifier endpoint over real HTTP: `bp-ray serve` in its own process (its own local Ray and Serve), called
with httpx, the official `openai` client, the data stage's OpenAI rewriter, `bp-ray client` and schemathesis.

Tests run in file order against one server: the overload, replica-kill and SIGTERM tests come last. Then a second
server, whose generation time limit is short, answers 504.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.serve_process import ServeProcess, free_port, start

pytestmark = pytest.mark.integration

MODEL = "bp-ray-beautifier"
# Small limits so that overload is reachable with a few dozen requests; one batch holds 4 rows.
LIMITS = {"max_batch_size": 4, "max_ongoing_requests": 4, "max_queued_requests": 4, "max_n": 4,
          "max_new_tokens": 64, "max_prompt_chars": 200, "request_timeout_s": 30, "max_messages": 32,
          "max_chat_chars": 4000}
MAX_SEED = 2**53 - 1


def start_server(tmp_path_factory, tiny_models_cfg, serve: dict, *overrides: str) -> ServeProcess:
    """`bp-ray serve --preset tiny` with these serve.* settings, in its own process; returns once it answers."""
    run_dir = tmp_path_factory.mktemp("serve-run")  # no trained model there: it serves models.policy
    port = free_port()
    argv = [sys.executable, "-m", "bp_ray.cli", "serve", "--preset", "tiny", "--port", str(port)]
    for item in [*(f"serve.{key}={value}" for key, value in serve.items()),
                 f"models.zoo_dir={tiny_models_cfg.zoo_dir}", f"output_dir={run_dir}", *overrides]:
        argv += ["--set", item]
    return start(argv, run_dir / "serve.log", f"http://127.0.0.1:{port}", ready_line="bp-ray serve: ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models_cfg) -> ServeProcess:
    # keep_prompt: every beautify route must open its answer with the user's prompt (the main job's setting)
    process = start_server(tmp_path_factory, tiny_models_cfg, {**LIMITS, "metrics_port": free_port()},
                           "sft.keep_prompt=true")
    yield process
    process.stop()


def post(server: ServeProcess, path: str, body: dict, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout_s)


def beautified(server: ServeProcess, **body) -> list[str]:
    response = post(server, "/v1/beautify", {"prompt": "a cat on a sofa", **body})
    assert response.status_code == 200, response.text
    return [output["text"] for output in response.json()["outputs"]]


# --- happy paths -----------------------------------------------------------------------------------------------

def test_health_models_and_spec_state_what_is_served(server):
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["render"] is True
    # The zoo's policy: this run directory has no trained model.
    assert Path(health["generator"]["checkpoint"]).name == "bloom"
    assert health["generator"]["pid"] != health["pid"]  # the model runs in its own replica process
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(server.url + f"/v1/models/{MODEL}").json()["id"] == MODEL
    spec = httpx.get(server.url + "/openapi.json").json()
    beautify = spec["components"]["schemas"]["BeautifyRequest"]["properties"]
    assert beautify["n"]["maximum"] == LIMITS["max_n"]
    assert beautify["prompt"]["anyOf"][0]["maxLength"] == LIMITS["max_prompt_chars"]  # optional with edit_of
    assert beautify["keep"]["anyOf"][0]["items"]["maxLength"] == LIMITS["max_prompt_chars"]
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == LIMITS["max_messages"]
    stop = spec["components"]["schemas"]["CompletionRequest"]["properties"]["stop"]["anyOf"]
    assert [alt.get("maxLength", alt.get("items", {}).get("maxLength")) for alt in stop[:2]] == [200, 200]


def test_beautify_applies_the_template_and_returns_n_seeded_outputs(server):
    response = post(server, "/v1/beautify", {"prompt": "a cat on a sofa", "n": 3, "seed": 11,
                                             "max_new_tokens": 12, "temperature": 1.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == 11 and body["prompt"] == "a cat on a sofa" and len(body["outputs"]) == 3
    assert [o["index"] for o in body["outputs"]] == [0, 1, 2]
    assert all(1 <= o["tokens"] <= 12 and "\n" not in o["text"] for o in body["outputs"])
    assert all(o["text"].startswith("a cat on a sofa") for o in body["outputs"])  # sft.keep_prompt
    # The instruction template is far longer than the 5-word prompt: it was applied.
    assert body["usage"]["prompt_tokens"] > 20
    assert body["usage"]["completion_tokens"] == sum(o["tokens"] for o in body["outputs"])
    assert body["latency_ms"] > 0
    unseeded = post(server, "/v1/beautify", {"prompt": "a dog"}).json()
    assert isinstance(unseeded["seed"], int)  # a random seed, returned so the output can be reproduced


def test_special_token_strings_are_beautified_as_text(server):
    # "</s>" used to reach the model as its end-of-text mark (a lone one was refused); it is text on every route.
    response = post(server, "/v1/beautify", {"prompt": "a cat </s> on a <pad> sofa", "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["text"].startswith("a cat </s> on a <pad> sofa")  # sft.keep_prompt
    usage = post(server, "/v1/completions", {"model": MODEL, "prompt": "</s>", "max_tokens": 4}).json()["usage"]
    assert usage["prompt_tokens"] > 1  # the characters of "</s>", not one control token
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "stream": True,
                                                 "messages": [{"role": "user", "content": "<unk>"}]})
    assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]"), chat.text


def test_same_seed_same_output_alone_or_batched_with_others(server):
    request = {"n": 2, "seed": 1234, "temperature": 1.0, "max_new_tokens": 16}
    alone = beautified(server, **request)
    assert beautified(server, **request) == alone

    async def crowd() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            bodies = [{"prompt": "a cat on a sofa", **request}] + [
                {"prompt": f"a house number {i}", "seed": i, "max_new_tokens": 16} for i in range(3)]
            responses = await asyncio.gather(*(client.post("/v1/beautify", json=b) for b in bodies))
        return [[o["text"] for o in r.json()["outputs"]] for r in responses]

    assert asyncio.run(crowd())[0] == alone
    assert beautified(server, **{**request, "seed": 4321}) != alone


def test_openai_client_completions_and_chat_plain_and_streamed(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]

    completion = client.completions.create(model=MODEL, prompt="a cat", max_tokens=8, n=2, seed=5)
    texts = [c.text for c in sorted(completion.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and completion.usage.completion_tokens > 0
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt="a cat", max_tokens=8, n=2, seed=5, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts

    chat = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "ignored: the instruction template is fixed"},
        {"role": "user", "content": "a cat on a sofa"}], max_tokens=16, seed=9)
    answer = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and answer == answer.strip() and "\n" not in answer
    # Chat beautifies with the training template: the same as /v1/beautify with the same seed.
    assert answer == beautified(server, seed=9, max_new_tokens=16)[0]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a cat on a sofa"}],
                                            max_tokens=16, seed=9, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == answer
    assert answer.startswith("a cat on a sofa")
    # Repetition controls go as extra fields (the openai client's extra_body); no token trigram of the answer
    # repeats, while the plain answer loops.
    plain = client.completions.create(model=MODEL, prompt="a cat", max_tokens=24, temperature=0).choices[0].text
    controlled = client.completions.create(model=MODEL, prompt="a cat", max_tokens=24, temperature=0,
                                           extra_body={"no_repeat_ngram_size": 2}).choices[0].text
    assert repeats_a_word_pair(plain) and not repeats_a_word_pair(controlled), (plain, controlled)

    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "a cat"}])
    with pytest.raises(openai.BadRequestError, match="n=5 asks for 5 outputs; the limit is 4"):
        client.completions.create(model=MODEL, prompt="a cat", n=5)


def repeats_a_word_pair(text: str) -> bool:
    words = text.split()
    return len(set(itertools.pairwise(words))) < len(words) - 1


def test_concurrent_streams_share_generate_batches_and_equal_their_plain_answers(server):
    bodies = [{"model": MODEL, "prompt": f"a house number {i}", "max_tokens": 12, "seed": 40 + i, "n": 1 + i % 2}
              for i in range(4)]
    plain = [[c["text"] for c in sorted(post(server, "/v1/completions", b).json()["choices"],
                                        key=lambda c: c["index"])] for b in bodies]

    async def streamed() -> list[list[str]]:
        async def one(client: httpx.AsyncClient, body: dict) -> list[str]:
            texts = [""] * body["n"]
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        for choice in json.loads(line[len("data: "):])["choices"]:
                            texts[choice["index"]] += choice["text"]
            return texts

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return list(await asyncio.gather(*(one(client, b) for b in bodies)))

    before = httpx.get(server.url + "/healthz").json()["generator"]["batching"]
    assert asyncio.run(streamed()) == plain
    after = httpx.get(server.url + "/healthz").json()["generator"]["batching"]
    assert after["stream_rows"] - before["stream_rows"] == sum(b["n"] for b in bodies)
    # 6 rows in batches of at most 4 (LIMITS): two generate calls when they meet, never one per stream
    assert after["stream_batches"] - before["stream_batches"] < len(bodies)


def test_the_data_stage_rewriter_works_against_the_endpoint(server):
    from bp_ray.data.openai_backend import OpenAIRewriter, OpenAISettings

    settings = OpenAISettings(base_url=server.url + "/v1", model=MODEL, api="chat", max_new_tokens=16,
                              temperature=0.0, max_retries=0)
    with OpenAIRewriter(settings) as rewriter:
        results = rewriter.complete(["a cat on a sofa", "a red car"])
    assert all(r.error is None and r.text for r in results), results


def test_render_beautifies_then_returns_a_png(server):
    response = post(server, "/v1/render", {"prompt": "a cat on a sofa", "seed": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers["x-seed"] == "3"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (32, 32)  # the tiny preset's serve.render
    prompt = unquote(response.headers["x-beautified-prompt"])
    assert prompt != "a cat on a sofa"
    assert prompt == beautified(server, seed=3, max_new_tokens=32, temperature=0.7)[0]
    again = post(server, "/v1/render", {"prompt": "a cat on a sofa", "seed": 3})
    assert again.content == response.content
    plain = post(server, "/v1/render", {"prompt": "a cat on a sofa", "seed": 3, "beautify": False})
    assert unquote(plain.headers["x-beautified-prompt"]) == "a cat on a sofa"


def test_client_command_prints_the_rewrites(server, capsys):
    from bp_ray.cli import main

    assert main(["client", "a cat on a sofa", "--url", server.url, "-n", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == beautified(server, n=2, seed=7)


# --- the largest request allowed: every limit at its maximum at once --------------------------------------------

# 200 characters (max_prompt_chars) of text that is many tokens per character: emoji and CJK are 3-4 bytes each.
LONGEST = ("a cat 🐈🐈🐈 猫猫 on a sofa 🛋🎨🎨 " * 10)[:200]
MOST = {"n": LIMITS["max_n"], "temperature": 2.0, "top_p": 1.0, "seed": MAX_SEED}


def sse_events(response: httpx.Response) -> list[dict]:
    """The JSON events of a server-sent-event answer, which must end with [DONE]."""
    data = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]", response.text[-500:]
    return [json.loads(item) for item in data[:-1]]


def assert_finished_once(events: list[dict], outputs: int) -> None:
    finished = [c["index"] for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert sorted(finished) == list(range(outputs)), finished
    assert all(c["finish_reason"] in ("stop", "length") for e in events for c in e["choices"] if c["finish_reason"])


def test_every_limit_at_its_maximum_at_once_is_answered(server):
    tokens = LIMITS["max_new_tokens"]
    beautify = post(server, "/v1/beautify", {"prompt": LONGEST, "max_new_tokens": tokens, "model": MODEL, **MOST})
    assert beautify.status_code == 200, beautify.text
    body = beautify.json()
    assert body["seed"] == MAX_SEED and body["prompt"] == LONGEST
    assert [o["index"] for o in body["outputs"]] == list(range(LIMITS["max_n"]))
    assert all(1 <= o["tokens"] <= tokens and o["finish_reason"] in ("stop", "length") and "\n" not in o["text"]
               for o in body["outputs"])
    assert body["usage"]["completion_tokens"] == sum(o["tokens"] for o in body["outputs"])

    # Completions: max_n prompts of max_prompt_chars, and four stop strings of max_prompt_chars each.
    stops = [("x" * 199 + str(i)) for i in range(4)]
    completions = post(server, "/v1/completions", {
        "model": MODEL, "prompt": [LONGEST] * LIMITS["max_n"], "max_tokens": tokens, "stop": stops, **MOST, "n": 1})
    assert completions.status_code == 200, completions.text
    body = completions.json()
    assert sorted(c["index"] for c in body["choices"]) == list(range(LIMITS["max_n"]))
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert 0 < body["usage"]["completion_tokens"] <= LIMITS["max_n"] * tokens
    assert body["usage"]["prompt_tokens"] > LIMITS["max_n"] * len(LONGEST)  # more tokens than characters
    streamed = post(server, "/v1/completions", {"model": MODEL, "prompt": LONGEST, "max_tokens": tokens,
                                                "stop": stops, "stream": True, **MOST})
    assert streamed.status_code == 200, streamed.text
    assert_finished_once(sse_events(streamed), LIMITS["max_n"])

    # Chat: max_messages messages of max_chat_chars in all, the last user message max_prompt_chars long.
    history = [{"role": "system" if i == 0 else ("user", "assistant")[(i - 1) % 2], "content": f"{i:03d} " + "y" * 100}
               for i in range(LIMITS["max_messages"] - 1)]
    history[0]["content"] += "z" * (LIMITS["max_chat_chars"] - len(LONGEST) - sum(len(m["content"]) for m in history))
    messages = [*history, {"role": "user", "content": LONGEST}]
    assert sum(len(m["content"]) for m in messages) == LIMITS["max_chat_chars"]
    chat = {"model": MODEL, "messages": messages, "max_tokens": tokens, "max_completion_tokens": tokens, **MOST}
    answer = post(server, "/v1/chat/completions", chat)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == list(range(LIMITS["max_n"]))
    assert all(c["message"]["role"] == "assistant" and "\n" not in c["message"]["content"] for c in choices)
    streamed = post(server, "/v1/chat/completions", {**chat, "stream": True})
    assert streamed.status_code == 200, streamed.text
    assert_finished_once(sse_events(streamed), LIMITS["max_n"])


# --- bad input: 4xx with a clear message, the replica keeps serving ----------------------------------------------

BAD_REQUESTS = [
    ("/v1/beautify", {"prompt": "   "}, 400, "prompt: must not be empty or whitespace only"),
    ("/v1/beautify", {"prompt": ""}, 400, "prompt: must not be empty"),
    ("/v1/beautify", {"prompt": "x" * 201}, 400, "prompt is 201 characters long; the limit is 200"),
    ("/v1/beautify", {"prompt": 42}, 400, "prompt: Input should be a valid string"),
    ("/v1/beautify", {"prompt": "a cat", "n": "2"}, 400, "n: Input should be a valid integer"),
    ("/v1/beautify", {"prompt": "a cat", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ("/v1/beautify", {"prompt": "a cat", "n": 5}, 400, "n=5 asks for 5 outputs; the limit is 4"),
    ("/v1/beautify", {"prompt": "a cat", "temperature": 2.5}, 400, "temperature: Input should be less than"),
    ("/v1/beautify", {"prompt": "a cat", "temperature": -1}, 400, "temperature: Input should be greater than"),
    ("/v1/beautify", {"prompt": "a cat", "max_new_tokens": 65}, 400,
     "max_new_tokens=65 exceeds the limit of 64"),
    ("/v1/beautify", {"prompt": "a cat", "max_new_tokens": 0}, 400, "max_new_tokens: Input should be greater"),
    ("/v1/beautify", {"prompt": "a cat", "seed": -3}, 400, "seed: Input should be greater than or equal to 0"),
    ("/v1/beautify", {"prompt": "a cat", "repetition_penalty": 3}, 400,
     "repetition_penalty: Input should be less than or equal to 2"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "no_repeat_ngram_size": -1}, 400,
     "no_repeat_ngram_size: Input should be greater than or equal to 0"),
    ("/v1/beautify", {"n": 1}, 400, "prompt: required (unless edit_of"),
    ("/v1/beautify", [1, 2], 400, "the request body must be a JSON object"),
    ("/v1/beautify", {"prompt": "a cat", "model": "dall-e"}, 404, "model 'dall-e' does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "stream": True}, 400,
     "stream=true takes a single prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 2}, 400,
     "n=2 x 3 prompts asks for 6 outputs; the limit is 4"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400,
     "stop: List should have at most 4 items"),
    ("/v1/completions", {"prompt": "a"}, 400, "model: Field required"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": "hi"}]}, 400,
     "needs a message with role 'user'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role: Input should be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "max_completion_tokens": 100}, 400, "max_completion_tokens=100 exceeds the limit"),
    ("/v1/beautify", {"prompt": "a \u0007 cat"}, 400, "prompt: has the control character U+0007 at character 2"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a cat"}, {"type": "text", "text": "\x00"}]}]}, 400,
     "messages[0].content[1].text: has the control character U+0000"),
    # Prompts that give the model no text, on every route: blank or invisible (checked as the request is read;
    # the strings of special tokens are text, see test_special_token_strings_are_beautified_as_text).
    ("/v1/completions", {"model": MODEL, "prompt": " \n\t"}, 400, "prompt: must not be empty or whitespace only"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\u3000"}]}, 400,
     "messages: must not be empty or whitespace only"),
    ("/v1/beautify", {"prompt": "\u200b"}, 400,
     "prompt: must not be empty or whitespace only (U+200B at character 0 is an invisible format character)"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a cat", "\ufeff\u200d"]}, 400,
     "prompt: must not be empty or whitespace only (U+FEFF at character 0"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": " \u00ad"}]}, 400,
     "messages: must not be empty or whitespace only (U+00AD at character 1"),
    # Limits of a whole request: a long chat history, and stop strings
    ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"a cat number {i}"} for i in range(1000)]},
     400, "messages has 1000 messages; the limit is 32"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "system", "content": "x" * 3999}, {"role": "user", "content": "a cat"}]}, 400,
     "messages hold 4004 characters in all; the limit is 4000"),
    ("/v1/completions", {"model": MODEL, "prompt": "a cat", "stop": ["x", "y" * 201]}, 400,
     "stop[1] is 201 characters long; the limit is 200"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS,
                         ids=[f"{p}-{m[:30]}" for p, _, _, m in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_clear_message(server, path, body, status, message):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_a_body_over_max_body_bytes_gets_413_and_the_server_goes_on(server):
    # 2 MiB of chat history: under every per-field limit's radar until parsed, so the body limit must catch it.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a cat " * 30}] * 12_000}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"
    assert post(server, "/v1/beautify", {"prompt": "a cat", "max_new_tokens": 4}).status_code == 200


@pytest.mark.parametrize(("method", "path", "content", "status", "message"), [
    ("POST", "/v1/beautify", b'{"prompt": "a cat",', 400, "invalid JSON body"),
    ("POST", "/v1/beautify", b"", 400, "missing JSON body"),
    ("GET", "/v1/beautify", None, 405, "GET is not allowed on /v1/beautify"),
    ("GET", "/v1/nothing-here", None, 404, "no such path: /v1/nothing-here"),
    ("GET", "/v1/models/dall-e", None, 404, "model 'dall-e' does not exist"),
    # a lone surrogate is a valid JSON escape but not Unicode: the tokenizer cannot take it (was a 500)
    ("POST", "/v1/beautify", b'{"prompt": "a \\ud800 cat"}', 400, "prompt: has a lone surrogate U+D800 at character 2"),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": "a \\udc00"}' % MODEL.encode(), 400,
     "prompt: has a lone surrogate U+DC00"),
    ("POST", "/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d"}]}' % MODEL.encode(), 400,
     "messages[0].content: has a lone surrogate U+D83D"),
    ("POST", "/v1/render", b'{"prompt": "a \\ud800 cat"}', 400, "prompt: has a lone surrogate U+D800"),
])
def test_malformed_http_gets_a_4xx_with_a_clear_message(server, method, path, content, status, message):
    response = httpx.request(method, server.url + path, content=content, timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_bad_requests_did_not_hurt_the_replica(server):
    assert beautified(server, seed=1)  # still answers after every bad input above


def test_serve_metrics_are_exported_for_prometheus(server):
    """Ray exports Serve's own metrics (per deployment: requests, latencies, replicas) on the metrics port."""
    port = int(server.log.read_text(errors="replace").split("Prometheus metrics at http://127.0.0.1:")[1]
               .split("/")[0])
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # the metrics agent reports every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if 'deployment="Beautifier"' in text and 'deployment="Generator"' in text:
            break
        time.sleep(2)
    served = [line for line in text.splitlines() if line.startswith("ray_serve_") and "Beautifier" in line]
    assert served, text[-2000:]


def test_openapi_spec_fuzzed_with_schemathesis(server, tmp_path):
    """Every operation, bounded in examples and time: no 5xx, and every response matches its declared schema."""
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(schemathesis), "run", server.url + "/openapi.json", "--checks",
         "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
         "--max-examples", "5", "--max-time", "20", "--seed", "7", "--request-timeout", "30", "--workers", "1",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert "Tested: 7" in summary and " passed" in summary


# --- overload, failure, shutdown --------------------------------------------------------------------------------

def test_overload_gets_fast_503s_while_admitted_requests_succeed_then_recovers(server):
    async def burst(count: int) -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=count)) as client:
            async def one(i: int) -> tuple[int, float]:
                start = time.perf_counter()
                response = await client.post("/v1/beautify", json={"prompt": f"a cat number {i}", "seed": i,
                                                                   "max_new_tokens": 64, "temperature": 1.0})
                return response.status_code, time.perf_counter() - start
            return await asyncio.gather(*(one(i) for i in range(count)))

    results = asyncio.run(burst(48))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 8, statuses  # at most 4 running + 4 queued per replica at a time
    assert statuses.count(200) >= 4, statuses
    assert max(seconds for status, seconds in results if status == 503) < 10  # refused at once, not hung
    assert beautified(server, seed=2)  # and it serves again afterwards


def test_a_replica_killed_under_load_is_replaced_and_later_requests_succeed(server):
    """Four clients send requests back to back; the generator replica's process is SIGKILLed among them. Serve
    starts a new replica, and the same clients' later requests succeed again (each bounded; the load stops)."""
    pid = httpx.get(server.url + "/healthz").json()["generator"]["pid"]
    stop, log = threading.Event(), []  # (time, status or "error")

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            deadline = time.monotonic() + 150
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    status = http.post("/v1/beautify", json={"prompt": "a cat", "max_new_tokens": 8}).status_code
                except httpx.HTTPError:
                    status = "error"
                log.append((time.monotonic(), status))
                time.sleep(0.05)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        while sum(status == 200 for _, status in log) < 8:  # load is flowing
            time.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # the model replica of the server this module started
        while time.monotonic() < killed_at + 120:
            after = [status for t, status in log if t > killed_at + 1]
            if len(after) >= 10 and all(status == 200 for status in after[-10:]):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    after = [status for t, status in log if t > killed_at + 1]
    assert len(after) >= 10 and all(status == 200 for status in after[-10:]), (after[-20:], server.log_tail())
    assert httpx.get(server.url + "/healthz").json()["generator"]["pid"] != pid


def test_sigterm_shuts_serve_down_cleanly(server):
    assert server.stop(timeout_s=90) == 0, server.log_tail()
    assert "bp-ray serve: shutting down" in server.log.read_text(errors="replace")
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz", timeout=5)


# --- the request timeout (504), on a second server ----------------------------------------------------------------

# Rows wait up to 8 s for a full batch of 4 and a request gets 3 s: a lone request of one output times out by
# construction (nothing else fills its batch), however slow the machine, while a request of 4 outputs fills a batch
# and is sent at once. The health check has its own bound (serve.health_timeout_s), so this server is healthy
# whatever request_timeout_s is (it used to wait on a generator replica for request_timeout_s).
SLOW_BATCHES = {"request_timeout_s": 3, "batch_wait_timeout_s": 8, "max_batch_size": 4, "max_concurrent_batches": 1,
                "max_n": 4, "min_replicas": 1, "max_replicas": 1, "enable_render": "false"}


@pytest.fixture(scope="module")
def timeout_server(tmp_path_factory, tiny_models_cfg) -> ServeProcess:
    process = start_server(tmp_path_factory, tiny_models_cfg, SLOW_BATCHES)
    yield process
    process.stop()


def test_a_request_past_the_timeout_gets_504_and_the_server_keeps_serving(timeout_server):
    url = timeout_server.url
    before = httpx.get(url + "/healthz", timeout=30).json()["generator"]

    async def lone_requests() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v1/beautify", json={"prompt": "a cat", "max_new_tokens": 8}),
                client.post("/v1/completions", json={"model": MODEL, "prompt": "a cat", "max_tokens": 8}),
                client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8,
                                                          "messages": [{"role": "user", "content": "a cat"}]}))

    start_s = time.monotonic()
    responses = asyncio.run(lone_requests())
    answered_s = time.monotonic()
    for response in responses:
        assert response.status_code == 504, response.text
        assert response.json() == {"error": {
            "message": "generation did not finish within the request timeout of 3 s; retry later or ask for fewer "
                       "tokens", "type": "timeout_error", "param": None, "code": "request_timeout"}}
        for internal in ("Traceback", "actor", "pid", "/", "ray::", "Error"):
            assert internal not in response.text
    assert answered_s - start_s < SLOW_BATCHES["batch_wait_timeout_s"]  # at the timeout, not when the batch left

    # The three rows' batch opened at the latest when they timed out; once its 8 s are over it is dropped (every
    # row in it was cancelled), and a request of 4 outputs makes a full batch of its own.
    time.sleep(max(0.0, answered_s + SLOW_BATCHES["batch_wait_timeout_s"] + 0.5 - time.monotonic()))
    response = post(timeout_server, "/v1/beautify", {"prompt": "a cat on a sofa", "n": 4, "max_new_tokens": 8,
                                                     "seed": 5})
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]) == 4
    after = httpx.get(url + "/healthz", timeout=30).json()["generator"]
    assert after["pid"] == before["pid"]  # the same replica: nothing crashed
    # The timed-out rows never reached the model: the one batch it ran since is the 4-output request.
    assert (after["batching"]["batches"], after["batching"]["rows"]) == (
        before["batching"]["batches"] + 1, before["batching"]["rows"] + 4)
