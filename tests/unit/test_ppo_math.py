"""PPO math against hand-computed values: rewards, GAE, clipped losses, KL estimators and controllers, masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bp_ray.train.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_controller,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    value_loss,
)

# Row 0 has three real tokens, row 1 two and one padding position.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def close(actual, expected) -> bool:
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=1e-6)


def with_padding(tensor: torch.Tensor, fill: float) -> torch.Tensor:
    """The same tensor with another value at the padding positions of MASK."""
    return torch.where(MASK.bool(), tensor, torch.full_like(tensor, fill))


# masked statistics

def test_masked_mean_and_var_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # real values 1, 2, 3, 4: mean 2.5; per row 2 and 4
    assert close(masked_mean(values, mask), 2.5)
    assert close(masked_mean(values, mask, dim=1), [2.0, 4.0])
    # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> biased 5/4, unbiased 5/3
    assert close(masked_var(values, mask, unbiased=False), 1.25)
    assert close(masked_var(values, mask), 5 / 3)


def test_masked_var_of_one_token_is_zero_and_of_none_raises():
    assert close(masked_var(torch.tensor([[7.0, 1.0]]), torch.tensor([[1, 0]])), 0.0)
    with pytest.raises(ValueError, match="no real token"):
        masked_var(torch.ones(1, 2), torch.zeros(1, 2))


def test_masked_whiten_normalises_real_tokens_and_zeroes_padding():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # (x - 2.5) / sqrt(5/3) on the real tokens, 0 on padding
    std = math.sqrt(5 / 3)
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert close(masked_whiten(values, mask), expected)
    # shift_mean=False keeps the mean 2.5 on the real tokens
    assert close(masked_whiten(values, mask, shift_mean=False), expected + 2.5 * mask)


# KL

def test_k1_and_k3_kl():
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0, -0.7]), torch.tensor([-2.0, -1.0, -0.7])
    # k1 = logp - ref_logp
    assert close(kl_per_token(logprobs, ref_logprobs, "k1"), [1.0, -1.0, 0.0])
    # k3 = (r - 1) - log r, r = exp(ref - logp): r = e^-1 -> e^-1 - 1 + 1 = e^-1; r = e -> e - 1 - 1 = e - 2
    k3 = kl_per_token(logprobs, ref_logprobs, "k3")
    assert close(k3, [math.exp(-1), math.e - 2, 0.0])
    assert bool((k3 >= 0).all())


def test_unknown_kl_estimator_names_the_choices():
    with pytest.raises(ValueError, match="k1, k3"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


# rewards and advantages

def test_kl_penalty_on_every_real_token_and_score_on_the_last():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -0.5, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -0.5, -1.0], [-1.0, -1.0, 0.0]])
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, MASK, kl_coef=0.1)
    # kl row 0 = [0.5, -0.5, 0]; row 1 = [-1, 0.5, padding -> 0]
    assert close(kl, [[0.5, -0.5, 0.0], [-1.0, 0.5, 0.0]])
    # -0.1 * kl, plus score 2 on row 0's third token and -1 on row 1's second token
    assert close(rewards, [[-0.05, 0.05, 2.0], [0.1, -0.05 - 1.0, 0.0]])


def test_token_rewards_rejects_a_row_without_real_tokens():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_rewards(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2), mask, kl_coef=0.1)


def test_gae_by_hand():
    values = torch.tensor([[0.5, 1.0, 2.0], [1.0, 2.0, 99.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    advantages, returns = gae(values, rewards, MASK, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45; the value after the last real token is 0.
    # row 0: t2: delta = 1 - 2 = -1              -> A = -1
    #        t1: delta = 0 + 0.9*2 - 1 = 0.8      -> A = 0.8 + 0.45*(-1) = 0.35
    #        t0: delta = 0 + 0.9*1 - 0.5 = 0.4    -> A = 0.4 + 0.45*0.35 = 0.5575
    # row 1: t1: delta = 1 - 2 = -1               -> A = -1
    #        t0: delta = 0.5 + 0.9*2 - 1 = 1.3    -> A = 1.3 + 0.45*(-1) = 0.85
    assert close(advantages, [[0.5575, 0.35, -1.0], [0.85, -1.0, 0.0]])
    # returns = A + V on real tokens, 0 on padding
    assert close(returns, [[1.0575, 1.35, 1.0], [1.85, 1.0, 0.0]])


def test_gae_returns_no_grad_and_leaves_inputs_alone():
    values = torch.tensor([[0.5, 1.0, 2.0], [1.0, 2.0, 99.0]], requires_grad=True)
    rewards = torch.ones(2, 3)
    advantages, returns = gae(values, rewards, MASK, gamma=1.0, lam=1.0)
    assert not advantages.requires_grad and not returns.requires_grad
    assert close(values.detach()[1, 2], 99.0) and close(rewards, torch.ones(2, 3))


# clipped losses

@pytest.mark.parametrize(("ratio", "advantage", "expected_loss", "expected_clipfrac"), [
    (1.1, 2.0, -2.2, 0.0),   # inside the clip range: -2 * 1.1
    (1.5, 2.0, -2.4, 1.0),   # A > 0, ratio too high: max(-3.0, -2 * 1.2) = -2.4, clipped
    (0.5, 2.0, -1.0, 0.0),   # A > 0, ratio low: max(-1.0, -2 * 0.8 = -1.6) = -1.0, unclipped
    (0.5, -1.0, 0.8, 1.0),   # A < 0, ratio too low: max(0.5, 0.8) = 0.8, clipped
    (1.5, -1.0, 1.5, 0.0),   # A < 0, ratio high: max(1.5, 1.2) = 1.5, unclipped (pessimistic bound)
])
def test_clipped_policy_loss(ratio, advantage, expected_loss, expected_clipfrac):
    old_logprobs = torch.tensor([[-1.0]])
    logprobs = old_logprobs + math.log(ratio)
    loss, stats = policy_loss(logprobs, old_logprobs, torch.tensor([[advantage]]), torch.ones(1, 1), clip_range=0.2)
    assert close(loss, expected_loss)
    assert stats["clipfrac"] == expected_clipfrac
    assert stats["approx_kl"] == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_clipped_policy_loss_averages_over_real_tokens():
    old_logprobs = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]]))
    advantages = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 5.0]])
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, MASK, clip_range=0.2)
    # per-token losses from the cases above: -2.2, -2.4, -1.0, 0.8, 1.5 -> mean -3.3 / 5; two of five clipped
    assert close(loss, -3.3 / 5)
    assert stats["clipfrac"] == pytest.approx(0.4)


def test_clipped_value_loss():
    old_values, values = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.5, 1.5]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(values, old_values, returns, torch.ones(1, 2), clip_range_value=0.2)
    # v_clipped = 1 + clamp(0.5, -0.2, 0.2) = 1.2
    # token 0: (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped larger)
    # token 1: (1.5-1)^2 = 0.25, (1.2-1)^2 = 0.04 -> 0.25
    # loss = 0.5 * (0.64 + 0.25) / 2 = 0.2225
    assert close(loss, 0.2225)
    assert stats["value_clipfrac"] == pytest.approx(0.5)


# masking

def test_padding_values_change_no_output():
    torch.manual_seed(0)
    clean_inputs = [torch.randn(2, 3) for _ in range(3)]
    padded_inputs = [with_padding(t, fill) for t, fill in zip(clean_inputs, (9.0, -7.0, 50.0), strict=True)]
    outputs = []
    for x, y, z in (clean_inputs, padded_inputs):
        outputs.append([
            masked_mean(x, MASK),
            masked_whiten(x, MASK),
            *gae(x, y, MASK, gamma=0.9, lam=0.95),
            policy_loss(x, y, z, MASK, clip_range=0.2),
            value_loss(x, y, z, MASK, clip_range_value=0.2),
            explained_variance(x, y, MASK),
        ])
    for clean, noisy in zip(*outputs, strict=True):
        if isinstance(clean, tuple):  # (loss, stats)
            assert close(clean[0], noisy[0]) and clean[1] == pytest.approx(noisy[1])
        else:
            assert close(clean, noisy)


@pytest.mark.parametrize(("ids", "expected"), [
    ([5, 2, 7, 2], [1, 1, 0, 0]),  # EOS mid-row: kept, everything after it is padding (a second EOS too)
    ([5, 6, 7, 2], [1, 1, 1, 1]),  # EOS at the end
    ([5, 6, 7, 8], [1, 1, 1, 1]),  # no EOS: cut at max_new_tokens
    ([2, 2, 2, 2], [1, 0, 0, 0]),  # pad_id == eos_id
])
def test_response_mask(ids, expected):
    assert response_mask(torch.tensor([ids]), 2).tolist() == [expected]


def test_response_mask_ends_a_row_at_whichever_stop_token_comes_first():
    rows = torch.tensor([[5, 9, 7, 2], [5, 6, 2, 9], [5, 6, 7, 8]])  # 9: a newline token, 2: EOS
    assert response_mask(rows, (2, 9)).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


# logits

def test_entropy_of_uniform_logits_is_log_vocab():
    assert close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    assert close(entropy_from_logits(torch.full((1, 1, 4), 7.0)), [[math.log(4)]])


def test_logprobs_from_logits_by_hand():
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [0.0, math.log(3)]]])
    labels = torch.tensor([[1, 1, 0]])
    assert close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25), math.log(0.25)]])


def test_explained_variance():
    returns = torch.tensor([[1.0, 3.0], [2.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # real returns 1, 3, 2 have mean 2: predicting it leaves all the variance unexplained
    assert explained_variance(torch.full((2, 2), 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(torch.zeros(2, 2), torch.ones(2, 2), mask))


# KL controllers

@pytest.mark.parametrize(("current_kl", "expected"), [
    (6.6, 0.101),   # error 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 10/100)
    (5.4, 0.099),   # error -0.1 -> 0.1 * (1 - 0.01)
    (60.0, 0.102),  # error 9 clipped to 0.2 -> 0.1 * (1 + 0.2 * 0.1)
    (0.0, 0.098),   # error -1 clipped to -0.2
])
def test_adaptive_kl_controller(current_kl, expected):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    assert controller.update(current_kl, n_steps=10) == pytest.approx(expected)
    assert controller.value == pytest.approx(expected)


def test_fixed_kl_controller_stays_put():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, n_steps=1000) == 0.05 and controller.value == 0.05


def test_kl_controller_choice_and_state_round_trip():
    assert isinstance(kl_controller(0.1, None, 100), FixedKLController)
    controller = kl_controller(0.1, 6.0, 100)
    assert isinstance(controller, AdaptiveKLController)
    controller.update(60.0, n_steps=10)
    resumed = kl_controller(0.1, 6.0, 100)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == pytest.approx(0.102)
    fixed = FixedKLController(0.0)
    fixed.load_state_dict({"value": 0.3})
    assert fixed.state_dict() == {"value": 0.3}


def test_intent_hinge_charges_only_relevance_lost_against_the_users_own_prompt():
    from bp_ray.train.ppo_rollout import Guards

    guards = Guards(relevance_coef=1.0, intent_hinge_coef=10.0, intent_margin=0.02)
    reward, baseline = np.array([5.0, 5.0, 5.0]), np.array([4.0, 4.0, 4.0])
    relevance, intent = np.array([0.70, 0.69, 0.60]), np.array([0.70, 0.70, 0.70])
    score, terms = guards.shape(reward, baseline, relevance, ["a b", "a b", "a b"], intent)
    # 1 + relevance, minus 10 x max(0, 0.70 - 0.02 - relevance): nothing inside the margin, 0.8 for 0.08 short
    np.testing.assert_allclose(score, [1.70, 1.69, 1.60 - 0.8])
    assert terms["guard/intent_kept"] == pytest.approx(2 / 3)
    assert terms["guard/intent_shortfall"] == pytest.approx(0.08 / 3)
    unguarded, _ = Guards(relevance_coef=1.0).shape(reward, baseline, relevance, ["a b"] * 3)
    np.testing.assert_allclose(unguarded, [1.70, 1.69, 1.60])


def test_a_cut_response_and_a_recoloured_rewrite_cost_their_penalties():
    from bp_ray.train.ppo_rollout import Guards

    guards = Guards(missing_eos_penalty=2.0, colour_coef=3.0)
    prompts = ["a yellow triangle", "a yellow triangle", "a cat", "a cat"]
    texts = ["a yellow triangle, 4k", "a purple triangle, 4k", "a cat in a red hat", "a cat, 4k, highly det"]
    stopped = np.array([True, True, True, False])
    reward, baseline, relevance = np.ones(4), np.zeros(4), np.zeros(4)
    score, logged = guards.shape(reward, baseline, relevance, texts, None, prompts, stopped)
    # a new colour is no change where the user gave none; the fourth was cut at max_new_tokens
    np.testing.assert_allclose(score, [1.0, 1.0 - 3.0, 1.0, 1.0 - 2.0])
    assert logged["guard/missing_eos"] == pytest.approx(0.25)
    assert logged["guard/colour_changed"] == pytest.approx(0.25)
    unguarded, _ = Guards().shape(reward, baseline, relevance, texts, None, prompts, stopped)
    np.testing.assert_allclose(unguarded, np.ones(4))
