"""Ground truth of the miniature world, computed from pixels alone: an aesthetic score and the object colours.

No model is involved, so these judge every model of the pipeline (the learned aesthetic head included) from
outside. The aesthetic is a weighted sum of five terms in [0, 1], scaled to LAION's 0..10:
contrast of the objects against the background, vividness of their colours, cleanliness (no grain),
sharpness of their edges and a centred composition.
"""

from __future__ import annotations

import numpy as np

from bp_ray.embedded.world.scenes import COLOURS, parse_description

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


# --- shapes and count -------------------------------------------------------------------------------------------

OBJECT_FLOOR = 0.06
"""Lowest saliency an object pixel may have: below SALIENT, so that low-contrast objects are still found."""
MIN_OBJECT_PIXELS = 6
"""A connected salient region smaller than this is a speck, not an object (a small object covers ~25 pixels)."""


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 4-connected regions of `mask` with at least MIN_OBJECT_PIXELS pixels, largest first."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= MIN_OBJECT_PIXELS]
    return [labels == i for i in keep]


def shape_of(region: np.ndarray) -> str:
    """circle / square / triangle of one object's pixel mask. The apex-up triangle puts most of its pixels in the
    lower half of its bounding box; a square, unlike a circle, fills the corners outside the box's inscribed
    ellipse (thresholds fitted on the renderer's own scenes: 85% right over all styles, 91% without blur or
    low contrast)."""
    ys, xs = np.nonzero(region)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = bottom - top + 1, right - left + 1
    middle = (top + bottom) / 2
    lower, upper = float((ys > middle).sum()), float((ys < middle).sum())
    if lower > 1.3 * max(upper, 1.0) and len(ys) / (height * width) < 0.8:
        return "triangle"
    ellipse = ((ys - middle) / (height / 2)) ** 2 + ((xs - (left + right) / 2) / (width / 2)) ** 2
    return "square" if float((ellipse > 1.0).mean()) > 0.05 else "circle"


def _object_regions(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(median-filtered image, saliency, object regions) of an RGB image."""
    image = _as_float(image)
    smooth = _median3(image)
    dist = np.linalg.norm(smooth - background_colour(smooth), axis=-1) / np.sqrt(3)
    # Half the image's peak saliency, not the fixed SALIENT cut: a glow or blur halo must not join two objects or
    # round a square's corners.
    cut = max(OBJECT_FLOOR, 0.5 * float(dist.max()))
    return smooth, dist, _regions(dist > cut)


def _region_colour(smooth: np.ndarray, dist: np.ndarray, region: np.ndarray, background: np.ndarray) -> str:
    """The palette colour an object region is painted in: the one whose direction from the background best
    matches the region's brightest pixels' (a faded, low-contrast object keeps its direction, not its value)."""
    strength = dist[region]
    core = smooth[region][strength >= np.median(strength)]
    offset = core.mean(axis=0) - background
    directions = _PALETTE - background
    cosine = directions @ offset / (np.linalg.norm(directions, axis=1) * max(np.linalg.norm(offset), 1e-6) + 1e-9)
    return _NAMES[int(np.argmax(cosine))]


def objects_seen(image: np.ndarray) -> list[tuple[str, str]]:
    """(colour, shape) of every object region in the image, largest first."""
    smooth, dist, regions = _object_regions(image)
    background = background_colour(smooth)
    return [(_region_colour(smooth, dist, region, background), shape_of(region)) for region in regions]


def object_count(image: np.ndarray) -> int:
    return len(_object_regions(image)[2])


def colours_match(image: np.ndarray, request: str) -> bool | None:
    """Whether the image shows the colours of the coloured shapes a request names (the world's relevance check):
    the largest object has the colour of a one-object request; each colour of a two-object request is the colour
    of some object. None when the request names no coloured shape."""
    wanted = [obj.colour for obj in parse_description(request).objects]
    if not wanted:
        return None
    seen = [colour for colour, _ in objects_seen(image)]
    if len(wanted) == 1:
        return seen[:1] == wanted
    return set(wanted) <= set(seen)


def shapes_match(image: np.ndarray, request: str) -> bool | None:
    """Whether every coloured shape the request names is drawn with its shape: a region of its colour has that
    shape. None when the request names none."""
    wanted = [(obj.colour, obj.shape) for obj in parse_description(request).objects]
    if not wanted:
        return None
    seen = objects_seen(image)
    return all(any(colour == c and shape == s for c, s in seen) for colour, shape in wanted)


def count_matches(image: np.ndarray, request: str) -> bool | None:
    """Whether the image shows as many objects as the request names (one or two). None when it names none."""
    wanted = parse_description(request).objects
    if not wanted:
        return None
    return object_count(image) == len(wanted)


def world_truth_scores(pixels: np.ndarray, requests: list[str]) -> np.ndarray:
    """(P, S, 4): ground-truth aesthetic, colour, shape and count match (1/0; NaN when a request names no coloured
    shape) of (P, S, H, W, 3) images, each judged against its user request: the `world_truth` eval metric."""
    def flag(value: bool | None) -> float:
        return np.nan if value is None else float(value)

    out = np.full((*pixels.shape[:2], 4), np.nan)
    for p, request in enumerate(requests):
        for s in range(pixels.shape[1]):
            image = pixels[p, s]
            out[p, s] = (true_aesthetic(image), flag(colours_match(image, request)),
                         flag(shapes_match(image, request)), flag(count_matches(image, request)))
    return out
