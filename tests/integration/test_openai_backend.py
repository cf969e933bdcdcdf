"""OpenAIRewriter against a real local OpenAI-compatible server, over real HTTP, with the real `openai` client."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from bp_ray.config import DataConfig
from bp_ray.data.openai_backend import OpenAIRewriter, OpenAISettings
from tests.openai_stub_server import EXPANSION_SUFFIX, OpenAIStubServer

pytestmark = pytest.mark.integration

KEY_ENV = "BP_RAY_TEST_OPENAI_KEY"
TEMPLATES = DataConfig()


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch):
    """No key unless a test sets one, and no ambient client settings from the developer's shell."""
    for name in (KEY_ENV, "OPENAI_CUSTOM_HEADERS", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def stub():
    """Start a stub server with the given failure knobs; every one started is stopped at teardown."""
    servers: list[OpenAIStubServer] = []

    def start(**knobs) -> OpenAIStubServer:
        servers.append(OpenAIStubServer(**knobs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def settings_for(server_or_url: OpenAIStubServer | str, **overrides) -> OpenAISettings:
    """Test settings: tiny timeouts and backoffs so the whole file runs in seconds."""
    base_url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    values = {"base_url": base_url, "model": "stub-model", "api_key_env": KEY_ENV, "concurrency": 4,
              "timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01, "max_new_tokens": 16}
    return OpenAISettings(**(values | overrides))


def summarise(prompt: str) -> str:
    return TEMPLATES.summarise_template.format(prompt=prompt)


def expand(prompt: str) -> str:
    return TEMPLATES.expand_template.format(prompt=prompt)


def test_settings_come_from_data_config_and_reject_unknown_api():
    cfg = DataConfig(openai_base_url="http://h:1/v1", openai_model="m", openai_api="completions",
                     openai_api_key_env="MY_KEY", openai_concurrency=8, openai_timeout_s=3.0, openai_max_retries=2,
                     openai_backoff_s=0.5, max_new_tokens=32)
    assert OpenAISettings.from_config(cfg) == OpenAISettings(
        base_url="http://h:1/v1", model="m", api="completions", api_key_env="MY_KEY", concurrency=8, timeout_s=3.0,
        max_retries=2, backoff_s=0.5, max_new_tokens=32, temperature=0.0)
    with pytest.raises(ValueError, match="api must be one of"):
        OpenAISettings(base_url="http://h:1/v1", model="m", api="responses")


def test_chat_summaries_and_expansions_keep_order_with_bounded_concurrency(stub):
    # delay_s makes requests overlap, so the in-flight count shows the concurrency limit
    server = stub(delay_s=0.05)
    instructions = [summarise(f"item{i} castle on a hill, by greg rutkowski, 8k") if i % 2 == 0
                    else expand(f"item{i} a cat on a sofa") for i in range(12)]
    with OpenAIRewriter(settings_for(server, concurrency=4)) as rewriter:
        results = rewriter.complete(instructions)
        assert rewriter.complete([]) == []
    # summary = first 4 words after "Prompt:"; expansion = description + the stub's tag suffix
    expected = [f"item{i} castle on a" if i % 2 == 0 else f"item{i} a cat on a sofa{EXPANSION_SUFFIX}"
                for i in range(12)]
    assert [r.text for r in results] == expected
    assert all(r.error is None and r.attempts == 1 for r in results)
    assert server.total_requests == 12
    assert 1 < server.max_in_flight <= 4
    assert {r.path for r in server.requests} == {"/v1/chat/completions"}


def test_completions_api(stub):
    server = stub()
    with OpenAIRewriter(settings_for(server, api="completions")) as rewriter:
        results = rewriter.complete([expand("a red fox"), summarise("a red fox in snow, octane render")])
    assert [r.text for r in results] == [f"a red fox{EXPANSION_SUFFIX}", "a red fox in"]
    assert {r.path for r in server.requests} == {"/v1/completions"}


def test_rate_limited_batch_still_succeeds_and_honours_retry_after_zero(stub):
    server = stub(rate_limit_first=3)  # 429 with `retry-after: 0`
    sleeps: list[float] = []
    with OpenAIRewriter(settings_for(server, backoff_s=1.0), sleep=sleeps.append) as rewriter:
        results = rewriter.complete([summarise(f"item{i} a b c d e") for i in range(12)])
    assert [r.text for r in results] == [f"item{i} a b c" for i in range(12)]
    # 3 rejected requests -> 3 extra attempts in all, each after the server's 0 s, not backoff_s=1.0
    assert sum(r.attempts for r in results) == 15 and server.total_requests == 15
    assert sleeps == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("headers", "delay_s"), [({"retry-after-ms": "250"}, 0.25), ({"retry-after": "1.5"}, 1.5),
                                                   ({"retry-after": "3600"}, 60.0)])
def test_retry_after_header_sets_the_delay_capped_at_60s(stub, headers, delay_s):
    server = stub(rate_limit_first=2, rate_limit_headers=headers)
    sleeps: list[float] = []
    with OpenAIRewriter(settings_for(server, backoff_s=0.01), sleep=sleeps.append) as rewriter:
        [result] = rewriter.complete([summarise("a b c d e")])
    assert (result.text, result.attempts) == ("a b c d", 3)
    assert sleeps == [delay_s, delay_s]


def test_exponential_backoff_without_retry_after_is_deterministic(stub):
    runs: list[list[float]] = []
    for _ in range(2):
        server = stub(rate_limit_first=3, rate_limit_headers={})  # 429 without any Retry-After header
        sleeps: list[float] = []
        with OpenAIRewriter(settings_for(server, backoff_s=0.5, max_retries=5), sleep=sleeps.append) as rewriter:
            [result] = rewriter.complete([summarise("a b c d e")])
        assert (result.text, result.attempts) == ("a b c d", 4)
        runs.append(sleeps)
    # backoff_s * 2**attempt = 0.5, 1.0, 2.0, each plus up to 10 % jitter seeded by the instruction
    for delay, base in zip(runs[0], [0.5, 1.0, 2.0], strict=True):
        assert base <= delay <= 1.1 * base
    assert runs[0] == runs[1]


def test_server_errors_are_retried_with_real_sleeps(stub):
    server = stub(fail_5xx_first=2)
    started = time.monotonic()
    with OpenAIRewriter(settings_for(server, concurrency=2, backoff_s=0.01)) as rewriter:
        results = rewriter.complete([summarise(f"item{i} a b c d") for i in range(4)])
    assert [r.text for r in results] == [f"item{i} a b c" for i in range(4)]
    assert sum(r.attempts for r in results) == 6
    assert time.monotonic() - started < 2.0


def test_gives_up_after_max_retries_without_raising(stub):
    server = stub(rate_limit_first=1000)
    sleeps: list[float] = []
    with OpenAIRewriter(settings_for(server, max_retries=2), sleep=sleeps.append) as rewriter:
        results = rewriter.complete([summarise(f"item{i} a b c d") for i in range(3)])
    for result in results:
        assert (result.text, result.error, result.attempts) == (None, "rate_limited: gave up after 2 retries", 3)
    assert server.total_requests == 9 and len(sleeps) == 6


def test_bad_request_fails_only_that_item_at_once(stub):
    server = stub(bad_request_if_contains="forbidden")
    instructions = [summarise(f"item{i} a b c d") for i in range(4)] + [summarise("forbidden words here now")]
    with OpenAIRewriter(settings_for(server)) as rewriter:
        results = rewriter.complete(instructions)
    assert [r.text for r in results[:4]] == [f"item{i} a b c" for i in range(4)]
    bad = results[4]
    assert bad.text is None and bad.attempts == 1
    assert bad.error == "bad_request: 400 This prompt was rejected by the stub."
    assert server.count("forbidden") == 1


def test_slow_server_times_out_after_retries(stub):
    server = stub(delay_s=0.8)
    sleeps: list[float] = []
    started = time.monotonic()
    with OpenAIRewriter(settings_for(server, timeout_s=0.1, max_retries=1), sleep=sleeps.append) as rewriter:
        [result] = rewriter.complete([summarise("a b c d e")])
    assert (result.text, result.error, result.attempts) == (None, "timeout", 2)
    assert len(sleeps) == 1
    assert time.monotonic() - started < 0.7  # two 0.1 s timeouts, not one 0.8 s answer


def test_unreachable_server_is_a_connection_error():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with OpenAIRewriter(settings_for(url, max_retries=1), sleep=lambda _: None) as rewriter:
        [result] = rewriter.complete(["hello"])
    assert (result.text, result.error, result.attempts) == (None, "connection_error: gave up after 1 retry", 2)


def test_api_key_is_read_from_the_named_env_var(stub, monkeypatch):
    server = stub(require_api_key="sk-stub-123")
    monkeypatch.setenv(KEY_ENV, "sk-stub-123")
    with OpenAIRewriter(settings_for(server)) as rewriter:
        [result] = rewriter.complete([summarise("a b c d e")])
    assert result.text == "a b c d"
    assert server.requests[0].authorization == "Bearer sk-stub-123"


def test_missing_api_key_warns_and_401_is_not_retried(stub, caplog):
    server = stub(require_api_key="sk-stub-123")
    with caplog.at_level(logging.WARNING, logger="bp_ray.data.openai_backend"):
        rewriter = OpenAIRewriter(settings_for(server))
    assert [r.message for r in caplog.records if KEY_ENV in r.message], "warning should name the variable"
    with rewriter:
        [result] = rewriter.complete([summarise("a b c d e")])
    assert result.text is None and result.attempts == 1
    assert result.error == f"auth_error: 401 Incorrect API key provided. (API key from ${KEY_ENV}, which is unset)"
    assert server.total_requests == 1


def test_chatter_after_the_answer_is_dropped_and_empty_output_is_an_error(stub):
    stub_server = stub()
    instructions = ["\n  \n  first line  \nsecond line",  # echoed: keep the first non-empty line
                    "   \n  ",  # echoed: whitespace only
                    "Summarise this.\nPrompt:\nSummary:"]  # summary of an empty prompt
    with OpenAIRewriter(settings_for(stub_server)) as rewriter:
        results = rewriter.complete(instructions)
    assert [(r.text, r.error, r.attempts) for r in results] == [
        ("first line", None, 1), (None, "empty_output", 1), (None, "empty_output", 1)]
