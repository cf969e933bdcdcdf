"""Reward-model data: inputs, label reading, standardisation, masking of untrained heads, metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bp_ray.models.reward_heads import HeadSpec, reward_text
from bp_ray.train.reward_data import (
    build_rm_examples,
    classification_report,
    collate_rm,
    fit_head_spec,
    head_loss,
    masked_bce,
    masked_mse,
    pearson,
    read_labels,
    read_style_labels,
    regression_report,
    spearman,
)


class WordTokenizer:
    """One id per word: enough to count examples and check truncation."""

    def __call__(self, texts, truncation=True, max_length=None):
        ids = [[len(w) for w in t.split()] for t in texts]
        return {"input_ids": [i[:max_length] if truncation else i for i in ids]}


def labels_frame(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame({
        "pair_id": [f"p{i // 2}" for i in range(n)], "role": ["low", "high"] * (n // 2),
        "prompt": [f"prompt number {i}" for i in range(n)], "intent": [f"intent {i}" for i in range(n)],
        "pickscore_mean": np.arange(n, dtype=float) + 20, "aesthetic_mean": np.arange(n, dtype=float) * 0.5 + 5,
    })


def test_reward_text_modes():
    assert reward_text("high", "a cat", "a cat, 4k") == "a cat, 4k"
    assert reward_text("low+high", "a {cat}", "a cat, 4k") == "Input: a {cat}\nOutput: a cat, 4k"
    with pytest.raises(ValueError, match="unknown reward-model input 'low'"):
        reward_text("low", "a", "b")


def test_read_labels_keeps_roles_and_drops_non_finite(tmp_path):
    frame = labels_frame(6)
    frame.loc[3, "aesthetic_mean"] = float("nan")
    frame.to_parquet(tmp_path / "part-00000.parquet")
    kept, dropped = read_labels(tmp_path, ["high"])
    assert dropped == 1 and list(kept["role"].unique()) == ["high"] and len(kept) == 2
    both, dropped = read_labels(tmp_path)
    assert len(both) == 5 and dropped == 1
    with pytest.raises(ValueError, match=r"rm\.label_roles"):
        read_labels(tmp_path, ["mid"])
    with pytest.raises(FileNotFoundError, match="bp-ray rewards label"):
        read_labels(tmp_path / "missing")


def test_head_spec_standardises_and_round_trips(tmp_path):
    frame = labels_frame(4).assign(aesthetic_mean=5.0)  # a constant label must not divide by zero
    spec = fit_head_spec(frame, ["pickscore", "aesthetic"], ["low+high", "high"])
    assert spec.mean == pytest.approx([21.5, 5.0]) and spec.std[1] == 1.0
    spec.save(tmp_path)
    again = HeadSpec.load(tmp_path)
    assert again == spec
    np.testing.assert_allclose(again.to_units(np.array([[0.0, 0.0], [1.0, 2.0]])),
                               [[21.5, 5.0], [21.5 + spec.std[0], 7.0]])
    with pytest.raises(FileNotFoundError, match="not a bp-ray reward model"):
        HeadSpec.load(tmp_path / "elsewhere")


def test_heads_with_one_input_share_examples_and_different_inputs_do_not():
    frame = labels_frame(4)
    same = fit_head_spec(frame, ["pickscore", "aesthetic"], ["high", "high"])
    shared = build_rm_examples(WordTokenizer(), frame, same, max_length=32)
    assert len(shared) == 4 and all(math.isfinite(t) for e in shared for t in e.targets)

    apart = fit_head_spec(frame, ["pickscore", "aesthetic"], ["low+high", "high"])
    split = build_rm_examples(WordTokenizer(), frame, apart, max_length=3)
    assert len(split) == 8
    first, second = split[:4], split[4:]
    assert all(math.isfinite(e.targets[0]) and math.isnan(e.targets[1]) for e in first)
    assert all(math.isnan(e.targets[0]) and math.isfinite(e.targets[1]) for e in second)
    assert max(len(e.input_ids) for e in split) == 3
    # standardised: the training targets of a head have mean 0
    assert np.mean([e.targets[0] for e in first]) == pytest.approx(0.0)


def test_collate_pads_right_and_masked_mse_skips_untrained_heads():
    frame = labels_frame(4)
    spec = fit_head_spec(frame, ["pickscore", "aesthetic"], ["low+high", "high"])
    batch = collate_rm(build_rm_examples(WordTokenizer(), frame, spec, 32)[3:5], pad_id=0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["targets"].shape == (2, 2)
    assert batch["attention_mask"][:, 0].all()
    predictions = torch.zeros(2, 2)
    targets = torch.tensor([[1.0, float("nan")], [float("nan"), 3.0]])
    assert float(masked_mse(predictions, targets)) == pytest.approx((1 + 9) / 2)
    with pytest.raises(ValueError, match="no finite target"):
        masked_mse(predictions, torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="empty batch"):
        collate_rm([], 0)


def test_correlations_and_mean_baseline():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, x**3) == pytest.approx(1.0) and pearson(x, x**3) < 1.0
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, np.ones(4)))
    report = regression_report("aesthetic", predicted=x, actual=x + 0.1, train_mean=2.5)
    assert report["rm/aesthetic/mse"] == pytest.approx(0.01)
    assert report["rm/aesthetic/mean_baseline_mse"] == pytest.approx(np.mean((2.5 - (x + 0.1)) ** 2))


def test_no_held_out_rows_give_no_examples_with_a_fast_tokenizer():
    # rm.eval_fraction=0 leaves the held-out frame empty; a fast tokenizer raises on an empty list of texts
    from bp_ray.models.tokenizers import train_bloom_tokenizer

    frame = labels_frame(4)
    spec = fit_head_spec(frame, ["pickscore", "aesthetic"], ["low+high", "high"])
    tokenizer = train_bloom_tokenizer(["a cat on a sofa", "a red car at night"] * 10, 300)
    assert build_rm_examples(tokenizer, frame.iloc[:0], spec, max_length=32) == []
    assert len(build_rm_examples(tokenizer, frame, spec, max_length=32)) == 8


def test_style_labels_are_one_for_sd_prompts_and_zero_for_captions_without_duplicates(tmp_path):
    sd = tmp_path / "sd.jsonl"
    sd.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "castle, highly detailed, artstation", "Castle, highly detailed, artstation.", "a dog, 8k", "  ",
        "a red car")))
    captions = tmp_path / "captions.txt"
    captions.write_text("A dog sitting on a couch.\nA red car\nA man riding a horse.\nA kitchen with a stove.\n")
    frame, dropped = read_style_labels([str(sd)], [str(captions)], rows=3)
    # Rows 1-3 of each file: the near-duplicate castle is dropped; "a red car" is past row 3 of sd.jsonl, so the
    # caption "A red car" stays a negative; the fourth caption is past the limit.
    positives, negatives = (sorted(frame.loc[frame["style_mean"] == label, "prompt"]) for label in (1, 0))
    assert positives == ["a dog, 8k", "castle, highly detailed, artstation"]
    assert negatives == ["A dog sitting on a couch.", "A man riding a horse.", "A red car"]
    assert dropped == 1 and (frame["intent"] == frame["prompt"]).all() and frame["pair_id"].is_unique
    with pytest.raises(ValueError, match="style_negative"):
        read_style_labels([str(sd)], [], rows=3)


def test_a_prompt_on_both_sides_teaches_nothing_and_is_dropped(tmp_path):
    sd, captions = tmp_path / "sd.txt", tmp_path / "captions.txt"
    sd.write_text("a red car\ncastle, artstation\n")
    captions.write_text("A red car.\nA man riding a horse.\n")
    frame, dropped = read_style_labels([str(sd)], [str(captions)], rows=10)
    assert sorted(frame["prompt"]) == ["A man riding a horse.", "castle, artstation"] and dropped == 2


def test_classification_report_against_the_majority_class():
    report = classification_report(np.array([0.9, 0.8, 0.3, 0.6, 0.1]), np.array([1.0, 1.0, 1.0, 0.0, 0.0]))
    assert report["rm/style/accuracy"] == pytest.approx(0.6)  # 0.3 misses a positive, 0.6 a negative
    assert report["rm/style/majority_accuracy"] == pytest.approx(0.6)
    # Positive-negative pairs ranked right: 0.9 and 0.8 beat both negatives, 0.3 beats only 0.1 -> 5 / 6.
    assert report["rm/style/auc"] == pytest.approx(5 / 6)


def test_a_logistic_style_head_learns_log_odds_of_the_raw_labels(tmp_path):
    frame = pd.DataFrame({"style_mean": [1.0, 1.0, 0.0], "prompt": ["castle, 8k", "elf, artstation", "A dog."],
                          "intent": ["castle, 8k", "elf, artstation", "A dog."], "pair_id": ["a", "b", "c"]})
    spec = fit_head_spec(frame, ["style"], ["high"], log_odds=True)
    assert spec.log_odds and spec.mean == [0.0] and spec.std == [1.0]
    assert [e.targets for e in build_rm_examples(WordTokenizer(), frame, spec, 32)] == [[1.0], [1.0], [0.0]]
    spec.save(tmp_path)
    assert HeadSpec.load(tmp_path) == spec
    # The score is the log-odds; held-out figures read its probability.
    np.testing.assert_allclose(spec.to_probability(np.array([[0.0], [math.log(3)]])), [[0.5], [0.75]])
    assert fit_head_spec(frame, ["style"], ["high"]).to_probability(np.array([0.25])) == pytest.approx(0.25)

    logits, targets = torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([[1.0], [0.0], [float("nan")]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2  # the untrained third row does not count
    assert float(masked_bce(logits, targets)) == pytest.approx(expected)
    assert head_loss(spec) is masked_bce and head_loss(fit_head_spec(frame, ["style"], ["high"])) is masked_mse


def test_a_head_file_written_before_log_odds_heads_loads_as_standardised(tmp_path):
    (tmp_path / "reward_head.json").write_text(json.dumps({"heads": ["style"], "inputs": ["high"], "mean": [0.4],
                                                           "std": [0.5]}))
    spec = HeadSpec.load(tmp_path)
    assert not spec.log_odds and spec.to_probability(spec.to_units(np.array([1.0]))) == pytest.approx(0.9)
