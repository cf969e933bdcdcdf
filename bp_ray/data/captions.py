"""Pair source (i): BLIP captions of the images of high-quality prompts become their low prompts."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bp_ray.config import ModelsConfig
from bp_ray.data import columns as C
from bp_ray.data.prompt_io import load_image
from bp_ray.data.prompt_rules import first_line


@torch.no_grad()
def caption_images(model, processor, images: list[Image.Image], max_new_tokens: int) -> list[str]:
    """One greedy caption per image (B images -> B strings)."""
    if not images:
        return []
    inputs = processor(images=[img.convert("RGB") for img in images], return_tensors="pt").to(model.device)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [first_line(text) for text in processor.batch_decode(ids, skip_special_tokens=True)]


class Captioner:
    """Ray Data UDF: holds one BLIP per actor; captions the rows that are high quality and have an image."""

    def __init__(self, models_cfg: ModelsConfig, max_new_tokens: int):
        from bp_ray.models.loading import load_captioner

        self.model, self.processor = load_captioner(models_cfg.captioner, models_cfg, device=models_cfg.device)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = np.flatnonzero((batch[C.QUALITY] == "high") & (batch[C.IMAGE_REF] != ""))
        captions = np.full(len(batch[C.QUALITY]), "", dtype=object)
        images = [load_image(str(batch[C.IMAGE_REF][i])) for i in wanted]
        for i, caption in zip(wanted, caption_images(self.model, self.processor, images, self.max_new_tokens),
                              strict=True):
            captions[i] = caption
        batch[C.CAPTION] = captions
        return batch
