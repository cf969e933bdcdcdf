"""A request's controls (protected spans, token budget, detail, style, avoid) turned into what the generator
enforces at decoding and what the ingress checks on each finished output (see controls.py for the text rules).

Plain Python: the ingress builds one ControlPlan per request and applies it to each of its outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from bp_ray.config import ControlsConfig
from bp_ray.data.colours import other_colours
from bp_ray.serve import controls as T
from bp_ray.serve import schemas as S
from bp_ray.serve.errors import ApiError
from bp_ray.serve.generation import GenerationRequest


@dataclass(frozen=True)
class ControlPlan:
    spans: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    avoid_words: tuple[str, ...] = ()
    """Words banned as words at decoding (keep_colours: the colours the prompt does not give)."""
    prefer: tuple[str, ...] = ()
    prefer_bias: float = 0.0
    min_new_tokens: int = 0
    max_added: int | None = None
    """At most this many words beyond the prompt's (detail=low)."""
    budget: int | None = None
    """Text-encoder tokens (BOS and EOS included) an output may take."""

    def constrain(self, request: GenerationRequest) -> GenerationRequest:
        """The generation request with the plan's decoding constraints."""
        return dataclasses.replace(request, avoid=self.avoid, avoid_words=self.avoid_words, prefer=self.prefer,
                                   prefer_bias=self.prefer_bias,
                                   min_new_tokens=min(self.min_new_tokens, request.max_new_tokens))

    def finish(self, text: str, prompt: str, count: Callable[[str], int]) -> tuple[str, int] | None:
        """The output as returned and its encoder-token count, or None if it cannot keep the spans in budget."""
        budget = self.budget if self.budget is not None else 1 << 30
        # A text encoder has no use for control characters, and a user could not send them back (edit_of).
        text = S.NOT_TEXT.sub("", text)
        return T.finish_output(text, prompt, self.spans, self.avoid, self.max_added, count, budget)

    def fit_prefix(self, count: Callable[[str], int]) -> Callable[[str], str] | None:
        """For a stream: the part of a text within the budget (None: no budget)."""
        if self.budget is None:
            return None
        budget = self.budget
        return lambda text: T.fit_budget(text, (), count, budget) or ""


def plan_controls(body: S.Controls, prompt: str, cfg: ControlsConfig, default_budget: int | None,
                  count: Callable[[str], int], prompt_kept: bool, field: str = "prompt",
                  keep_colours: bool = False) -> tuple[str, ControlPlan]:
    """The prompt without its <keep> markup, and the plan; ApiError 400 naming the field for a control that
    cannot be met whatever is generated. `prompt_kept`: every output opens with the prompt (sft.keep_prompt);
    `keep_colours`: the server's default where the request does not say."""
    try:
        plain, marked = T.parse_keep(prompt)
    except ValueError as error:
        raise ApiError(400, f"{field}: {error}", param=field) from None
    spans = tuple(dict.fromkeys([*marked, *(body.keep or [])]))
    if len(spans) > cfg.max_keep:
        raise ApiError(400, f"keep: {len(spans)} protected spans (keep and <keep> markup together); the limit is "
                            f"{cfg.max_keep}", param="keep")
    avoid = T.default_avoid() if body.avoid is None else tuple(body.avoid)
    if body.avoid is not None and len(avoid) > cfg.max_avoid:
        raise ApiError(400, f"avoid: {len(avoid)} phrases; the limit is {cfg.max_avoid}", param="avoid")
    avoid = T.banned_phrases(avoid, (plain, *spans))  # what the user wrote is theirs: never banned, never stripped
    budget = body.max_prompt_tokens if body.max_prompt_tokens is not None else default_budget
    if budget is not None and prompt_kept and count(plain) > budget:
        if body.max_prompt_tokens is not None:
            raise ApiError(400, f"max_prompt_tokens: the prompt alone takes {count(plain)} tokens of the renderer's "
                                f"text encoder, and every output opens with it; the budget is {budget}",
                           param="max_prompt_tokens")
        budget = count(plain)  # the default budget adds nothing past the window, and refuses no prompt of the user
    if budget is not None:
        needed = count(", ".join(spans)) if spans else 0
        if needed > budget:
            raise ApiError(400, f"max_prompt_tokens: the protected spans alone take {needed} tokens of the "
                                f"renderer's text encoder; the budget is {budget}", param="max_prompt_tokens")
    keep_colours = keep_colours if body.keep_colours is None else body.keep_colours
    plan = ControlPlan(
        spans=spans, avoid=avoid, avoid_words=other_colours(plain) if keep_colours else (),
        prefer=T.style_phrases(body.style) if body.style else (),
        prefer_bias=cfg.style_bias if body.style else 0.0,
        min_new_tokens=cfg.detail_high_min_words if body.detail == "high" else 0,
        max_added=cfg.detail_low_max_words if body.detail == "low" else None,
        budget=budget)
    return plain, plan


DECODING_ONLY = ("keep_colours",)
"""Controls enforced while tokens are chosen, with nothing to check on the finished text: a stream keeps them."""


def used_controls(body: S.Controls) -> list[str]:
    """The control fields a request set that a streamed answer cannot apply (its text is sent as generated)."""
    return [name for name in S.Controls.model_fields
            if name not in DECODING_ONLY and getattr(body, name) is not None]
