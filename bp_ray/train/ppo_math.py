"""The math of PPO for language models (Ziegler et al. 2019; TRL's classic PPOTrainer), in plain torch.

`ppo.py` runs it inside Ray actors; nothing here knows about Ray or DeepSpeed, so every step is unit-tested by hand.
All per-token tensors are (B, T) over RESPONSE tokens only; `mask` is 1 on a real response token (up to and
including the first stop token: EOS, or a newline, since only a prompt's first line is ever used) and 0 on
the padding after it. The mask is a prefix of each row: real tokens, then padding.
One PPO step: token_rewards (score + KL penalty) -> gae (advantages, returns) -> masked_whiten(advantages)
-> policy_loss + value_loss for a few epochs -> AdaptiveKLController.update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")
WHITEN_EPS = 1e-8


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1, over all elements or along `dim` (NaN where the mask is empty)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over the real tokens. A single real token has variance 0 (no Bessel correction is
    possible) so whitening one token gives 0 rather than NaN."""
    count = mask.sum().item()
    if count == 0:
        raise ValueError("masked_var: the mask has no real token")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(B, T) -> (B, T) with mean 0 and variance 1 over the real tokens (the mean is kept if not `shift_mean`);
    padding comes out 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs, (B, T).

    k1 = log p - log p_ref: unbiased, but negative on single tokens.
    k3 = (r - 1) - log r with r = p_ref / p: unbiased and never negative (Schulman, "Approximating KL divergence").
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def _last_token_index(mask: Tensor) -> Tensor:
    """(B, T) mask -> (B,) position of each row's last real token; a row without one raises."""
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"rows {empty} have no real response token: nothing to put the score on")
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).amax(dim=1)


def token_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                  estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, T): -kl_coef * KL on every real token, plus the sequence score (B,) on the last one
    (Ziegler et al. 2019, eq. 2). Returns (rewards, kl); both are 0 on padding."""
    last = _last_token_index(mask)
    mask = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    score_at_last = F.one_hot(last, mask.shape[1]).to(logprobs.dtype) * scores.to(logprobs.dtype)[:, None]
    return -kl_coef * kl + score_at_last, kl


def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the real tokens, (B, T) each.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}; the state after the last real
    token is terminal (value 0). Returns (advantages, returns = advantages + values), 0 on padding, without grad.
    """
    mask = mask.to(values.dtype)
    values, rewards = values.detach() * mask, rewards.detach() * mask
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padding follows the last real token, so both carries are still 0 when the recursion reaches it.
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, averaged over real tokens; inputs (B, T).

    Stats: `clipfrac`, the share of tokens where the clipped term won; `approx_kl`, mean 0.5 * (log ratio)^2."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask).item(),
                 "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item()}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (as in OpenAI baselines / TRL): the value may move at most `clip_range_value` from the
    rollout's value before the worse error is taken; inputs (B, T). Stats: `value_clipfrac`."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > error).to(values.dtype), mask).item()}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(B, T, V) -> (B, T) entropy of each next-token distribution: logsumexp(z) - sum softmax(z) * z."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, T, V) logits and (B, T) token ids -> (B, T) log-probs of those tokens. Precision follows the logits:
    upcast bf16 logits first if the ratio exp(logp - old_logp) must be exactly 1 on the first epoch."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 one that predicts the
    mean; NaN when the returns are constant."""
    returns_variance = masked_var(returns, mask).item()
    if returns_variance == 0:
        return float("nan")
    return 1.0 - masked_var(returns - values, mask).item() / returns_variance


def response_mask(response_ids: Tensor, stop_ids: int | Sequence[int]) -> Tensor:
    """(B, T) generated ids -> (B, T) long mask: 1 up to and including each row's first stop token (EOS, or any
    of `stop_ids`), 0 after it; a row without one (cut at max_new_tokens) is all 1. Works when pad_id == eos_id."""
    stops = torch.as_tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=response_ids.device)
    is_stop = torch.isin(response_ids, stops).long()
    stop_before = is_stop.cumsum(dim=1) - is_stop
    return (stop_before == 0).long()


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, Section 2.2).

    `n_steps` and `horizon` are in the same unit (TRL: samples): the coefficient changes by at most 20% per
    `horizon`."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def kl_controller(init_kl_coef: float, target: float | None, horizon: int) -> AdaptiveKLController | FixedKLController:
    """Adaptive when a target KL is given, fixed otherwise."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
