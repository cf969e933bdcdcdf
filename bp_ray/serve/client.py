"""`bp-ray client` and the Python API of a running beautifier endpoint (plain httpx, no Ray).

    from bp_ray.serve.client import beautify_remote
    body = beautify_remote("http://127.0.0.1:8000", "a cat on a sofa", n=4, rank="reward_model", best_of=2,
                           keep=["<lora:catstyle:0.8>"], style="painting", detail="high")
    for output in body["outputs"]:
        print(output["text"], output["scores"]["reward"], output["id"])
    edit = beautify_remote(url, edit_of=body["outputs"][0]["id"], text="a cat on a sofa, oil painting")
"""

from __future__ import annotations

import sys
from typing import Any

import httpx

CONTROLS = ("keep", "max_prompt_tokens", "negative_prompt", "rank", "best_of", "detail", "style", "avoid",
            "keep_colours", "render", "edit_of", "text", "seed", "temperature", "max_new_tokens")
"""Request fields the client passes through when given (None: the server's default)."""


class EndpointError(RuntimeError):
    """The endpoint answered with an error status; the message is the server's own."""


def beautify_remote(url: str, prompt: str | None = None, n: int = 1, timeout_s: float = 60.0,
                    **fields: Any) -> dict[str, Any]:
    """POST {url}/v1/beautify with `prompt`, `n` and any of CONTROLS; returns the response body, or raises
    EndpointError with the server's message."""
    unknown = sorted(set(fields) - set(CONTROLS))
    if unknown:
        raise TypeError(f"beautify_remote() got unknown fields {unknown}; known: {', '.join(CONTROLS)}")
    body: dict[str, Any] = {"n": n, **{key: value for key, value in fields.items() if value is not None}}
    if prompt is not None:
        body["prompt"] = prompt
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/beautify", json=body, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise EndpointError(f"cannot reach {url}: {error}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip() or response.reason_phrase
        raise EndpointError(f"HTTP {response.status_code}: {message}")
    return response.json()


def print_response(body: dict[str, Any]) -> None:
    """The outputs on stdout, one per line (with their scores and ids when ranked); the rest on stderr."""
    outputs = ([body["original"]] if body.get("original") else []) + body["outputs"]
    for output in outputs:
        scores = output.get("scores")
        label = "original: " if output is body.get("original") else ("edit:     " if body.get("original") else "")
        print(f"{label}{output['text']}")
        if scores:
            print(f"  reward {scores['reward']:.3f} (PickScore {scores['pickscore']:.2f}, aesthetic "
                  f"{scores['aesthetic']:.2f}), id {output['id']}", file=sys.stderr)
    notes = [f"seed {body['seed']}", f"{body['usage']['completion_tokens']} tokens", f"{body['latency_ms']:.0f} ms"]
    if body.get("rejected"):
        notes.append(f"{body['rejected']} outputs could not keep the protected spans within the token budget")
    print(f"({', '.join(notes)})", file=sys.stderr)
