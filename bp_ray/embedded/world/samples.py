"""Training and held-out samples of the miniature world: rendered scenes with their descriptions and truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bp_ray.embedded.world.scenes import Scene, render_scene, sample_scenes
from bp_ray.embedded.world.truth import true_aesthetic


@dataclass
class WorldSamples:
    scenes: list[Scene]
    images: np.ndarray
    """(N, S, S, 3) uint8: each scene rendered as its detailed description asks."""
    plain_images: np.ndarray
    """(N, S, S, 3) uint8: the same objects rendered from the plain description (styles and sizes left open)."""
    plain: list[str]
    detailed: list[str]
    aesthetic: np.ndarray
    """(N,) float32 ground-truth aesthetic of `images`."""
    plain_aesthetic: np.ndarray
    """(N,) float32 ground-truth aesthetic of `plain_images`."""

    def __len__(self) -> int:
        return len(self.scenes)


def make_samples(num: int, seed: int, size: int = 32) -> WorldSamples:
    """`num` scenes of `seed`, each rendered twice (detailed and plain) with render seed seed * 1_000_003 + i."""
    scenes = sample_scenes(num, seed)
    render_seeds = [seed * 1_000_003 + i for i in range(num)]
    images = np.stack([render_scene(s, r, size) for s, r in zip(scenes, render_seeds, strict=True)])
    plain_scenes = [Scene(tuple(type(o)(o.colour, o.shape) for o in s.objects)) for s in scenes]
    plain_images = np.stack([render_scene(s, r, size) for s, r in zip(plain_scenes, render_seeds, strict=True)])
    return WorldSamples(
        scenes=scenes, images=images, plain_images=plain_images,
        plain=[s.plain() for s in scenes], detailed=[s.detailed() for s in scenes],
        aesthetic=np.array([true_aesthetic(im) for im in images], dtype=np.float32),
        plain_aesthetic=np.array([true_aesthetic(im) for im in plain_images], dtype=np.float32),
    )


def heldout_seed(seed: int) -> int:
    """Seed of the held-out scenes for a world seed (never equal to a training seed)."""
    return 10_000 + seed


def world_texts(seed: int, num_scenes: int = 3000, corpus_rows: int = 3000) -> list[str]:
    """Text the world zoo's tokenizers are trained on: plain and detailed world descriptions plus the embedded
    corpus's prompts, so both world words and ordinary prompt words are single tokens or short merges."""
    from bp_ray.data.corpus import generate_prompts

    scenes = sample_scenes(num_scenes, seed + 777)
    corpus = [p for p in generate_prompts(corpus_rows, seed=seed) if isinstance(p, str) and p.strip()]
    return [s.plain() for s in scenes] + [s.detailed() for s in scenes] + corpus
