"""The shapes zoo: the paper preset's models at their real dimensions, with random weights.

The hub is out of reach here, but the architectures are public: `bp_ray/embedded/shapes/*.json` copy the
hyperparameters of BLOOM-1b1, BLIP-large, Stable Diffusion 1.5, PickScore's CLIP ViT-H/14, CLIP ViT-L/14 and the
LAION aesthetic predictor's open_clip ViT-L-14. Each role is built from them with random weights and a tokenizer of
its family at the real vocabulary size, and saved in the format its loader reads, so `--preset paper-shapes` runs
every stage with the memory, dtypes and token limits of real sizes. Roles are built one by one on first use (or by
`bp-ray models build-shapes`) and cached: changing the LM's layers rebuilds only the LM.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bp_ray.config import ModelsConfig
from bp_ray.embedded.config import ShapesConfig
from bp_ray.embedded.tiny_zoo import save_sd_pipeline
from bp_ray.models.aesthetic import AestheticHead, AestheticSpec, save_aesthetic_folder
from bp_ray.models.model_cache import MANIFEST, ZooSummary, build_zoo, default_zoo_dir

logger = logging.getLogger(__name__)

SHAPES_ROLES = ("bloom", "blip", "sd", "pickscore", "clip", "aesthetic")
ARCHITECTURES = {"bloom": "bloom-1b1", "blip": "blip-large", "sd": "sd-1.5", "pickscore": "clip-vit-h-14",
                 "clip": "clip-vit-l-14", "aesthetic": "aesthetic-vit-l-14"}
"""Role -> its architecture file in bp_ray/embedded/shapes/."""
BUILDER_VERSION = 1


def architecture(role: str) -> dict[str, Any]:
    """The public hyperparameters of a role's real model (keys starting with `_` are notes)."""
    text = (resources.files("bp_ray.embedded") / "shapes" / f"{ARCHITECTURES[role]}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def role_key(role: str, shapes: ShapesConfig) -> str:
    """Hash of what a role is built from: another key means rebuild that role."""
    settings = asdict(shapes) if role == "bloom" else {k: v for k, v in asdict(shapes).items() if k != "lm_layers"}
    payload = json.dumps({"role": role, "architecture": architecture(role), "settings": settings,
                          "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shapes_dir(models_cfg: ModelsConfig) -> Path:
    return default_zoo_dir(models_cfg) / "shapes"


def _is_current(folder: Path, key: str) -> bool:
    manifest = folder / MANIFEST
    return manifest.exists() and json.loads(manifest.read_text()).get("key") == key


def ensure_shapes_role(role: str, models_cfg: ModelsConfig) -> Path:
    """Folder of one role, built first if missing or built from other settings."""
    folder = shapes_dir(models_cfg) / role
    if not _is_current(folder, role_key(role, models_cfg.zoo["shapes"])):
        build_shapes_role(folder, role, models_cfg.zoo["shapes"])
    return folder


def build_shapes_role(folder: Path, role: str, shapes: ShapesConfig, force: bool = False) -> ZooSummary:
    """Build one role into `folder` (atomically, under a lock); deterministic for a seed."""
    key = role_key(role, shapes)

    def build(staging: Path) -> dict:
        torch.manual_seed(shapes.seed * 1000 + SHAPES_ROLES.index(role))
        count = BUILDERS[role](staging, architecture(role), shapes, _tokenizer_texts(shapes))
        manifest = {"key": key, "role": role, "architecture": ARCHITECTURES[role], "settings": asdict(shapes),
                    "builder": BUILDER_VERSION, "parameters": {role: count}}
        if role == "bloom":  # the real depth, for estimates made from a model built with fewer layers
            manifest["full_layers"] = architecture(role)["n_layer"]
        return manifest

    return build_zoo(folder, lambda: _is_current(folder, key), build, force)


def _tokenizer_texts(shapes: ShapesConfig) -> list[str]:
    from bp_ray.data.corpus import generate_prompts

    prompts = generate_prompts(shapes.tokenizer_corpus_rows, seed=shapes.seed)
    return [p for p in prompts if isinstance(p, str) and p.strip()]


def _count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


# --- the models, from the architecture files (also instantiable on the meta device, to count parameters) --------

def bloom_model(arch: dict[str, Any], layers: int = 0) -> Any:
    from transformers import BloomConfig, BloomForCausalLM

    settings = {k: v for k, v in arch.items() if k not in ("model_type", "tokenizer_size")}
    return BloomForCausalLM(BloomConfig(**{**settings, "n_layer": layers or settings["n_layer"]}))


def blip_model(arch: dict[str, Any], token_ids: dict[str, int] | None = None) -> Any:
    from transformers import BlipConfig, BlipForConditionalGeneration

    text = {**arch["text_config"], **(token_ids or {})}
    return BlipForConditionalGeneration(BlipConfig(
        text_config=text, vision_config=arch["vision_config"], projection_dim=arch["projection_dim"],
        image_text_hidden_size=arch["image_text_hidden_size"]))


def clip_model(arch: dict[str, Any], token_ids: dict[str, int] | None = None) -> Any:
    from transformers import CLIPConfig, CLIPModel

    text = {**arch["text_config"], "projection_dim": arch["projection_dim"], **(token_ids or {})}
    vision = {**arch["vision_config"], "projection_dim": arch["projection_dim"]}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["projection_dim"],
                                logit_scale_init_value=arch["logit_scale_init_value"]))


def sd_models(arch: dict[str, Any], token_ids: dict[str, int] | None = None) -> tuple[Any, Any, Any]:
    """(unet, vae, text encoder) of SD 1.5."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"], **(token_ids or {})))
    return UNet2DConditionModel(**arch["unet"]), AutoencoderKL(**arch["vae"]), text_encoder


def aesthetic_models(arch: dict[str, Any], device: str = "cpu") -> tuple[Any, AestheticHead]:
    """(open_clip model, LAION head)."""
    import open_clip

    clip = open_clip.create_model(arch["open_clip_model"], pretrained=None, device=device)
    return clip, AestheticHead(arch["embed_dim"])


# --- builders: (out folder, architecture, settings, tokenizer texts) -> parameters ------------------------------

def build_bloom(out: Path, arch: dict[str, Any], shapes: ShapesConfig, texts: list[str]) -> int:
    from bp_ray.models.tokenizers import train_bloom_tokenizer

    tokenizer = train_bloom_tokenizer(texts, shapes.trained_tokens, pad_to=arch["tokenizer_size"])
    model = bloom_model(arch, shapes.lm_layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _count(model)


def build_blip(out: Path, arch: dict[str, Any], shapes: ShapesConfig, texts: list[str]) -> int:
    from transformers import BlipImageProcessor, BlipProcessor

    from bp_ray.models.tokenizers import train_bert_tokenizer

    tokenizer = train_bert_tokenizer(texts, shapes.trained_tokens, pad_to=arch["tokenizer_size"])
    tokenizer.model_max_length = arch["model_max_length"]
    model = blip_model(arch, {"bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
                              "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.sep_token_id})
    model.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(**arch["image_processor"]),
                  tokenizer=tokenizer).save_pretrained(out)
    return _count(model)


def _clip_token_ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_clip(out: Path, arch: dict[str, Any], shapes: ShapesConfig, texts: list[str]) -> int:
    from transformers import CLIPImageProcessor, CLIPProcessor

    from bp_ray.models.tokenizers import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(texts, shapes.trained_tokens, pad_to=arch["tokenizer_size"])
    model = clip_model(arch, _clip_token_ids(tokenizer))
    size = arch["image_processor"]
    processor = CLIPImageProcessor(size={"shortest_edge": size["size"]},
                                   crop_size={"height": size["crop_size"], "width": size["crop_size"]})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return _count(model)


def build_sd(out: Path, arch: dict[str, Any], shapes: ShapesConfig, texts: list[str]) -> int:
    import diffusers

    from bp_ray.models.tokenizers import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(texts, shapes.trained_tokens, pad_to=arch["tokenizer_size"])
    unet, vae, text_encoder = sd_models(arch, _clip_token_ids(tokenizer))
    scheduler_settings = dict(arch["scheduler"])
    scheduler = getattr(diffusers, scheduler_settings.pop("_class_name")).from_config(scheduler_settings)
    return save_sd_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)


def build_aesthetic(out: Path, arch: dict[str, Any], shapes: ShapesConfig, texts: list[str]) -> int:
    clip, head = aesthetic_models(arch)
    spec = AestheticSpec(clip_model=arch["open_clip_model"], clip_pretrained=None, embed_dim=arch["embed_dim"],
                         head_source="random init (shapes zoo)")
    save_aesthetic_folder(out, spec, head, clip_state=clip.state_dict())
    return _count(clip, head)


BUILDERS: dict[str, Callable[[Path, dict[str, Any], ShapesConfig, list[str]], int]] = {
    "bloom": build_bloom, "blip": build_blip, "sd": build_sd, "pickscore": build_clip, "clip": build_clip,
    "aesthetic": build_aesthetic,
}
