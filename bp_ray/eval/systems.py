"""The systems under evaluation: each turns the user prompts into the prompts that get rendered.

- `original`: the prompt unchanged.
- `tags`: the prompt plus the most frequent style/quality tags of a pool of prompts, as users add by hand.
- `sft`, `ppo`: a trained beautifier checkpoint, prompted with the training template.
- `llm`: any OpenAI-compatible endpoint (or the local rewriter model) with a rewrite instruction, as the
  paper's ChatGPT baseline.

Plain Python, no Ray.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bp_ray.config import DataConfig, EvalConfig, ModelsConfig, SFTConfig
from bp_ray.data.prompt_rules import first_line
from bp_ray.data.vocab import load_vocab, tag_terms

CHECKPOINT_SYSTEMS = ("sft", "ppo")


@dataclass(frozen=True)
class RewriteSettings:
    """What rewriting the user prompts reads: eval's generation settings, the SFT template (the checkpoint
    systems), the models, and the OpenAI endpoint in `data` (the `llm` system)."""

    ev: EvalConfig
    sft: SFTConfig
    data: DataConfig
    models: ModelsConfig


@dataclass
class Rewrites:
    """One system's prompts, aligned with the user prompts; `failed[i]` says why prompt i fell back to the
    user prompt (an endpoint error), else ""."""

    system: str
    prompts: list[str]
    failed: list[str]


def _segments(prompt: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"[,|]", prompt) if s.strip()]


def popular_tags(pool: Iterable[str], k: int, vocabulary: Sequence[str] | None = None) -> list[str]:
    """The k tags of `vocabulary` (default: the style/quality/lighting/artist tags of the shipped vocabulary) that
    occur in most prompts of `pool` (ties by vocabulary order, so the choice is deterministic)."""
    if vocabulary is None:
        vocab = load_vocab()
        terms = tag_terms(vocab)
        vocabulary = (*vocab.quality, *vocab.styles, *vocab.lighting, *vocab.artists)
    else:
        terms = {t.lower() for t in vocabulary}
    order = {t.lower(): i for i, t in enumerate(vocabulary)}
    counts: Counter[str] = Counter()
    for prompt in pool:
        counts.update({s for s in _segments(prompt) if s in terms})
    ranked = sorted(counts, key=lambda t: (-counts[t], order.get(t, len(order))))
    if len(ranked) < k:  # a pool without (enough) tags: top up in vocabulary order
        ranked += [t for t in sorted(order, key=order.get) if t not in ranked][: k - len(ranked)]
    return ranked[:k]


def with_tags(prompt: str, tags: Sequence[str]) -> str:
    """`prompt, tag1, tag2, ...`, leaving out tags the prompt already has."""
    present = set(_segments(prompt))
    extra = [t for t in tags if t not in present]
    base = prompt.strip().rstrip(".,")
    return ", ".join([base, *extra]) if extra else prompt.strip()


def tags_pool(ev: EvalConfig, data: DataConfig) -> list[str]:
    """Prompts whose tag frequencies choose the `tags` baseline: eval.tags_source, else the embedded corpus."""
    if ev.tags_source:
        from bp_ray.data.prompt_io import read_prompts

        table, _ = read_prompts(ev.tags_source)
        return table["prompt"].tolist()
    from bp_ray.data.corpus import generate_prompts
    from bp_ray.data.pipeline import corpus_spec

    return generate_prompts(data.corpus_rows, data.corpus_seed, corpus_spec(data))


def tag_vocabulary(data: DataConfig) -> Sequence[str] | None:
    """The tags the `tags` baseline may pick: the prompt source's own (the world's style phrases), else None for
    the vocabulary's."""
    from bp_ray.data.prompt_sources import prompt_source

    return prompt_source(data.corpus_kind).style_tags()


def checkpoint_model_dir(path: str | Path) -> Path:
    """A training stage folder (with model/) or a Hugging Face model folder itself."""
    path = Path(path)
    if (path / "model" / "config.json").exists():
        return path / "model"
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"no Hugging Face model at {path} (expected {path}/model/config.json or "
                            f"{path}/config.json)")


