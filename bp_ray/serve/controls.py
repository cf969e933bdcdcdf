"""What a user may ask of a rewrite beyond the prompt, as plain text functions the ingress applies: protected spans
(`<keep>` markup and the keep list), avoided phrases, a word limit on what the model adds and a token budget of
the diffusion model's text encoder (docs/serving.md, Controls).

No Ray, no torch. Decoding already bans avoided phrases and holds back an early end (serve/generation.py); these
functions make the returned text keep its promises whatever the model wrote: every span verbatim, no avoided
phrase the user did not write, within the budget, or the output is not returned at all (`finish_output`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from bp_ray.data.vocab import load_vocab

STYLES: tuple[str, ...] = tuple(load_vocab().style_families)
"""The style families a request may name (vocab.json `style_families`)."""

_KEEP_TAG = re.compile(r"<(/?)keep>", re.IGNORECASE)
_WEIGHT_OPEN = re.compile(r"[(\[{]\s*$")
_WEIGHT_CLOSE = re.compile(r"\s*(?::\s*\d+(?:\.\d+)?\s*)?[)\]}]")
"""A removed phrase's now empty weighting brackets: "(8k)", "[masterpiece]", "(best quality:1.2)"."""


def style_phrases(style: str) -> tuple[str, ...]:
    """The phrases of a style family, whose tokens the generator favours for `style`."""
    families = load_vocab().style_families
    if style not in families:
        raise ValueError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    return families[style]


def default_avoid() -> tuple[str, ...]:
    """What `avoid` means when a request leaves it out: the overused keyword soup (vocab.json `overused_terms`)."""
    return load_vocab().overused_terms


def parse_keep(prompt: str) -> tuple[str, list[str]]:
    """`<keep>…</keep>` markup -> (the prompt without the tags, the spans in order, each stripped).

    The span text stays where it was, so the model reads the prompt the user meant. Positions in error messages
    are 0-based character offsets into the prompt as sent."""
    parts: list[str] = []
    spans: list[str] = []
    opened: int | None = None  # offset of the open <keep> tag
    start_in_clean = 0
    last = 0
    for tag in _KEEP_TAG.finditer(prompt):
        parts.append(prompt[last:tag.start()])
        last = tag.end()
        if not tag.group(1):
            if opened is not None:
                raise ValueError(f"<keep> at position {tag.start()} opens inside the span opened at position "
                                 f"{opened}: spans cannot nest")
            opened, start_in_clean = tag.start(), sum(map(len, parts))
            continue
        if opened is None:
            raise ValueError(f"</keep> at position {tag.start()} closes no open <keep>")
        span = "".join(parts)[start_in_clean:].strip()
        if not span:
            raise ValueError(f"the <keep> span at position {opened} is empty: put the words to keep inside it")
        spans.append(span)
        opened = None
    if opened is not None:
        raise ValueError(f"<keep> at position {opened} is never closed with </keep>")
    parts.append(prompt[last:])
    return "".join(parts), spans


def apply_keep(text: str, spans: Sequence[str]) -> str:
    """`text` with every span in it verbatim: spans it lacks go in front, in order, joined with ", "."""
    missing = [span for span in spans if span not in text]
    if not missing:
        return text
    return ", ".join([*missing, text.strip()] if text.strip() else missing)


def _phrase_regex(phrases: Sequence[str]) -> re.Pattern[str] | None:
    """Any of the phrases, case-insensitive, as whole words (not "8k" inside "8kHz"), any run of spaces between
    their words; longest first, so "by greg rutkowski" wins over "greg rutkowski"."""
    words = sorted({tuple(p.split()) for p in phrases if p.strip()}, key=lambda w: len(" ".join(w)), reverse=True)
    if not words:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, w)) for w in words)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def occurs(phrase: str, text: str) -> bool:
    """Whether `phrase` is in `text` as whole words, ignoring case (how avoided phrases are matched)."""
    pattern = _phrase_regex([phrase])
    return bool(pattern and pattern.search(text))


