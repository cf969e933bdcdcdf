"""SFT examples: instruction + low prompt -> high prompt, loss on the target only (paper Section 4.1).

Everything here is pure (lists, arrays, tensors): the Ray Train worker loop in `sft.py` calls it per rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from bp_ray.data import columns as C
from bp_ray.data.policy_format import TEXT_ONLY, encode_prompts, sft_target

IGNORE_INDEX = -100
"""Label that torch's cross-entropy (and HF causal LMs) skip: prompt tokens and padding."""


def split_held_out(pair_ids: Sequence[str], eval_fraction: float, seed: int) -> np.ndarray:
    """(N,) bool mask, True = held out for evaluation; each id decides alone, so a pair never changes side as
    the pair table grows or is reordered."""
    # blake2b of (seed, id), not Python's hash(): that one is salted per process, so ranks would disagree.
    keys = [hashlib.blake2b(f"{seed}:{pair_id}".encode(), digest_size=8).digest() for pair_id in pair_ids]
    unit = np.array([int.from_bytes(key, "big") / 2**64 for key in keys], dtype=np.float64)
    return unit < eval_fraction


@dataclass
class SFTExample:
    """One training sequence; `labels` equals `input_ids` on target tokens and IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def _assemble(prompt_ids: list[int], target_ids: list[int], eos_id: int, max_length: int) -> SFTExample:
    """Prompt + target + EOS in at most max_length tokens: the target is cut first, the prompt (from the left)
    only when it alone leaves no room for the EOS."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt token and the EOS")
    if len(prompt_ids) > max_length - 1:
        # Cut from the left: the end ("Input: <low>\nOutput:") is what the model must continue from.
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - 1):]
    room = max_length - len(prompt_ids) - 1
    target_ids = [*target_ids[:room], eos_id]
    return SFTExample(input_ids=[*prompt_ids, *target_ids],
                      labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids)


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: SFT targets must end with one so generation stops")
    return int(tokenizer.eos_token_id)


def build_example(tokenizer: Any, instruction: str, low: str, high: str, max_length: int,
                  keep_prompt: bool = False) -> SFTExample:
    """One (low, high) pair -> input ids `prompt + " " + high + EOS` (<= max_length) with prompt labels masked."""
    prompt_ids = encode_prompts(tokenizer, instruction, [low], keep_prompt)[0]
    target_ids = tokenizer(" " + sft_target(low, high, keep_prompt), **TEXT_ONLY)["input_ids"]
    return _assemble(prompt_ids, target_ids, _eos_id(tokenizer), max_length)


def build_examples(tokenizer: Any, pairs: pd.DataFrame, instruction: str, max_length: int,
                   keep_prompt: bool = False) -> list[SFTExample]:
    """Pair table (columns `low`, `high`) -> one SFTExample per row, in row order; same rules as build_example."""
    if pairs.empty:
        return []
    eos_id = _eos_id(tokenizer)
    # One batched call per side: the fast tokenizer is much quicker on lists than row by row.
    prompts = encode_prompts(tokenizer, instruction, pairs[C.LOW].tolist(), keep_prompt)
    targets = tokenizer([" " + sft_target(low, high, keep_prompt) for low, high in zip(pairs[C.LOW], pairs[C.HIGH],
                                                                                         strict=True)],
                        **TEXT_ONLY)["input_ids"]
    return [_assemble(p, t, eos_id, max_length) for p, t in zip(prompts, targets, strict=True)]


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[SFTExample]:
    """Greedy, in order: concatenate whole examples into sequences of at most max_length tokens."""
    # Attention is not reset at example boundaries (plain packing): each example ends with EOS and its
    # prompt labels stay masked, so the loss still only covers targets.
    packed: list[SFTExample] = []
    input_ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        if len(example.input_ids) > max_length:
            raise ValueError(f"an example of {len(example.input_ids)} tokens does not fit max_length={max_length}")
        if input_ids and len(input_ids) + len(example.input_ids) > max_length:
            packed.append(SFTExample(input_ids, labels))
            input_ids, labels = [], []
        input_ids.extend(example.input_ids)
        labels.extend(example.labels)
    if input_ids:
        packed.append(SFTExample(input_ids, labels))
    return packed


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (B, T) padded with pad_id, attention_mask (B, T), labels (B, T) padded with
    IGNORE_INDEX; T is the longest example."""
    # Right padding whatever the tokenizer's padding_side (left, for generation): positions then start at 0.
    if not examples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(num_examples: int, epoch: int, seed: int) -> np.ndarray:
    """(num_examples,) permutation fixed by (seed, epoch): a resumed run sees the same order as the first."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches_for_rank(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's share of every global batch: len(order) // batch_size arrays of batch_size // world_size
    example indices (the last partial global batch is dropped so every rank takes the same number of steps)."""
    if world_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be a multiple of world_size={world_size} "
                         "(each worker takes an equal share of every global batch)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1}")
    share = batch_size // world_size
    num_batches = len(order) // batch_size
    return [np.asarray(order[b * batch_size + rank * share: b * batch_size + (rank + 1) * share])
            for b in range(num_batches)]
