"""`bp-ray eval`: rewrite user prompts with every system, render them with N seeds through the reward service,
score every image against the ORIGINAL user prompt, and write results.json / results.csv / report.html.

The Ray part is thin: each system's rewrites run as a Ray task (with the rewriter pool's resources) and the images
come from one reward service actor; everything else is plain Python on the driver.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from bp_ray.config import (
    ActorPoolConfig,
    ClusterConfig,
    DataConfig,
    EvalConfig,
    ModelsConfig,
    RewardsConfig,
    SFTConfig,
)
from bp_ray.eval import stats
from bp_ray.eval.prompts import load_eval_prompts
from bp_ray.eval.systems import (
    CHECKPOINT_SYSTEMS,
    Rewrites,
    RewriteSettings,
    checkpoint_model_dir,
    popular_tags,
    rewrite,
    tag_vocabulary,
    tags_pool,
)
from bp_ray.extensions import EvalMetric, registry
from bp_ray.layout import SUCCESS, write_manifest
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.rewards.scoring import SCORE_NAMES, combined_reward

logger = logging.getLogger(__name__)

IMAGE_METRICS = (*SCORE_NAMES, "reward")
"""Per image: PickScore, aesthetic, CLIP relevance (all against the user prompt) and the combined reward; then the
columns of each metric in eval.metrics (a backend's, computed from pixels: bp_ray.extensions.EvalMetric)."""
PROMPT_METRICS = ("words", "sd_tokens")
"""Per rewritten prompt: its length in words and in Stable Diffusion text-encoder tokens."""
BASELINES = ("original", "sft")


def eval_reward_setup(ev: EvalConfig, rewards: RewardsConfig, models: ModelsConfig) -> RewardSetup:
    """What the reward service renders and scores with: eval's render settings and seeds, PickScore against the
    user prompt (the intent), as the paper measures."""
    # One request per batch: a batch then holds one fixed chunk of one system's prompts whatever order the systems
    # finish in, so the same seeds give bit-identical images (batched kernels differ in the last bits).
    return RewardSetup(models, ev.render, ev.num_seeds, replace(rewards, pickscore_text="intent", service_max_batch=1))


def sd_tokenizer(models: ModelsConfig) -> Any:
    """The tokenizer of the Stable Diffusion text encoder (its model_max_length is the truncation point)."""
    from transformers import AutoTokenizer

    from bp_ray.models.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(models.diffusion, models), subfolder="tokenizer")


def long_prompt_report(limit: int, sd_lengths: dict[str, list[int]], mode: str) -> dict[str, Any]:
    """How many prompts of each system exceed the text encoder's window of `limit` tokens, and what the renderer
    does about it; `sd_lengths` are each system's prompt lengths in that encoder's tokens."""
    per_system = {}
    for system, lengths in sd_lengths.items():
        over = sum(n > limit for n in lengths)
        per_system[system] = {"over_limit": int(over), "share_over_limit": over / max(len(lengths), 1),
                              "max_tokens": int(max(lengths, default=0)), "mean_tokens": float(np.mean(lengths))}
    return {"limit_tokens": limit, "mode": mode, "systems": per_system,
            "note": "Stable Diffusion sees the first tokens only (truncate) or every token in 75-token windows "
                    "(chunked, eval.render.long_prompts); the scorers compare images with the user prompt."}


def _rewrite_all(settings: RewriteSettings, prompts: list[str], systems: list[str], checkpoints: dict[str, Path],
                 tags: list[str]) -> dict[str, Any]:
    """Ray object refs of every system's Rewrites (checkpoint and LLM systems load models: Ray tasks)."""
    import ray

    pool = settings.data.rewriter_pool
    # A killed task runs again and gives the same rewrites (every row has its own seed); one retry was not enough
    # when a fault also hit the retry (benchmarks/chaos.py).
    task = ray.remote(rewrite).options(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                                       resources=dict(pool.resources) or None, max_retries=3)
    refs = {}
    for system in systems:
        if system in (*CHECKPOINT_SYSTEMS, "llm"):
            refs[system] = task.remote(system, prompts, settings, checkpoints, tags)
        else:
            refs[system] = ray.put(rewrite(system, prompts, settings, checkpoints, tags))
    return refs


