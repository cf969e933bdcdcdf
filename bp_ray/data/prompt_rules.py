"""Rules that clean raw prompts and split them into low / high quality (paper Section 3): pure Python, no Ray.

One row goes normalize_prompt -> drop_reason -> prompt_features -> classify; annotate_prompts runs the same
rules over a whole table. Keyword, NSFW-score and near-duplicate filters sit beside them for the data driver.
"""

import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from bp_ray.data import columns as C
from bp_ray.data.vocab import Vocab

DROP_EMPTY, DROP_TOO_LONG, DROP_NON_TEXT = "empty", "too_long", "non_text"
LOW, HIGH, NEITHER = "low", "high", "neither"

# Columns annotate_prompts adds next to C.PROMPT (the normalised text).
DROP_REASON, QUALITY, WORDS, TAGS, SEGMENTS, HAS_WEIGHTS, HAS_NEGATIVE = (
    "drop_reason", "quality", "words", "tags", "segments", "has_weights", "has_negative",
)
ANNOTATION_COLUMNS = (C.PROMPT, DROP_REASON, QUALITY, WORDS, TAGS, SEGMENTS, HAS_WEIGHTS, HAS_NEGATIVE)

MIN_LETTERS = 3
MIN_LETTER_SHARE = 0.4
"""A normalised prompt with fewer letters, or letters under this share of its non-space characters, is junk."""


@dataclass(frozen=True)
class PromptFeatures:
    """What the low / high split looks at. Counts are of the normalised prompt, flags of the raw one."""

    words: int
    """Whitespace-separated tokens holding at least one letter or digit."""
    tags: int
    """Distinct vocabulary tags (longest match wins, no overlaps) plus distinct `by <name>` artist phrases."""
    segments: int
    """Comma-separated non-empty segments."""
    has_weights: bool
    """A1111 emphasis in the raw prompt: (x:1.2), ((x)), [x], {x}."""
    has_negative: bool
    """Negative syntax in the raw prompt: "--no ..." or "Negative prompt: ..."."""


@dataclass(frozen=True)
class SplitRules:
    """Thresholds of the heuristic split; mirrors the DataConfig fields of the same names."""

    low_max_words: int = 12
    low_max_tags: int = 0
    low_max_segments: int = 2
    high_min_words: int = 8
    high_min_tags: int = 2
    high_min_segments: int = 4
    syntax_tag_bonus: int = 1

    @classmethod
    def from_config(cls, data_cfg: Any) -> "SplitRules":
        """Read the thresholds off a DataConfig (or anything with the same attribute names)."""
        return cls(**{f.name: int(getattr(data_cfg, f.name)) for f in fields(cls)})


# --- normalisation --------------------------------------------------------------------------------------

