"""The locally trained tokenizers: deterministic merges, and real-format tokenizers built from them."""

from __future__ import annotations

import random
from collections import Counter

from bp_ray.embedded.world.samples import world_texts
from bp_ray.models.bpe import build_vocab, learn_merges
from bp_ray.models.tokenizers import train_bert_tokenizer, train_clip_tokenizer


def _words(spec: dict[str, int]) -> Counter[tuple[str, ...]]:
    return Counter({tuple(word.split()): n for word, n in spec.items()})


def test_merges_follow_frequency_and_break_ties_by_text() -> None:
    words = _words({"l o w": 5, "l o w e r": 2, "n e w e s t": 6, "w i d e s t": 3})
    # e s and s t both count 9: the smaller pair text wins; then l o / o w (7), then e w beats n e and w est (6).
    assert learn_merges(words, 5) == [("e", "s"), ("es", "t"), ("l", "o"), ("lo", "w"), ("e", "w")]


def test_merges_stop_when_no_pair_is_left() -> None:
    assert learn_merges(_words({"a b": 2, "c": 1}), 10) == [("a", "b")]


def test_wordpiece_join_and_vocab_ids() -> None:
    words = _words({"t ##h ##e": 4, "t ##o": 1})
    merges = learn_merges(words, 5, lambda a, b: a + b.removeprefix("##"))
    # ##h ##e and t ##h tie at 4; the continuation pieces merge into one continuation piece.
    assert merges == [("##h", "##e"), ("t", "##he"), ("t", "##o")]
    vocab, kept = build_vocab(["[PAD]"], ["t", "##h", "##e", "##o"], merges, 7, lambda a, b: a + b.removeprefix("##"))
    assert vocab == {"[PAD]": 0, "##e": 1, "##h": 2, "##o": 3, "t": 4, "##he": 5, "the": 6}
    assert kept == merges[:2]


def test_tokenizers_do_not_depend_on_text_order_or_run() -> None:
    texts = world_texts(0, 300, 300)
    shuffled = random.Random(1).sample(texts, len(texts))
    for train in (train_clip_tokenizer, train_bert_tokenizer):
        first, again, reordered = train(texts, 512), train(texts, 512), train(shuffled, 512)
        assert first.get_vocab() == again.get_vocab() == reordered.get_vocab()
        assert len(first) == 512


def test_trained_tokenizers_keep_world_words_whole_and_round_trip() -> None:
    texts = world_texts(0, 300, 300)
    prompt = "a large red circle above a small blue square, dark background, high contrast"
    clip = train_clip_tokenizer(texts, 1024)
    assert "circle</w>" in clip.tokenize(prompt)
    assert clip.decode(clip(prompt)["input_ids"], skip_special_tokens=True).replace(" ,", ",") == prompt
    bert = train_bert_tokenizer(texts, 1024)
    assert "contrast" in bert.tokenize(prompt)
    assert bert.decode(bert(prompt)["input_ids"], skip_special_tokens=True) == prompt
    # A word never seen still encodes, as pieces, instead of becoming unknown.
    assert bert.unk_token not in bert.tokenize("zebra")
