"""Multi-seed rendering: every prompt with N seeds in one batched pipeline call (paper Section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bp_ray.config import RenderConfig


def seeds_for(num_seeds: int, seed_base: int) -> list[int]:
    return list(range(seed_base, seed_base + num_seeds))


@torch.no_grad()
def render_seeds(pipe, prompts: Sequence[str], seeds: Sequence[int], render: RenderConfig) -> np.ndarray:
    """(P, S, H, W, 3) uint8 images of P prompts x S seeds, from one pipeline call.

    One CPU generator per (prompt, seed) image: image (p, s) is the image of rendering prompt p with seed s
    alone (up to the last float bits of batched kernels), on any device.
    """
    if not prompts:
        return np.zeros((0, len(seeds), render.height, render.width, 3), dtype=np.uint8)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts for seed in seeds]
    images = pipe(list(prompts), num_images_per_prompt=len(seeds), generator=generators, height=render.height,
                  width=render.width, num_inference_steps=render.num_inference_steps,
                  guidance_scale=render.guidance_scale, output_type="np").images
    pixels = np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)
    return pixels.reshape(len(prompts), len(seeds), render.height, render.width, 3)
