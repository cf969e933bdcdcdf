"""The world's Stable Diffusion: train the tiny pipeline on world scenes so prompts steer what it draws.

Two phases, as Stable Diffusion itself was made:
1. an AutoencoderKL learns to squeeze 32x32 world images into an 8x8 latent and back (reconstruction, a texture
   term so grain survives, a small KL),
2. a UNet2DConditionModel, jointly with the CLIP text encoder, learns epsilon-prediction on those latents under the
   pipeline's own DDIM (SD 1.x) noise schedule, with captions dropped to "" now and then for classifier-free
   guidance.
Each scene trains twice: its detailed description (or the same without sizes and relation) with its image, and
its plain description with the image of the same objects whose styles were left open, so a plain prompt draws the
varied default and each style phrase pins one property. The result is saved back as a diffusers
StableDiffusionPipeline folder, loaded and rendered by the same code as any other (`models.loading.load_diffusion`,
`rewards.render.render_seeds`).

Architecture: the tiny zoo's 2-block SD works at a 16x16 latent, where a UNet step costs ~2.5x that at 8x8; world
scenes are flat shapes, so a 3-block VAE (8x8x4 latent) keeps what matters and the UNet trains fast enough on CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bp_ray.config import RenderConfig
from bp_ray.embedded.config import TinyZooConfig, WorldConfig
from bp_ray.embedded.world.samples import WorldSamples
from bp_ray.embedded.world.scenes import BAD_STYLES, COLOURS, GOOD_STYLES, Scene, WorldObject, parse_description
from bp_ray.embedded.world.schedule import warmup_cosine
from bp_ray.embedded.world.truth import colours_match, dominant_colour, true_aesthetic

VAE_CHANNELS = (16, 32, 64)
"""Three blocks: 32x32 pixels -> 8x8 latent (a UNet step at 8x8 costs ~2.5x less than at the tiny zoo's 16x16)."""
LATENT_CHANNELS = 4
"""As SD. 16 channels reconstructed colours better, but diffusion in it drew noise textures: weak channels,
scaled up by the one scaling_factor, turned the UNet's small errors into large decoded ones."""
UNET_CHANNELS = (32, 64)
UNET_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
"""Cross-attention at 4x4 and in the middle only: attention at the 8x8 level made a step 1.7x slower, and the
steps it bought at equal time matched colours better (99% against 80% of renders)."""
VAE_KL_WEIGHT = 1e-4
"""Weight of the mean per-element KL against the per-pixel MSE: enough to keep the latent smooth for diffusion."""
VAE_TEXTURE_WEIGHT = 4.0
"""Weight of `texture_loss`: with it the decoder draws grain (and "grainy" / "smooth" move the true aesthetic);
at 1 it still smoothed grain away."""
OFFSET_NOISE = 0.1
"""Per-channel constant added to the training noise (offset noise): SD 1.x's schedule leaves a little of the image
in the noise at t=999, so without it the seed, not the prompt, chose a dark or light background."""
EMA_DECAY = 0.998
"""The UNet and text encoder saved are an exponential moving average of the trained weights (~500-step window)."""
LR_WARMUP = 50
LR_FLOOR = 0.1
"""The LR ends at a tenth of its peak, not zero: short runs still end on small, careful steps."""
LOG_EVERY = 50
"""Losses are reported as means over windows of this many steps (one step's loss is too noisy to compare)."""

logger = logging.getLogger(__name__)


# --- architecture -----------------------------------------------------------------------------------------

def world_vae(tiny: TinyZooConfig):
    """AutoencoderKL of the world SD (random init): tiny.image_size pixels, a latent 4x smaller per side."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=list(VAE_CHANNELS), layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * len(VAE_CHANNELS),
                         up_block_types=["UpDecoderBlock2D"] * len(VAE_CHANNELS),
                         norm_num_groups=min(VAE_CHANNELS), sample_size=tiny.image_size)


def world_unet(tiny: TinyZooConfig, cross_attention_dim: int):
    """UNet2DConditionModel of the world SD (random init) on world_vae's latent."""
    from diffusers import UNet2DConditionModel

    latent_size = tiny.image_size // 2 ** (len(VAE_CHANNELS) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=list(UNET_CHANNELS), layers_per_block=1, norm_num_groups=min(UNET_CHANNELS),
        down_block_types=list(UNET_DOWN), up_block_types=list(UNET_UP),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)