def _render_and_score(ev: EvalConfig, setup: RewardSetup, pool: ActorPoolConfig, prompts: list[str],
                      systems: list[str], rewrite_refs: dict[str, Any],
                      out_dir: Path) -> tuple[dict[str, Rewrites], dict[str, np.ndarray], dict[str, str]]:
    """Every system's prompts rendered and scored as soon as its rewrites are ready; (rewrites, (P, S, 3) scores
    per system, relative image paths of the grid's prompts keyed "system/prompt/seed")."""
    import ray

    from bp_ray.rewards.service import reward_service

    # No cache: evaluation needs every image for the grid, and renders are what is being measured.
    service = reward_service(setup, pool, None)
    try:
        rewrites, pending = _submit_renders(service, ev, prompts, rewrite_refs)
        scores, image_paths = _collect_renders(pending, prompts, systems, ev, setup.seeds, out_dir)
    finally:
        ray.kill(service)
    return rewrites, scores, image_paths


def saved_image_prompts(ev: EvalConfig) -> int:
    """How many of the first prompts have their images saved: the report's grid and the human study's."""
    return max(ev.grid_prompts, ev.human_prompts)


def _submit_renders(service: Any, ev: EvalConfig, prompts: list[str],
                    rewrite_refs: dict[str, Any]) -> tuple[dict[str, Rewrites], dict[Any, tuple[str, int, bool]]]:
    """Send each system's prompts to the service as soon as its rewrites are ready, in fixed chunks (the prompts
    whose images are saved first, with their images); returns the rewrites and the pending requests (system,
    start, images)."""
    import ray

    saved = min(saved_image_prompts(ev), len(prompts))
    rewrites: dict[str, Rewrites] = {}
    pending: dict[Any, tuple[str, int, bool]] = {}
    waiting = {ref: system for system, ref in rewrite_refs.items()}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        system = waiting.pop(ready[0])
        rewrites[system] = ray.get(ready[0])
        logger.info("eval: %s rewrites ready, rendering %d prompts x %d seeds", system, len(prompts), ev.num_seeds)
        texts = rewrites[system].prompts
        chunks = [(s, min(s + ev.batch_size, saved), True) for s in range(0, saved, ev.batch_size)]
        # Pixel metrics are computed here, so with them every chunk brings its images back.
        chunks += [(s, min(s + ev.batch_size, len(texts)), bool(ev.metrics))
                   for s in range(saved, len(texts), ev.batch_size)]
        for start, end, images in chunks:
            method = service.score_with_images if images else service.score_detailed
            pending[method.remote(texts[start:end], prompts[start:end])] = (system, start, images)
    return rewrites, pending


