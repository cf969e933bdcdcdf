"""Learned reward models: a causal-LM backbone with scalar regression heads, and the combined reward PPO and eval
use, reward = alpha * PickScore + (1 - alpha) * aesthetic (paper Section 3.3).

The heads are Hugging Face's `AutoModelForSequenceClassification` with `problem_type="regression"`: the score is
read at the last non-padding token, and the checkpoint is a plain `save_pretrained` folder plus `reward_head.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.config import ModelsConfig
from bp_ray.layout import MANIFEST
from bp_ray.train.reward_data import HEADS, HeadSpec, reward_text


def load_regressor(spec: str, models_cfg: ModelsConfig | None, num_heads: int, device: str = "cpu") -> tuple[Any, Any]:
    """(sequence-regression model, right-padding tokenizer) from a causal-LM backbone or a trained RM folder.

    From a backbone the heads start random (transformers says so once); from an RM folder they are restored."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bp_ray.models.loading import quiet_hf_progress, resolve_model

    quiet_hf_progress()
    path = resolve_model(spec, models_cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_heads, problem_type="regression", pad_token_id=tokenizer.pad_token_id)
    return model.to(device), tokenizer


def predict_standardised(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int,
                         batch_size: int = 32) -> np.ndarray:
    """(N, heads) raw head outputs (standardised units) for texts."""
    import torch

    outputs = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(model.device)
            outputs.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, model.config.num_labels))


class LearnedReward:
    """The reward models of one `bp-ray train rm` output folder, for PPO and evaluation.

        reward = LearnedReward.load("runs/tiny/rm", alpha=cfg.rewards.alpha)
        reward.scores(lows, highs)   # {"pickscore": (N,), "aesthetic": (N,)} in the scorers' units
        reward(lows, highs)          # (N,) alpha * pickscore + (1 - alpha) * aesthetic
    """

    def __init__(self, models: list[tuple[Any, Any, HeadSpec]], alpha: float, max_length: int):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1]")
        covered = [head for _, _, spec in models for head in spec.heads]
        if sorted(covered) != sorted(HEADS):
            raise ValueError(f"reward models cover heads {covered}; the combined reward needs exactly {list(HEADS)}")
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

    def __call__(self, lows: Sequence[str], highs: Sequence[str]) -> np.ndarray:
        from bp_ray.rewards.scoring import combined_reward

        scores = self.scores(lows, highs)
        return np.asarray(combined_reward(scores["pickscore"], scores["aesthetic"], self.alpha), dtype=np.float64)
