"""Multi-seed rendering: every prompt with N seeds in one batched pipeline call (paper Section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bp_ray.config import RenderConfig
from bp_ray.rewards.long_prompts import chunked_prompt_embeds, window_count

VAE_BATCH_PIXELS = 4 * 512 * 512
"""Above this many pixels in one call (four 512 px images) the VAE decodes image by image."""


def seeds_for(num_seeds: int, seed_base: int) -> list[int]:
    return list(range(seed_base, seed_base + num_seeds))


@torch.no_grad()
def render_seeds(pipe, prompts: Sequence[str], seeds: Sequence[int], render: RenderConfig,
                 negative_prompt: str | None = None) -> np.ndarray:
    """(P, S, H, W, 3) uint8 images of P prompts x S seeds, from one batched pipeline call.

    negative_prompt applies to every prompt (diffusers' negative_prompt); None is diffusers' default, the empty
    prompt, and leaves the call exactly as without the argument.

    One CPU generator per (prompt, seed) image: image (p, s) is the image of rendering prompt p with seed s
    alone (up to the last float bits of batched kernels), on any device.

    render.long_prompts == "chunked" encodes each prompt whole in 75-token windows (rewards/long_prompts.py), with
    one pipeline call per window count: an empty window appended to a short prompt changes its image, so prompts
    only share a call with prompts as long (in windows), and an image never depends on its batch neighbours.
    """
    if not prompts:
        return np.zeros((0, len(seeds), render.height, render.width, 3), dtype=np.uint8)
    if render.long_prompts == "truncate":
        # one negative per prompt: diffusers rejects a single string beside a list of prompts
        negative = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * len(prompts)}
        return _render(pipe, len(prompts), seeds, render, prompt=list(prompts), **negative)
    pixels = np.zeros((len(prompts), len(seeds), render.height, render.width, 3), dtype=np.uint8)
    counts = np.asarray(window_count(pipe.tokenizer, prompts))
    for count in np.unique(counts):
        group = np.flatnonzero(counts == count)
        # the pipeline repeats both per seed (num_images_per_prompt); a negative of more windows than the group
        # pads the group's prompts with empty windows, as A1111 pads the shorter of the two
        embeds, negative_embeds = chunked_prompt_embeds(pipe, [prompts[i] for i in group], negative_prompt or "")
        pixels[group] = _render(pipe, len(group), seeds, render, prompt_embeds=embeds,
                                negative_prompt_embeds=negative_embeds)
    return pixels


def _render(pipe, num_prompts: int, seeds: Sequence[int], render: RenderConfig, **text) -> np.ndarray:
    """(P, S, H, W, 3) uint8 from one pipeline call; text is prompt=[...] or prompt_embeds=/negative_prompt_embeds=."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in range(num_prompts) for seed in seeds]
    # The VAE decodes a whole batch at once, and its activations grow with it: a paper renderer batch is 8 prompts
    # x 8 seeds at 512 px. Image by image, the decoder's peak is one image's and the images are the same: its
    # convolutions are already busy at that size.
    if len(generators) * render.height * render.width > VAE_BATCH_PIXELS:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    images = pipe(**text, num_images_per_prompt=len(seeds), generator=generators, height=render.height,
                  width=render.width, num_inference_steps=render.num_inference_steps,
                  guidance_scale=render.guidance_scale, output_type="np").images
    pixels = np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)
    return pixels.reshape(num_prompts, len(seeds), render.height, render.width, 3)
