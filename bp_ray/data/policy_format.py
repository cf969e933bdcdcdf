"""The text the policy reads and writes: the paper's instruction template around the user prompt, and the rewrite a
completion stands for. SFT trains on it, PPO samples with it, serving and evaluation generate with it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bp_ray.data.content import split_subject

TEXT_ONLY = {"add_special_tokens": False, "split_special_tokens": True}
"""How the policy's prompts and targets are tokenised, in training and serving alike: no BOS/EOS added (the EOS
ends targets by id), and a user's "</s>" or "<pad>" is the text it reads as, never the control token. A model's
input then begins with `leading_tokens`."""


LEADING_PROBE = "a"
"""The text `leading_tokens` has the tokenizer encode with and without its own special tokens."""


def leading_tokens(tokenizer: Any) -> list[int]:
    """The control tokens the tokenizer itself puts before any text: Gemma's `<bos>`, without which Gemma writes
    nonsense; none for GPT-2, BLOOM or SmolLM2. TEXT_ONLY leaves them out, so every policy input starts with them."""
    full = tokenizer(LEADING_PROBE)["input_ids"]
    plain = tokenizer(LEADING_PROBE, **TEXT_ONLY)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def template_marks(tokenizer: Any, instruction: str) -> list[str]:
    """The tokenizer's control tokens that the instruction itself holds (a chat template's `<|im_start|>`), longest
    first: those are control tokens, where the same strings in a user's text are text."""
    specials = {*getattr(tokenizer, "all_special_tokens", ()),
                *(token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
                  if getattr(token, "special", False))}
    return sorted((mark for mark in specials if mark and mark in instruction), key=len, reverse=True)


def encode_prompts(tokenizer: Any, instruction: str, lows: Sequence[str], keep_prompt: bool = False) -> list[list[int]]:
    """Token ids of `format_prompt(instruction, low, keep_prompt)` for each low prompt, after `leading_tokens`: the
    instruction's own control tokens as control tokens, and everything else, the user's words above all, as text
    (TEXT_ONLY). Without control tokens in the instruction this is tokenising the formatted text whole."""
    lead = leading_tokens(tokenizer)
    marks = template_marks(tokenizer, instruction)
    if not marks:
        return [lead + ids for ids in tokenizer([format_prompt(instruction, low, keep_prompt) for low in lows],
                                                **TEXT_ONLY)["input_ids"]]
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", instruction)
    ids = [tokenizer.convert_tokens_to_ids(piece) if piece in marks else None for piece in pieces]
    out = []
    for low in lows:
        texts = [piece.replace("{raw}", low) for piece, known in zip(pieces, ids, strict=True) if known is None]
        if keep_prompt:
            texts[-1] += f" {kept_prefix(low)}"
        encoded = iter(tokenizer(texts, **TEXT_ONLY)["input_ids"])
        tokens = [token for piece_id in ids for token in ([piece_id] if piece_id is not None else next(encoded))]
        # A template that writes its own <bos> keeps one.
        out.append(tokens if tokens[:len(lead)] == lead else lead + tokens)
    return out


def padded(tokenizer: Any, ids: Sequence[Sequence[int]]) -> dict:
    """input_ids and attention_mask (torch) of token id lists, padded on the tokenizer's padding side."""
    return tokenizer.pad({"input_ids": [list(row) for row in ids]}, padding=True, return_tensors="pt")


def format_prompt(instruction: str, low: str, keep_prompt: bool = False) -> str:
    """The paper's template with the user prompt in place of `{raw}`; ends with "Output:", the target follows.
    With keep_prompt the answer is begun with the user prompt itself (`kept_prefix`), so the model only adds."""
    # str.replace, not str.format: user prompts may contain braces ("{cat|dog}" wildcard syntax).
    query = instruction.replace("{raw}", low)
    return f"{query} {kept_prefix(low)}" if keep_prompt else query


def kept_prefix(low: str) -> str:
    """How a keep_prompt answer begins: the user prompt verbatim, then a comma."""
    return low.strip().rstrip(".,") + ","


def policy_text(low: str, completion: str, keep_prompt: bool = False) -> str:
    """The rewrite a generated completion stands for: with keep_prompt, the user prompt and then the completion's
    additions (the user prompt alone when the model adds nothing)."""
    if not keep_prompt:
        return completion
    added = completion.strip().strip(",").strip()
    return f"{kept_prefix(low)} {added}" if added else low.strip()


def sft_target(low: str, high: str, keep_prompt: bool = False) -> str:
    """What SFT teaches the model to write after the template: the high prompt, or with keep_prompt only what the
    high prompt adds after its subject (its first comma segment)."""
    if not keep_prompt:
        return high
    return ", ".join(split_subject(high)[1])
