"""Prompt sources: what the generated corpus's plain and rich prompts, its images and the embedded evaluation set
are made of (`data.corpus_kind`). `prompts` is DiffusionDB's kind of text from the shipped vocabulary; a backend
may register others (bp_ray.extensions; the embedded backend's `world`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bp_ray.data import prompt_text
from bp_ray.data.vocab import load_vocab
from bp_ray.extensions import PromptSource, registry

BUILTIN = "prompts"


class VocabPrompts:
    """Subjects, settings, artists and tags of DiffusionDB, drawn from the shipped vocabulary."""

    def plain(self, rng: np.random.Generator) -> str:
        return prompt_text.plain_prompt(rng, load_vocab())

    def rich(self, rng: np.random.Generator) -> str:
        return prompt_text.rich_prompt(rng, load_vocab())

    def image(self, prompt: str, seed: int, size: int) -> Any:
        return None  # the corpus's generic drawing

    def eval_prompts(self, size: int, seed: int, exclude: set[str]) -> list[str]:
        """Plain prompts drawn like the corpus's but from their own seed, distinct, and none of `exclude` (the
        training corpus), so the set is held out."""
        rng, vocab = np.random.default_rng(seed), load_vocab()
        seen = {p.strip().lower() for p in exclude}
        out: list[str] = []
        for _ in range(size * 50):  # bounded: the vocabulary allows far more distinct prompts than `size`
            prompt = prompt_text.plain_prompt(rng, vocab)
            if prompt.lower() not in seen:
                seen.add(prompt.lower())
                out.append(prompt)
                if len(out) == size:
                    break
        return out

    def style_tags(self) -> Sequence[str] | None:
        return None


def prompt_source_names() -> list[str]:
    return [BUILTIN, *registry().prompt_sources]


def prompt_source(name: str) -> PromptSource:
    if name == BUILTIN:
        return VocabPrompts()
    try:
        return registry().prompt_sources[name]
    except KeyError:
        raise ValueError(f"unknown prompt source {name!r}; available: {', '.join(prompt_source_names())}") from None
