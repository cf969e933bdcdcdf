"""Ground truth of the miniature world, computed from pixels alone: an aesthetic score and the object colours.

No model is involved, so these judge every model of the pipeline (the learned aesthetic head included) from
outside. The aesthetic is a weighted sum of five terms in [0, 1], scaled to LAION's 0..10:
contrast of the objects against the background, vividness of their colours, cleanliness (no grain),
sharpness of their edges and a centred composition.
"""

from __future__ import annotations

import numpy as np

from bp_ray.world.scenes import COLOURS, parse_description

WEIGHTS = {"contrast": 0.3, "vividness": 0.15, "cleanliness": 0.2, "sharpness": 0.2, "composition": 0.15}
SALIENT = 0.15
"""A pixel belongs to an object when its colour is this far (RGB distance / sqrt 3) from the background."""
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255
_NAMES = list(COLOURS)


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.astype(np.float32)


def _median3(image: np.ndarray) -> np.ndarray:
    """3x3 median per channel: removes grain, keeps edges (so grain never passes for sharpness)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    stack = np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return np.median(stack, axis=0)


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def saliency(image: np.ndarray) -> np.ndarray:
    """(H, W) distance of each pixel's colour from the background colour, in [0, 1]."""
    smooth = _median3(image)
    return np.linalg.norm(smooth - background_colour(smooth), axis=-1) / np.sqrt(3)


def aesthetic_terms(image: np.ndarray) -> dict[str, float]:
    """The five terms of the ground-truth aesthetic, each in [0, 1]."""
    image = _as_float(image)
    smooth = _median3(image)
    dist = np.linalg.norm(smooth - background_colour(smooth), axis=-1) / np.sqrt(3)
    mask = dist > SALIENT
    if mask.sum() < 2:
        grain = float(np.median(np.abs(image - smooth)))
        return {"contrast": 0.0, "vividness": 0.0, "cleanliness": float(np.clip(1 - grain / 0.05, 0, 1)),
                "sharpness": 0.0, "composition": 0.0}
    contrast_raw = float(dist[mask].mean())
    rgb = smooth[mask]
    saturation = (rgb.max(axis=1) - rgb.min(axis=1)) / np.maximum(rgb.max(axis=1), 1e-3)
    grain = float(np.median(np.abs(image - smooth)))  # median: edges are a minority of pixels
    steps = np.maximum(np.abs(np.diff(dist, axis=0))[:, :-1], np.abs(np.diff(dist, axis=1))[:-1])
    sharp_raw = float(np.percentile(steps, 99)) / max(contrast_raw, 1e-3)
    ys, xs = np.nonzero(mask)
    weights = dist[ys, xs]
    h, w = dist.shape
    cy, cx = (ys * weights).sum() / weights.sum() / (h - 1), (xs * weights).sum() / weights.sum() / (w - 1)
    off_centre = float(np.hypot(cx - 0.5, cy - 0.5))
    return {
        "contrast": float(np.clip(contrast_raw / 0.55, 0, 1)),
        "vividness": float(np.clip(saturation.mean(), 0, 1)),
        "cleanliness": float(np.clip(1 - grain / 0.05, 0, 1)),
        "sharpness": float(np.clip((sharp_raw - 0.2) / 0.6, 0, 1)),
        "composition": float(np.clip(1 - off_centre / 0.35, 0, 1)),
    }


def true_aesthetic(image: np.ndarray) -> float:
    """Ground-truth aesthetic of an RGB image (uint8 or float in [0, 1]), on LAION's 0..10 scale."""
    terms = aesthetic_terms(image)
    return 10.0 * sum(WEIGHTS[name] * value for name, value in terms.items())


def colour_shares(image: np.ndarray) -> dict[str, float]:
    """Share of the object pixels nearest to each palette colour, weighted by saliency (empty: no object)."""
    image = _as_float(image)
    dist = saliency(image)
    mask = dist > SALIENT
    if not mask.any():
        return {}
    pixels = _median3(image)[mask]
    nearest = np.argmin(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
    totals = np.bincount(nearest, weights=dist[mask], minlength=len(_NAMES))
    return {name: float(share) for name, share in zip(_NAMES, totals / totals.sum(), strict=True)}


def dominant_colour(image: np.ndarray) -> str | None:
    shares = colour_shares(image)
    return max(shares, key=shares.get) if shares else None


def colours_match(image: np.ndarray, request: str, min_share: float = 0.2) -> bool | None:
    """Whether the image shows the colours of the coloured shapes a request names (the world's relevance
    check): one object's colour must dominate, each of two must hold min_share. None when it names none."""
    wanted = [obj.colour for obj in parse_description(request).objects]
    if not wanted:
        return None
    shares = colour_shares(image)
    if not shares:
        return False
    if len(wanted) == 1:
        return max(shares, key=shares.get) == wanted[0]
    return all(shares[c] >= min_share for c in wanted)