_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
# Negative part: everything from " --no" / "Negative prompt:" on. DOTALL: A1111 puts it on the next line.
_NEGATIVE = re.compile(r"(?:(?<!\S)--no\b|\bnegative\s+prompt\s*:).*", re.IGNORECASE | re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# "(word:1.2)": the character before the colon must not be a digit, so "(16:9)" stays an aspect ratio.
_PAREN_WEIGHT = re.compile(rf"\(([^()]*?[^\d\s(])\s*:\s*{_NUM}\s*\)")
# ":1.3" left after a letter once brackets are unbalanced ("(masterpiece:1.3, cat"); "::2" is Midjourney's.
# No space after the colon, so "step 1: a cat" and "12:30" are left alone.
_STRAY_WEIGHT = re.compile(rf"(?<=[^\W\d_])\s*::?{_NUM}(?![\w.:])")
_MAX_WEIGHT_NESTING = 8
_BRACKET = re.compile(r"\\?[()\[\]{}]")  # "\(" is A1111's literal bracket: drop the backslash with it
_SPACE_AFTER_OPEN = re.compile(r"(?<=[(\[{])\s+")
_SPACE_BEFORE_CLOSE = re.compile(r"\s+(?=[)\]}])")
_KEEP_WEIGHT = re.compile(rf"(?<=[^\s:])\s*:\s*({_NUM})\)")
_HAS_BRACKET = re.compile(r"[()\[\]{}]")
_COMMAS = re.compile(r" ?,(?: ?,)*")

WEIGHTS_SYNTAX = ("strip", "keep")


def normalize_prompt(raw: str, weights_syntax: str = "strip") -> str:
    """NFC, negative part removed, weights stripped or canonicalised, whitespace and commas tidied.

    Never raises on a str; anything else normalises to "".
    """
    if weights_syntax not in WEIGHTS_SYNTAX:
        raise ValueError(f"weights_syntax must be one of {WEIGHTS_SYNTAX}, got {weights_syntax!r}")
    if not isinstance(raw, str):
        return ""
    # The `in` guards skip regex scans most prompts do not need: annotate_prompts runs this on every row.
    text = raw if raw.isascii() else unicodedata.normalize("NFC", raw)
    if "--" in text or "egative" in text.lower():
        text = _NEGATIVE.sub("", text)
    text = _CONTROL.sub(" ", text)
    if weights_syntax == "strip":
        if ":" in text:
            # One pass per nesting level ("((a:1.2) b:1.1)" needs two); real prompts never nest 8 deep, and the
            # cap keeps adversarial input linear. Deeper leftovers are caught by _STRAY_WEIGHT and _BRACKET.
            for _ in range(_MAX_WEIGHT_NESTING):
                text, count = _PAREN_WEIGHT.subn(r"\1", text)
                if not count:
                    break
            text = _STRAY_WEIGHT.sub("", text)
        # A space, not "": "a cat(fluffy)" must stay two words; surplus spaces collapse below.
        text = _BRACKET.sub(" ", text)
    elif _HAS_BRACKET.search(text):
        text = _SPACE_AFTER_OPEN.sub("", text)
        text = _SPACE_BEFORE_CLOSE.sub("", text)
        text = _KEEP_WEIGHT.sub(r":\1)", text)
    text = " ".join(text.split())
    if " ," in text or ",," in text:
        text = _COMMAS.sub(",", text)
    return text.strip(" ,")


# --- dropping -------------------------------------------------------------------------------------------

_NON_LETTERS = re.compile(r"[\W\d_]+")
_ASCII_NON_LETTERS = bytes(b for b in range(128) if not chr(b).isalpha())


def _letter_count(text: str) -> int:
    if text.isascii():  # bytes.translate is ~10x faster than a regex, and most prompts are ASCII
        return len(text.encode("ascii").translate(None, _ASCII_NON_LETTERS))
    return len(_NON_LETTERS.sub("", text))


def _is_junk(normalized: str) -> bool:
    """Too few letters: punctuation / emoji / number soup."""
    letters = _letter_count(normalized)
    non_space = len(normalized) - normalized.count(" ")
    return letters < MIN_LETTERS or letters < MIN_LETTER_SHARE * non_space


def drop_reason(raw: object, normalized: str, max_chars: int) -> str | None:
    """Why the row is unusable (non_text / empty / too_long), or None; max_chars counts raw characters."""
    if not isinstance(raw, str):
        return DROP_NON_TEXT
    if not normalized.strip():
        return DROP_EMPTY
    if len(raw) > max_chars:
        return DROP_TOO_LONG
    if _CONTROL.search(raw) or _is_junk(normalized):
        return DROP_NON_TEXT
    return None


# --- features -------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]\S*")  # from a token's first letter/digit to its end: one match per counted word
# For the ASCII fast path: everything but letters, digits and the whitespace bytes.split() splits on.
_ASCII_NON_WORD = bytes(b for b in range(128) if not (chr(b).isalnum() or chr(b) in " \t\n\r\v\f"))
# "A1111 weight" = "(" ... non-digit ":" number, closing bracket optional so "(masterpiece:1.3, cat" counts.
_WEIGHTS = re.compile(
    rf"\([^()]*?[^\d\s(:]\s*:\s*{_NUM}(?![\w.])"
    r"|\(\([^()]+\)\)|\[[^\[\]]+\]|\{[^{}]+\}"
)
_HAS_NEGATIVE = re.compile(r"(?<!\S)--no\b|\bnegative\s+prompt\s*:", re.IGNORECASE)
# "by <name>" reads as an artist credit only at the start of a segment or right after an art word:
# "a cat by a river" and "surrounded by trees" are not credits. Names are one or two words.
ART_WORDS = frozenset({
    "art", "artwork", "painting", "painted", "illustration", "illustrated", "drawing", "drawn", "sketch",
    "photo", "photograph", "photographed", "photography", "render", "rendered", "poster", "design", "designed",
    "style",
})
_NOT_NAMES = (
    "a", "an", "the", "his", "her", "their", "its", "my", "our", "your", "this", "that", "these", "those",
    "him", "them", "me", "us", "itself", "himself", "herself", "themselves", "night", "day", "hand",
)
_NOT_SECOND_NAMES = ("and", "with", "in", "on", "of", "at", "for", "from", "as", "or", "the", "a", "an")
_BY_NAME = re.compile(  # starts with the literal "by" so re scans for it quickly; the context is checked after
    rf"by\s+(?!(?:{'|'.join(_NOT_NAMES)})(?!\w))"
    rf"([^\W\d_][\w.'-]*(?:\s+(?!(?:{'|'.join(_NOT_SECOND_NAMES)})(?!\w))[^\W\d_][\w.'-]*)?)"
)


def word_count(text: str) -> int:
    """Whitespace-separated tokens that hold at least one letter or digit ("--" and emoji are not words)."""
    if text.isascii():  # deleting punctuation makes punctuation-only tokens vanish from split(): ~5x faster
        return len(text.encode("ascii").translate(None, _ASCII_NON_WORD).split())
    return len(_WORD.findall(text))


def within_bounds(text: str, bounds: Sequence[int]) -> bool:
    """min_words <= word_count(text) <= max_words for bounds = [min_words, max_words]."""
    low, high = bounds
    return low <= word_count(text) <= high


def _trie_regex(terms: Iterable[str]) -> str:
    """Lower-case terms as one regex nested by shared prefix, longest match first; spaces match any whitespace.

    A flat 130-way alternation costs ~90 us per prompt, the prefix tree ~10 us.
    """
    trie: dict[str, dict] = {}
    for term in terms:
        node = trie
        for char in term:
            node = node.setdefault(char, {})
        node[""] = {}  # a term ends here

    def emit(node: dict[str, dict]) -> str:
        branches = [(r"\s+" if char == " " else re.escape(char)) + emit(child)
                    for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        # Greedy "?": the longer term is tried first, the shorter one is the fallback.
        return f"(?:{group})?" if "" in node else group

    return emit(trie)


@lru_cache(maxsize=64)
def compiled_terms(terms: frozenset[str] | tuple[str, ...]) -> re.Pattern[str]:
    """One regex per term set, matching lower-cased text on \\w boundaries (so "8k," and "ukiyo-e" match)."""
    unique = {" ".join(t.lower().split()) for t in terms if t and t.strip()}
    if not unique:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(rf"(?<!\w)(?:{_trie_regex(unique)})(?!\w)")


def artist_credits(lower: str) -> Iterator[re.Match[str]]:
    """`by <name>` credits in lower-cased text (group 1: the name): at the text or a comma segment's start, or
    right after an art word ("painting by ..."); "a cat by a river" and "hobby" are not credits."""
    for match in _BY_NAME.finditer(lower):
        start = match.start()
        if start and (lower[start - 1].isalnum() or lower[start - 1] == "_"):
            continue  # "hobby", "abby"
        before = lower[:start].rstrip()
        if before and not before.endswith(",") and before.rsplit(None, 1)[-1] not in ART_WORDS:
            continue
        yield match


def _artist_names(lower: str, pattern: re.Pattern[str]) -> set[str]:
    """Names credited as `by <name>` that are not vocabulary tags already (lower-cased text in, names out)."""
    # "by greg rutkowski" is counted as a vocabulary tag already
    return {" ".join(m.group(1).split()) for m in artist_credits(lower) if not pattern.match(lower, m.start(1))}


def _count_tags(normalized: str, pattern: re.Pattern[str]) -> int:
    """Distinct vocabulary tags + distinct uncounted artist names; expects single spaces (normalised text)."""
    lower = normalized.lower()
    tags = len(set(pattern.findall(lower)))
    return tags + len(_artist_names(lower, pattern)) if "by" in lower else tags


def _feature_tuple(raw: str, normalized: str, pattern: re.Pattern[str]) -> tuple[int, int, int, bool, bool]:
    """(words, tags, segments, has_weights, has_negative): a tuple, since annotate_prompts calls it per row."""
    # `in` guards skip the regexes on the many prompts without brackets or dashes.
    has_weights = ("(" in raw or "[" in raw or "{" in raw) and _WEIGHTS.search(raw) is not None
    has_negative = ("--" in raw or "egative" in raw.lower()) and _HAS_NEGATIVE.search(raw) is not None
    segments = sum(1 for segment in normalized.split(",") if segment.strip())
    return word_count(normalized), _count_tags(normalized, pattern), segments, has_weights, has_negative


def prompt_features(raw: str, normalized: str, vocab_terms: frozenset[str]) -> PromptFeatures:
    """Counts of the normalised prompt and syntax flags of the raw one; vocab_terms as from vocab.tag_terms."""
    return PromptFeatures(*_feature_tuple(raw, normalized, compiled_terms(frozenset(vocab_terms))))


# --- split ----------------------------------------------------------------------------------------------

def classify(features: PromptFeatures, rules: SplitRules) -> str:
    """LOW, HIGH or NEITHER by the thresholds in rules; weights / negative syntax count as extra tags."""
    syntax = features.has_weights or features.has_negative
    tags_eff = features.tags + (rules.syntax_tag_bonus if syntax else 0)
    if features.words >= rules.high_min_words and (
        tags_eff >= rules.high_min_tags or features.segments >= rules.high_min_segments
    ):
        return HIGH
    if (features.words <= rules.low_max_words and features.tags <= rules.low_max_tags
            and features.segments <= rules.low_max_segments and not syntax):
        return LOW
    return NEITHER


def _classify_arrays(words: np.ndarray, tags: np.ndarray, segments: np.ndarray, syntax: np.ndarray,
                     rules: SplitRules) -> np.ndarray:
    """classify over (N,) arrays -> (N,) object array of LOW / HIGH / NEITHER."""
    tags_eff = tags + np.where(syntax, rules.syntax_tag_bonus, 0)
    high = (words >= rules.high_min_words) & ((tags_eff >= rules.high_min_tags)
                                              | (segments >= rules.high_min_segments))
    low = ((words <= rules.low_max_words) & (tags <= rules.low_max_tags)
           & (segments <= rules.low_max_segments) & ~syntax)
    return np.where(high, HIGH, np.where(low, LOW, NEITHER)).astype(object)


def annotate_prompts(prompts: Sequence[object], rules: SplitRules, vocab_terms: frozenset[str],
                     weights_syntax: str, max_chars: int) -> pd.DataFrame:
    """One row per input: normalised prompt ("" where dropped), drop_reason, quality and the features.

    Dropped rows get quality None, zero counts and False flags. ~30k prompts/s on one CPU core.
    """
    pattern = compiled_terms(frozenset(vocab_terms))
    texts: list[str] = []
    reasons: list[str | None] = []
    rows: list[tuple[int, int, int, bool, bool]] = []
    dropped_row = (0, 0, 0, False, False)
    for raw in prompts:
        normalized = normalize_prompt(raw, weights_syntax)
        reason = drop_reason(raw, normalized, max_chars)
        reasons.append(reason)
        if reason is None:
            texts.append(normalized)
            rows.append(_feature_tuple(raw, normalized, pattern))  # type: ignore[arg-type]  # raw is a str here
        else:
            texts.append("")
            rows.append(dropped_row)

    table = np.array(rows, dtype=np.int64).reshape(len(rows), 5)  # (N, 5) in _feature_tuple's order
    words, tags, segments = table[:, 0], table[:, 1], table[:, 2]
    has_weights, has_negative = table[:, 3].astype(bool), table[:, 4].astype(bool)
    quality = _classify_arrays(words, tags, segments, has_weights | has_negative, rules)
    quality[np.array([r is not None for r in reasons], dtype=bool)] = None
    return pd.DataFrame({
        C.PROMPT: pd.Series(texts, dtype=object), DROP_REASON: pd.Series(reasons, dtype=object),
        QUALITY: pd.Series(quality, dtype=object), WORDS: words, TAGS: tags, SEGMENTS: segments,
        HAS_WEIGHTS: has_weights, HAS_NEGATIVE: has_negative,
    })


# --- content filters ------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _keyword_index(terms: frozenset[str] | tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """Compiled regex for a term set and lower-cased matched text -> the term as listed."""
    canonical = {" ".join(t.lower().split()): t for t in terms if t and t.strip()}
    return compiled_terms(terms), canonical


def keyword_hit(text: str, terms: Iterable[str]) -> str | None:
    """The leftmost listed term (longest at that place) found in text on word boundaries, any case, else None."""
    if not isinstance(text, str):
        return None
    key = terms if isinstance(terms, (tuple, frozenset)) else tuple(terms)
    pattern, canonical = _keyword_index(key)
    match = pattern.search(text.lower())
    return None if match is None else canonical[" ".join(match.group(0).lower().split())]


def content_flag(text: str, vocab: Vocab) -> str | None:
    """"nsfw_keyword" or "political_keyword" when text holds a term from the vocab's lists, else None."""
    if keyword_hit(text, vocab.nsfw_terms) is not None:
        return "nsfw_keyword"
    if keyword_hit(text, vocab.political_terms) is not None:
        return "political_keyword"
    return None


def _score(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def nsfw_score_flag(prompt_nsfw: float, image_nsfw: float, threshold: float) -> bool:
    """Either DiffusionDB NSFW score (0-1; image 2.0 = already blurred) above threshold; NaN / None = unknown."""
    # NaN > threshold is False, so unknown scores never flag.
    return _score(prompt_nsfw) > threshold or _score(image_nsfw) > threshold


# --- near duplicates ------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[\W_]+")


def dedup_key(text: str) -> str:
    """16 hex chars of sha1 over the stripped, lower-cased, punctuation-free prompt: equal for near duplicates."""
    plain = _PUNCTUATION.sub(" ", normalize_prompt(text, "strip").lower())
    # surrogatepass: a str may hold lone surrogates (broken UTF-16 upstream), and this must not raise.
    return hashlib.sha1(" ".join(plain.split()).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def first_line(output: str | None) -> str:
    """First non-empty line of a model output, stripped ("" if none): LLMs add chatter after the answer."""
    for line in (output or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


ANSWER_PREAMBLE = re.compile(
    r"^(?:(?:sure|okay|ok|certainly)[,.!]?\s+)?(?:here(?:'s| is)|the)\s+(?:\w+\s+){0,3}?"
    r"(?:prompt|description|summary|caption|version)(?:\s+is)?\s*:\s*", re.IGNORECASE)
"""An assistant's lead-in before its answer: "The image prompt is: ...", "Here is a short description: ..."."""


def answer_text(output: str | None) -> str:
    """The answer in an LLM's output: its first line, without a lead-in naming what follows and without the quotes
    around it (SmolLM2 begins a third of its summaries with "The image prompt is:")."""
    line = first_line(output)
    answer = ANSWER_PREAMBLE.sub("", line, count=1).strip()
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "\"'":
        answer = answer[1:-1].strip()
    return answer or line


META_ANSWER = re.compile(r"^(?:this|the|here is|here's|my)\s+(?:\w+\s+){0,2}?(?:image\s+)?(?:prompt|description)\b"
                         r"|\bimage prompt\b", re.IGNORECASE)
"""An LLM writing about the prompt instead of writing one: "This image prompt is a fun and creative way to ..."."""


def is_meta_answer(text: str) -> bool:
    """Whether a generated summary or expansion talks about the prompt rather than being a prompt (SmolLM2 does so
    in over half of its summaries)."""
    return bool(META_ANSWER.search(text.strip()))


def repetition_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 for texts shorter than n + 1 words)."""
    words = text.lower().replace(",", " , ").split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
