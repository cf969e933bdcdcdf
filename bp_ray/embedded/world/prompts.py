"""The `world` prompt source: plain and detailed descriptions of miniature-world scenes, with the world's own renders
as the corpus images, so the world's models can caption, score and learn from the corpus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from bp_ray.embedded.world.scenes import STYLE_WORDS, parse_description, render_scene, sample_scene, sample_scenes


class WorldPrompts:
    def plain(self, rng: np.random.Generator) -> str:
        return sample_scene(rng).plain()

    def rich(self, rng: np.random.Generator) -> str:
        return sample_scene(rng).detailed()

    def image(self, prompt: str, seed: int, size: int) -> Any:
        """The world's render of a prompt that describes a world scene; None for any other prompt."""
        scene = parse_description(prompt)
        return Image.fromarray(render_scene(scene, seed, size)) if scene.objects else None

    def eval_prompts(self, size: int, seed: int, exclude: set[str]) -> list[str]:
        """Distinct plain descriptions of scenes from the evaluation seed, one- and two-object ones interleaved. The
        world has only 18 one-object descriptions, so these can repeat a training prompt's text (`exclude` cannot
        be honoured); what is held out is the scene and every render seed."""
        singles: list[str] = []
        pairs: list[str] = []
        for scene in sample_scenes(size * 20, seed):
            bucket = singles if len(scene.objects) == 1 else pairs
            if scene.plain() not in bucket:
                bucket.append(scene.plain())
        mixed = [p for two in zip(singles, pairs, strict=False) for p in two]
        mixed += singles[len(pairs):] + pairs[len(singles):]
        return mixed[:size]

    def style_tags(self) -> Sequence[str] | None:
        return STYLE_WORDS
