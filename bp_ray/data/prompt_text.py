"""Synthetic prompt text in the styles DiffusionDB users write: plain, tag-rich, NSFW, political, malformed.

Pure functions of a numpy Generator and the shipped vocabulary; the corpus generator decides how many of each.
"""

import numpy as np

from bp_ray.data.vocab import Vocab

_FRAMINGS = (
    "portrait of", "a photo of", "concept art of", "an illustration of", "a painting of", "a close up of",
    "a beautiful render of", "a cinematic shot of",
)
_WEIGHTS = (1.1, 1.2, 1.3, 1.4, 1.5)
_JUNK = "!?.,;:*#@&%~^()[]{}<>/\\|-_=+"
_EMOJI = ("🔥", "✨", "😍", "🎨", "💀", "🌈", "👀", "🤖")
MALFORMED_SHAPES = ("empty", "whitespace", "too_long", "junk", "unbalanced_weights", "control_chars")

def _pick(rng: np.random.Generator, options: tuple | list):
    return options[int(rng.integers(len(options)))]


def _sample(rng: np.random.Generator, options: tuple | list, k: int) -> list:
    return [options[i] for i in rng.choice(len(options), size=min(k, len(options)), replace=False)]


def _bare(subject: str) -> str:
    """'a cat' -> 'cat', 'an owl' -> 'owl'."""
    for article in ("a ", "an "):
        if subject.startswith(article):
            return subject[len(article):]
    return subject


def plain_prompt(rng: np.random.Generator, vocab: Vocab) -> str:
    text = _pick(rng, vocab.subjects)
    if rng.random() < 0.6:
        text = f"{text} {_pick(rng, vocab.settings)}"
    style = rng.random()
    if style < 0.15:
        text = text[0].upper() + text[1:] + "."  # caption style, as in COCO
    elif style < 0.25:
        text = _bare(text)
    return text


def _tags(rng: np.random.Generator, vocab: Vocab, k: int) -> list[str]:
    """k distinct modifiers drawn from styles (30%), quality (40%), lighting (15%) and artists (15%)."""
    tags: list[str] = []
    while len(tags) < k:
        r = rng.random()
        if r < 0.30:
            tag = _pick(rng, vocab.styles)
        elif r < 0.70:
            tag = _pick(rng, vocab.quality)
        elif r < 0.85:
            tag = _pick(rng, vocab.lighting)
        else:
            tag = _artist_phrase(rng, vocab)
        if tag not in tags:
            tags.append(tag)
    return tags


def _artist_phrase(rng: np.random.Generator, vocab: Vocab) -> str:
    first, second = _sample(rng, vocab.artists, 2)
    r = rng.random()
    if r < 0.45:
        return f"by {first}"
    if r < 0.65:
        return f"art by {first} and {second}"
    if r < 0.80:
        return f"by {first}, {second}"
    return first


def _emphasise(rng: np.random.Generator, tag: str) -> str:
    """A1111 weight syntax: (tag:1.2), ((tag)), [tag]."""
    r = rng.random()
    if r < 0.5:
        return f"({tag}:{_pick(rng, _WEIGHTS)})"
    if r < 0.8:
        return f"(({tag}))"
    return f"[{tag}]"


def rich_prompt(rng: np.random.Generator, vocab: Vocab) -> str:
    head = _pick(rng, vocab.subjects)
    if rng.random() < 0.35:
        head = f"{_pick(rng, _FRAMINGS)} {head}"
    if rng.random() < 0.7:
        head = f"{head} {_pick(rng, vocab.settings)}"
    tags = _tags(rng, vocab, int(rng.integers(2, 9)))
    if rng.random() < 0.25:
        first, second = _sample(rng, vocab.colors, 2)
        tags.insert(int(rng.integers(len(tags) + 1)), f"{first} and {second} color scheme")
    if rng.random() < 0.25:
        emphasised = rng.random(len(tags)) < 0.35
        emphasised[int(rng.integers(len(tags)))] = True
        tags = [_emphasise(rng, t) if e else t for t, e in zip(tags, emphasised, strict=True)]
    text = ", ".join([head, *tags])
    r = rng.random()
    if r < 0.06:
        text += " --no " + ", ".join(_sample(rng, vocab.negative_terms, int(rng.integers(1, 4))))
    elif r < 0.12:
        text += " Negative prompt: " + ", ".join(_sample(rng, vocab.negative_terms, int(rng.integers(2, 6))))
    elif r < 0.2:
        text += ","  # DiffusionDB prompts often end with a dangling comma
    return text


def nsfw_prompt(rng: np.random.Generator, vocab: Vocab) -> str:
    term, subject = _pick(rng, vocab.nsfw_terms), _pick(rng, vocab.subjects)
    head = f"{term} {_bare(subject)}" if rng.random() < 0.5 else f"{subject}, {term}"
    if rng.random() < 0.5:
        head = f"{head} {_pick(rng, vocab.settings)}"
    return ", ".join([head, *_tags(rng, vocab, int(rng.integers(1, 5)))])


def political_prompt(rng: np.random.Generator, vocab: Vocab) -> str:
    head = _pick(rng, vocab.political_terms)
    if rng.random() < 0.5:
        head = f"{head} {_pick(rng, vocab.settings)}"
    return ", ".join([head, *_tags(rng, vocab, int(rng.integers(1, 5)))])


def malformed_prompt(rng: np.random.Generator, vocab: Vocab, shape: str) -> str:
    subject = _pick(rng, vocab.subjects)
    if shape == "empty":
        return ""
    if shape == "whitespace":
        return _pick(rng, (" ", "   ", "\t", " \n ", "\u3000"))
    if shape == "too_long":
        text = subject
        while len(text) <= 1000:
            text += ", " + ", ".join(_tags(rng, vocab, 8))
        return text
    if shape == "junk":
        symbols = list(_JUNK) + list(_EMOJI)
        return "".join(_pick(rng, symbols) for _ in range(int(rng.integers(3, 25))))
    if shape == "unbalanced_weights":
        tag = _pick(rng, vocab.quality)
        shapes = (f"(masterpiece:1.3, {subject}, {tag}", f"{subject}, ((({tag}))", f"[{subject}, {tag}")
        return _pick(rng, shapes)
    if shape == "control_chars":
        return f"{subject}\x00 {_pick(rng, vocab.settings)}\x07, \x1b[31m{_pick(rng, vocab.styles)}\x1b[0m"
    raise ValueError(f"unknown malformed shape {shape!r}")


def vary_duplicate(rng: np.random.Generator, text: str) -> str:
    r = rng.random()
    if r < 0.5:
        return text  # same prompt, new seed: the commonest repeat in DiffusionDB
    if r < 0.6:
        return text.upper()
    if r < 0.7:
        return text[0].upper() + text[1:]
    if r < 0.8:
        return f"  {text} "
    if r < 0.9:
        return text.replace(" ", "  ")
    return text + ", "


# ---------------------------------------------------------------------------------------------------------
# metadata and images
