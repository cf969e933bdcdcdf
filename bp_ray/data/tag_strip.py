"""A plain prompt from a beautiful one, without any model: take out its vocabulary style / quality tags and its
artist credits, keep what it depicts.

"portrait of a knight in armor, highly detailed, digital painting, artstation, by greg rutkowski" becomes
"portrait of a knight in armor". This is pair source (iv): the tags a prompt engineer adds are exactly what the
beautifier must learn to add back, and real prompt pools hold thousands of such prompts.
"""

from __future__ import annotations

import re

from bp_ray.data.prompt_rules import ART_WORDS, artist_credits, compiled_terms

_ARTICLES = ("the", "a", "an")
_CONNECTORS = ("and", "with", "by", "in", "of", "on", "at", "for", "from", "as", "or", "to", "style", "art", "&",
               "+", "|", "-", ":", ";", ".")


def _alternation(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in words)


# A segment may start with an article ("a cat"), but not with a connector a removed tag left behind ("and a cat"
# from "by greg rutkowski and a cat" is not possible, "of a cat" from "portrait of a cat" minus "portrait" is);
# it may end with neither ("a cat with" from "a cat with octane render").
_LEADING = re.compile(rf"^(?:(?:{_alternation(_CONNECTORS)})(?:\s+|$))+")
_TRAILING = re.compile(rf"(?:\s+|^)(?:(?:{_alternation(_CONNECTORS + _ARTICLES)})(?=\s|$)\s*)+$")
_STYLE_OF = re.compile(r"\b(?:in\s+the\s+style\s+of|style\s+of|inspired\s+by|trending\s+on|featured\s+on)\b.*$")
_FILLER = frozenset({*_CONNECTORS, *_ARTICLES, *ART_WORDS, "very", "highly", "ultra", "super", "extremely",
                     "detailed"})
_SPACES = re.compile(r"\s+")
_SEGMENTS = re.compile(r"[,|]")  # "|" separates segments in some prompt styles as commas do


def _is_glued(char: str) -> bool:
    return not (char.isspace() or char.isalnum())


def strip_tags(prompt: str, vocab_terms: frozenset[str], max_segments: int = 2) -> str:
    """`prompt` (normalised, weights syntax already stripped) without its tags, credits and tag-only segments.

    Per comma segment: drop "in the style of ..." / "trending on ..." tails, artist credits ("by <name>" at the
    segment start or after an art word) and every vocabulary term; keep the segment if a content word is left.
    At most `max_segments` segments are kept, the first ones (a low prompt has few; the subject comes first).
    Returns "" when nothing but tags was there. Case is kept; only ASCII text is edited in place (a non-ASCII
    prompt whose lower-casing changes its length is matched on the lower-cased text instead).
    """
    pattern = compiled_terms(frozenset(vocab_terms))
    kept = []
    for segment in _SEGMENTS.split(prompt):
        text = _strip_segment(segment.strip(), pattern)
        if text and any(word.lower() not in _FILLER for word in text.split()):
            kept.append(text)
            if len(kept) == max_segments:
                break
    return ", ".join(kept)


def _strip_segment(segment: str, pattern: re.Pattern[str]) -> str:
    lower = segment.lower()
    if len(lower) != len(segment):
        segment = lower
    spans = [m.span() for m in _STYLE_OF.finditer(lower)]
    spans += [m.span() for m in pattern.finditer(lower)]
    spans += [m.span() for m in artist_credits(lower)]
    keep = [True] * len(segment)
    for start, end in spans:
        # punctuation glued to a removed word goes with it ("beautiful!!" leaves no "!!")
        while start > 0 and _is_glued(segment[start - 1]):
            start -= 1
        while end < len(segment) and _is_glued(segment[end]):
            end += 1
        keep[start:end] = [False] * (end - start)
    text = _SPACES.sub(" ", "".join(c for c, k in zip(segment, keep, strict=True) if k)).strip()
    return _LEADING.sub("", _TRAILING.sub("", text)).strip(" ,;:-")
