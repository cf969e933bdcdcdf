"""One RL iteration's experience: sample responses to the low prompts, read their old log-probs (and values), the
reference's log-probs and the reward, shaped by the baseline and the reward-hacking guards. Runs in the Ray Train
worker on its own policy, or (ppo.async_rollout) in a rollout actor on a copy one update behind."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bp_ray.config import PPOConfig, SFTConfig
from bp_ray.data import columns as C
from bp_ray.train.ppo_rollout import Guards


@dataclass
class Scorer:
    """What a rollout's texts score: the reward actor (learned or online), less the paper's baseline (the reward
    of each pair's own high prompt), shaped by the reward-hacking guards."""

    actor: Any
    ppo: Any
    guards: Any

    def scores(self, lows: list[str], texts: list[str]) -> dict[str, np.ndarray]:
        """{"reward", "pickscore", "aesthetic", "relevance"}: (B,) each, from either kind of reward actor (both
        answer `score_rewrites`)."""
        import ray

        return ray.get(self.actor.score_rewrites.remote(lows, texts))

    def baseline(self, rows: Any) -> np.ndarray:
        """Scored with the iteration's whole batch every time rather than cached per pair: padding makes a score
        depend on its batch in the last float bits, and a resumed run must repeat the same numbers. Cheap: the
        learned reward is one forward pass, and the online reward answers repeats from its cache."""
        # A group's responses share their prompt's baseline, so the group methods' advantages cancel it.
        if self.ppo.reward_baseline == "none" or self.ppo.algorithm != "ppo":
            return np.zeros(len(rows))
        return np.asarray(self.scores(rows[C.LOW].tolist(), rows[C.HIGH].tolist())["reward"], dtype=np.float64)

    def intent(self, lows: list[str]) -> np.ndarray | None:
        """Relevance of each low prompt to itself: through its own renders (online, cached after the first time),
        or 1 for the text reward (a prompt's CLIP text embedding against itself)."""
        if not self.ppo.intent_hinge_coef:
            return None
        if self.ppo.reward_source == "rm":
            return np.ones(len(lows))
        return np.asarray(self.scores(lows, lows)["relevance"], dtype=np.float64)

    def shape(self, scores: dict[str, np.ndarray], rows: Any, texts: list[str],
              stopped: Any = None) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        """(B,) scores, (B,) values of each unweighted score term, and the batch means to log. `stopped`: (B,)
        whether each response ended before max_new_tokens (None: all did)."""
        lows = rows[C.LOW].tolist()
        intent = self.intent(lows)
        score, logged = self.guards.shape(scores["reward"], self.baseline(rows), scores["relevance"], texts, intent,
                                          lows, stopped)
        return score, self.guards.terms(scores["reward"], scores["relevance"], texts, intent, lows, stopped), logged


@dataclass
class Experience:
    """One iteration's samples on this worker and everything the update needs of them."""

    rollout: Any
    """ppo_rollout.Rollout: queries, responses, their mask and decoded texts."""
    old_logprobs: Any
    old_values: Any
    ref_logprobs: Any
    scores: dict[str, np.ndarray]
    shaped: np.ndarray
    """(B,) each response's score: reward - baseline + guards."""
    terms: dict[str, np.ndarray]
    """(B,) each unweighted score term (Guards.terms), for per-term group normalisation."""
    weights: dict[str, float]
    """Each term's weight in the score (Guards.weights)."""
    reward_terms: dict[str, float]
    generate_s: float
    reward_s: float
    policy_step: int
    """How many updates the weights that sampled this rollout had (the iteration's own step when on-policy)."""

    def to(self, device: Any) -> Experience:
        """The same experience with its tensors on `device` (a rollout actor's travels through the object store on
        the CPU)."""
        from dataclasses import replace

        return replace(self, rollout=self.rollout.to(device), old_logprobs=self.old_logprobs.to(device),
                       old_values=None if self.old_values is None else self.old_values.to(device),
                       ref_logprobs=self.ref_logprobs.to(device))


def guards_for(ppo: PPOConfig) -> Guards:
    return Guards(ppo.relevance_coef, ppo.max_words, ppo.length_coef, ppo.repetition_coef, ppo.intent_hinge_coef,
                  ppo.intent_margin, ppo.missing_eos_penalty, ppo.colour_coef)


class FrozenPolicy:
    """A policy that only samples (the rollout actor's copy): log-probs without grad and no critic."""

    def __init__(self, policy: Any, tokenizer: Any):
        self.policy, self.tokenizer = policy.eval(), tokenizer

    def logprobs_and_values(self, rollout: Any) -> tuple[Any, None]:
        import torch

        from bp_ray.train.ppo_rollout import response_logprobs

        with torch.no_grad():
            return response_logprobs(self.policy, rollout), None


def rollout(model: Any, reference: Any, ppo: PPOConfig, sft: SFTConfig, rows: Any, scorer: Scorer,
            policy_step: int) -> Experience:
    """Sample a response to each pair's low prompt with `model` (the worker's _ActorCritic, or a FrozenPolicy),
    read its old log-probs and values, the reference's log-probs (an actor, asked while the rest runs) and its
    scores, shaped by the baseline and the guards. `policy_step`: the updates the sampling weights had."""
    import ray
    import torch

    from bp_ray.data.policy_format import encode_prompts, policy_text
    from bp_ray.train.ppo_rollout import sample

    keep = sft.keep_prompt  # with keep_prompt the policy writes only what follows the user prompt
    lows = rows[C.LOW].tolist()
    began = time.perf_counter()
    out = sample(model.policy, model.tokenizer, encode_prompts(model.tokenizer, sft.instruction, lows, keep),
                 ppo.max_new_tokens, ppo.temperature, ppo.top_p, max_query_tokens=ppo.max_query_tokens)
    out.texts = [policy_text(low, text, keep) for low, text in zip(lows, out.texts, strict=True)]
    generated = time.perf_counter()
    ref_future = reference.logprobs.remote(out.input_ids.cpu().numpy(), out.attention_mask.cpu().numpy(),
                                           out.query_len)
    old_logprobs, old_values = model.logprobs_and_values(out)
    scores = scorer.scores(lows, out.texts)
    ref_logprobs = torch.as_tensor(ray.get(ref_future), device=old_logprobs.device)
    shaped, terms, logged = scorer.shape(scores, rows, out.texts, out.stopped)
    return Experience(out, old_logprobs, old_values, ref_logprobs, scores, shaped, terms, scorer.guards.weights(),
                      logged, generated - began, time.perf_counter() - generated, policy_step)
