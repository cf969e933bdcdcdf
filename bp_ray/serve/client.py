"""`bp-ray client`: call a running beautifier endpoint from the command line (plain httpx, no Ray)."""

from __future__ import annotations

from typing import Any

import httpx


class EndpointError(RuntimeError):
    """The endpoint answered with an error status; the message is the server's own."""


def beautify_remote(url: str, prompt: str, n: int = 1, seed: int | None = None, temperature: float | None = None,
                    max_new_tokens: int | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """POST {url}/v1/beautify; returns the response body, or raises EndpointError with the server's message."""
    body: dict[str, Any] = {"prompt": prompt, "n": n}
    for key, value in (("seed", seed), ("temperature", temperature), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            body[key] = value
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
