"""Aesthetic scores of the images that come with high-quality prompts, for the pair filter."""

from __future__ import annotations

import numpy as np

from bp_ray.config import ModelsConfig
from bp_ray.data import columns as C
from bp_ray.data.prompt_io import load_image


class ImageAesthetic:
    """Ray Data UDF: one aesthetic scorer per actor; NaN where a row has no image."""

    def __init__(self, models_cfg: ModelsConfig):
        from bp_ray.models.loading import load_aesthetic

        self.scorer = load_aesthetic(models_cfg, device=models_cfg.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = np.full(len(batch[C.IMAGE_REF]), np.nan, dtype=np.float32)
        rows = np.flatnonzero(batch[C.IMAGE_REF] != "")
        if len(rows):
            scores[rows] = self.scorer.score([load_image(str(batch[C.IMAGE_REF][i])) for i in rows])
        batch[C.AESTHETIC] = scores
        return batch
