"""The user prompts of an evaluation: a prompt file, or the embedded evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bp_ray.config import PipelineConfig
from bp_ray.data.prompt_io import ReadReport, read_prompts

EMBEDDED_SET_SIZE = 200
EMBEDDED_SEED = 2311_06752  # the paper's arXiv number: a seed no corpus preset uses


def embedded_eval_prompts(exclude: set[str] | frozenset[str] = frozenset(), size: int = EMBEDDED_SET_SIZE) -> list[str]:
    """Plain prompts ("a fox in a misty forest") drawn like the corpus's plain prompts but from their own seed,
    distinct, and without any prompt in `exclude` (the training corpus), so the set is held out."""
    from bp_ray.data.prompt_text import plain_prompt
    from bp_ray.data.vocab import load_vocab

    rng, vocab = np.random.default_rng(EMBEDDED_SEED), load_vocab()
    seen = {p.strip().lower() for p in exclude}
    out: list[str] = []
    for _ in range(size * 50):  # bounded: the vocabulary allows far more distinct prompts than `size`
        prompt = plain_prompt(rng, vocab)
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            out.append(prompt)
            if len(out) == size:
                break
    return out


def world_eval_prompts(size: int = EMBEDDED_SET_SIZE) -> list[str]:
    """Distinct plain descriptions of miniature-world scenes from the evaluation seed, one- and two-object ones
    interleaved. The world has only 18 one-object descriptions, so these can repeat a training prompt's text;
    what is held out is the scene and every render seed."""
    from bp_ray.world.scenes import sample_scenes

    singles: list[str] = []
    pairs: list[str] = []
    for scene in sample_scenes(size * 20, EMBEDDED_SEED):
        bucket = singles if len(scene.objects) == 1 else pairs
        if scene.plain() not in bucket:
            bucket.append(scene.plain())
    mixed = [p for two in zip(singles, pairs, strict=False) for p in two]
    mixed += singles[len(pairs):] + pairs[len(singles):]
    return mixed[:size]


def load_eval_prompts(cfg: PipelineConfig, path: str | Path | None = None) -> tuple[list[str], ReadReport | None]:
    """(prompts, read report) from `path` / eval.prompts, else the embedded set held out from the corpus; at most
    eval.num_prompts (0 = all), in file order."""
    path = path or cfg.eval.prompts
    limit = cfg.eval.num_prompts or None
    if path:
        table, report = read_prompts(path, limit=limit)
        prompts = [p.strip() for p in table["prompt"].tolist() if p.strip()]
        report.skip("empty_prompt", len(table) - len(prompts))  # nothing to rewrite or to score against
        if not prompts:
            raise ValueError(f"{path}: no usable prompts (skipped: {report.rows_skipped})")
        return prompts, report
    if cfg.data.corpus_kind == "world":
        prompts = world_eval_prompts()
        return (prompts[:limit] if limit else prompts), None
    from bp_ray.data.corpus import generate_prompts

    corpus = generate_prompts(cfg.data.corpus_rows, cfg.data.corpus_seed)
    prompts = embedded_eval_prompts(exclude=set(corpus))
    return (prompts[:limit] if limit else prompts), None
