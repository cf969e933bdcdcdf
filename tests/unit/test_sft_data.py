"""SFT data: prompt format, loss masking, truncation, packing, padding, held-out split, data order per rank."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bp_ray.config import PAPER_INSTRUCTION
from bp_ray.data import columns as C
from bp_ray.data.policy_format import LEADING_PROBE, format_prompt
from bp_ray.train.sft_data import (
    IGNORE_INDEX,
    SFTExample,
    batches_for_rank,
    build_example,
    build_examples,
    collate,
    epoch_order,
    pack_examples,
    split_held_out,
)

EOS = 0


class CharTokenizer:
    """One token per character (id = ord), EOS id 0: lengths in the truncation cases can be counted by hand."""

    eos_token_id = EOS

    def __call__(self, text, add_special_tokens=True, split_special_tokens=False):
        # A user's "</s>" is text (TEXT_ONLY); only leading_tokens' probe asks for the tokenizer's own special
        # tokens, and a character tokenizer has none to add.
        assert (not add_special_tokens and split_special_tokens) or text == LEADING_PROBE
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def bloom_tokenizer(tiny_models_cfg):
    from bp_ray.models.loading import load_causal_lm

    _, tokenizer = load_causal_lm("tiny:bloom", tiny_models_cfg, device="cpu")
    return tokenizer


# --- prompt and masking ---------------------------------------------------------------------------------------

def test_format_prompt_fills_raw_and_leaves_other_braces_alone():
    assert format_prompt("In: {raw}\nOut:", "a {cat|dog}") == "In: a {cat|dog}\nOut:"
    assert format_prompt(PAPER_INSTRUCTION, "a cat").endswith("Input: a cat\nOutput:")


def test_prompt_tokens_are_masked_and_target_ends_with_eos_on_tiny_bloom(bloom_tokenizer):
    tok = bloom_tokenizer
    example = build_example(tok, PAPER_INSTRUCTION, "a cat", "a cat, highly detailed", max_length=384)
    prompt = tok(format_prompt(PAPER_INSTRUCTION, "a cat"), add_special_tokens=False)["input_ids"]
    target = tok(" a cat, highly detailed", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    # input = prompt + target + EOS; labels: -100 on every prompt position, the ids themselves after.
    assert example.input_ids == prompt + target + [eos]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + target + [eos]
    first_target = len(prompt)
    assert example.labels[first_target - 1] == IGNORE_INDEX  # last prompt token ("Output:" ends here)
    assert example.labels[first_target] == example.input_ids[first_target] != IGNORE_INDEX
    assert example.input_ids[-1] == example.labels[-1] == eos
    # Tokenizing the pieces apart matches tokenizing the whole text: the " " join does not shift a boundary.
    whole = tok(format_prompt(PAPER_INSTRUCTION, "a cat") + " a cat, highly detailed", add_special_tokens=False)
    assert whole["input_ids"] == prompt + target


def test_build_examples_matches_build_example_row_by_row(bloom_tokenizer):
    pairs = pd.DataFrame({C.PAIR_ID: ["p0", "p1"], C.LOW: ["a cat", "a house {x}"],
                          C.HIGH: ["a cat, 8k, trending", "a house, concept art"]})
    examples = build_examples(bloom_tokenizer, pairs, PAPER_INSTRUCTION, max_length=64)
    expected = [build_example(bloom_tokenizer, PAPER_INSTRUCTION, low, high, 64)
                for low, high in zip(pairs[C.LOW], pairs[C.HIGH], strict=True)]
    assert examples == expected
    assert build_examples(bloom_tokenizer, pairs.iloc[:0], PAPER_INSTRUCTION, 64) == []


# --- truncation (CharTokenizer: prompt "Q:xyA:" is 6 tokens, target " hello" 6 tokens + EOS) -----------------

def test_example_that_fits_is_not_cut():
    example = build_example(CharTokenizer(), "Q:{raw}A:", "xy", "hello", max_length=13)
    assert example.input_ids == [*ids("Q:xyA: hello"), EOS]
    assert example.labels == [IGNORE_INDEX] * 6 + ids(" hello") + [EOS]


def test_target_is_cut_first_and_still_ends_with_eos():
    example = build_example(CharTokenizer(), "Q:{raw}A:", "xy", "hello", max_length=9)
    # 9 = 6 prompt + 2 target (" h") + EOS
    assert example.input_ids == [*ids("Q:xyA: h"), EOS]
    assert example.labels == [IGNORE_INDEX] * 6 + ids(" h") + [EOS]


def test_prompt_that_just_fits_leaves_only_the_eos():
    example = build_example(CharTokenizer(), "Q:{raw}A:", "xy", "hello", max_length=7)
    assert example.input_ids == [*ids("Q:xyA:"), EOS]
    assert example.labels == [IGNORE_INDEX] * 6 + [EOS]


def test_prompt_too_long_is_cut_from_the_left():
    example = build_example(CharTokenizer(), "Q:{raw}A:", "xy", "hello", max_length=5)
    # the prompt keeps its last 4 tokens ("xyA:"), where the answer starts
    assert example.input_ids == [*ids("xyA:"), EOS]
    assert example.labels == [IGNORE_INDEX] * 4 + [EOS]


def test_max_length_below_two_is_rejected():
    with pytest.raises(ValueError, match="max_length"):
        build_example(CharTokenizer(), "Q:{raw}A:", "xy", "hello", max_length=1)


# --- packing and padding --------------------------------------------------------------------------------------

def make(length: int, start: int) -> SFTExample:
    """An example of `length` tokens with ids start, start+1, ...; prompt = first token (masked)."""
    tokens = list(range(start, start + length))
    return SFTExample(tokens, [IGNORE_INDEX, *tokens[1:]])


def test_packing_is_greedy_keeps_examples_whole_and_respects_max_length():
    examples = [make(n, 100 * i) for i, n in enumerate([3, 4, 2, 5, 1])]
    packed = pack_examples(examples, max_length=6)
    # greedy: [3] (+4 > 6) | [4, 2] (+5 > 6) | [5, 1]
    assert [len(p.input_ids) for p in packed] == [3, 6, 6]
    assert packed[1].input_ids == examples[1].input_ids + examples[2].input_ids
    assert packed[1].labels == examples[1].labels + examples[2].labels  # -100s carried over
    assert all(len(p.input_ids) == len(p.labels) <= 6 for p in packed)
    flat = [t for p in packed for t in p.input_ids]
    assert flat == [t for e in examples for t in e.input_ids]  # nothing lost, order kept, none split


def test_packing_rejects_an_example_longer_than_max_length():
    with pytest.raises(ValueError, match="max_length"):
        pack_examples([make(7, 0)], max_length=6)


def test_collate_pads_on_the_right():
    batch = collate([SFTExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), SFTExample([8], [8])], pad_id=3)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 3) for k in ("input_ids", "attention_mask", "labels")}
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 3, 3]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]))
    assert all(v.dtype == torch.long for v in batch.values())


# --- held-out split ---------------------------------------------------------------------------------------------

def test_held_out_split_is_deterministic_stable_and_about_the_right_size():
    pair_ids = [f"pair-{i}" for i in range(2000)]
    mask = split_held_out(pair_ids, eval_fraction=0.1, seed=7)
    assert mask.dtype == bool and mask.shape == (2000,)
    assert np.array_equal(mask, split_held_out(pair_ids, 0.1, seed=7))
    # binomial(2000, 0.1): mean 200, sd ~13; 0.03 is over 4 sd
    assert abs(mask.mean() - 0.1) < 0.03
    # growing or reordering the table never moves a pair to the other side
    assert np.array_equal(split_held_out(pair_ids[:500], 0.1, seed=7), mask[:500])
    assert np.array_equal(split_held_out(pair_ids[::-1], 0.1, seed=7), mask[::-1])
    assert not np.array_equal(split_held_out(pair_ids, 0.1, seed=8), mask)
    assert not split_held_out(pair_ids, 0.0, seed=7).any()


# --- data order -----------------------------------------------------------------------------------------------

def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = epoch_order(50, epoch=0, seed=1)
    assert sorted(order.tolist()) == list(range(50))
    assert np.array_equal(order, epoch_order(50, epoch=0, seed=1))
    assert not np.array_equal(order, epoch_order(50, epoch=1, seed=1))
    assert not np.array_equal(order, epoch_order(50, epoch=0, seed=2))


def test_batches_for_rank_splits_each_global_batch_exactly_once():
    order = np.array([9, 3, 7, 1, 0, 8, 2, 6, 5, 4])
    rank0 = batches_for_rank(order, batch_size=4, rank=0, world_size=2)
    rank1 = batches_for_rank(order, batch_size=4, rank=1, world_size=2)
    # 10 // 4 = 2 global batches ([9 3 7 1], [0 8 2 6]); the last 2 examples are dropped
    assert [b.tolist() for b in rank0] == [[9, 3], [0, 8]]
    assert [b.tolist() for b in rank1] == [[7, 1], [2, 6]]
    order = epoch_order(103, epoch=3, seed=0)
    shares = [batches_for_rank(order, 12, rank, 3) for rank in range(3)]
    assert all(len(s) == 103 // 12 for s in shares)
    for b in range(103 // 12):
        together = np.concatenate([shares[rank][b] for rank in range(3)])
        assert np.array_equal(together, order[b * 12:(b + 1) * 12])


def test_batches_for_rank_needs_a_batch_divisible_by_world_size():
    with pytest.raises(ValueError, match="multiple of world_size"):
        batches_for_rank(np.arange(10), batch_size=5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        batches_for_rank(np.arange(10), batch_size=4, rank=2, world_size=2)


def test_keep_prompt_begins_the_answer_with_the_user_prompt_and_teaches_only_the_additions():
    from bp_ray.data.policy_format import format_prompt, kept_prefix, policy_text, sft_target

    instruction = "Input: {raw}\nOutput:"
    kept = format_prompt(instruction, "a red circle.", keep_prompt=True)
    assert kept == "Input: a red circle.\nOutput: a red circle,"
    assert format_prompt(instruction, "a red circle.") == "Input: a red circle.\nOutput:"
    assert kept_prefix(" a red circle. ") == "a red circle,"
    high = "a large red circle, dark background, high contrast"
    assert sft_target("a red circle", high, keep_prompt=True) == "dark background, high contrast"
    assert sft_target("a red circle", high) == high
    assert policy_text("a red circle", " dark background, sharp", keep_prompt=True) == \
        "a red circle, dark background, sharp"
    assert policy_text("a red circle", " , ", keep_prompt=True) == "a red circle"  # nothing added: the prompt
    assert policy_text("a red circle", "a blue square", keep_prompt=False) == "a blue square"
