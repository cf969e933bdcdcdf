"""`bp-ray eval-text`: what the beautifier writes, judged as text, with no image rendered.

For each prompt set (PartiPrompts, DrawBench, ...; any prompt the run's training pairs hold as a low prompt is left
out and counted) and each system (`original`, `base`: models.policy with the SFT instruction, `sft`, `ppo`):

- subject_kept: share of outputs holding at least half of the input's content words (stop words dropped, plural
  `s` ignored): the rewrite still describes what the user asked for;
- content_kept: mean share of the input's content words in the output;
- colours_kept: share of outputs that keep every colour the input gives something (data.colours), over the inputs
  that give one (its own n, `colours_n`): "a black dog" -> "a black dog with golden fur" has not;
- tags: mean number of style / quality / lighting / artist tags of the shipped vocabulary;
- content_similarity: cosine similarity of the output's and the input's sentence embeddings by a real pretrained
  encoder (models.text_encoder, e.g. all-MiniLM-L6-v2): the meaning kept, not only the words; only when set;
- words: mean length; repetition: mean share of repeated word trigrams;
- rm_score: the run's trained reward (alpha x PickScore + (1 - alpha) x aesthetic predicted from the text, or the
  style classifier's score), predicted from the text.

Every mean comes with its 95% interval: Wilson's for the subject_kept share, Student t for the other means.

Plain Python; the rewrites use the same batched generation as the image evaluation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.config import PipelineConfig
from bp_ray.data.colours import colours_changed
from bp_ray.data.content import content_kept
from bp_ray.data.prompt_rules import dedup_key, prompt_features, repetition_share
from bp_ray.data.vocab import load_vocab, tag_terms
from bp_ray.eval.human_stats import wilson_interval
from bp_ray.eval.stats import mean_ci
from bp_ray.eval.systems import RewriteSettings, checkpoint_rewrites

TEXT_SYSTEMS = ("original", "base", "sft", "ppo")
TEXT_METRICS = ("subject_kept", "content_kept", "colours_kept", "content_similarity", "tags", "words", "repetition",
                "rm_score")
SHARES = ("subject_kept", "colours_kept")
SUBJECT_KEPT_SHARE = 0.5

def text_metrics(prompt: str, output: str, terms: frozenset[str] | set[str]) -> dict[str, float | None]:
    """Every metric but rm_score and content_similarity, for one output (colours_kept: None where the input gives
    no colour)."""
    kept = content_kept(prompt, output)
    changed = colours_changed(prompt, output)
    return {"subject_kept": float(kept >= SUBJECT_KEPT_SHARE), "content_kept": kept,
            "colours_kept": None if changed is None else float(not changed),
            "tags": float(prompt_features(output, output, terms).tags), "words": float(len(output.split())),
            "repetition": repetition_share(output)}


def trained_low_keys(pairs_dir: Path | None) -> set[str]:
    """Near-duplicate keys of every low prompt of the run's training pairs (empty without pairs)."""
    if pairs_dir is None or not Path(pairs_dir).exists():
        return set()
    import pandas as pd

    parts = sorted(Path(pairs_dir).glob("part-*.parquet"))
    if not parts:
        return set()
    return {dedup_key(p) for p in pd.concat(pd.read_parquet(p, columns=["low"]) for p in parts)["low"]}


def unseen_prompts(path: str | Path, trained: set[str], limit: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    """(prompts, counts) of one prompt file: distinct prompts none of whose near duplicates was trained on, then
    `limit` of them (0: all) drawn with `seed` (file order kept)."""
    from bp_ray.data.prompt_io import read_prompts

    table, report = read_prompts(path)
    seen: set[str] = set()
    prompts, left_out = [], 0
    for prompt in (p.strip() for p in table["prompt"]):
        key = dedup_key(prompt)
        if not prompt or key in seen:
            continue
        seen.add(key)
        if key in trained:
            left_out += 1
            continue
        prompts.append(prompt)
    if limit and len(prompts) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), limit, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts, {"file": str(path), "rows_read": report.rows_read, "trained_left_out": left_out,
                     "count": len(prompts)}


def system_rewrites(system: str, prompts: Sequence[str], settings: RewriteSettings,
                    checkpoints: dict[str, Path]) -> list[str]:
    """One system's outputs: the prompt itself, or a model's greedy rewrite with the SFT instruction."""
    if system == "original":
        return list(prompts)
    return checkpoint_rewrites(checkpoints[system], prompts, settings)


