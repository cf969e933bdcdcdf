"""The user prompts of an evaluation: a prompt file, or the embedded evaluation set."""

from __future__ import annotations

from pathlib import Path

from bp_ray.config import DataConfig, EvalConfig
from bp_ray.data.prompt_io import ReadReport, read_prompts

EMBEDDED_SET_SIZE = 200
EMBEDDED_SEED = 2311_06752  # the paper's arXiv number: a seed no corpus preset uses


def load_eval_prompts(ev: EvalConfig, data: DataConfig,
                      path: str | Path | None = None) -> tuple[list[str], ReadReport | None]:
    """(prompts, read report) from `path` / eval.prompts, else the embedded set held out from the corpus; at most
    eval.num_prompts (0 = all), in file order."""
    path = path or ev.prompts
    limit = ev.num_prompts or None
    if path:
        table, report = read_prompts(path, limit=limit)
        prompts = [p.strip() for p in table["prompt"].tolist() if p.strip()]
        report.skip("empty_prompt", len(table) - len(prompts))  # nothing to rewrite or to score against
        if not prompts:
            raise ValueError(f"{path}: no usable prompts (skipped: {report.rows_skipped})")
        return prompts, report
    prompts = embedded_eval_prompts(data)
    return (prompts[:limit] if limit else prompts), None


def embedded_eval_prompts(data: DataConfig, size: int = EMBEDDED_SET_SIZE) -> list[str]:
    """The prompt source's (data.corpus_kind) held-out evaluation set: its own seed, none of the corpus's prompts."""
    from bp_ray.data.corpus import generate_prompts
    from bp_ray.data.pipeline import corpus_spec
    from bp_ray.data.prompt_sources import prompt_source

    corpus = generate_prompts(data.corpus_rows, data.corpus_seed, corpus_spec(data))
    return prompt_source(data.corpus_kind).eval_prompts(size, EMBEDDED_SEED, set(corpus))