# --- training ---------------------------------------------------------------------------------------------

def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the range the SD VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _log_progress(phase: str, step: int, steps: int, losses: list[float]) -> None:
    if (step + 1) % (4 * LOG_EVERY) == 0 or step + 1 == steps:
        logger.info("world sd %s step %d/%d loss %.4f", phase, step + 1, steps, np.mean(losses[-LOG_EVERY:]))


def _window_means(losses: list[float]) -> tuple[float, float]:
    window = max(1, min(LOG_EVERY, len(losses) // 2))
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float,
              generator: torch.Generator) -> list[float]:
    """Reconstruction MSE + VAE_KL_WEIGHT * KL, on random batches of `pixels` (N, 3, H, W). Returns the losses."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, LR_WARMUP, floor=LR_FLOOR)
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(recon, batch) + VAE_KL_WEIGHT * kl + VAE_TEXTURE_WEIGHT * texture_loss(recon, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        _log_progress("vae", step, steps, losses)
    vae.eval()
    return losses


def _local_detail(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H/4, W/4): RMS of the high-pass residual (image - 3x3 mean) per 4x4 patch."""
    high_pass = images - F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return (F.avg_pool2d(high_pass.pow(2), 4) + 1e-6).sqrt()


def texture_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Match how much fine detail (grain, edge sharpness) each patch has, not where it is.

    Pixel losses alone make the decoder draw the mean of what a latent could mean: grain it cannot place averages
    out to smooth, so "grainy" and "sharp" would look like everything else.
    """
    return F.mse_loss(_local_detail(recon), _local_detail(target))


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled: (N, C, h, w) each."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        posterior = vae.encode(pixels[start:start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def loose_description(scene: Scene) -> str:
    """The detailed description without sizes and relation ("a red circle, dark background, sharp").

    Leaving those open keeps the description true of the image (the renderer would draw them at random), while
    styles must stay: an unspecified style group means its own default look. Trained alongside the detailed one,
    so a plain prompt plus a style phrase is a sentence the text encoder has seen.
    """
    return Scene(tuple(WorldObject(o.colour, o.shape) for o in scene.objects), None, scene.styles).detailed()


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(N, 77) ids exactly as StableDiffusionPipeline.encode_prompt makes them (padded to the window, truncated)."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(unet, text_encoder, noise_scheduler, latent_mean: torch.Tensor, latent_std: torch.Tensor,
               caption_ids: torch.Tensor, empty_ids: torch.Tensor, steps: int, batch_size: int, lr: float,
               caption_dropout: float, generator: torch.Generator) -> list[float]:
    """Epsilon-prediction (with offset noise) on latents, already scaled: mean and std (N, C, h, w) of each image's
    posterior, sampled afresh each time. Captions (N, V, 77): V variants per latent, one drawn at random each time.
    Trains the text encoder jointly; both end as the EMA of their weights. Returns the losses."""
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    ema = [p.detach().clone() for p in params]
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, LR_WARMUP, floor=LR_FLOOR)
        index = torch.randint(len(latent_mean), (batch_size,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        variant = torch.randint(caption_ids.shape[1], (batch_size,), generator=generator)
        ids = caption_ids[index, variant].clone()
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        noise = noise + OFFSET_NOISE * torch.randn((*noise.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(len(alphas_cumprod), (batch_size,), generator=generator)
        alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise  # == noise_scheduler.add_noise
        context = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short runs (tests) average over fewer steps
        with torch.no_grad():
            for average, param in zip(ema, params, strict=True):
                average.lerp_(param, 1 - decay)
        losses.append(loss.item())
        _log_progress("unet", step, steps, losses)
    with torch.no_grad():
        for param, average in zip(params, ema, strict=True):
            param.copy_(average)
    unet.eval()
    text_encoder.eval()
    return losses


def build_world_sd(folder: Path, samples: WorldSamples, world: WorldConfig, tiny: TinyZooConfig,
                   texts: list[str]) -> dict[str, float]:
    """Build the world SD (the tiny zoo's tokenizer, text encoder and scheduler; VAE and UNet in the world
    architecture from world.seed), train it on world samples and save it as a diffusers pipeline folder.

    Deterministic for a seed on one machine. Returns the training figures.
    """
    from bp_ray.embedded.tiny_zoo import save_sd_pipeline, sd_text_side

    tokenizer, text_encoder, scheduler = sd_text_side(tiny, texts)
    torch.manual_seed(world.seed)
    generator = torch.Generator().manual_seed(world.seed)
    vae = world_vae(tiny)
    unet = world_unet(tiny, text_encoder.config.hidden_size)

    start = time.perf_counter()
    pixels = torch.cat([_pixels(samples.images), _pixels(samples.plain_images)])
    vae_losses = train_vae(vae, pixels, world.vae_steps, world.vae_batch_size, world.vae_lr, generator)
    latent_mean, latent_std = encode_latents(vae, pixels)
    # SD decodes latents / scaling_factor: scale so the latents the UNet sees have unit std, like SD's 0.18215
    spread = (latent_mean.var() + latent_std.pow(2).mean()).sqrt().item()
    scaling = 1.0 / spread
    vae.register_to_config(scaling_factor=scaling)
    vae_seconds = time.perf_counter() - start

    start = time.perf_counter()
    caption_ids = torch.stack([
        tokenize(tokenizer, list(samples.detailed) + list(samples.plain)),
        tokenize(tokenizer, [loose_description(s) for s in samples.scenes] + list(samples.plain)),
    ], dim=1)
    empty_ids = tokenize(tokenizer, [""])[0]
    unet_losses = train_unet(unet, text_encoder, scheduler, latent_mean * scaling, latent_std * scaling,
                             caption_ids, empty_ids, world.unet_steps, world.unet_batch_size, world.unet_lr,
                             world.caption_dropout, generator)
    unet_seconds = time.perf_counter() - start

    save_sd_pipeline(Path(folder), vae, text_encoder, tokenizer, unet, scheduler)
    vae_first, vae_last = _window_means(vae_losses) if vae_losses else (float("nan"), float("nan"))
    unet_first, unet_last = _window_means(unet_losses) if unet_losses else (float("nan"), float("nan"))
    return {"vae_steps": float(world.vae_steps), "vae_seconds": vae_seconds, "vae_loss_first": vae_first,
            "vae_loss_last": vae_last, "vae_scaling_factor": scaling, "unet_steps": float(world.unet_steps),
            "unet_seconds": unet_seconds, "unet_loss_first": unet_first, "unet_loss_last": unet_last}


# --- renders for the other roles ---------------------------------------------------------------------------

WORLD_RENDER = RenderConfig(height=32, width=32, num_inference_steps=4, guidance_scale=5.0, scheduler="ddim")
"""How the world preset renders (data, rewards, PPO and eval): what the world SD's renders are judged at."""
RENDER_BATCH = 250


def styled_prompts(scenes: Sequence[Scene], seed: int) -> list[str]:
    """Each scene's plain description followed by style phrases, each group's with probability 1/2 (a random
    phrase of the group, in group order): the shape of a beautifier's rewrite of a plain request."""
    from bp_ray.embedded.world.scenes import STYLE_GROUPS

    rng = np.random.default_rng(seed)
    prompts = []
    for scene in scenes:
        styles = [str(rng.choice(group)) for group in STYLE_GROUPS.values() if rng.random() < 0.5]
        prompts.append(", ".join([scene.plain(), *styles]))
    return prompts


def render_prompts(sd_folder: Path, prompts: Sequence[str], seed: int, size: int = 32) -> np.ndarray:
    """(N, size, size, 3) uint8: one render of each prompt by the SD pipeline folder at WORLD_RENDER, batch b with
    render seed seed + b."""
    from dataclasses import replace

    from bp_ray.models.loading import load_diffusion
    from bp_ray.rewards.render import render_seeds

    render = replace(WORLD_RENDER, height=size, width=size)
    pipe = load_diffusion(str(sd_folder), device="cpu", scheduler=render.scheduler)
    batches = [render_seeds(pipe, prompts[start:start + RENDER_BATCH], [seed + b], render)[:, 0]
               for b, start in enumerate(range(0, len(prompts), RENDER_BATCH))]
    return np.concatenate(batches) if batches else np.zeros((0, size, size, 3), dtype=np.uint8)


# --- measuring --------------------------------------------------------------------------------------------

def _render_occurrences(pipe, prompts: Sequence[str], render: RenderConfig, num_seeds: int) -> np.ndarray:
    """(len(prompts), num_seeds, H, W, 3): the k-th occurrence of a prompt renders with seeds k*num_seeds + j.

    render_seeds gives every prompt of a call the same seeds, so a repeated prompt would repeat its images; one
    call per round of distinct prompts gives each occurrence new seeds and keeps the calls batched.
    """
    from bp_ray.rewards.render import render_seeds

    occurrence, seen = [], {}
    for prompt in prompts:
        occurrence.append(seen.get(prompt, 0))
        seen[prompt] = occurrence[-1] + 1
    images = np.zeros((len(prompts), num_seeds, render.height, render.width, 3), dtype=np.uint8)
    for round_ in range(max(occurrence, default=-1) + 1):
        rows = [i for i, k in enumerate(occurrence) if k == round_]
        seeds = [round_ * num_seeds + j for j in range(num_seeds)]
        images[rows] = render_seeds(pipe, [prompts[i] for i in rows], seeds, render)
    return images


def _mean_aesthetic(images: np.ndarray) -> float:
    return float(np.mean([true_aesthetic(image) for image in images.reshape(-1, *images.shape[-3:])]))


def measure_sd(pipe, heldout: WorldSamples, render: RenderConfig, num_seeds: int = 2) -> dict:
    """Does the SD draw what world prompts ask? Colour match and style directions on held-out scenes.

    - colour_match: share of renders of single-object plain prompts whose dominant colour is the requested one
      (chance: 1/6); two_object_match: share of two-object plain renders holding both colours (colours_match).
    - style_delta[phrase]: mean true aesthetic of `plain + ", " + phrase` renders minus that of `plain` renders
      (single-object prompts, same seeds); style_expected_sign counts GOOD_STYLES > 0 and BAD_STYLES < 0.
    - aesthetic_detailed / aesthetic_plain: mean true aesthetic of renders of all held-out detailed / plain
      prompts, next to the world's own images of them (truth_detailed / truth_plain), and the correlation between
      a detailed prompt's renders and its true image (how much the styles written steer the render).
    """
    single = [p for p, s in zip(heldout.plain, heldout.scenes, strict=True) if len(s.objects) == 1]
    double = [p for p, s in zip(heldout.plain, heldout.scenes, strict=True) if len(s.objects) == 2]
    start = time.perf_counter()
    single_images = _render_occurrences(pipe, single, render, num_seeds)
    wanted = [parse_description(p).objects[0].colour for p in single]
    hits = [dominant_colour(image) == colour for colour, row in zip(wanted, single_images, strict=True)
            for image in row]
    double_images = _render_occurrences(pipe, double, render, num_seeds)
    pair_hits = [bool(colours_match(image, prompt)) for prompt, row in zip(double, double_images, strict=True)
                 for image in row]

    base = _mean_aesthetic(single_images)
    deltas = {}
    for phrase in GOOD_STYLES + BAD_STYLES:
        styled = _render_occurrences(pipe, [f"{p}, {phrase}" for p in single], render, num_seeds)
        deltas[phrase] = _mean_aesthetic(styled) - base
    expected = sum(deltas[p] > 0 for p in GOOD_STYLES) + sum(deltas[p] < 0 for p in BAD_STYLES)

    detailed_images = _render_occurrences(pipe, heldout.detailed, render, num_seeds)
    plain_images = np.concatenate([single_images, double_images])  # all plain prompts, rendered above
    per_prompt = np.array([np.mean([true_aesthetic(im) for im in row]) for row in detailed_images])
    varied = len(per_prompt) > 1 and per_prompt.std() > 0 and heldout.aesthetic.std() > 0
    correlation = float(np.corrcoef(per_prompt, heldout.aesthetic)[0, 1]) if varied else float("nan")
    return {
        "colour_match": float(np.mean(hits)) if hits else float("nan"),
        "colour_chance": 1 / len(COLOURS),
        "two_object_match": float(np.mean(pair_hits)) if pair_hits else float("nan"),
        "style_delta": deltas,
        "style_expected_sign": int(expected),
        "style_phrases": len(deltas),
        "aesthetic_plain": _mean_aesthetic(plain_images),
        "aesthetic_detailed": float(per_prompt.mean()),
        "truth_plain": float(heldout.plain_aesthetic.mean()),
        "truth_detailed": float(heldout.aesthetic.mean()),
        "detailed_truth_correlation": correlation,
        "renders": int(num_seeds * (len(single) * (1 + len(deltas)) + len(double) + len(heldout.detailed))),
        "seconds": time.perf_counter() - start,
    }