def summary_rows(per_output: list[dict[str, Any]], systems: Sequence[str], sets: Sequence[str]) -> list[dict]:
    """Means per (set, system), plus an `all` row per system over every set's outputs; `ci` holds each mean's 95%
    interval [low, high]. colours_kept is over the outputs that have it (`colours_n` of them; absent at 0)."""
    # rm_score needs a reward model, content_similarity a text encoder
    present = [m for m in TEXT_METRICS if per_output and m in per_output[0]]
    rows = []
    for name in [*sets, "all"]:
        for system in systems:
            mine = [r for r in per_output if r["system"] == system and name in (r["set"], "all")]
            if not mine:
                continue
            values = {m: np.array([r[m] for r in mine if r[m] is not None], dtype=np.float64) for m in present}
            values = {m: v for m, v in values.items() if len(v)}
            row = {"set": name, "system": system, "n": len(mine), **{m: float(v.mean()) for m, v in values.items()},
                   "ci": {m: interval(m, v) for m, v in values.items()}}
            if "colours_kept" in present:
                row["colours_n"] = len(values.get("colours_kept", ()))
            rows.append(row)
    return rows


def interval(metric: str, values: np.ndarray) -> list[float]:
    """95% interval of a mean: Wilson's for the shares (exact enough at 0 or 1, where a t interval collapses),
    Student t otherwise (a single value: no interval, [mean, mean])."""
    if metric in SHARES:
        return [round(bound, 4) for bound in wilson_interval(float(values.sum()), len(values))]
    mean, half = mean_ci(values)
    half = 0.0 if np.isnan(half) else half
    return [round(mean - half, 4), round(mean + half, 4)]


def run_text_evaluation(cfg: PipelineConfig, out_dir: Path, prompt_files: Sequence[str | Path],
                        checkpoints: dict[str, Path], rm_dir: Path | None = None, pairs_dir: Path | None = None,
                        num_prompts: int = 0) -> dict[str, Any]:
    """Rewrite every unseen prompt of every file with every system that has a model (and `original`), score the
    outputs, and write results_text.json and rewrites_text.jsonl to out_dir; returns the results."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = [s for s in TEXT_SYSTEMS if s == "original" or s in checkpoints]
    trained = trained_low_keys(pairs_dir)
    sets: dict[str, list[str]] = {}
    set_counts = {}
    for path in prompt_files:
        name = Path(path).stem
        sets[name], set_counts[name] = unseen_prompts(path, trained, num_prompts, cfg.eval.generation_seed)
    terms = tag_terms(load_vocab())
    reward = encoder = None
    if rm_dir is not None:
        from bp_ray.rewards.learned import LearnedReward

        reward = LearnedReward.load(Path(rm_dir), cfg.rewards.alpha, cfg.models.device)
    if cfg.models.text_encoder:
        from bp_ray.models.loading import load_text_encoder

        encoder = load_text_encoder(cfg.models.text_encoder, cfg.models, cfg.models.device)
    per_output, examples, timings = [], [], {}
    for system in systems:
        started = time.perf_counter()
        for name, prompts in sets.items():
            outputs = system_rewrites(system, prompts, RewriteSettings(cfg.eval, cfg.sft, cfg.data, cfg.models),
                                      checkpoints)
            scores = reward(prompts, outputs) if reward is not None and prompts else None
            similarity = encoder.similarity(outputs, prompts) if encoder is not None and prompts else None
            for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
                row = {"set": name, "system": system, "prompt": prompt, "output": output,
                       **text_metrics(prompt, output, terms)}
                if similarity is not None:
                    row["content_similarity"] = float(similarity[i])
                if scores is not None:
                    row["rm_score"] = float(scores[i])
                per_output.append(row)
        timings[system] = round(time.perf_counter() - started, 2)
    with (out_dir / "rewrites_text.jsonl").open("w") as f:
        for row in per_output:
            f.write(json.dumps(row) + "\n")
    for name, prompts in sets.items():
        for prompt in prompts:
            examples.append({"set": name, "prompt": prompt, **{r["system"]: r["output"] for r in per_output
                                                               if r["set"] == name and r["prompt"] == prompt}})
    results = {"stage": "eval_text", "preset": cfg.preset, "systems": systems, "sets": set_counts,
               "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "rm": str(rm_dir) if rm_dir else None,
               "alpha": cfg.rewards.alpha, "subject_kept_share": SUBJECT_KEPT_SHARE,
               "text_encoder": cfg.models.text_encoder or None, "decoding": asdict(cfg.eval.decoding),
               "max_new_tokens": cfg.eval.max_new_tokens, "table": summary_rows(per_output, systems, list(sets)),
               "examples": examples, "rewrite_seconds": timings,
               "wall_time_s": round(time.perf_counter() - start, 2)}
    (out_dir / "results_text.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    """The results table as Markdown, each mean with its 95% interval."""
    metrics = [m for m in TEXT_METRICS if any(m in row for row in results["table"])]
    lines = ["| set | system | n | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for row in results["table"]:
        cells = [f"{row[m]:.3f} [{row['ci'][m][0]:.2f}, {row['ci'][m][1]:.2f}]" if m in row else "–"
                 for m in metrics]
        lines.append(f"| {row['set']} | {row['system']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
