"""GRPO and RLOO math against hand-computed values: group advantages, per-term normalisation, the KL terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bp_ray.train.group_math import (
    group_standardise,
    grouped,
    grpo_advantages,
    kl_loss,
    normalised_score,
    rloo_advantages,
    sequence_kl,
    token_advantages,
)
from bp_ray.train.ppo_rollout import Guards

# Two groups of three responses each: rows 0-2 answer one prompt, rows 3-5 another.
SCORES = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def close(actual, expected, atol=1e-6) -> bool:
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=atol)


def test_grpo_advantages_standardise_each_group():
    # group 1: mean 3, unbiased std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7); group 2 is constant: zeros
    std = math.sqrt(7.0)
    expected = [-2 / (std + 0.01), -1 / (std + 0.01), 3 / (std + 0.01), 0.0, 0.0, 0.0]
    assert close(grpo_advantages(SCORES, 3, eps=0.01), expected)


def test_rloo_advantages_subtract_the_mean_of_the_others():
    # row 0: 1 - (2 + 6) / 2 = -3; row 1: 2 - (1 + 6) / 2 = -1.5; row 2: 6 - (1 + 2) / 2 = 4.5
    assert close(rloo_advantages(SCORES, 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    # RLOO's advantages are the centred scores scaled by G / (G - 1)
    centred = SCORES.reshape(2, 3) - SCORES.reshape(2, 3).mean(1, keepdim=True)
    assert close(rloo_advantages(SCORES, 3), (centred * 3 / 2).reshape(-1))


def test_groups_must_be_whole():
    with pytest.raises(ValueError, match="groups of 4"):
        grouped(SCORES, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        grouped(SCORES, 1)


def test_a_shared_baseline_cancels_in_both_methods():
    """The paper's baseline (the reward of the pair's own high prompt) is one number per group."""
    baseline = torch.tensor([4.0, 4.0, 4.0, -1.0, -1.0, -1.0])
    assert close(grpo_advantages(SCORES - baseline, 3, 0.01), grpo_advantages(SCORES, 3, 0.01))
    assert close(rloo_advantages(SCORES - baseline, 3), rloo_advantages(SCORES, 3))


def test_per_term_normalisation_weights_standardised_terms():
    # the aesthetic-like term spreads widely, relevance narrowly; standardised, each counts by its weight alone
    wide = torch.tensor([10.0, 20.0, 30.0, 1.0, 2.0, 3.0])
    narrow = torch.tensor([0.03, 0.02, 0.01, 0.5, 0.5, 0.5])
    got = normalised_score({"reward": wide, "relevance": narrow, "repetition": torch.ones(6)},
                           {"reward": 1.0, "relevance": 2.0, "repetition": -1.0}, 3, eps=0.0)
    # wide: (-1, 0, 1) in both groups (std 10 and 1); narrow: (1, 0, -1) then (0, 0, 0); repetition constant: 0
    assert close(got, [-1 + 2 * 1, 0.0, 1 + 2 * -1, -1.0, 0.0, 1.0], atol=1e-5)
    assert close(group_standardise(wide, 3, 0.0), [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0])
    # a zero weight drops its term, whatever its values
    assert close(normalised_score({"reward": wide, "relevance": narrow}, {"reward": 1.0, "relevance": 0.0}, 3, 0.0),
                 group_standardise(wide, 3, 0.0))


def test_kl_terms():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 3.0]])
    # k1 summed over real tokens: row 0: 0.5 - 1 + 0 = -0.5; row 1: 1 + 0 (the padding's -12 left out)
    assert close(sequence_kl(logprobs, ref, MASK), [-0.5, 1.0])

    def k3(lp, r):
        return math.exp(r - lp) - 1 - (r - lp)

    expected = (k3(-1, -1.5) + k3(-2, -1) + k3(-0.5, -0.5) + k3(-1, -2) + k3(-1, -1)) / 5
    assert close(kl_loss(logprobs, ref, MASK), expected)
    # the loss term pulls the policy towards the reference: its gradient on a token's log-prob is 1 - p_ref / p
    policy = logprobs.clone().requires_grad_(True)
    kl_loss(policy, ref, MASK).backward()
    assert close(policy.grad[0, 0], (1 - math.exp(-1.5 + 1.0)) / 5)
    assert policy.grad[1, 2] == 0  # padding takes no gradient


def test_token_advantages_repeat_the_response_advantage_on_real_tokens():
    assert close(token_advantages(torch.tensor([2.0, -1.0]), MASK), [[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]])


def test_guard_terms_and_weights_rebuild_the_score():
    guards = Guards(relevance_coef=2, max_words=3, length_coef=0.5, repetition_coef=1, intent_hinge_coef=5,
                    intent_margin=0.03)
    reward, relevance, intent = np.array([1.0, 2.0]), np.array([0.7, 0.8]), np.array([0.75, 0.75])
    texts = ["a b c d e", "a b"]
    score, logged = guards.shape(reward, np.array([0.5, 0.5]), relevance, texts, intent)
    # row 0: 1 - 0.5 + 2 * 0.7 - 5 * (0.75 - 0.03 - 0.7) - 0.5 * (5 - 3) = 0.8; row 1: 2 - 0.5 + 1.6 = 3.1
    assert np.allclose(score, [0.8, 3.1])
    terms, weights = guards.terms(reward, relevance, texts, intent), guards.weights()
    assert np.allclose(sum(weights[k] * terms[k] for k in weights) - 0.5, score)
    assert logged["guard/words_over_cap"] == pytest.approx(1.0)


def test_group_methods_need_whole_groups_on_every_worker():
    from bp_ray.config import ConfigError
    from bp_ray.config_loader import load_config

    assert load_config("tiny", ["ppo.algorithm=grpo", "ppo.group_size=4"]).ppo.rollout_batch_size == 16
    with pytest.raises(ConfigError, match=r"multiple of ppo\.group_size=3"):
        load_config("tiny", ["ppo.algorithm=grpo", "ppo.group_size=3"])
    with pytest.raises(ConfigError, match=r"ppo\.algorithm='a2c' is not allowed"):
        load_config("tiny", ["ppo.algorithm=a2c"])
