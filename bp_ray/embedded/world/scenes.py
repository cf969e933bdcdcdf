"""The miniature world: seedable scenes of coloured shapes, their two descriptions, and a renderer to pixels.

A scene is one or two objects (colour, shape, size) plus style phrases. The plain description names only what
is drawn ("a red circle and a blue square"); the detailed one adds sizes, the relation and the style phrases
("a large red circle above a small blue square, dark background, high contrast, sharp"). Whatever a
description leaves open (position, background, blur, grain...) the renderer draws from its seed, so a plain
prompt yields varied images and each style phrase pins one property down, in a direction the world's
ground-truth aesthetic (`bp_ray.embedded.world.truth`) rewards or penalises.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40),
    "green": (40, 170, 60), "blue": (40, 90, 225), "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")

STYLE_GROUPS: dict[str, tuple[str, ...]] = {
    "background": ("dark background", "light background"),
    "contrast": ("high contrast", "low contrast"),
    "focus": ("sharp", "blurry"),
    "texture": ("smooth", "grainy"),
    "composition": ("centered",),
    "glow": ("glowing",),
}
"""At most one phrase per group; a group a description leaves out is drawn at random by the renderer."""

STYLE_WORDS = tuple(word for group in STYLE_GROUPS.values() for word in group)
GOOD_STYLES = ("dark background", "light background", "high contrast", "sharp", "smooth", "centered")
BAD_STYLES = ("low contrast", "blurry", "grainy", "glowing")
"""The direction each phrase moves the ground-truth aesthetic, against leaving its group unspecified
(`glowing` lowers it: its halo softens the edges and the contrast)."""


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    size: str | None = None
    """`small` / `large`, or None when the description does not say (the renderer picks)."""

    def plain(self) -> str:
        return f"{_article(self.colour)} {self.colour} {self.shape}"

    def detailed(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}" if self.size else self.plain()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    relation: str | None = None
    """Where the first of two objects is relative to the second; None leaves it to the renderer."""
    styles: tuple[str, ...] = field(default_factory=tuple)

    def plain(self) -> str:
        return " and ".join(obj.plain() for obj in self.objects)

    def detailed(self) -> str:
        objects = [obj.detailed() for obj in self.objects]
        subject = f" {self.relation} ".join(objects) if self.relation else " and ".join(objects)
        return ", ".join([subject, *self.styles])

    def style_group(self, group: str) -> str | None:
        return next((s for s in self.styles if s in STYLE_GROUPS[group]), None)


def sample_scene(rng: np.random.Generator, min_styles: int = 3, max_styles: int = 6,
                 two_object_p: float = 0.35) -> Scene:
    """A random scene with sizes, a relation for two objects, and min..max style phrases (distinct groups)."""
    count = 2 if rng.random() < two_object_p else 1
    objects = []
    for _ in range(count):
        colour = str(rng.choice([c for c in COLOURS if all(o.colour != c for o in objects)]))
        objects.append(WorldObject(colour, str(rng.choice(SHAPES)), str(rng.choice(SIZES))))
    relation = str(rng.choice(RELATIONS)) if count == 2 else None
    groups = [g for g in STYLE_GROUPS if not (g == "composition" and count == 2)]
    chosen = rng.choice(groups, size=int(rng.integers(min_styles, min(max_styles, len(groups)) + 1)), replace=False)
    styles = tuple(str(rng.choice(STYLE_GROUPS[g])) for g in STYLE_GROUPS if g in set(chosen))
    return Scene(tuple(objects), relation, styles)


def sample_scenes(num: int, seed: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(num)]


# --- text -> scene ----------------------------------------------------------------------------------------

_OBJECT = re.compile(rf"\b(?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?\b")
_RELATION = re.compile(rf"\b({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) (?:an? )?(?:(?:small|large) )?"
                       rf"(?:{'|'.join(COLOURS)}) ")


def parse_description(text: str) -> Scene:
    """The scene a description asks for: its first two coloured shapes, relation and style phrases.

    Unknown words are ignored, so any prompt parses; one naming no coloured shape gives a scene with no objects.
    """
    lowered = " ".join(text.lower().split())
    objects = tuple(WorldObject(colour, shape, size or None)
                    for size, colour, shape in _OBJECT.findall(lowered))[:2]
    relation_match = _RELATION.search(lowered)
    relation = relation_match.group(2) if relation_match and len(objects) == 2 else None
    styles = []
    for group in STYLE_GROUPS.values():
        found = [(lowered.find(word), word) for word in group if re.search(rf"\b{word}\b", lowered)]
        if found:
            styles.append(min(found)[1])  # contradictory phrases: the first one written wins
    return Scene(objects, relation, tuple(styles))


# --- scene -> pixels --------------------------------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cx, cy) with half-size r (unit coordinates)."""
    px = 1.0 / xs.shape[0]
    if shape == "circle":
        signed = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - r
    elif shape == "square":
        signed = np.maximum(np.abs(xs - cx), np.abs(ys - cy)) - r * 0.85
    else:  # triangle, apex up: inside the base line and both slanted edges
        top, bottom = cy - r, cy + r * 0.8
        half_width = (ys - top) / (bottom - top) * r * 1.1
        signed = np.maximum(np.maximum(ys - bottom, top - ys), np.abs(xs - cx) - np.maximum(half_width, 0) * 0.9)
    return np.clip(0.5 - signed / px, 0.0, 1.0)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(w * padded[:, i:i + image.shape[1]] for i, w in enumerate(taps))
    return sum(w * rows[i:i + image.shape[0]] for i, w in enumerate(taps))


