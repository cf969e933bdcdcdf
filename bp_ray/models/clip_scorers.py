"""CLIP-based image-text scorers: PickScore (preference) and CLIP relevance.

PickScore (Kirstain et al. 2023) = logit_scale.exp() * cos(text_emb, image_emb) with the PickScore_v1 CLIP;
relevance = cos(text_emb, image_emb) with a plain CLIP. Both take paired lists: image i is scored against text i.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel


def _features(output: object) -> torch.Tensor:
    # transformers 5 may return an output object from get_*_features instead of a tensor.
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]


class ClipScorer:
    """Paired image-text scores with a Hugging Face CLIP model; `use_logit_scale` makes it PickScore."""

    def __init__(self, model: CLIPModel, processor: object, device: str = "cpu", use_logit_scale: bool = True):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.use_logit_scale = use_logit_scale

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings."""
        pixels = self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        emb = _features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(B, D) L2-normalised text embeddings; texts beyond the 77-token window are truncated."""
        tokens = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        emb = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                     attention_mask=tokens["attention_mask"].to(self.device)))
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def score(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """(B,) score of image i against text i."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; they are scored in pairs")
        if not images:
            return np.zeros(0, dtype=np.float32)
        cosine = (self.embed_images(images) * self.embed_texts(texts)).sum(dim=-1)
        scale = self.model.logit_scale.exp() if self.use_logit_scale else 1.0
        return (scale * cosine).float().cpu().numpy()
