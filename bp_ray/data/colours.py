"""Does a rewrite keep the colours the user gave? Plain Python, shared by the text evaluation (a metric) and PPO (a
guard): "a yellow triangle" rewritten as "a purple triangle" has failed, however good it looks.

A prompt binds a colour to the word it colours ("a black colored dog": black -> dog). A rewrite changes a binding
when it drops the colour, puts another colour right before the word ("a golden dog"), or gives the word another
colour in a `with` phrase that follows it ("a black dog with golden fur", "a green banana, with the vibrant colors
of red and yellow"). A new colour elsewhere ("a black banana on a white marble countertop") is not a change.
Word rules, not parsing: "a green book with golden lettering" counts as a change too.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z]+|[.;:!?]")
_COLOUR_TEXT = """
red orange yellow green blue purple violet pink brown black white gray grey gold golden silver teal cyan magenta
crimson scarlet turquoise beige maroon navy ivory amber emerald indigo lavender bronze copper
"""
COLOURS = frozenset(_COLOUR_TEXT.split())
_SAME = {"grey": "gray", "golden": "gold"}
_LINKS = frozenset(["colored", "coloured", "color", "colour", "toned", "tinted", "hued", "and", "a", "an", "the"])
_CLAUSE_END = frozenset(".;:!?")
_BEFORE, _AFTER = 3, 6  # words before the coloured word that modify it; words of the `with` phrase after it


def _tokens(text: str) -> list[str]:
    # "golden hour" is light, not the colour of anything in the picture
    return _WORD.findall(text.lower().replace("golden hour", "hour"))


def _colour(word: str) -> str | None:
    return _SAME.get(word, word) if word in COLOURS else None


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def colour_bindings(prompt: str) -> dict[str, set[str]]:
    """{coloured word (plural s dropped): its colours} of a prompt: each colour word and the first following word
    that is neither a colour nor a link ("colored", "and", an article)."""
    words = _tokens(prompt)
    bindings: dict[str, set[str]] = {}
    for i, word in enumerate(words):
        colour = _colour(word)
        if colour is None:
            continue
        noun = next((w for w in words[i + 1:] if _colour(w) is None and w not in _LINKS), None)
        if noun is not None and noun not in _CLAUSE_END:
            bindings.setdefault(_stem(noun), set()).add(colour)
    return bindings


def _colours_near(words: list[str], at: int) -> set[str]:
    """Colours modifying words[at]: just before it, and in a `with` phrase right after it (same clause)."""
    before = {c for w in words[max(0, at - _BEFORE):at] if (c := _colour(w))}
    after: set[str] = set()
    rest = words[at + 1:at + 1 + _AFTER]
    if rest[:1] == ["with"]:
        for word in rest[1:]:
            if word in _CLAUSE_END:
                break
            if colour := _colour(word):
                after.add(colour)
    return before | after


def other_colours(prompt: str) -> tuple[str, ...]:
    """Every colour word naming a colour other than those the prompt gives something (none when it gives none):
    what decoding may leave out so that a rewrite cannot recolour the user's things."""
    bindings = colour_bindings(prompt)
    if not bindings:
        return ()
    given = set().union(*bindings.values())
    return tuple(sorted(word for word in COLOURS if _colour(word) not in given))


def colours_changed(prompt: str, output: str) -> bool | None:
    """Whether `output` changes a colour `prompt` gives something (None: the prompt binds no colour)."""
    bindings = colour_bindings(prompt)
    if not bindings:
        return None
    words = _tokens(output)
    said = {c for w in words if (c := _colour(w))}
    given = set().union(*bindings.values())
    if not given <= said:
        return True
    for at, word in enumerate(words):
        wanted = bindings.get(_stem(word))
        if wanted is not None and _colours_near(words, at) - given:
            return True
    return False
