"""Aesthetic predictor: open_clip image tower -> L2-normalised embedding -> LAION MLP head -> scalar.

The head is exactly LAION's "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor):
Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
Linear(16, 1), no activations; d = 768 on CLIP ViT-L/14 (paper preset), smaller in the tiny zoo. Its
published `.pth` state dict loads unchanged (`layers.{0,2,4,6,7}`).

A scorer folder holds `aesthetic_config.json`, `aesthetic_head.safetensors` and, for a locally built CLIP,
`open_clip.safetensors` plus its open_clip model config.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "aesthetic_config.json"
HEAD_NAME = "aesthetic_head.safetensors"
CLIP_WEIGHTS_NAME = "open_clip.safetensors"
CLIP_CONFIG_DIR = "open_clip_config"

LAION_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
                  "6934dd81792f086e613a121dbce43082cb8be85e/sac%2Blogos%2Bava1-l14-linearMSE.pth")
LAION_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


class AestheticHead(nn.Module):
    """LAION improved aesthetic predictor MLP: (B, d) L2-normalised CLIP image embedding -> (B,) score."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


@dataclass
class AestheticSpec:
    """What `aesthetic_config.json` records."""

    clip_model: str
    """open_clip model name (`ViT-L-14`, or the tiny zoo's registered config)."""
    clip_pretrained: str | None
    """open_clip pretrained tag (`openai`); None when weights are in the folder."""
    embed_dim: int
    head_source: str = ""
    """Where the head's weights came from (file and sha256), for provenance."""


def load_laion_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a foreign LAION `.pth` safely: tensors only, mapped to CPU (the file was saved on cuda:0)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise ValueError(f"{path} is not a LAION aesthetic head state dict (expected keys layers.{{0,2,4,6,7}})")
    return {k: v.float().contiguous() for k, v in state.items()}


def head_from_state_dict(state: dict[str, torch.Tensor]) -> AestheticHead:
    head = AestheticHead(input_size=state["layers.0.weight"].shape[1])
    head.load_state_dict(state, strict=True)
    return head.eval()


def save_aesthetic_folder(out_dir: str | Path, spec: AestheticSpec, head: AestheticHead,
                          clip_state: dict[str, torch.Tensor] | None = None,
                          clip_model_config: dict[str, Any] | None = None) -> Path:
    """Write a scorer folder in safetensors; `clip_state` only for CLIP weights not loadable by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_NAME))
    if clip_state is not None:
        save_file({k: v.contiguous() for k, v in clip_state.items()}, str(out / CLIP_WEIGHTS_NAME))
    if clip_model_config is not None:
        (out / CLIP_CONFIG_DIR).mkdir(exist_ok=True)
        (out / CLIP_CONFIG_DIR / f"{spec.clip_model}.json").write_text(json.dumps(clip_model_config, indent=2))
    (out / CONFIG_NAME).write_text(json.dumps(asdict(spec), indent=2))
    return out


def convert_laion_head(pth: str | Path, out_dir: str | Path, clip_model: str = "ViT-L-14",
                       clip_pretrained: str = "openai") -> Path:
    """LAION `.pth` -> scorer folder (safetensors head + config naming the CLIP it expects)."""
    pth = Path(pth)
    state = load_laion_state_dict(pth)
    head = head_from_state_dict(state)
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    spec = AestheticSpec(clip_model=clip_model, clip_pretrained=clip_pretrained, embed_dim=head.input_size,
                         head_source=f"{pth.name} sha256:{digest}")
    return save_aesthetic_folder(out_dir, spec, head)


def fetch_laion_head(url: str, cache_dir: Path, expected_sha256: str | None = None) -> Path:
    """Download a head `.pth` once into `cache_dir` (cluster use; these machines have no internet)."""
    name = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
    target = cache_dir / name
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target) + ".part", progress=False)
        shutil.move(str(target) + ".part", target)
    if expected_sha256 and hashlib.sha256(target.read_bytes()).hexdigest() != expected_sha256:
        raise ValueError(f"{target}: sha256 does not match the published LAION head")
    return target


class AestheticScorer:
    """Scores PIL images with CLIP image embedding -> LAION head, in batches. Higher is better."""

    def __init__(self, clip_model: nn.Module, preprocess: Any, head: AestheticHead, device: str = "cpu"):
        self.clip = clip_model.to(device).eval()
        self.preprocess = preprocess
        self.head = head.to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, d) L2-normalised image embeddings."""
        pixels = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)
        features = self.clip.encode_image(pixels).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def score(self, images: list[Image.Image]) -> np.ndarray:
        """(B,) aesthetic scores (LAION's scale is roughly 1-10 with the real weights)."""
        if not images:
            return np.zeros(0, dtype=np.float32)
        return self.head(self.embed(images)).cpu().numpy().astype(np.float32)


def load_aesthetic_head(path: str | Path) -> tuple[AestheticHead, AestheticSpec]:
    """The head and its spec from a scorer folder, or from a bare head file (then CLIP ViT-L/14 is assumed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"aesthetic scorer not found: {path}")
    if path.is_dir():
        spec = AestheticSpec(**json.loads((path / CONFIG_NAME).read_text()))
        return head_from_state_dict(load_file(str(path / HEAD_NAME))), spec
    state = load_file(str(path)) if path.suffix == ".safetensors" else load_laion_state_dict(path)
    spec = AestheticSpec(clip_model="ViT-L-14", clip_pretrained="openai",
                         embed_dim=state["layers.0.weight"].shape[1], head_source=path.name)
    return head_from_state_dict(state), spec


def load_aesthetic_scorer(path: str | Path, device: str = "cpu", cache_dir: Path | None = None
                          ) -> AestheticScorer:
    """Load a scorer folder, a bare LAION head file (.pth / .safetensors, CLIP ViT-L/14 assumed) or its URL."""
    import open_clip  # heavy import (torchvision); only where an aesthetic scorer is built

    text = str(path)
    if text.startswith(("http://", "https://")):
        expected = LAION_HEAD_SHA256 if text == LAION_HEAD_URL else None
        path = fetch_laion_head(text, cache_dir or Path.home() / ".cache" / "bp-ray" / "aesthetic", expected)
    head, spec = load_aesthetic_head(path)
    folder = Path(path) if Path(path).is_dir() else None
    if folder is not None and (folder / CLIP_CONFIG_DIR).is_dir():
        open_clip.add_model_config(folder / CLIP_CONFIG_DIR)
    clip_model, _, preprocess = open_clip.create_model_and_transforms(
        spec.clip_model, pretrained=spec.clip_pretrained, device="cpu")
    if folder is not None and (folder / CLIP_WEIGHTS_NAME).exists():
        clip_model.load_state_dict(load_file(str(folder / CLIP_WEIGHTS_NAME)), strict=True)
    if head.input_size != spec.embed_dim:
        raise ValueError(f"aesthetic head expects {head.input_size}-d embeddings but {spec.clip_model} "
                         f"gives {spec.embed_dim}-d")
    return AestheticScorer(clip_model, preprocess, head, device)
