"""Image scores (PickScore, aesthetic, CLIP relevance), their statistics over seeds, and the combined reward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bp_ray.config import ModelsConfig

SCORE_NAMES = ("pickscore", "aesthetic", "relevance")


@dataclass
class ImageScorers:
    pickscore: object
    aesthetic: object
    relevance: object


def load_scorers(models_cfg: ModelsConfig, device: str = "auto") -> ImageScorers:
    from bp_ray.models.loading import load_aesthetic, load_clip_relevance, load_pickscore

    return ImageScorers(load_pickscore(models_cfg, device), load_aesthetic(models_cfg, device),
                        load_clip_relevance(models_cfg, device))


def score_images(scorers: ImageScorers, pixels: np.ndarray, pickscore_texts: list[str],
                 intents: list[str]) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, 3) scores: PickScore against pickscore_texts[i], aesthetic, and CLIP
    relevance (cosine) against intents[i]."""
    images = [Image.fromarray(p) for p in pixels]
    return np.stack([scorers.pickscore.score(images, pickscore_texts), scorers.aesthetic.score(images),
                     scorers.relevance.score(images, intents)], axis=1).astype(np.float64)


def seed_stats(per_seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, S) -> mean and population std over seeds, each (P,)."""
    return per_seed.mean(axis=1), per_seed.std(axis=1)


def combined_reward(pickscore: np.ndarray, aesthetic: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * PickScore + (1 - alpha) * aesthetic (paper Section 3.3; alpha = 0.7 there)."""
    return alpha * np.asarray(pickscore) + (1.0 - alpha) * np.asarray(aesthetic)
