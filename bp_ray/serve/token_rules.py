"""A request's decoding constraints (avoided phrases, preferred phrases, a minimum length) as token ids of the
generating tokenizer, in the lookup form the sampler (generation.RowSampler) consults every step."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bp_ray.serve.generation import GenerationRequest


@dataclass(frozen=True)
class TokenRules:
    """A request's decoding constraints as token ids of the generating tokenizer; the request's rows share them."""

    banned: tuple[tuple[int, ...], ...] = ()
    """Token sequences never generated: a sequence's last token is banned wherever a row's generated tokens end
    with the rest of it (a one-token sequence always)."""
    preferred: tuple[tuple[int, ...], ...] = ()
    """Token sequences whose first token, and next token after any generated prefix, get `prefer_bias`."""
    prefer_bias: float = 0.0
    min_new_tokens: int = 0
    held: tuple[int, ...] = ()
    """Tokens banned until a row has `min_new_tokens` tokens: EOS and those whose text holds a stop string."""


_PHRASE_ANCHOR = "a"
"""A word put before a phrase so that it is tokenized as it is mid-text after a space (sentencepiece tokenizers
give a leading space of the text's start a token of its own)."""

_CACHE_ENTRIES = 4096
"""Phrases and stop sets remembered per tokenizer: the default avoid list and a style family recur in nearly every
request, a user's own phrases may not (the cache starts over when full)."""


@dataclass
class _TokenizerCache:
    texts: list[str] | None = None
    stops: dict[tuple[str, ...], tuple[int, ...]] = field(default_factory=dict)
    phrases: dict[tuple[str, str], tuple[tuple[int, ...], ...]] = field(default_factory=dict)


_CACHES: weakref.WeakKeyDictionary[Any, _TokenizerCache] = weakref.WeakKeyDictionary()


def _cache(tokenizer: Any) -> _TokenizerCache:
    cache = _CACHES.get(tokenizer)
    if cache is None:
        cache = _CACHES[tokenizer] = _TokenizerCache()
    for table in (cache.stops, cache.phrases):
        if len(table) > _CACHE_ENTRIES:
            table.clear()
    return cache


def _phrase_forms(phrase: str, all_cases: bool) -> list[str]:
    """The spellings a model writes a phrase in: as given and lower case; with all_cases also upper case ("8K"),
    Capitalised and Title Case."""
    phrase = " ".join(phrase.split())
    forms = [phrase, phrase.lower()]
    if all_cases:
        forms += [phrase.upper(), phrase[:1].upper() + phrase[1:], phrase.title()]
    return list(dict.fromkeys(forms))


def _tokenize_phrase(tokenizer: Any, phrase: str, kind: str) -> tuple[tuple[int, ...], ...]:
    forms = _phrase_forms(phrase, all_cases=kind == "avoid")
    special = set(tokenizer.all_special_ids)
    anchor = tokenizer(_PHRASE_ANCHOR, add_special_tokens=False)["input_ids"]
    spaced = tokenizer([f"{_PHRASE_ANCHOR} {form}" for form in forms], add_special_tokens=False)["input_ids"]
    sequences = [ids[len(anchor):] if ids[: len(anchor)] == anchor else
                 tokenizer(f" {form}", add_special_tokens=False)["input_ids"]
                 for ids, form in zip(spaced, forms, strict=True)]
    if kind == "prefer":
        sequences = [ids for ids in sequences if ids and tokenizer.decode(ids[:1]).strip()]
    elif kind == "avoid":
        sequences += tokenizer(forms, add_special_tokens=False)["input_ids"]
    return tuple(dict.fromkeys(tuple(ids) for ids in sequences if ids and not special.intersection(ids)))


def _cached_sequences(tokenizer: Any, phrases: Sequence[str], kind: str) -> tuple[tuple[int, ...], ...]:
    cache = _cache(tokenizer)
    found: dict[tuple[int, ...], None] = {}
    for phrase in phrases:
        if not phrase.strip():
            continue
        key = (phrase, kind)
        if key not in cache.phrases:
            cache.phrases[key] = _tokenize_phrase(tokenizer, phrase, kind)
        found.update(dict.fromkeys(cache.phrases[key]))
    return tuple(found)


def phrase_token_ids(tokenizer: Any, phrases: Sequence[str], for_bias: bool = False) -> tuple[tuple[int, ...], ...]:
    """The token sequences the phrases are generated as by the tokenizer's own merges: mid-text after a space
    and, as after "(" or at the text's start, after none; in every case of `_phrase_forms`.

    Only these canonical tokenizations: the same text spelt by other token splits (" c" "at" for " cat") is not
    covered, which is why the ingress still checks the decoded text. Sequences holding a special token (the
    phrase "</s>" tokenizes to EOS, not to text) are left out.

    for_bias (preferred phrases, whose first token is raised everywhere): only as given and lower case, only
    after a space, and only sequences whose first token has text: a small vocabulary spells a rare case as a bare
    space then letters (" Photograph" -> " ", "P", ...), and a phrase's first token without its space is a word
    piece ("phot") that a bias would glue onto whatever word comes before."""
    return _cached_sequences(tokenizer, phrases, "prefer" if for_bias else "avoid")


def word_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of whole words mid-text, after a space, as given, lower case and Capitalised. Unlike
    `phrase_token_ids` not the bare form, whose tokens are often pieces of other words ("red" ends "hundred");
    a sequence that starts with a bare space stays (a ban takes only its last token, after the rest)."""
    return _cached_sequences(tokenizer, [f for w in words for f in dict.fromkeys((w, w[:1].upper() + w[1:]))],
                             "word")


def stop_token_ids(tokenizer: Any, stop: Sequence[str]) -> tuple[int, ...]:
    """Ids of the tokens whose text alone holds one of the stop strings (a stop string split over several
    tokens is not found this way)."""
    stop = tuple(s for s in stop if s)
    if not stop:
        return ()
    cache = _cache(tokenizer)
    if cache.texts is None:
        # Every token's text alone (special tokens: ""), decoded once: a real vocabulary has 250,000 of them.
        cache.texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    if stop not in cache.stops:
        cache.stops[stop] = tuple(i for i, text in enumerate(cache.texts) if any(s in text for s in stop))
    return cache.stops[stop]


def token_rules(tokenizer: Any, request: GenerationRequest) -> TokenRules | None:
    """`request`'s avoid, avoid_words, prefer and min_new_tokens as token ids; None when it has none of them (its
    rows are then sampled exactly as without any constraint support)."""
    prefers = bool(request.prefer) and request.prefer_bias != 0
    if not (request.avoid or request.avoid_words or prefers or request.min_new_tokens > 0):
        return None
    held = ((tokenizer.eos_token_id, *stop_token_ids(tokenizer, request.stop)) if request.min_new_tokens > 0
            else ())
    banned = dict.fromkeys((*phrase_token_ids(tokenizer, request.avoid),
                            *word_token_ids(tokenizer, request.avoid_words)))
    return TokenRules(banned=tuple(banned),
                      preferred=phrase_token_ids(tokenizer, request.prefer, for_bias=True) if prefers else (),
                      prefer_bias=float(request.prefer_bias) if prefers else 0.0,
                      min_new_tokens=min(request.min_new_tokens, request.max_new_tokens), held=held)


class _PrefixTable:
    """Token sequences looked up by the tokens generated so far: which tokens come next after a generated
    prefix of a sequence; `first` and `single` do not depend on what was generated."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.first = sorted({ids[0] for ids in sequences})
        self.single = sorted({ids[0] for ids in sequences if len(ids) == 1})
        self.next: dict[tuple[int, ...], set[int]] = {}
        for ids in sequences:
            for end in range(1, len(ids)):
                self.next.setdefault(tuple(ids[:end]), set()).add(ids[end])
        self.lengths = sorted({len(prefix) for prefix in self.next})
        self.depth = max(self.lengths, default=0)

    def after(self, tail: Sequence[int]) -> set[int]:
        """Tokens that continue a sequence whose prefix `tail` ends with."""
        found: set[int] = set()
        for length in self.lengths:
            if length > len(tail):
                break
            found |= self.next.get(tuple(tail[len(tail) - length:]), set())
        return found


class CompiledRules:
    """One TokenRules in the lookup form the sampler consults every step."""

    def __init__(self, rules: TokenRules):
        self.banned = _PrefixTable(rules.banned)
        self.preferred = _PrefixTable(rules.preferred if rules.prefer_bias else ())
        self.bias = rules.prefer_bias
        self.min_new_tokens = rules.min_new_tokens
        self.held = sorted(set(rules.held))
        self.depth = max(self.banned.depth, self.preferred.depth)
