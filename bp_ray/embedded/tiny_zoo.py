"""The tiny model zoo: random-weight models of the real architectures, with locally trained tokenizers.

Every role of the pipeline gets a model small enough for 2 CPU cores, saved in its library's own format so
the same `from_pretrained` code paths load it as load the real checkpoints. Built once per config and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from bp_ray.config import ModelsConfig
from bp_ray.embedded import ZOO_ROLES
from bp_ray.embedded.config import TinyZooConfig
from bp_ray.models.aesthetic import AestheticHead, AestheticSpec, save_aesthetic_folder
from bp_ray.models.model_cache import MANIFEST, ZooSummary, build_zoo, default_zoo_dir

logger = logging.getLogger(__name__)


TINY_OPEN_CLIP_NAME = "bp-tiny-vit"


def zoo_key(tiny: TinyZooConfig) -> str:
    """Hash of the tiny config and the builder version: a different key means rebuild."""
    payload = json.dumps({"config": asdict(tiny), "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


BUILDER_VERSION = 3
"""Bump when a builder changes what it writes, so cached zoos are rebuilt."""


def ensure_tiny_zoo(models_cfg: ModelsConfig) -> Path:
    """Path of an up-to-date tiny zoo, building it if missing or built from another config."""
    root = default_zoo_dir(models_cfg) / "tiny"
    if is_current(root, zoo_key(models_cfg.zoo["tiny"])):
        return root
    build_tiny_zoo(root, models_cfg.zoo["tiny"])
    return root


def is_current(root: Path, key: str) -> bool:
    """Whether `root` holds a complete zoo whose manifest records `key` (the hash of what built it)."""
    manifest = root / MANIFEST
    if not manifest.exists():
        return False
    recorded = json.loads(manifest.read_text())
    return recorded.get("key") == key and all((root / role).is_dir() for role in ZOO_ROLES)


def build_tiny_zoo(root: Path, tiny: TinyZooConfig, force: bool = False) -> ZooSummary:
    """Build every role into `root` (atomically: a half-built zoo is never visible). Deterministic for a seed."""
    def build(staging: Path) -> dict:
        texts = _tokenizer_texts(tiny)
        builders: dict[str, Callable[[Path, TinyZooConfig, list[str]], int]] = {
            "bloom": build_tiny_bloom, "blip": build_tiny_blip, "sd": build_tiny_sd,
            "pickscore": build_tiny_clip, "clip": build_tiny_clip, "aesthetic": build_tiny_aesthetic,
        }
        parameters = {}
        roles = tqdm(builders.items(), desc="tiny zoo", unit="model", disable=None)  # disable=None: tty only
        for offset, (role, builder) in enumerate(roles):
            torch.manual_seed(tiny.seed * 1000 + offset)  # distinct, reproducible weights per role
            parameters[role] = builder(staging / role, tiny, texts)
        return {"key": zoo_key(tiny), "config": asdict(tiny), "builder": BUILDER_VERSION, "parameters": parameters}

    return build_zoo(root, lambda: is_current(root, zoo_key(tiny)), build, force)


def _tokenizer_texts(tiny: TinyZooConfig) -> list[str]:
    from bp_ray.data.corpus import generate_prompts

    prompts = generate_prompts(tiny.tokenizer_corpus_rows, seed=tiny.seed)
    return [p for p in prompts if isinstance(p, str) and p.strip()]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- one builder per role: (out_dir, config, tokenizer texts) -> parameter count ------------------------------

def build_tiny_bloom(out: Path, tiny: TinyZooConfig, texts: list[str]) -> int:
    """BLOOM causal LM (policy, reference, rewriter, reward-model backbone)."""
    from transformers import BloomConfig, BloomForCausalLM

    from bp_ray.models.tokenizers import train_bloom_tokenizer

    tokenizer = train_bloom_tokenizer(texts, tiny.lm_vocab_size)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=tiny.lm_hidden_size, n_layer=tiny.lm_layers,
                         n_head=tiny.lm_heads, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = BloomForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _count(model)


def build_tiny_blip(out: Path, tiny: TinyZooConfig, texts: list[str]) -> int:
    """BLIP image captioner (vision transformer + BERT-style text decoder)."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from bp_ray.models.tokenizers import train_bert_tokenizer

    tokenizer = train_bert_tokenizer(texts, tiny.captioner_vocab_size)
    width = tiny.clip_hidden_size
    text_config = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=tiny.clip_layers, num_attention_heads=2, max_position_embeddings=64,
                       bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
                       sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.sep_token_id)
    # BlipVisionConfig's default initializer_range is 1e-10 (real BLIP is never trained from scratch): a tower of
    # ~1e-10 weights whose channels all get the same gradient. 0.02 is what every other tower here starts from.
    vision_config = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=tiny.clip_layers,
                         num_attention_heads=2, image_size=tiny.image_size, patch_size=tiny.image_size // 4,
                         initializer_range=0.02)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text_config, vision_config=vision_config,
                                                    projection_dim=tiny.clip_projection_dim))
    image_processor = BlipImageProcessor(size={"height": tiny.image_size, "width": tiny.image_size})
    model.save_pretrained(out)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return _count(model)


