"""The group-relative methods' math, beside PPO's (`ppo_math.py`): plain torch on (B,) per-response scores whose
rows come in groups of G responses to one user prompt, in order (rows g*G .. g*G+G-1 are group g).

- GRPO (Shao et al. 2024, DeepSeekMath eq. 3): A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every
  token of response i; KL to the reference as a k3 loss term.
- RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other G - 1 rewards of its group (leave one out); KL in the
  reward or in the loss.
- Per-term normalisation (GDPO-style): each reward term standardised within its group before the terms are
  weighted and summed, so a term with a wide spread (the aesthetic) cannot drown one with a narrow spread
  (relevance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bp_ray.train.ppo_math import kl_per_token, masked_mean


def grouped(values: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / G, G): one row per user prompt."""
    if group_size < 2 or values.numel() % group_size:
        raise ValueError(f"{values.numel()} responses do not form groups of {group_size} (group_size >= 2)")
    return values.reshape(-1, group_size)


def group_standardise(values: Tensor, group_size: int, eps: float) -> Tensor:
    """(B,) values minus their group's mean, over the group's standard deviation (unbiased) + eps; a group whose
    values are all equal gets zeros."""
    rows = grouped(values, group_size)
    centred = rows - rows.mean(dim=1, keepdim=True)
    std = rows.std(dim=1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred)).reshape(-1)


def grpo_advantages(scores: Tensor, group_size: int, eps: float) -> Tensor:
    """(B,) GRPO advantages: each score standardised within its group."""
    return group_standardise(scores, group_size, eps)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """(B,) RLOO advantages: each score minus the mean of the other scores of its group."""
    rows = grouped(scores, group_size)
    leave_one_out = (rows.sum(dim=1, keepdim=True) - rows) / (group_size - 1)
    return (rows - leave_one_out).reshape(-1)


def normalised_score(terms: dict[str, Tensor], weights: dict[str, float], group_size: int, eps: float) -> Tensor:
    """(B,) sum over the terms of weight * term standardised within its group (GDPO-style); a zero weight leaves
    its term out."""
    total = torch.zeros_like(next(iter(terms.values())))
    for name, values in terms.items():
        if weights[name]:
            total = total + weights[name] * group_standardise(values, group_size, eps)
    return total


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """(B,) KL of each response to the reference: the per-token estimate summed over its real tokens (what the
    in-reward penalty subtracts from its score)."""
    return (kl_per_token(logprobs, ref_logprobs, estimator) * mask).sum(dim=-1)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GRPO's KL term: the k3 estimate of KL(policy || reference) per token, averaged over real tokens; grad flows
    through the policy's log-probs."""
    return masked_mean(kl_per_token(logprobs, ref_logprobs, "k3"), mask)


def token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) per-response advantages -> (B, T), the same on every real token of the response, 0 on padding."""
    return advantages[:, None] * mask