def banned_phrases(avoid: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """The avoid phrases the user did not write themselves: those not in any `allowed` text (the prompt and the
    kept spans). What the generator bans and the ingress strips; each once, stripped, in order."""
    phrases = dict.fromkeys(" ".join(p.split()) for p in avoid if p.strip())
    return tuple(p for p in phrases if not any(occurs(p, text) for text in allowed))


def _protected(text: str, allowed: Sequence[str]) -> list[tuple[int, int]]:
    """Where the user's own texts (prompt, spans) stand verbatim in `text`: never cut into."""
    return [(m.start(), m.end()) for a in allowed if a.strip() for m in re.finditer(re.escape(a.strip()), text)]


def _join(left: str, right: str) -> str:
    """The text on both sides of a removed phrase, with at most one separator and one space where it was:
    "a, 8k, b" -> "a, b"; "(red, 8k)" -> "(red)"; "8k, a" -> "a"."""
    left, right = left.rstrip(), right.lstrip()
    if not left:
        return right.lstrip(" ,;:.")
    if right[:1] in (",", ";") and left[-1] in ",;:([{":
        right = right[1:].lstrip()
    elif right[:1] in (".", "!", "?", ")", "]", "}") and left[-1] in ",;:":
        left = left[:-1].rstrip()
    if not right:
        return left
    return left + ("" if right[0] in ",.;:!?)]}" or left[-1] in "([{" else " ") + right


def strip_avoided(text: str, avoid: Sequence[str], allowed: Sequence[str]) -> str:
    """`text` without the avoided phrases that slipped past decoding (another tokenization, another case).

    Matching is case-insensitive on whole words. Phrases that occur in an `allowed` text are the user's own
    words and stay, and so does anything inside a verbatim occurrence of an allowed text. Commas and spaces
    are tidied only where something was removed, so the rest of the text (spans included) is left as it was."""
    pattern = _phrase_regex(banned_phrases(avoid, allowed))
    if pattern is None:
        return text
    protected = _protected(text, allowed)
    regions: list[tuple[int, int]] = []
    for match in pattern.finditer(text):
        start, end = match.span()
        if any(start < p_end and p_start < end for p_start, p_end in protected):
            continue
        # Take a weight's brackets along when the phrase was all they held: "(8k:1.2)" goes whole.
        while (before := _WEIGHT_OPEN.search(text, 0, start)) and (after := _WEIGHT_CLOSE.match(text, end)):
            start, end = before.start(), after.end()
        regions.append((start, end))
    if not regions:
        return text
    out = text[: regions[0][0]]
    starts = [start for start, _ in regions[1:]] + [len(text)]
    for (_, end), next_start in zip(regions, starts, strict=True):
        out = _join(out, text[end:next_start])
    if not text[regions[-1][1]:].strip():  # removed at the very end: no trailing comma
        out = out.rstrip(" ,;:")
    return out


def _span_floor(text: str, spans: Sequence[str]) -> int:
    """Where the last span's first occurrence ends: no cut may fall before it."""
    return max((text.index(span) + len(span) for span in spans if span and span in text), default=0)


def _inside_span(text: str, spans: Sequence[str], position: int) -> bool:
    return any(m.start() < position < m.end() for span in spans if span for m in re.finditer(re.escape(span), text))


def _cut(text: str, end: int, floor: int) -> str:
    """text[:end] without trailing separators, but never shorter than `floor` (a span may end in a comma)."""
    out = text[:end]
    while len(out) > floor and out[-1] in " ,;:":
        out = out[:-1]
    return out


def trim_added_words(text: str, prompt: str, max_added: int, spans: Sequence[str]) -> str:
    """At most `max_added` words beyond the prompt's word count (the `detail` control).

    Cuts at the last comma boundary that still adds a word, else after the last word allowed, so that a trimmed
    output ends on a whole tag; never before the end of a span (spans win over the limit)."""
    limit = len(prompt.split()) + max_added
    words = list(re.finditer(r"\S+", text))
    if len(words) <= limit:
        return text
    word_end = words[limit - 1].end() if limit > 0 else 0
    floor = _span_floor(text, spans)
    prompt_words = len(prompt.split())
    commas = [i for i in range(word_end, floor - 1, -1) if i < len(text) and text[i] == ","
              and not _inside_span(text, spans, i) and len(text[:i].split()) > prompt_words]
    if commas:
        return _cut(text, commas[0], floor)
    end = max(word_end, floor)
    while end < len(text) and not text[end].isspace():  # a span ending mid-word keeps its word
        end += 1
    return _cut(text, end, floor)


def encoder_tokens(tokenizer: Any, text: str) -> int:
    """Tokens `text` takes in the diffusion text encoder's tokenizer, BOS and EOS included, as the pipeline
    counts them against `model_max_length` (77 for CLIP), before any truncation."""
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])