def _placements(scene: Scene, rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]]:
    if len(scene.objects) == 1:
        if scene.style_group("composition") == "centered":
            return [(0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02))]
        r = radii[0]
        return [tuple(rng.uniform(r + 0.02, 1 - r - 0.02, size=2))]
    relation = scene.relation or str(rng.choice(RELATIONS))
    along, across = rng.uniform(0.25, 0.32), rng.uniform(0.35, 0.65)
    first, second = 0.5 - along, 0.5 + along  # the first object's coordinate along the relation's axis
    if relation in ("below", "right of"):
        first, second = second, first
    if relation in ("above", "below"):
        return [(across, first), (1 - across, second)]
    return [(first, across), (second, 1 - across)]


def render_scene(scene: Scene, seed: int, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8 image of the scene; what the scene leaves open is drawn from `seed`."""
    rng = np.random.default_rng(seed)
    background = scene.style_group("background")
    if background == "dark background":
        bg = _hsv(rng.random(), rng.uniform(0.2, 0.5), rng.uniform(0.04, 0.12))
    elif background == "light background":
        bg = _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.88, 0.96))
    else:  # unspecified: a dull mid-tone
        bg = _hsv(rng.random(), rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.7))

    contrast = scene.style_group("contrast")
    fade = {"high contrast": 0.0, "low contrast": rng.uniform(0.55, 0.7)}.get(contrast, rng.uniform(0.0, 0.4))
    glow = scene.style_group("glow") == "glowing"
    ys, xs = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    image = np.broadcast_to(bg, (size, size, 3)).copy()
    objects = list(scene.objects)
    radii = [{"small": rng.uniform(0.13, 0.17), "large": rng.uniform(0.26, 0.31)}.get(
        obj.size or str(rng.choice(SIZES))) * (0.8 if len(objects) == 2 else 1.0) for obj in objects]
    for obj, radius, (cx, cy) in zip(objects, radii, _placements(scene, rng, radii), strict=True):
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) / 255
        colour = (1 - fade) * colour + fade * bg
        if glow:
            halo = np.exp(-(((xs - cx) ** 2 + (ys - cy) ** 2) / (1.6 * radius) ** 2))[..., None] * 0.55
            image = image * (1 - halo) + colour * halo
        coverage = _shape_mask(obj.shape, cx, cy, radius, xs, ys)[..., None]
        image = image * (1 - coverage) + colour * coverage

    focus = scene.style_group("focus")
    sigma = {"sharp": 0.0, "blurry": rng.uniform(1.3, 1.8)}.get(focus, rng.uniform(0.0, 1.0))
    image = _blur(image, sigma * size / 32)
    texture = scene.style_group("texture")
    grain = {"smooth": 0.0, "grainy": rng.uniform(0.1, 0.14)}.get(texture, rng.uniform(0.0, 0.06))
    image = image + rng.normal(0, grain, size=image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_text(text: str, seed: int, size: int = 32) -> np.ndarray:
    """Render whatever scene a description asks for (its objects and style phrases)."""
    return render_scene(parse_description(text), seed, size)
