"""Best-of-n: score candidate rewrites of a user prompt and rank them by reward (rank=reward_model or rank=online).

Both scorers answer with one dict per candidate, in the same units as labelling and evaluation:
reward = alpha * PickScore + (1 - alpha) * aesthetic (paper Section 3.3), with alpha = rewards.alpha.
- TextScorer: the learned reward models of a `bp-ray train rm` folder predict the scores from text alone (fast).
- OnlineScorer: each candidate is rendered with Stable Diffusion on serve.controls.online_seeds seeds, as
  /v1/render renders, and its images scored; the scores are the means over seeds, relevance (CLIP cosine of the
  images to the user prompt) included.
No Ray here: the Scorer deployment (model_deployments.py) wraps these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bp_ray.config import PipelineConfig
from bp_ray.layout import RunLayout
from bp_ray.rewards.scoring import SCORE_NAMES, combined_reward

if TYPE_CHECKING:
    from bp_ray.rewards.labeler import RewardSetup


def _rows(columns: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """{name: (N,)} -> N dicts {name: float}."""
    count = len(next(iter(columns.values())))
    return [{name: float(values[i]) for name, values in columns.items()} for i in range(count)]


def _check_lengths(prompts: Sequence[str], texts: Sequence[str]) -> None:
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts: score one user prompt per candidate")


class TextScorer:
    """The reward models of one `bp-ray train rm` folder: each candidate's seed-averaged PickScore and aesthetic
    score predicted from (user prompt, candidate) text, without rendering."""

    def __init__(self, rm_dir: str | Path, alpha: float, device: str = "cpu"):
        from bp_ray.models.loading import resolve_device
        from bp_ray.rewards.learned import LearnedReward

        self.rm_dir = str(rm_dir)
        self.alpha = alpha
        self.reward = LearnedReward.load(Path(rm_dir), alpha, resolve_device(device))

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[dict[str, float]]:
        """Per candidate texts[i] of user prompt prompts[i]: {"reward", "pickscore", "aesthetic"} (a style reward
        model: {"reward", "style"})."""
        _check_lengths(prompts, texts)
        # one call per model for all pairs; reward combined here rather than by LearnedReward.__call__, which
        # would run the models a second time
        scores = self.reward.scores(lows=list(prompts), highs=list(texts))
        return _rows({"reward": self.reward(prompts, texts, scores), **scores})


def online_setup(cfg: PipelineConfig) -> RewardSetup:
    """What rank=online renders and scores: /v1/render's settings (serve.render, its scheduler included) with
    seeds rewards.seed_base .. + serve.controls.online_seeds - 1, and the `rewards` section (alpha, PickScore
    text)."""
    from bp_ray.rewards.labeler import RewardSetup

    return RewardSetup(cfg.models, cfg.serve.render, cfg.serve.controls.online_seeds, cfg.rewards)


class OnlineScorer:
    """Render every candidate on the setup's seeds and score the images (PickScore, aesthetic, CLIP relevance to
    the user prompt): the labeller's own render + score, without its cache."""

    def __init__(self, setup: RewardSetup):
        from bp_ray.rewards.labeler import RewardLabeler

        self.alpha = setup.rewards.alpha
        # No cache: candidates are sampled text, so a repeat (same text, same user prompt) is rare.
        self.labeler = RewardLabeler(setup, cache_path=None)

    @property
    def seeds(self) -> list[int]:
        return self.labeler.seeds

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[dict[str, float]]:
        """Per candidate texts[i] of user prompt prompts[i]: {"reward", "pickscore", "aesthetic", "relevance"},
        each the mean over the seeds; all candidates are rendered in one batched call."""
        _check_lengths(prompts, texts)
        # the rendered text is the candidate, the intent the user's prompt (relevance, pickscore_text=intent)
        labels = self.labeler.label(list(texts), list(prompts))
        means = labels.scores.mean(axis=1)  # (P, S, 3) -> (P, 3)
        columns = {name: means[:, k] for k, name in enumerate(SCORE_NAMES)}
        # the mean of per-seed rewards: the combination is linear, so combining the means is the same
        reward = combined_reward(columns["pickscore"], columns["aesthetic"], self.alpha)
        return _rows({"reward": reward, **columns})


def ranked(scores: Sequence[dict[str, float]]) -> list[int]:
    """Indices of the candidates by descending "reward"; ties keep their order (stable); NaN rewards last."""

    def key(i: int) -> float:
        reward = scores[i]["reward"]
        return math.inf if math.isnan(reward) else -reward

    return sorted(range(len(scores)), key=key)


def rm_folder(cfg: PipelineConfig) -> str | None:
    """The reward-model folder behind rank=reward_model: serve.controls.reward_model when set (an absolute path;
    a missing folder fails when it is loaded, not here), else the run's `rm` output when its manifest exists,
    else None (rank=reward_model unavailable)."""
    if cfg.serve.controls.reward_model:
        return str(Path(cfg.serve.controls.reward_model).expanduser().resolve())
    layout = RunLayout(Path(cfg.output_dir))
    return str(layout.stage_dir("rm").resolve()) if layout.manifest("rm").exists() else None