def _collect_renders(pending: dict[Any, tuple[str, int, bool]], prompts: list[str], systems: list[str],
                     ev: EvalConfig, seeds: list[int], out_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(P, S, 3) scores per system, and the images of the first saved_image_prompts prompts (the grid's and the
    human study's) saved under out_dir/images keyed "system/prompt/seed"."""
    import ray

    from bp_ray.console import report_progress

    width = len(SCORE_NAMES) + len(pixel_metric_columns(ev))
    scores = {system: np.full((len(prompts), len(seeds), width), np.nan) for system in systems}
    saved = min(saved_image_prompts(ev), len(prompts))
    image_paths: dict[str, str] = {}
    for done, (ref, (system, start, images)) in enumerate(pending.items(), 1):
        result = ray.get(ref)
        report_progress(done, len(pending), "render batches")
        block, pixels = result if images else (result, None)
        scores[system][start:start + len(block), :, :len(SCORE_NAMES)] = block
        column = len(SCORE_NAMES)
        for metric in pixel_metrics(ev):
            end = column + len(metric.columns)
            scores[system][start:start + len(block), :, column:end] = metric.score(
                pixels, prompts[start:start + len(block)])
            column = end
        for p in range(min(len(pixels), saved - start) if pixels is not None else 0):
            for s, seed in enumerate(seeds):
                rel = Path("images") / system / f"p{start + p:04d}_s{seed}.png"
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[p, s]).save(out_dir / rel)
                image_paths[f"{system}/{start + p}/{seed}"] = rel.as_posix()
    return scores, image_paths


def pixel_metrics(ev: EvalConfig) -> list[EvalMetric]:
    """The registered metrics eval.metrics names, in its order."""
    return [registry().eval_metrics[name] for name in ev.metrics]


def pixel_metric_columns(ev: EvalConfig) -> tuple[str, ...]:
    return tuple(column for metric in pixel_metrics(ev) for column in metric.columns)


def image_metrics(ev: EvalConfig) -> tuple[str, ...]:
    return (*IMAGE_METRICS, *pixel_metric_columns(ev))


def score_table(prompts: list[str], rewrites: dict[str, Rewrites], scores: dict[str, np.ndarray],
                seeds: list[int], sd_lengths: dict[str, list[int]], alpha: float,
                pixel_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Long table, one row per image: prompt_id, system, seed, the image metrics (the model scores, then
    `pixel_columns`) and the prompt metrics."""
    rows = []
    for system, per_seed in scores.items():
        texts = rewrites[system].prompts
        for p in range(len(prompts)):
            for s, seed in enumerate(seeds):
                pick, aesthetic, relevance, *pixel = per_seed[p, s]
                rows.append({"prompt_id": p, "system": system, "seed": seed, "pickscore": pick,
                             "aesthetic": aesthetic, "relevance": relevance,
                             "reward": float(combined_reward(pick, aesthetic, alpha)),
                             **dict(zip(pixel_columns, pixel, strict=True)),
                             "words": len(texts[p].split()), "sd_tokens": sd_lengths[system][p]})
    return pd.DataFrame(rows)


def _round(value: Any) -> Any:
    """Floats to 6 significant digits in results files: bit-level noise of batched kernels is not a result."""
    if isinstance(value, float):
        return None if not np.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def training_metric_files(stage_dirs: dict[str, Path]) -> dict[str, Path]:
    """`metrics.csv` of each training stage folder given (rm has one per head), keyed like "ppo" or "rm/aesthetic"."""
    found = {}
    for stage, folder in stage_dirs.items():
        for csv_path in sorted(Path(folder).glob("**/metrics/metrics.csv")):
            sub = csv_path.parent.parent.relative_to(folder).as_posix()
            found[stage if sub == "." else f"{stage}/{sub}"] = csv_path
    return found


def resolve_systems(ev: EvalConfig, systems: list[str] | None, checkpoints: dict[str, Path | None]) -> list[str]:
    systems = list(systems or ev.systems)
    missing = [s for s in systems if s in CHECKPOINT_SYSTEMS and not checkpoints.get(s)]
    if missing:
        raise FileNotFoundError(f"system(s) {', '.join(missing)} need a checkpoint: pass "
                                f"{' '.join(f'--{s} DIR' for s in missing)} or leave them out of --systems")
    if "original" not in systems:
        systems.insert(0, "original")  # every win rate is against it
    return list(dict.fromkeys(systems))


def run_evaluation(ev: EvalConfig, sft: SFTConfig, data: DataConfig, rewards: RewardsConfig, models: ModelsConfig,
                   cluster: ClusterConfig, out_dir: Path, *, preset: str = "", sft_dir: Path | None = None,
                   ppo_dir: Path | None = None, prompts_file: str | None = None, systems: list[str] | None = None,
                   training_dirs: dict[str, Path] | None = None) -> dict[str, Any]:
    """The whole stage; returns the manifest it writes to out_dir/manifest.json.

    What it reads besides `ev`: the SFT template (`sft`), the corpus behind the embedded prompt set, the OpenAI
    endpoint of the `llm` system and the rewriter / scorer pools (`data`), alpha and the seed base (`rewards`)."""
    from bp_ray.eval.report import write_report
    from bp_ray.models.loading import prepare_models
    from bp_ray.ray_runtime import init_ray
    from bp_ray.rewards.long_prompts import token_lengths

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    for old in ("images", "plots"):  # a grid or plot of an earlier evaluation must not show in this report
        shutil.rmtree(out_dir / old, ignore_errors=True)
    if (out_dir / "human").exists():  # people's votes on the images just deleted: kept, but out of this study
        (out_dir / "human").rename(out_dir / f"human-before-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoints = {name: checkpoint_model_dir(path) for name, path in (("sft", sft_dir), ("ppo", ppo_dir)) if path}
    systems = resolve_systems(ev, systems, checkpoints)
    prompts, report = load_eval_prompts(ev, data, prompts_file)
    tags = popular_tags(tags_pool(ev, data), ev.num_tags, tag_vocabulary(data)) if "tags" in systems else []
    prepare_models(models, ("diffusion", "pickscore", "aesthetic", "clip_relevance", "rewriter"))
    init_ray(cluster)
    setup = eval_reward_setup(ev, rewards, models)
    refs = _rewrite_all(RewriteSettings(ev, sft, data, models), prompts, systems, checkpoints, tags)
    rewrites, scores, image_paths = _render_and_score(ev, setup, data.scorer_pool, prompts, systems, refs, out_dir)
    rewrites = {system: rewrites[system] for system in systems}  # in the order asked for, not the order finished
    rendered_s = time.perf_counter() - start

    tokenizer = sd_tokenizer(models)
    sd_lengths = {system: token_lengths(tokenizer, r.prompts) for system, r in rewrites.items()}
    seeds = setup.seeds
    table = score_table(prompts, rewrites, scores, seeds, sd_lengths, rewards.alpha, pixel_metric_columns(ev))
    table.to_csv(out_dir / "scores.csv", index=False, float_format="%.6g")
    metrics = image_metrics(ev)
    per_prompt = stats.per_prompt(table, [*metrics, *PROMPT_METRICS])
    summary = stats.system_table(per_prompt, [*metrics, *PROMPT_METRICS], systems)
    # "original over sft" only mirrors "sft over original": every system is compared with the baselines after it.
    comparisons = stats.to_records(c for c in stats.win_table(per_prompt, metrics, systems, BASELINES)
                                   if systems.index(c.system) > systems.index(c.baseline))
    with (out_dir / "rewrites.jsonl").open("w") as f:
        for p, prompt in enumerate(prompts):
            f.write(json.dumps({"prompt_id": p, "prompt": prompt, **{s: rewrites[s].prompts[p] for s in systems},
                                **{f"{s}_error": rewrites[s].failed[p] for s in systems if rewrites[s].failed[p]}})
                    + "\n")
    results = _round({
        "stage": "eval", "preset": preset, "systems": systems, "metrics": list(metrics),
        "prompt_metrics": list(PROMPT_METRICS),
        "prompts": {"source": Path(prompts_file or ev.prompts).name if (prompts_file or ev.prompts)
                    else "embedded", "count": len(prompts),
                    "skipped": report.rows_skipped if report else {}},
        "seeds": seeds, "render": asdict(ev.render), "alpha": rewards.alpha, "tags": tags,
        "generation": {"temperature": ev.temperature, "top_p": ev.top_p,
                       "max_new_tokens": ev.max_new_tokens, "seed": ev.generation_seed},
        "table": summary, "comparisons": comparisons,
        "rewrite_failures": {s: sum(bool(e) for e in rewrites[s].failed) for s in systems},
        "long_prompts": long_prompt_report(int(tokenizer.model_max_length), sd_lengths,
                                           ev.render.long_prompts),
    })
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    _write_csv(out_dir / "results.csv", results["table"])
    metric_files = training_metric_files(training_dirs or {})
    grid_images = {key: path for key, path in image_paths.items() if int(key.split("/")[1]) < ev.grid_prompts}
    files = write_report(out_dir, results, prompts, {s: rewrites[s].prompts for s in systems}, per_prompt,
                         grid_images, metric_files)
    manifest = {"stage": "eval", "systems": systems, "prompts": len(prompts), "seeds": seeds,
                "checkpoints": {k: str(v) for k, v in checkpoints.items()},
                "training_metrics": {k: str(v) for k, v in metric_files.items()},
                "files": sorted({"results.json", "results.csv", "scores.csv", "rewrites.jsonl", *files,
                                 *image_paths.values()}),
                "render_s": round(rendered_s, 2), "wall_time_s": round(time.perf_counter() - start, 2)}
    return write_manifest(out_dir, manifest)
