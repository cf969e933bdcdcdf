"""The columns an RL update computes on: the LM head only over the response (logits_to_keep), and a minibatch
trimmed of the padding its rows share, give the log-probs of the full forward pass."""

from __future__ import annotations

import pytest
import torch

from bp_ray.models.loading import load_causal_lm
from bp_ray.train.ppo_math import logprobs_from_logits
from bp_ray.train.ppo_rollout import lm_inputs, response_logprobs, sample

QUERIES = ["a cat", "a red house on a green hill at dusk", "a dog", "an old man reading a book by a window"]


@pytest.fixture(scope="module")
def policy_and_rollout(tiny_models_cfg):
    model, tokenizer = load_causal_lm(tiny_models_cfg.policy, tiny_models_cfg, device="cpu")
    model.eval()
    torch.manual_seed(0)
    return model, sample(model, tokenizer, QUERIES, max_new_tokens=12, temperature=1.0)


def full_logprobs(model, rollout) -> torch.Tensor:
    """Log-probs of the response tokens from the logits of every position."""
    with torch.no_grad():
        logits = model(**lm_inputs(model, rollout.input_ids, rollout.attention_mask)).logits
    return logprobs_from_logits(logits[:, rollout.query_len - 1:-1].float(), rollout.response_ids)


def test_response_logprobs_from_the_kept_logits_equal_the_full_forward(policy_and_rollout):
    model, rollout = policy_and_rollout
    with torch.no_grad():
        kept = response_logprobs(model, rollout)
    assert kept.shape == rollout.mask.shape
    assert torch.allclose(kept, full_logprobs(model, rollout), atol=1e-5)


def test_a_trimmed_minibatch_has_fewer_columns_and_the_same_logprobs(policy_and_rollout):
    model, rollout = policy_and_rollout
    short = rollout.select(torch.tensor([0, 2]))  # the two short queries: the long ones' left padding goes
    trimmed = short.trimmed()
    n = trimmed.mask.shape[1]
    assert trimmed.query_len < short.query_len
    assert trimmed.input_ids.shape[1] < short.input_ids.shape[1]
    assert torch.equal(trimmed.mask, short.mask[:, :n])
    assert torch.equal(trimmed.response_ids, short.response_ids[:, :n])
    assert short.mask[:, n:].sum() == 0  # only padding was cut from the right
    with torch.no_grad():
        got = response_logprobs(model, trimmed)
    assert torch.allclose(got * trimmed.mask, full_logprobs(model, short)[:, :n] * trimmed.mask, atol=1e-5)


def test_an_experience_moves_its_tensors_and_keeps_the_rest():
    from bp_ray.train.ppo_experience import Experience
    from bp_ray.train.ppo_rollout import Rollout

    rollout = Rollout(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), 3, torch.ones(2, 2),
                      ["a", "b"])
    exp = Experience(rollout, torch.zeros(2, 2), None, torch.ones(2, 2), {}, None, {}, {}, {}, 0.1, 0.2, 7)
    moved = exp.to("meta")  # a device with no data: every tensor must have been moved to it
    assert moved.rollout.input_ids.device.type == moved.old_logprobs.device.type == "meta"
    assert moved.ref_logprobs.device.type == moved.rollout.mask.device.type == "meta"
    assert moved.old_values is None and moved.rollout.texts == ["a", "b"] and moved.policy_step == 7
    assert exp.old_logprobs.device.type == "cpu"  # the original is left as it was


def test_a_rollout_knows_which_responses_stopped_before_max_new_tokens(tiny_models_cfg):
    from bp_ray.train.ppo_rollout import stop_token_ids

    model, tokenizer = load_causal_lm(tiny_models_cfg.policy, tiny_models_cfg, device="cpu")
    torch.manual_seed(1)
    rollout = sample(model.eval(), tokenizer, QUERIES * 4, max_new_tokens=6, temperature=1.0)
    stops = torch.as_tensor(stop_token_ids(tokenizer))
    ended = torch.isin(rollout.response_ids, stops) & (rollout.mask > 0)
    assert torch.equal(rollout.stopped, ended.any(dim=1))
    assert rollout.stopped.any() and not rollout.stopped.all()  # the seed gives both kinds
    assert (rollout.mask[~rollout.stopped] == 1).all()  # a cut response runs to the last column
    assert torch.equal(rollout.select(torch.tensor([1, 0])).stopped, rollout.stopped[[1, 0]])
