"""`bp-ray rewards label`: every low and high prompt of every pair, rendered with N seeds and scored.

    pairs -> (prompt, intent) rows -> Renderer pool -> Scorer pool -> per-seed scores, means, stds -> Parquet

or one fused pool (rewards.fused; a pool of one fused actor is that actor fed block by block, without Ray Data's
executor). The intent of a prompt is its pair's low prompt: CLIP relevance is measured
against it, and PickScore too when rewards.pickscore_text=intent. Identical (prompt, intent) rows are rendered
once; the SQLite cache makes a rerun (or PPO and evaluation later) skip every image it has already scored.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bp_ray.config import ActorPoolConfig, ClusterConfig, DataConfig, ModelsConfig, RewardsConfig
from bp_ray.console import report_progress
from bp_ray.data import columns as C
from bp_ray.layout import SUCCESS, write_manifest
from bp_ray.ray_runtime import actor_pool_args, use_held_cpus
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.rewards.scoring import SCORE_NAMES, combined_reward, seed_stats

logger = logging.getLogger(__name__)

PROMPT_ID = "prompt_id"
ROLE = "role"
INTENT = "intent"
PIXELS = "pixels"
NEEDS_SCORING = "needs_scoring"


def prompt_id(prompt: str, intent: str) -> str:
    return hashlib.sha1(f"{prompt}\x1f{intent}".encode()).hexdigest()[:16]


def label_rows(pairs: pd.DataFrame) -> pd.DataFrame:
    """Pairs -> one row per (pair, role): role low has prompt = intent = low; role high has prompt = high."""
    low = pd.DataFrame({C.PAIR_ID: pairs[C.PAIR_ID], ROLE: "low", C.PROMPT: pairs[C.LOW], INTENT: pairs[C.LOW]})
    high = pd.DataFrame({C.PAIR_ID: pairs[C.PAIR_ID], ROLE: "high", C.PROMPT: pairs[C.HIGH], INTENT: pairs[C.LOW]})
    rows = pd.concat([low, high], ignore_index=True)
    return rows.assign(**{PROMPT_ID: [prompt_id(p, i) for p, i in zip(rows[C.PROMPT], rows[INTENT], strict=True)]})


def read_pairs(pairs_dir: Path) -> pd.DataFrame:
    files = sorted(Path(pairs_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no pair files (part-*.parquet) in {pairs_dir}: run `bp-ray data generate` first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


# --- Ray Data UDFs (thin: the work is in RewardLabeler) --------------------------------------------------------

def _save_images(pixels: np.ndarray, ids: np.ndarray, seeds: list[int], image_dir: str, fmt: str) -> None:
    from PIL import Image

    Path(image_dir).mkdir(parents=True, exist_ok=True)
    for per_prompt, pid in zip(pixels, ids, strict=True):
        for image, seed in zip(per_prompt, seeds, strict=True):
            Image.fromarray(image).save(Path(image_dir) / f"{pid}-s{seed}.{fmt}", quality=90)


class Renderer:
    """Renders the rows not fully in the cache; passes the others through with blank pixels."""

    def __init__(self, setup: RewardSetup, cache_path: str, image_dir: str | None, num_cpus: float = 1):
        from bp_ray.rewards.labeler import RewardLabeler

        use_held_cpus(num_cpus)
        self.labeler = RewardLabeler(setup, cache_path, render=True, score=False)
        self.image_dir, self.image_format = image_dir, setup.rewards.image_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, intents = list(batch[C.PROMPT]), list(batch[INTENT])
        _, complete = self.labeler.cached(prompts, intents)
        todo = np.flatnonzero(~complete)
        r = self.labeler.render_cfg
        pixels = np.zeros((len(prompts), len(self.labeler.seeds), r.height, r.width, 3), dtype=np.uint8)
        if len(todo):
            pixels[todo] = self.labeler.render([prompts[i] for i in todo])
            if self.image_dir:
                _save_images(pixels[todo], batch[PROMPT_ID][todo], self.labeler.seeds, self.image_dir,
                             self.image_format)
        batch[PIXELS] = pixels
        batch[NEEDS_SCORING] = ~complete
        return batch


class Scorer:
    """Scores rendered rows (and caches them); reads the others from the cache."""

    def __init__(self, setup: RewardSetup, cache_path: str, num_cpus: float = 1):
        from bp_ray.rewards.labeler import RewardLabeler

        use_held_cpus(num_cpus)
        self.labeler = RewardLabeler(setup, cache_path, render=False, score=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, intents = list(batch[C.PROMPT]), list(batch[INTENT])
        scores, _ = self.labeler.cached(prompts, intents)
        todo = np.flatnonzero(batch[NEEDS_SCORING])
        if len(todo):
            scores[todo] = self.labeler.score(batch[PIXELS][todo], [prompts[i] for i in todo],
                                              [intents[i] for i in todo])
        return _score_columns(batch, scores, batch[NEEDS_SCORING])


class FusedLabeler:
    """Render and score in one actor (one GPU holds SD and the scorers)."""

    def __init__(self, setup: RewardSetup, cache_path: str, image_dir: str | None, num_cpus: float = 1):
        from bp_ray.rewards.labeler import RewardLabeler

        use_held_cpus(num_cpus)
        self.labeler = RewardLabeler(setup, cache_path)
        self.image_dir, self.image_format = image_dir, setup.rewards.image_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = self.labeler.label(list(batch[C.PROMPT]), list(batch[INTENT]), keep_pixels=bool(self.image_dir))
        if self.image_dir and labels.rendered.any():
            _save_images(labels.pixels[labels.rendered], batch[PROMPT_ID][labels.rendered], labels.seeds,
                         self.image_dir, self.image_format)
        return _score_columns(batch, labels.scores, labels.rendered)


def _score_columns(batch: dict[str, np.ndarray], scores: np.ndarray, rendered: np.ndarray) -> dict[str, np.ndarray]:
    out = {PROMPT_ID: batch[PROMPT_ID], "rendered": np.asarray(rendered, dtype=bool)}
    for index, name in enumerate(SCORE_NAMES):
        out[name] = scores[:, :, index].astype(np.float64)  # (B, S)
    return out


# --- driver -------------------------------------------------------------------------------------------------------

def reward_cache_path(rewards: RewardsConfig, rewards_dir: Path) -> Path:
    """rewards.cache_path, else cache.sqlite in the rewards stage's folder (PPO's online reward shares it)."""
    return Path(rewards.cache_path) if rewards.cache_path else Path(rewards_dir) / "cache.sqlite"


def score_unique_prompts(unique: pd.DataFrame, setup: RewardSetup, renderer_pool: ActorPoolConfig,
                         scorer_pool: ActorPoolConfig, cache_path: Path, image_dir: Path | None) -> pd.DataFrame:
    """(prompt_id, prompt, intent) rows -> prompt_id, rendered, and (S,) per-seed arrays per score."""
    import ray

    block = max(1, renderer_pool.batch_size)
    blocks = [unique.iloc[i:i + block] for i in range(0, len(unique), block)]
    images = str(image_dir) if image_dir else None
    renderer_kwargs = {"setup": setup, "cache_path": str(cache_path), "image_dir": images,
                       "num_cpus": renderer_pool.num_cpus}
    if setup.rewards.fused and renderer_pool.max_actors == 1:
        return _label_on_one_actor(blocks, renderer_pool, renderer_kwargs, len(unique))
    ds = ray.data.from_pandas(blocks)
    if setup.rewards.fused:
        ds = ds.map_batches(FusedLabeler, fn_constructor_kwargs=renderer_kwargs, **actor_pool_args(renderer_pool))
    else:
        ds = ds.map_batches(Renderer, fn_constructor_kwargs=renderer_kwargs, **actor_pool_args(renderer_pool))
        ds = ds.map_batches(Scorer, fn_constructor_kwargs={"setup": setup, "cache_path": str(cache_path),
                                                           "num_cpus": scorer_pool.num_cpus},
                            **actor_pool_args(scorer_pool))
    parts = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        parts.append(_scores_frame(batch))
        report_progress(sum(map(len, parts)), len(unique), "prompts")
    return pd.concat(parts, ignore_index=True)


def _scores_frame(batch: dict[str, np.ndarray]) -> pd.DataFrame:
    """One labelled batch (the UDFs' output columns) as rows: prompt_id, rendered, a (S,) array per score."""
    return pd.DataFrame({PROMPT_ID: batch[PROMPT_ID], "rendered": batch["rendered"],
                         **{name: list(batch[name]) for name in SCORE_NAMES}})


def _label_on_one_actor(blocks: list[pd.DataFrame], pool: ActorPoolConfig, kwargs: dict[str, Any],
                        total: int) -> pd.DataFrame:
    """The blocks through one fused actor, in order. With a single actor Ray Data has nothing to schedule, and its
    executor and service actors only add processes on the cores the actor computes on. A killed actor is
    restarted and its unfinished blocks sent again: a block's scores depend only on the block."""
    import ray

    actor = ray.remote(FusedLabeler).options(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                                             resources=dict(pool.resources) or None, max_restarts=3,
                                             max_task_retries=3).remote(**kwargs)
    try:
        # All blocks queue at the actor at once: it works through them while the driver collects the results.
        refs = [actor.__call__.remote({name: b[name].to_numpy() for name in b.columns}) for b in blocks]
        parts = []
        for ref in refs:
            parts.append(_scores_frame(ray.get(ref)))
            report_progress(sum(map(len, parts)), total, "prompts")
    finally:
        ray.kill(actor)
    return pd.concat(parts, ignore_index=True)


def _cached_scores(unique: pd.DataFrame, setup: RewardSetup, cache_path: Path) -> pd.DataFrame:
    """Rows whose every seed is already in the cache, in score_unique_prompts' format (no model is loaded)."""
    from bp_ray.rewards.labeler import RewardLabeler

    columns = [PROMPT_ID, "rendered", *SCORE_NAMES]
    if not cache_path.exists() or unique.empty:
        return pd.DataFrame(columns=columns)
    lookup = RewardLabeler(setup, str(cache_path), render=False, score=False)
    scores, complete = lookup.cached(list(unique[C.PROMPT]), list(unique[INTENT]))
    hits = np.flatnonzero(complete)
    return pd.DataFrame({PROMPT_ID: unique[PROMPT_ID].to_numpy()[hits], "rendered": False,
                         **{name: list(scores[hits, :, i]) for i, name in enumerate(SCORE_NAMES)}})


def long_prompt_count(setup: RewardSetup, prompts: list[str]) -> dict[str, Any]:
    """How many prompts exceed the diffusion text encoder's window, counted with the renderer's own tokenizer:
    in the workers diffusers warns about each batch that holds one, and the manifest keeps the one count."""
    from transformers import AutoTokenizer

    from bp_ray.models.loading import resolve_model
    from bp_ray.rewards.long_prompts import token_lengths

    models = setup.models
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(models.diffusion, models), subfolder="tokenizer")
    limit = int(tokenizer.model_max_length)
    return {"mode": setup.render.long_prompts, "limit_tokens": limit, "prompts": len(prompts),
            "over_limit": int(sum(n > limit for n in token_lengths(tokenizer, prompts)))}