def checkpoint_rewrites(model_dir: str | Path, prompts: Sequence[str], settings: RewriteSettings) -> list[str]:
    """The checkpoint's rewrite of every prompt, batched, each row with its own seed (greedy at temperature 0)."""
    from bp_ray.data.colours import other_colours
    from bp_ray.models.loading import load_causal_lm
    from bp_ray.serve.generation import GenerationRequest, beautified_text, beautify_input, generate

    ev, models, sft = settings.ev, settings.models, settings.sft
    model, tokenizer = load_causal_lm(str(model_dir), models, device=models.device, dtype=models.dtype)
    out: list[str] = []
    for start in range(0, len(prompts), ev.batch_size):
        batch = prompts[start:start + ev.batch_size]
        keep = sft.keep_prompt
        requests = [GenerationRequest(text=beautify_input(sft.instruction, p, keep), prompt=p,
                                      instruction=sft.instruction, keep_prompt=keep,
                                      max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_p=ev.top_p,
                                      seed=ev.generation_seed + start + i,
                                      repetition_penalty=ev.decoding.repetition_penalty,
                                      no_repeat_ngram_size=ev.decoding.no_repeat_ngram_size,
                                      avoid_words=other_colours(p) if ev.decoding.keep_colours else ())
                    for i, p in enumerate(batch)]
        out += [beautified_text(r.completions[0].text, p, keep)
                for p, r in zip(batch, generate(model, tokenizer, requests), strict=True)]
    return out


def llm_rewrites(prompts: Sequence[str], settings: RewriteSettings) -> tuple[list[str], list[str]]:
    """(rewrites, errors) from the `llm` baseline; a failed item keeps the user prompt and records its error."""
    from bp_ray.data.rewrite import build_instructions

    ev, models = settings.ev, settings.models
    instructions = build_instructions(ev.llm_instruction, list(prompts))
    if ev.llm_backend == "local":
        from bp_ray.data.rewrite import generate_local
        from bp_ray.models.loading import load_causal_lm

        model, tokenizer = load_causal_lm(models.rewriter, models, device=models.device)
        texts = []
        for start in range(0, len(instructions), ev.batch_size):
            texts += generate_local(model, tokenizer, instructions[start:start + ev.batch_size], ev.max_new_tokens)
        errors = ["" if t.strip() else "empty_output" for t in texts]
    else:
        from dataclasses import replace

        from bp_ray.data.openai_backend import OpenAIRewriter, OpenAISettings

        endpoint = replace(OpenAISettings.from_config(settings.data), max_new_tokens=ev.max_new_tokens)
        with OpenAIRewriter(endpoint) as client:
            results = client.complete(instructions)
        texts = [r.text or "" for r in results]
        errors = [r.error or "" for r in results]
    rewrites = [first_line(t).strip() if not e else p for t, e, p in zip(texts, errors, prompts, strict=True)]
    return rewrites, errors


def rewrite(system: str, prompts: Sequence[str], settings: RewriteSettings,
            checkpoints: dict[str, Path] | None = None, tags: Sequence[str] = ()) -> Rewrites:
    """One system's prompts for the user prompts."""
    prompts = list(prompts)
    none = [""] * len(prompts)
    if system == "original":
        return Rewrites(system, prompts, none)
    if system == "tags":
        return Rewrites(system, [with_tags(p, tags) for p in prompts], none)
    if system in CHECKPOINT_SYSTEMS:
        if not checkpoints or system not in checkpoints:
            raise FileNotFoundError(f"system {system!r} needs a checkpoint: pass --{system} DIR")
        return Rewrites(system, checkpoint_rewrites(checkpoints[system], prompts, settings), none)
    if system == "llm":
        texts, errors = llm_rewrites(prompts, settings)
        return Rewrites(system, texts, errors)
    raise ValueError(f"unknown system {system!r}")
