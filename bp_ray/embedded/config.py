"""Settings of the embedded backend, kept under `models.zoo.tiny`, `models.zoo.world` and `models.zoo.shapes` of
every config (the embedded backend registers these sections; `bp-ray config explain models.zoo.world` shows them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bp_ray.config import attach_field_help, opt


@dataclass
class TinyZooConfig:
    """Sizes of the random-init tiny models that `bp-ray models build-tiny` builds (real architectures)."""

    seed: int = 0
    """Seed of every tiny model's weights and of the corpus its tokenizers are trained on."""
    tokenizer_corpus_rows: int = opt(3000, ge=100)
    """Prompts of the embedded corpus the tiny tokenizers are trained on."""
    lm_vocab_size: int = opt(1024, ge=300)
    lm_hidden_size: int = opt(64, ge=8)
    lm_layers: int = opt(2, ge=1)
    lm_heads: int = opt(4, ge=1)
    clip_vocab_size: int = opt(1024, ge=300)
    clip_hidden_size: int = opt(32, ge=8)
    clip_layers: int = opt(2, ge=1)
    clip_projection_dim: int = opt(32, ge=8)
    image_size: int = opt(32, ge=16)
    """Pixel size of tiny images: SD output, BLIP / CLIP / open_clip input."""
    sd_latent_channels: int = opt(4, ge=1)
    sd_block_channels: list[int] = field(default_factory=lambda: [32, 64])
    captioner_vocab_size: int = opt(1024, ge=300)


@dataclass
class WorldConfig:
    """The miniature world that `bp-ray models build-world` trains the tiny models in (see bp_ray/embedded/world)."""

    seed: int = 0
    """Seed of the world's scenes and of every model's training; the same seed builds the same files."""
    train_scenes: int = opt(6000, ge=100)
    """Scenes (image + plain + detailed description) the vision models and SD train on."""
    heldout_scenes: int = opt(400, ge=20)
    """Scenes of another seed, never trained on, that the build's quality figures are measured on."""
    lm_steps: int = opt(1000, ge=0)
    lm_batch_size: int = opt(32, ge=1)
    lm_lr: float = opt(2.0e-3, gt=0)
    captioner_steps: int = opt(8000, ge=0)
    """All BLIP steps: the first 60% teach its vision tower shapes alone (64 images a step), the rest caption."""
    captioner_batch_size: int = opt(32, ge=1)
    captioner_lr: float = opt(2.0e-3, gt=0)
    clip_steps: int = opt(6000, ge=0)
    """All CLIP steps: the first 60% teach its vision tower shapes alone (64 images a step), the rest contrastive."""
    clip_batch_size: int = opt(64, ge=2)
    clip_lr: float = opt(2.0e-3, gt=0)
    aesthetic_steps: int = opt(8000, ge=0)
    aesthetic_batch_size: int = opt(64, ge=1)
    aesthetic_lr: float = opt(1.0e-3, gt=0)
    aesthetic_sd_renders: int = opt(6000, ge=0)
    """Training images the aesthetic predictor gets besides the renderer's: the world SD's renders of plain
    descriptions with random style phrases (a rewrite's shape), labelled with their true aesthetic from pixels, so
    that it judges what a policy's prompts make SD draw (trained on the renderer's images alone it predicted
    -0.006 for what `grainy` costs an SD render, truly -1.12, and PPO wrote it). 0: the renderer's images only."""
    vae_steps: int = opt(3000, ge=0)
    """SD's AutoencoderKL, trained first (world/sd_training.py). At 1000 steps its reconstructions of held-out
    one-object scenes kept the shape in 69% (the images themselves: 97%), at 3000 in 78%."""
    vae_batch_size: int = opt(32, ge=1)
    vae_lr: float = opt(2.0e-3, gt=0)
    unet_steps: int = opt(9000, ge=0)
    """SD's UNet and text encoder, trained on the VAE's latents. With 4500 steps (and the 1000-step VAE) the SD
    lost shapes to style phrases: shape match on the evaluation prompts 0.177 bare, 0.115 with the best-scoring
    phrases (the world's own images of those prompts: 0.615 and 0.896); with 9000 (and 3000) 0.234 and 0.177, and
    0.240 with `high contrast, sharp, smooth` (benchmarks/world_headroom.py --truth)."""
    unet_batch_size: int = opt(32, ge=1)
    unet_lr: float = opt(1.0e-3, gt=0)
    caption_dropout: float = opt(0.1, ge=0, le=1)
    """Share of SD training captions replaced by the empty prompt, so classifier-free guidance works."""


@dataclass
class ShapesConfig:
    """The shapes zoo (`shapes:<role>`, `bp-ray models build-shapes`): the paper preset's architectures at their real
    dimensions, random weights, tokenizers at the real vocabulary sizes."""

    lm_layers: int = opt(0, ge=0)
    """Layers of the BLOOM-1b1 stand-in; 0 builds all 24. Fewer keep the real width (1536), heads (16) and
    vocabulary (250,880): what a 24 GiB CPU machine can train (Adam states of the full model alone are 17 GB)."""
    seed: int = 0
    """Seed of the weights and of the corpus the tokenizers are trained on."""
    tokenizer_corpus_rows: int = opt(3000, ge=100)
    """Prompts of the embedded corpus the tokenizers learn their merges from (the rest of each vocabulary is filler
    words, so that every id a model can sample decodes to text)."""
    trained_tokens: int = opt(8000, ge=300)
    """Tokens each tokenizer learns from that corpus before it is filled up to its real size."""


attach_field_help(__name__)
