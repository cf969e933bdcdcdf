"""Content words of a prompt, and how much of one prompt another keeps: plain Python, shared by the pair filters
(does a low prompt describe what its high prompt shows?) and the text evaluation (does a rewrite keep the
user's subject?)."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOP_TEXT = """
a an the and or but of in on at to for with without from by as into onto over under near next beside behind
above below between through across against along around up down out off is are was were be been being it its
this that these those there here his her their our your my some any each every very so too not
no has have had do does doing can could will would should may might must i you he she we they me him them us
while which who whom whose what when where how than then just also only all both such own same other another
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())  # numbers stay content words: DrawBench counts objects


def content_words(text: str) -> set[str]:
    """Lower-case words of `text` without stop words, a plural `s` dropped (cats -> cat, glasses -> glasse)."""
    words = (w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS)
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words}


def content_kept(prompt: str, output: str) -> float:
    """Share of the prompt's content words the output holds (1.0 for a prompt without any)."""
    wanted = content_words(prompt)
    return len(wanted & content_words(output)) / len(wanted) if wanted else 1.0


def split_subject(prompt: str) -> tuple[str, list[str]]:
    """(subject, additions) of a prompt: its first comma segment, and the non-empty segments after it (style and
    quality tags follow the subject)."""
    subject, *rest = prompt.split(",")
    return subject.strip(), [segment.strip() for segment in rest if segment.strip()]


def pair_overlap(low: str, high: str) -> tuple[float, float]:
    """(share of the low prompt's content words the high prompt holds, share of the high prompt's subject words
    the low prompt holds): a faithful pair scores high on both; a caption that names another object fails the
    first, one that leaves out an object of the subject fails the second."""
    return content_kept(low, high), content_kept(split_subject(high)[0], low)
