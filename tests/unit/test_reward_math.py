"""Pure reward pieces: seed statistics, the combined reward, pair -> prompt rows, and request batching."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest

from bp_ray.data import columns as C
from bp_ray.rewards.pipeline import INTENT, ROLE, label_rows
from bp_ray.rewards.render import seeds_for
from bp_ray.rewards.scoring import combined_reward, seed_stats
from bp_ray.rewards.service import BatchingScorer


def test_seed_stats_are_mean_and_population_std():
    per_seed = np.array([[1.0, 3.0], [2.0, 2.0]])
    mean, std = seed_stats(per_seed)
    # row 0: mean 2, std sqrt(((1-2)^2 + (3-2)^2) / 2) = 1; row 1: mean 2, std 0
    assert np.allclose(mean, [2.0, 2.0]) and np.allclose(std, [1.0, 0.0])


def test_combined_reward_weights_pickscore_by_alpha():
    # 0.7 * 20 + 0.3 * 5 = 15.5
    assert np.allclose(combined_reward(np.array([20.0]), np.array([5.0]), alpha=0.7), [15.5])
    assert np.allclose(combined_reward(np.array([20.0]), np.array([5.0]), alpha=0.0), [5.0])


def test_seeds_are_consecutive_from_the_base():
    assert seeds_for(4, 10) == [10, 11, 12, 13]


def test_every_pair_gives_a_low_and_a_high_row_whose_intent_is_the_low_prompt():
    pairs = pd.DataFrame({C.PAIR_ID: ["p1", "p2"], C.LOW: ["a cat", "a dog"],
                          C.HIGH: ["a cat, oil painting", "a dog, 8k"]})
    rows = label_rows(pairs)
    assert len(rows) == 4
    high = rows[rows[ROLE] == "high"].set_index(C.PAIR_ID)
    assert high.loc["p1", C.PROMPT] == "a cat, oil painting" and high.loc["p1", INTENT] == "a cat"
    low = rows[rows[ROLE] == "low"]
    assert (low[C.PROMPT] == low[INTENT]).all()
    assert rows["prompt_id"].nunique() == 4


def fake_labeler(calls: list[list[str]]):
    """A deterministic stand-in for rendering + scoring: score = (len(prompt), len(intent), seed index)."""
    def label(prompts: list[str], intents: list[str], keep_pixels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        calls.append(list(prompts))
        scores = np.array([[[len(p), len(i), s] for s in range(2)] for p, i in zip(prompts, intents, strict=True)],
                          dtype=float)
        # a 1x1 "image" per seed whose pixel is the prompt length, so a test can tell whose images it got
        pixels = np.broadcast_to(scores[:, :, :1, None, None], (len(prompts), 2, 1, 1, 3)).astype(np.uint8)
        return scores, pixels if keep_pixels else None
    return label


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    calls: list[list[str]] = []
    scorer = BatchingScorer(fake_labeler(calls), alpha=0.5, max_batch=8, wait_s=0.05)

    async def main():
        requests = [[f"p{r}-{k}" * (r + 1) for k in range(2)] for r in range(4)]
        answers = await asyncio.gather(*(scorer.scores(req, req) for req in requests))
        return requests, answers

    requests, answers = asyncio.run(main())
    for request, answer in zip(requests, answers, strict=True):
        assert answer.shape == (2, 2, 3)
        assert answer[:, 0, 0].tolist() == [len(p) for p in request]  # each caller got its own slice
    assert scorer.calls == 4 and scorer.batches == 1 and len(calls) == 1  # 8 prompts fit one batch


def test_batches_respect_the_size_limit_and_rewards_combine_means():
    calls: list[list[str]] = []
    scorer = BatchingScorer(fake_labeler(calls), alpha=0.5, max_batch=3, wait_s=0.01)

    async def main():
        return await asyncio.gather(*(scorer.rewards(["ab", "abcd"], ["x", "x"]) for _ in range(3)))

    results = asyncio.run(main())
    assert all(len(batch) <= 3 for batch in calls) and scorer.batches == 3
    # pickscore mean = len(prompt), aesthetic mean = len(intent) = 1 -> 0.5 * 2 + 0.5 * 1 = 1.5; 0.5 * 4 + 0.5 = 2.5
    assert results == [[1.5, 2.5]] * 3


def test_a_failing_batch_fails_its_callers_and_the_service_goes_on():
    state = {"fail": True}

    def label(prompts, intents, keep_pixels):
        if state.pop("fail", False):
            raise RuntimeError("renderer out of memory")
        return np.zeros((len(prompts), 1, 3)), None

    scorer = BatchingScorer(label, alpha=0.7, max_batch=4, wait_s=0.0)

    async def main():
        with pytest.raises(RuntimeError, match="out of memory"):
            await scorer.scores(["a"], ["a"])
        return await scorer.scores(["b"], ["b"])

    assert asyncio.run(main()).shape == (1, 1, 3)


def test_requests_for_images_get_their_own_images_beside_score_only_requests():
    calls: list[list[str]] = []
    scorer = BatchingScorer(fake_labeler(calls), alpha=0.5, max_batch=8, wait_s=0.05)

    async def main():
        return await asyncio.gather(scorer.scores_and_images(["abc"], ["x"]), scorer.scores(["a", "ab"], ["x", "x"]),
                                    scorer.scores_and_images(["abcde", "ab"], ["x", "x"]))

    (_, pixels_1), plain, (scores_3, pixels_3) = asyncio.run(main())
    assert scorer.batches == 1 and plain.shape == (2, 2, 3)
    assert pixels_1.shape == (1, 2, 1, 1, 3) and pixels_1[0, 0, 0, 0, 0] == 3
    assert pixels_3[:, 0, 0, 0, 0].tolist() == [5, 2] and scores_3[:, 0, 0].tolist() == [5, 2]


def test_mismatched_lengths_are_refused():
    scorer = BatchingScorer(fake_labeler([]), alpha=0.7, max_batch=4, wait_s=0.0)
    with pytest.raises(ValueError, match="2 prompts but 1 intents"):
        asyncio.run(scorer.scores(["a", "b"], ["a"]))


def test_the_online_reward_answers_ppo_as_the_learned_one_does():
    """`score_rewrites(lows, highs)`: the rewrites (highs) are rendered and judged against the user prompts (lows);
    per rewrite the seed means of each score and alpha * PickScore + (1 - alpha) * aesthetic."""
    from bp_ray.rewards.service import RewardService

    seen = []

    def label(prompts, intents, keep_pixels):
        seen.append((prompts, intents))
        per_seed = {"a red circle, sharp": [[20.0, 6.0, 0.7], [22.0, 8.0, 0.9]],
                    "a cat, glowing": [[10.0, 4.0, 0.5], [12.0, 4.0, 0.3]]}
        return np.array([per_seed[p] for p in prompts]), None

    service = RewardService.__new__(RewardService)  # the actor's methods over a scorer that needs no models
    service.core = BatchingScorer(label, alpha=0.25, max_batch=8, wait_s=0.0)
    got = asyncio.run(service.score_rewrites(["a red circle", "a cat"], ["a red circle, sharp", "a cat, glowing"]))
    assert seen == [(["a red circle, sharp", "a cat, glowing"], ["a red circle", "a cat"])]
    np.testing.assert_allclose(got["pickscore"], [21.0, 11.0])
    np.testing.assert_allclose(got["aesthetic"], [7.0, 4.0])
    np.testing.assert_allclose(got["relevance"], [0.8, 0.4])
    np.testing.assert_allclose(got["reward"], [0.25 * 21 + 0.75 * 7, 0.25 * 11 + 0.75 * 4])
