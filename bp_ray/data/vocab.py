"""The tag vocabulary shipped in bp_ray/resources/vocab.json: subjects, settings, styles, artists, ..."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

_LIST_FIELDS = (
    "subjects", "settings", "styles", "artists", "quality", "lighting", "colors", "negative_terms",
    "nsfw_terms", "political_terms", "overused_terms",
)


@dataclass(frozen=True)
class Vocab:
    """Word lists used to build synthetic prompts and, later, to recognise tags in real ones."""

    subjects: tuple[str, ...]
    settings: tuple[str, ...]
    styles: tuple[str, ...]
    artists: tuple[str, ...]
    quality: tuple[str, ...]
    lighting: tuple[str, ...]
    colors: tuple[str, ...]
    negative_terms: tuple[str, ...]
    """Terms seen after "--no" / "Negative prompt:"."""
    nsfw_terms: tuple[str, ...]
    """Mild keywords of the kind DiffusionDB-style NSFW / gore filters catch."""
    political_terms: tuple[str, ...]
    overused_terms: tuple[str, ...]
    """The keyword soup people complain about ("trending on artstation", "8k", ...): what the endpoint avoids
    adding by default."""
    color_rgb: Mapping[str, tuple[int, int, int]]
    """Colour word -> RGB, used to tint the synthetic images."""
    style_families: Mapping[str, tuple[str, ...]]
    """Style family ("photo", "painting", "anime", "3d") -> its common prompt phrases, which the endpoint's
    `style` control favours at decoding."""


@lru_cache(maxsize=1)
def load_vocab() -> Vocab:
    """Read and validate bp_ray/resources/vocab.json once per process."""
    text = resources.files("bp_ray").joinpath("resources/vocab.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    lists = {}
    for name in _LIST_FIELDS:
        values = raw.get(name)
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise ValueError(f"vocab.json: {name!r} must be a non-empty list of non-empty strings")
        lists[name] = tuple(values)
    color_rgb = {name: tuple(rgb) for name, rgb in raw.get("color_rgb", {}).items()}
    missing = [c for c in lists["colors"] if c not in color_rgb]
    if missing:
        raise ValueError(f"vocab.json: colours without an entry in 'color_rgb': {missing}")
    families = raw.get("style_families")
    if not isinstance(families, dict) or not families:
        raise ValueError("vocab.json: 'style_families' must be a non-empty object of family -> phrases")
    for family, phrases in families.items():
        if not phrases or not isinstance(phrases, list) or not all(isinstance(v, str) and v.strip() for v in phrases):
            raise ValueError(f"vocab.json: style family {family!r} must be a non-empty list of non-empty strings")
    # The default avoid list would ban a phrase that is in both, so a style could never add it.
    overused = {term.lower() for term in lists["overused_terms"]}
    clashes = sorted({p for phrases in families.values() for p in phrases if p.lower() in overused})
    if clashes:
        raise ValueError(f"vocab.json: style family phrases also in 'overused_terms': {clashes}")
    # MappingProxyType: the cached Vocab is shared, so nobody may mutate it.
    return Vocab(**lists, color_rgb=MappingProxyType(color_rgb),
                 style_families=MappingProxyType({family: tuple(phrases) for family, phrases in families.items()}))


def tag_terms(vocab: Vocab) -> frozenset[str]:
    """Lower-cased style, artist, quality and lighting tags: the words that make a prompt "beautiful"."""
    return frozenset(t.lower() for t in (*vocab.styles, *vocab.artists, *vocab.quality, *vocab.lighting))