def _clip_text_config(tiny: TinyZooConfig, tokenizer) -> dict:
    width = tiny.clip_hidden_size
    return dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=tiny.clip_layers, num_attention_heads=2, max_position_embeddings=77,
                projection_dim=tiny.clip_projection_dim, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_tiny_clip(out: Path, tiny: TinyZooConfig, texts: list[str]) -> int:
    """CLIP dual encoder with its processor (PickScore and CLIP-relevance roles)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from bp_ray.models.tokenizers import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(texts, tiny.clip_vocab_size)
    width = tiny.clip_hidden_size
    vision_config = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=tiny.clip_layers,
                         num_attention_heads=2, image_size=tiny.image_size, patch_size=tiny.image_size // 4,
                         projection_dim=tiny.clip_projection_dim)
    model = CLIPModel(CLIPConfig(text_config=_clip_text_config(tiny, tokenizer), vision_config=vision_config,
                                 projection_dim=tiny.clip_projection_dim))
    image_processor = CLIPImageProcessor(size={"shortest_edge": tiny.image_size},
                                         crop_size={"height": tiny.image_size, "width": tiny.image_size})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return _count(model)


def sd_text_side(tiny: TinyZooConfig, texts: list[str]):
    """(tokenizer, text encoder, scheduler) of a tiny SD: a CLIP BPE trained on `texts`, a random CLIP text
    encoder, and SD 1.x's DDIM noise schedule, so swapping in Euler/DPM schedulers behaves as with the real model."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from bp_ray.models.tokenizers import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(texts, tiny.clip_vocab_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(tiny, tokenizer)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return tokenizer, text_encoder, scheduler


def save_sd_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler) -> int:
    """Write a diffusers StableDiffusionPipeline folder (safetensors, no safety checker); returns its parameters."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return _count(unet) + _count(vae) + _count(text_encoder)


def build_tiny_sd(out: Path, tiny: TinyZooConfig, texts: list[str]) -> int:
    """Stable Diffusion: UNet2DConditionModel + AutoencoderKL + CLIP text encoder + DDIM, in diffusers format."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer, text_encoder, scheduler = sd_text_side(tiny, texts)
    channels = list(tiny.sd_block_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=tiny.sd_latent_channels,
                        block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * len(channels),
                        up_block_types=["UpDecoderBlock2D"] * len(channels), norm_num_groups=min(channels),
                        sample_size=tiny.image_size)
    latent_size = tiny.image_size // 2 ** (len(channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=tiny.sd_latent_channels, out_channels=tiny.sd_latent_channels,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=min(channels),
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"],
        cross_attention_dim=tiny.clip_hidden_size, attention_head_dim=8)
    return save_sd_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)


def tiny_open_clip_config(tiny: TinyZooConfig) -> dict:
    """open_clip model config of a tiny ViT (the aesthetic predictor's image tower)."""
    width = tiny.clip_hidden_size
    return {
        "embed_dim": tiny.clip_projection_dim,
        "vision_cfg": {"image_size": tiny.image_size, "layers": tiny.clip_layers, "width": width,
                       "head_width": width // 2, "patch_size": tiny.image_size // 4},
        "text_cfg": {"context_length": 77, "vocab_size": 1024, "width": width, "heads": 2,
                     "layers": 1},
    }


def build_tiny_aesthetic(out: Path, tiny: TinyZooConfig, texts: list[str]) -> int:
    """open_clip tiny ViT (registered model config) + LAION aesthetic MLP head on its embedding."""
    import open_clip

    config = tiny_open_clip_config(tiny)
    config_dir = out.parent / f".{out.name}-open_clip"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{TINY_OPEN_CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    clip_model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None)
    shutil.rmtree(config_dir)
    head = AestheticHead(input_size=config["embed_dim"])
    spec = AestheticSpec(clip_model=TINY_OPEN_CLIP_NAME, clip_pretrained=None, embed_dim=config["embed_dim"],
                         head_source="random init (tiny zoo)")
    save_aesthetic_folder(out, spec, head, clip_state=clip_model.state_dict(), clip_model_config=config)
    return _count(clip_model) + _count(head)
