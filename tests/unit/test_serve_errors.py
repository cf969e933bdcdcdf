"""The endpoint's error bodies: bad text named by field, and a 500 that carries no internals."""

import json
import logging

import pydantic
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bp_ray.serve.errors import install_error_handlers
from bp_ray.serve.schemas import BeautifyRequest, ChatCompletionRequest, CompletionRequest


def test_a_crash_answers_500_with_a_request_id_and_logs_the_details(caplog):
    api = FastAPI()
    install_error_handlers(api)

    @api.get("/boom")
    def boom() -> None:
        raise RuntimeError("ray::ServeReplica:beautifier:Generator pid=4242, actor_id=abc123 /work/secret/path.py")

    with caplog.at_level(logging.ERROR), TestClient(api, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    for internal in ("pid", "actor_id", "/work", "RuntimeError", "Traceback", "ServeReplica"):
        assert internal not in response.text
    request_id = message.split("request id ")[1].split(":")[0]
    assert len(request_id) == 16
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert request_id in logged and "actor_id=abc123" in caplog.text


@pytest.mark.parametrize(("model", "body", "field", "message"), [
    (BeautifyRequest, '{"prompt": "a \\ud800 cat"}', ("prompt",), "has a lone surrogate U+D800 at character 2"),
    (BeautifyRequest, '{"prompt": "a\\u001bcat"}', ("prompt",), "has the control character U+001B at character 1"),
    (CompletionRequest, '{"model": "m", "prompt": "ok", "stop": ["\\udfff"]}', ("stop",), "lone surrogate U+DFFF"),
    (ChatCompletionRequest, '{"model": "m", "messages": [{"role": "system", "content": "\\ud800"}, '
                            '{"role": "user", "content": "a cat"}]}', ("messages", 0, "content"), "U+D800"),
])
def test_text_a_tokenizer_cannot_take_is_refused_by_field(model, body, field, message):
    with pytest.raises(pydantic.ValidationError) as caught:
        model.model_validate(json.loads(body))  # Python's json accepts the escape, as FastAPI's parser does
    error = caught.value.errors()[0]
    assert error["loc"][:len(field)] == field and message in error["msg"]


def test_tabs_line_breaks_and_any_real_unicode_are_text():
    for prompt in ("a cat\ton a sofa\r\n", "un chat sur un canapé", "猫がソファに", "a cat 🐈"):
        assert BeautifyRequest.model_validate({"prompt": prompt}).prompt == prompt


def test_a_body_over_the_limit_gets_413_before_it_is_read():
    from bp_ray.serve.errors import BodyLimit

    api = FastAPI()
    install_error_handlers(api)
    seen: list[int] = []

    @api.post("/echo")
    def echo(body: dict) -> dict:
        seen.append(len(json.dumps(body)))
        return {"ok": True}

    api.add_middleware(BodyLimit, limit=lambda: 2048)
    with TestClient(api) as client:
        small = client.post("/echo", json={"prompt": "a" * 1000})
        large = client.post("/echo", json={"prompt": "a" * 5000})
        chat = client.post("/echo", json={"messages": [{"content": "b" * 100}] * 100})
    assert small.status_code == 200
    assert large.status_code == chat.status_code == 413
    error = large.json()["error"]
    assert error["code"] == "body_too_large" and "the limit is 2048" in error["message"]
    assert seen == [len(json.dumps({"prompt": "a" * 1000}))]  # the large bodies never reached the route
