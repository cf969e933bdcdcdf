"""Render + score + cache for (prompt, intent) lists: the one core behind the labelling UDFs, the reward actor
and the benchmarks. No Ray here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bp_ray.config import DataConfig, ModelsConfig, RenderConfig, RewardsConfig
from bp_ray.rewards.cache import RenderKey, RewardCache, entry_key
from bp_ray.rewards.render import render_seeds, seeds_for
from bp_ray.rewards.scoring import load_scorers, score_images


def model_fingerprint(spec: str, models_cfg) -> str:
    """`spec@<hash>` of a local folder's configs and weight sizes, or `spec@main` for a hub id (cache key part)."""
    from bp_ray.models.loading import resolve_model

    path = Path(resolve_model(spec, models_cfg)) if not spec.startswith(("http://", "https://")) else None
    if path is None or not path.exists():
        return f"{spec}@main"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        # Configs by content, weights by size: reading gigabytes of weights per actor start is not worth it.
        digest.update(file.read_bytes() if file.suffix == ".json" else str(file.stat().st_size).encode())
    return f"{spec}@{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class RewardSetup:
    """What rendering and scoring a prompt means, from the config sections that decide it: the image models, the
    render settings and number of seeds, and the `rewards` section (seed base, PickScore text, alpha, batching).
    Labelling and PPO's online reward use data.render and data.num_seeds (`for_labels`); evaluation its own."""

    models: ModelsConfig
    render: RenderConfig
    num_seeds: int
    rewards: RewardsConfig

    @classmethod
    def for_labels(cls, data: DataConfig, rewards: RewardsConfig, models: ModelsConfig) -> RewardSetup:
        return cls(models, data.render, data.num_seeds, rewards)

    @property
    def seeds(self) -> list[int]:
        return seeds_for(self.num_seeds, self.rewards.seed_base)


def make_render_key(setup: RewardSetup) -> RenderKey:
    models, render = setup.models, setup.render
    diffusion_model = model_fingerprint(models.diffusion, models)
    # Long prompts render differently when chunked: a suffix keeps those scores apart, and appending it only in
    # that mode leaves every default-mode key (existing caches) unchanged, with no new RenderKey field.
    if render.long_prompts != "truncate":
        diffusion_model += f"|long={render.long_prompts}"
    return RenderKey(diffusion_model=diffusion_model, height=render.height,
                     width=render.width, num_inference_steps=render.num_inference_steps,
                     guidance_scale=render.guidance_scale, scheduler=render.scheduler,
                     pickscore_model=model_fingerprint(models.pickscore, models) + "|" + models.pickscore_processor,
                     aesthetic_model=model_fingerprint(models.aesthetic, models),
                     relevance_model=model_fingerprint(models.clip_relevance, models))


@dataclass
class Labels:
    """Per-seed scores of P prompts: scores[p, s] = (pickscore, aesthetic, relevance) of seed seeds[s]."""

    seeds: list[int]
    scores: np.ndarray
    """(P, S, 3)"""
    rendered: np.ndarray
    """(P,) bool: True where the prompt had to be rendered (not all seeds were in the cache)."""
    pixels: np.ndarray | None = None
    """(P, S, H, W, 3) uint8 when asked for; zeros for prompts served from the cache."""


class RewardLabeler:
    """Holds the diffusion pipeline and/or the scorers of one worker, and the shared cache."""

    def __init__(self, setup: RewardSetup, cache_path: str | None, render: bool = True, score: bool = True):
        from bp_ray.models.loading import load_diffusion

        models = setup.models
        self.render_cfg = setup.render
        self.seeds = setup.seeds
        self.pickscore_text = setup.rewards.pickscore_text
        self.key = make_render_key(setup)
        self.cache = RewardCache(cache_path) if cache_path else None
        self.pipe = load_diffusion(models.diffusion, models, device=models.device, dtype=models.dtype,
                                   scheduler=self.render_cfg.scheduler) if render else None
        self.scorers = load_scorers(models, device=models.device) if score else None

    def _texts(self, prompts: list[str], intents: list[str]) -> list[str]:
        return list(intents) if self.pickscore_text == "intent" else list(prompts)

    def _keys(self, prompts: list[str], intents: list[str]) -> list[list[str]]:
        texts = self._texts(prompts, intents)
        return [[entry_key(self.key, p, s, t, i) for s in self.seeds] for p, t, i in zip(prompts, texts, intents,
                                                                                          strict=True)]

    def cached(self, prompts: list[str], intents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(P, S, 3) scores with NaN where missing, and (P,) True where every seed was cached."""
        scores = np.full((len(prompts), len(self.seeds), 3), np.nan)
        if self.cache is None or not prompts:
            return scores, np.zeros(len(prompts), dtype=bool)
        keys = self._keys(prompts, intents)
        hits = self.cache.get_many([k for row in keys for k in row])
        for p, row in enumerate(keys):
            for s, key in enumerate(row):
                if key in hits:
                    scores[p, s] = hits[key]
        return scores, ~np.isnan(scores).any(axis=(1, 2))

    def render(self, prompts: list[str]) -> np.ndarray:
        """(P, S, H, W, 3) uint8."""
        return render_seeds(self.pipe, prompts, self.seeds, self.render_cfg)

    def score(self, pixels: np.ndarray, prompts: list[str], intents: list[str]) -> np.ndarray:
        """(P, S, H, W, 3) images -> (P, S, 3) scores, written to the cache."""
        if not prompts:
            return np.zeros((0, len(self.seeds), 3))
        num_prompts, num_seeds = pixels.shape[:2]
        # prompt-major, as rendered: image p * S + s is prompt p with seed s
        texts = [t for t in self._texts(prompts, intents) for _ in range(num_seeds)]
        flat_intents = [i for i in intents for _ in range(num_seeds)]
        flat = score_images(self.scorers, pixels.reshape(-1, *pixels.shape[2:]), texts, flat_intents)
        scores = flat.reshape(num_prompts, num_seeds, 3)
        if self.cache is not None:
            keys = self._keys(prompts, intents)
            self.cache.put_many({key: tuple(scores[p, s]) for p, row in enumerate(keys) for s, key in enumerate(row)})
        return scores

    def label(self, prompts: list[str], intents: list[str], keep_pixels: bool = False) -> Labels:
        """Cached seeds are read; prompts missing any seed are rendered (all seeds, one call) and scored."""
        scores, complete = self.cached(prompts, intents)
        todo = np.flatnonzero(~complete)
        pixels = None
        if keep_pixels:
            r = self.render_cfg
            pixels = np.zeros((len(prompts), len(self.seeds), r.height, r.width, 3), dtype=np.uint8)
        if len(todo):
            todo_prompts, todo_intents = [prompts[i] for i in todo], [intents[i] for i in todo]
            rendered = self.render(todo_prompts)
            scores[todo] = self.score(rendered, todo_prompts, todo_intents)
            if pixels is not None:
                pixels[todo] = rendered
        return Labels(self.seeds, scores, ~complete, pixels)