def run_reward_labels(data: DataConfig, rewards: RewardsConfig, models: ModelsConfig, cluster: ClusterConfig,
                      pairs_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The whole stage (data.render, data.num_seeds and the renderer / scorer pools from `data`); returns the
    manifest it writes to out_dir/manifest.json."""
    from bp_ray.models.loading import prepare_models
    from bp_ray.ray_runtime import init_ray
    from bp_ray.rewards.labeler import make_render_key

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    rows = label_rows(read_pairs(pairs_dir))
    unique = rows.drop_duplicates(PROMPT_ID).loc[:, [PROMPT_ID, C.PROMPT, INTENT]].reset_index(drop=True)
    if rewards.max_prompts:
        unique = unique.head(rewards.max_prompts)
        rows = rows[rows[PROMPT_ID].isin(unique[PROMPT_ID])]
    setup = RewardSetup.for_labels(data, rewards, models)
    cache_path = reward_cache_path(rewards, out_dir)
    prepare_models(models, ("diffusion", "pickscore", "aesthetic", "clip_relevance"))
    scored = _cached_scores(unique, setup, cache_path)
    pending = unique[~unique[PROMPT_ID].isin(scored[PROMPT_ID])]
    if len(pending):  # a fully cached rerun starts no actors at all
        init_ray(cluster)
        fresh = score_unique_prompts(pending, setup, data.renderer_pool, data.scorer_pool, cache_path,
                                     out_dir / "images" if rewards.keep_images else None)
        scored = pd.concat([scored, fresh], ignore_index=True)

    labels = rows.merge(scored, on=PROMPT_ID, how="left", validate="many_to_one")
    seeds = setup.seeds
    for name in SCORE_NAMES:
        per_seed = np.stack(labels[name].to_numpy())
        labels[f"{name}_mean"], labels[f"{name}_std"] = seed_stats(per_seed)
    labels["reward"] = combined_reward(labels["pickscore_mean"], labels["aesthetic_mean"], rewards.alpha)
    key = make_render_key(setup)
    render = data.render
    labels = labels.assign(seeds=[seeds] * len(labels), pickscore_text=rewards.pickscore_text,
                           diffusion_model=key.diffusion_model, pickscore_model=key.pickscore_model,
                           aesthetic_model=key.aesthetic_model, relevance_model=key.relevance_model,
                           height=render.height, width=render.width, num_inference_steps=render.num_inference_steps,
                           guidance_scale=render.guidance_scale, scheduler=render.scheduler)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    pq.write_table(pa.Table.from_pandas(labels, preserve_index=False), out_dir / "part-00000.parquet")
    rendered = scored["rendered"].astype(bool)  # Ray Data may hand the flag back as an integer column
    manifest = {
        "stage": "rewards", "pairs": int(labels[C.PAIR_ID].nunique()), "rows": len(labels),
        "unique_prompts": len(unique), "max_prompts": rewards.max_prompts, "prompts_rendered": int(rendered.sum()),
        "prompts_from_cache": int((~rendered).sum()), "num_seeds": len(seeds), "seeds": seeds,
        "render": asdict(render),
        "alpha": rewards.alpha, "pickscore_text": rewards.pickscore_text, "fused": rewards.fused,
        "models": {"diffusion": key.diffusion_model, "pickscore": key.pickscore_model,
                   "aesthetic": key.aesthetic_model, "relevance": key.relevance_model},
        "long_prompts": long_prompt_count(setup, list(unique[C.PROMPT])),
        "cache": str(cache_path),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return write_manifest(out_dir, manifest)
