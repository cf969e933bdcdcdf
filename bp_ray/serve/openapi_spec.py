"""The OpenAPI spec the endpoint serves: FastAPI's, plus the replica's configured limits (prompt and stop-string
length, messages, n, max tokens, protected spans and avoided phrases) and the schemas of the streamed events, so
that clients and fuzzers see exactly what it accepts."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from bp_ray.serve import schemas as S

SERVED: dict[str, Any] = {}
"""This process's ServeConfig under "serve", set by the replica when it starts."""


def served_limit(name: str) -> Any:
    """A limit of this replica's ServeConfig (None outside a replica)."""
    serve_cfg = SERVED.get("serve")
    return getattr(serve_cfg, name) if serve_cfg is not None else None


class BeautifierAPI(FastAPI):
    """FastAPI whose /openapi.json states the serving replica's limits.

    Serve ships the ingress app to replicas by value, so the limits travel through this module's global (each
    replica sets it), not through an attribute set on the driver's copy of the app."""

    def openapi(self) -> dict[str, Any]:
        base = super().openapi()
        return with_limits(copy.deepcopy(base), SERVED["serve"]) if "serve" in SERVED else base


def openapi_spec(app: FastAPI, serve_cfg: Any) -> dict[str, Any]:
    """`app`'s spec as a replica configured by `serve_cfg` serves it."""
    return with_limits(copy.deepcopy(FastAPI.openapi(app)), serve_cfg)


def _field(schemas: dict[str, Any], model: str, name: str) -> list[dict[str, Any]]:
    """The typed alternatives of one property (an optional field is anyOf [type, null])."""
    prop = schemas[model]["properties"][name]
    return [alt for alt in prop.get("anyOf", [prop]) if alt.get("type") not in (None, "null")]


def with_limits(spec: dict[str, Any], serve_cfg: Any) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    for model, name in (("BeautifyRequest", "prompt"), ("RenderRequest", "prompt"),
                        ("CompletionRequest", "prompt")):
        for alt in _field(schemas, model, name):
            (alt["items"] if alt["type"] == "array" else alt)["maxLength"] = serve_cfg.max_prompt_chars
            if alt["type"] == "array":
                alt.update(minItems=1, maxItems=serve_cfg.max_n)
    controls = serve_cfg.controls
    for model in ("BeautifyRequest", "RenderRequest", "ChatCompletionRequest"):
        for name, limit in (("keep", controls.max_keep), ("avoid", controls.max_avoid)):
            alt = _field(schemas, model, name)[0]
            alt.update(maxItems=limit)
            alt["items"]["maxLength"] = serve_cfg.max_prompt_chars
    for model, name in (("BeautifyRequest", "negative_prompt"), ("BeautifyRequest", "text"),
                        ("RenderRequest", "negative_prompt")):
        _field(schemas, model, name)[0]["maxLength"] = serve_cfg.max_prompt_chars
    for alt in _field(schemas, "CompletionRequest", "stop"):
        (alt["items"] if alt["type"] == "array" else alt)["maxLength"] = serve_cfg.max_prompt_chars
    _field(schemas, "ChatCompletionRequest", "messages")[0]["maxItems"] = serve_cfg.max_messages
    for model in ("BeautifyRequest", "CompletionRequest", "ChatCompletionRequest"):
        _field(schemas, model, "n")[0]["maximum"] = serve_cfg.max_n
    for model, name in (("BeautifyRequest", "max_new_tokens"), ("RenderRequest", "max_new_tokens"),
                        ("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                        ("ChatCompletionRequest", "max_completion_tokens")):
        _field(schemas, model, name)[0]["maximum"] = serve_cfg.max_new_tokens
    for model in ("BeautifyRequest", "CompletionRequest", "ChatCompletionRequest"):
        _field(schemas, model, "model")[0]["enum"] = [serve_cfg.model_name]
    # Invalid requests get 400 (as OpenAI answers), never FastAPI's default 422.
    for operations in spec["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, chunk in (("/v1/completions", S.CompletionResponse), ("/v1/chat/completions", S.ChatCompletionChunk)):
        event = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(event.pop("$defs", {}))
        schemas.setdefault(chunk.__name__, event)
        # Before OpenAPI 3.2 the schema of a text/event-stream describes one event: its `data` is a JSON chunk,
        # or the final "[DONE]".
        spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"] = {
            "type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"}},
                {"type": "string", "const": "[DONE]"}]}}}
    return spec