def fit_budget(text: str, spans: Sequence[str], count: Callable[[str], int], budget: int) -> str | None:
    """`text` cut to `count(text) <= budget`: trailing comma segments first (whole tags), then trailing words,
    never into a span; None when even the spans alone (or nothing at all) do not fit.

    Text past the budget is what the encoder would silently truncate, so it is cut here where the user sees it."""
    if text.strip() and count(text) <= budget:
        return text
    floor = _span_floor(text, spans)
    # 1. whole comma segments, longest first
    candidates = [_cut(text, i, floor) for i in range(len(text) - 1, floor - 1, -1)
                  if text[i] == "," and not _inside_span(text, spans, i)]
    # 2. then words of what is left after the last segment cut
    rest = candidates[-1] if candidates else text
    candidates += [_cut(rest, m.end(), floor) for m in reversed(list(re.finditer(r"\S+", rest)))
                   if floor <= m.end() < len(rest.rstrip())]
    if floor:
        candidates.append(text[:floor])
    for candidate in dict.fromkeys(candidates):
        if candidate.strip() and count(candidate) <= budget:
            return candidate
    if floor:
        return None
    # No span, and not even the first word fits (a long run of letters or symbols): its longest prefix that does.
    first = text.split()[0] if text.split() else ""
    low, high = 0, len(first)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(first[:middle]) <= budget else (low, middle - 1)
    return first[:low] or None


def finish_output(text: str, prompt: str, spans: Sequence[str], avoid: Sequence[str], max_added: int | None,
                  count: Callable[[str], int], budget: int) -> tuple[str, int] | None:
    """A generated rewrite made to keep every promise of its request -> (text, its encoder tokens), or None when
    it cannot (the endpoint leaves it out rather than return it broken).

    Steps: strip avoided phrases -> put in missing spans -> trim added words (max_added None: no limit) -> fit the
    token budget -> verify all of them on the final text."""
    allowed = (prompt, *spans)
    text = apply_keep(strip_avoided(text, avoid, allowed), spans)
    if max_added is not None:
        text = trim_added_words(text, prompt, max_added, spans)
    fitted = fit_budget(text, spans, count, budget)
    if fitted is None and spans:
        # A span late in the text blocks every cut before it: the spans in front, then what the model wrote.
        rest = text
        for span in spans:
            rest = rest.replace(span, " ")
        fitted = fit_budget(apply_keep(_join("", " ".join(rest.split())), spans), spans, count, budget)
    if fitted is None or not fitted.strip() or not all(span in fitted for span in spans):
        return None
    tokens = count(fitted)
    pattern = _phrase_regex(banned_phrases(avoid, allowed))
    protected = _protected(fitted, allowed)
    for match in pattern.finditer(fitted) if pattern else ():
        if not any(match.start() < p_end and p_start < match.end() for p_start, p_end in protected):
            return None
    return (fitted, tokens) if tokens <= budget else None
