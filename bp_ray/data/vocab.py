"""The tag vocabulary shipped in bp_ray/resources/vocab.json: subjects, settings, styles, artists, ..."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

_LIST_FIELDS = (
    "subjects", "settings", "styles", "artists", "quality", "lighting", "colors", "negative_terms",
    "nsfw_terms", "political_terms",
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
    color_rgb: Mapping[str, tuple[int, int, int]]
    """Colour word -> RGB, used to tint the synthetic images."""


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
    # MappingProxyType: the cached Vocab is shared, so nobody may mutate it.
    return Vocab(**lists, color_rgb=MappingProxyType(color_rgb))


def tag_terms(vocab: Vocab) -> frozenset[str]:
    """Lower-cased style, artist, quality and lighting tags: the words that make a prompt "beautiful"."""
    return frozenset(t.lower() for t in (*vocab.styles, *vocab.artists, *vocab.quality, *vocab.lighting))
