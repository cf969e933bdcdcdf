"""The models PPO consults but does not train, as Ray actors with their own resources (on a cluster they sit on
other GPUs than the policy): the frozen reference policy and the reward.

A reference and a reward actor serve each group of `ppo.workers_per_actor` train workers (0: one of each serves
all of them), so eight GPU workers do not queue behind one actor. With ppo.async_rollout each worker also has a
rollout actor: a copy of its policy, one update behind, that samples and scores the next iteration while the
worker updates on this one.

The reward is either the trained reward models (`ppo.reward_source=rm`, with CLIP text relevance between the
low prompt and the generated one) or online rendering and scoring by the reward service of `bp-ray rewards`
(`online`: N seeds per prompt, PickScore, aesthetic and CLIP image relevance to the low prompt, cached).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bp_ray.config import ActorPoolConfig, ModelsConfig, PPOConfig, SFTConfig
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.train.ppo_experience import Experience, FrozenPolicy, Scorer, guards_for, rollout
from bp_ray.train.ppo_rollout import Rollout, response_logprobs


class ReferencePolicy:
    """Ray actor: the frozen SFT policy; log-probs of response tokens for the KL penalty."""

    def __init__(self, model_dir: str, models_cfg: ModelsConfig, device: str = "cpu", threads: int = 1):
        from bp_ray.models.loading import load_causal_lm

        torch.set_num_threads(threads)
        self.model, _ = load_causal_lm(model_dir, models_cfg, device=device)
        self.model.requires_grad_(False)
        self.device = device
        self.served = 0

    @torch.no_grad()
    def logprobs(self, input_ids: np.ndarray, attention_mask: np.ndarray, query_len: int) -> np.ndarray:
        self.served += 1
        rollout = Rollout(torch.as_tensor(input_ids, device=self.device),
                          torch.as_tensor(attention_mask, device=self.device), query_len,
                          torch.ones(0), [])
        return response_logprobs(self.model, rollout).cpu().numpy()

    def calls(self) -> int:
        """How many rollouts this actor has answered (the manifest's per-group load)."""
        return self.served


class LearnedRewardScorer:
    """Ray actor: the trained reward models, plus the text relevance of each generated prompt to its low one (CLIP's
    text tower or the sentence encoder, `relevance`)."""

    def __init__(self, rm_dir: str, alpha: float, models_cfg: ModelsConfig, relevance: str, device: str = "cpu",
                 threads: int = 1):
        from bp_ray.models.loading import load_clip_relevance, load_text_encoder
        from bp_ray.rewards.learned import LearnedReward

        torch.set_num_threads(threads)
        self.reward = LearnedReward.load(Path(rm_dir), alpha, device)
        self.clip = load_clip_relevance(models_cfg, device) if relevance == "clip" else None
        self.encoder = load_text_encoder(models_cfg.text_encoder, models_cfg, device) \
            if relevance == "text_encoder" else None

    @torch.no_grad()
    def score_rewrites(self, lows: list[str], highs: list[str]) -> dict[str, np.ndarray]:
        scores = self.reward.scores(lows, highs)
        relevance = np.zeros(len(lows))
        if self.clip is not None and lows:
            relevance = (self.clip.embed_texts(lows) * self.clip.embed_texts(highs)).sum(-1).float().cpu().numpy()
        if self.encoder is not None and lows:
            relevance = self.encoder.similarity(highs, lows)
        return {**scores, "relevance": relevance, "reward": self.reward(lows, highs, scores)}


def actor_groups(num_workers: int, workers_per_actor: int) -> int:
    """How many reference (and reward) actors serve `num_workers` train workers: one per `workers_per_actor` of
    them, the last group possibly smaller; workers_per_actor=0 means one for all."""
    return math.ceil(num_workers / workers_per_actor) if workers_per_actor else 1


def actor_group(rank: int, workers_per_actor: int) -> int:
    """The group (index into the lists of reference and reward actors) whose actors serve train worker `rank`."""
    return rank // workers_per_actor if workers_per_actor else 0


def restartable(ppo: PPOConfig) -> dict[str, int]:
    """Ray options that bring a killed actor back (its constructor rerun with the same arguments, the handle kept) and
    retry the calls it had not answered, as many times as Ray Train restarts a killed worker. Without them the train
    workers hold a dead handle: every restarted worker group fails on it until ppo.resources.max_failures is spent
    (seen in benchmarks/chaos.py). Each method's answer depends only on its arguments, so a retried call answers the
    same; only ReferencePolicy's call count (the manifest's reference_calls) starts again from 0."""
    return {"max_restarts": ppo.resources.max_failures, "max_task_retries": ppo.resources.max_failures}


def start_reward_actor(ppo: PPOConfig, reward: RewardSetup, pool: ActorPoolConfig, rm_dir: Path | None,
                       cache_path: Path | None) -> Any:
    """The reward actor ppo.reward_source asks for, with `ppo.actor_cpus` / `ppo.actor_gpus` (and the pool's custom
    resources for the online one)."""
    import ray

    if ppo.reward_source == "online":
        from bp_ray.rewards.service import reward_service

        return reward_service(reward, pool, str(cache_path) if cache_path else None, num_gpus=ppo.actor_gpus,
                              num_cpus=ppo.actor_cpus, max_restarts=ppo.resources.max_failures)
    assert rm_dir is not None, "run_ppo checks that the reward models exist"
    actor = ray.remote(LearnedRewardScorer).options(num_cpus=ppo.actor_cpus, num_gpus=ppo.actor_gpus,
                                                    **restartable(ppo))
    relevance = ppo.relevance_model if ppo.relevance_coef > 0 or ppo.intent_hinge_coef > 0 else ""
    return actor.remote(str(rm_dir), reward.rewards.alpha, reward.models, relevance,
                        "cuda" if ppo.actor_gpus else "cpu")


def start_reference_actor(ppo: PPOConfig, models: ModelsConfig, sft_model: Path) -> Any:
    import ray

    actor = ray.remote(ReferencePolicy).options(num_cpus=ppo.actor_cpus, num_gpus=ppo.actor_gpus, **restartable(ppo))
    return actor.remote(str(sft_model), models, "cuda" if ppo.actor_gpus else "cpu")


class RolloutSampler:
    """Ray actor (ppo.async_rollout): samples and scores a worker's next iteration with the weights the worker sends,
    while the worker updates on the current one; the reference and reward actors are its worker's group's."""

    def __init__(self, model_dir: str, models_cfg: ModelsConfig, ppo: PPOConfig, sft: SFTConfig, reference: Any,
                 reward: Any, device: str = "cpu", threads: int = 1):
        from bp_ray.models.loading import load_causal_lm

        torch.set_num_threads(threads)
        policy, tokenizer = load_causal_lm(model_dir, models_cfg, device=device)
        self.policy = FrozenPolicy(policy.requires_grad_(False), tokenizer)
        self.reference, self.ppo, self.sft = reference, ppo, sft
        self.scorer = Scorer(reward, ppo, guards_for(ppo))

    def rollout(self, weights: dict[str, torch.Tensor], policy_step: int, rows: Any, seed: int) -> Experience:
        self.policy.policy.load_state_dict(weights)  # copied onto the actor's device
        torch.manual_seed(seed)
        return rollout(self.policy, self.reference, self.ppo, self.sft, rows, self.scorer, policy_step).to("cpu")


def start_rollout_actor(ppo: PPOConfig, sft: SFTConfig, models: ModelsConfig, sft_model: str, reference: Any,
                        reward: Any) -> Any:
    import ray

    actor = ray.remote(RolloutSampler).options(num_cpus=ppo.actor_cpus, num_gpus=ppo.actor_gpus, **restartable(ppo))
    return actor.remote(sft_model, models, ppo, sft, reference, reward, "cuda" if ppo.actor_gpus else "cpu")
