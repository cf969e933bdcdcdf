"""The learned reward: the reward models of one `bp-ray train rm` folder predicting, from text alone, what rendering
a rewrite would score; combined as reward = alpha * PickScore + (1 - alpha) * aesthetic (paper Section 3.3). A style
reward model (rm.target=style) has one head, and the reward is its score."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.layout import MANIFEST
from bp_ray.models.reward_heads import HEADS, STYLE, HeadSpec, reward_text
from bp_ray.models.reward_model import load_regressor, predict_standardised
from bp_ray.rewards.scoring import combined_reward


class LearnedReward:
    """The reward models of one `bp-ray train rm` output folder, for PPO and evaluation.

        reward = LearnedReward.load("runs/tiny/rm", alpha=cfg.rewards.alpha)
        reward.scores(lows, highs)   # {"pickscore": (N,), "aesthetic": (N,)} in the scorers' units
        reward(lows, highs)          # (N,) alpha * pickscore + (1 - alpha) * aesthetic

    A style reward model's scores are {"style": (N,)}, and its reward is that score.
    """

    def __init__(self, models: list[tuple[Any, Any, HeadSpec]], alpha: float, max_length: int):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1]")
        covered = [head for _, _, spec in models for head in spec.heads]
        if sorted(covered) not in (sorted(HEADS), [STYLE]):
            raise ValueError(f"reward models cover heads {covered}; the combined reward needs exactly {list(HEADS)} "
                             f"(or {STYLE!r} alone for a style reward)")
        self.models, self.alpha, self.max_length = models, alpha, max_length

    @classmethod
    def load(cls, rm_dir: Path, alpha: float, device: str = "cpu") -> LearnedReward:
        manifest_path = Path(rm_dir) / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} is missing: train the reward models first (bp-ray train rm)")
        manifest = json.loads(manifest_path.read_text())
        models = []
        for relative in manifest["models"].values():
            folder = Path(rm_dir) / relative
            spec = HeadSpec.load(folder)
            model, tokenizer = load_regressor(str(folder), None, len(spec.heads), device)
            models.append((model, tokenizer, spec))
        return cls(models, alpha, manifest["max_length"])

    def scores(self, lows: Sequence[str], highs: Sequence[str]) -> dict[str, np.ndarray]:
        """Predicted seed-averaged PickScore and aesthetic score of rendering each high prompt for its low one."""
        if len(lows) != len(highs):
            raise ValueError(f"{len(lows)} low prompts but {len(highs)} high prompts")
        out: dict[str, np.ndarray] = {}
        for model, tokenizer, spec in self.models:
            for mode in dict.fromkeys(spec.inputs):
                texts = [reward_text(mode, low, high) for low, high in zip(lows, highs, strict=True)]
                values = spec.to_units(predict_standardised(model, tokenizer, texts, self.max_length))
                for column, head in enumerate(spec.heads):
                    if spec.inputs[column] == mode:
                        out[head] = values[:, column]
        return out

    @property
    def heads(self) -> list[str]:
        return [head for _, _, spec in self.models for head in spec.heads]

    def __call__(self, lows: Sequence[str], highs: Sequence[str],
                 scores: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The reward of each high prompt for its low one; `scores` of `self.scores` spares running the models."""
        scores = self.scores(lows, highs) if scores is None else scores
        if STYLE in scores:
            return np.asarray(scores[STYLE], dtype=np.float64)
        return np.asarray(combined_reward(scores["pickscore"], scores["aesthetic"], self.alpha), dtype=np.float64)
