"""A deterministic BPE merge learner for the locally trained tokenizers.

The `tokenizers` trainers break ties between equally frequent pairs by token ids that they hand out in hash-map
order whenever a word-end suffix (CLIP's `</w>`) or a continuation prefix (WordPiece's `##`) is in play, so the
same texts give a different vocabulary in every process. Zoos must be identical for a seed, so the merges are
learnt here, with ties broken by the pair's text.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from itertools import pairwise

Pair = tuple[str, str]


def learn_merges(words: Counter[tuple[str, ...]], max_merges: int,
                 join: Callable[[str, str], str] = str.__add__) -> list[Pair]:
    """Greedy BPE on `words` (symbol tuples with counts): the most frequent adjacent pair merges first.

    Ties go to the lexicographically smallest pair, so the result depends only on `words`. `join` makes the
    merged symbol (WordPiece drops the right side's `##`).
    """
    symbols = {i: list(word) for i, word in enumerate(words)}
    counts = {i: words[word] for i, word in enumerate(words)}
    pair_counts: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for i, syms in symbols.items():
        for pair in pairwise(syms):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    merges: list[Pair] = []
    while len(merges) < max_merges:
        best_count = max(pair_counts.values(), default=0)
        if best_count <= 0:
            break
        best = min(pair for pair, n in pair_counts.items() if n == best_count)
        merges.append(best)
        merged = join(*best)
        for i in sorted(where.pop(best)):
            _merge_word(symbols[i], best, merged, counts[i], pair_counts, where, i)
        pair_counts.pop(best, None)
    return merges


def _merge_word(syms: list[str], pair: Pair, merged: str, count: int, pair_counts: Counter[Pair],
                where: defaultdict[Pair, set[int]], word_id: int) -> None:
    for old in pairwise(syms):
        pair_counts[old] -= count
        if not pair_counts[old]:
            del pair_counts[old]
    out: list[str] = []
    k = 0
    while k < len(syms):
        if k + 1 < len(syms) and (syms[k], syms[k + 1]) == pair:
            out.append(merged)
            k += 2
        else:
            out.append(syms[k])
            k += 1
    syms[:] = out
    for new in pairwise(syms):
        pair_counts[new] += count
        if new != pair:
            where[new].add(word_id)


def count_words(texts: Iterable[str], split: Callable[[str], list[str]],
                spell: Callable[[str], tuple[str, ...]]) -> Counter[tuple[str, ...]]:
    """Words of `texts` (as `split` cuts them), each spelt as its initial symbols by `spell`, with counts."""
    return Counter(spell(word) for text in texts for word in split(text) if word)


def build_vocab(specials: Iterable[str], alphabet: Iterable[str], merges: list[Pair], vocab_size: int,
                join: Callable[[str, str], str] = str.__add__) -> tuple[dict[str, int], list[Pair]]:
    """Ids: specials, then the sorted alphabet, then each merge's product; merges stop when the vocab is full."""
    tokens = list(dict.fromkeys([*specials, *sorted(set(alphabet))]))
    vocab = {token: i for i, token in enumerate(tokens)}
    kept: list[Pair] = []
    for pair in merges:
        if len(vocab) >= vocab_size:
            break
        kept.append(pair)
        vocab.setdefault(join(*pair), len(vocab))
    return vocab, kept
