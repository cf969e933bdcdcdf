"""Learned reward models: a causal-LM backbone with scalar regression heads (paper Section 4.2); `rewards.learned`
turns a trained folder into the combined reward PPO and eval use.

The heads are Hugging Face's `AutoModelForSequenceClassification` with `problem_type="regression"`: the score is
read at the last non-padding token, and the checkpoint is a plain `save_pretrained` folder plus `reward_head.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bp_ray.config import ModelsConfig


def load_regressor(spec: str, models_cfg: ModelsConfig | None, num_heads: int, device: str = "cpu") -> tuple[Any, Any]:
    """(sequence-regression model, right-padding tokenizer) from a causal-LM backbone or a trained RM folder.

    From a backbone the heads start random (transformers says so once); from an RM folder they are restored."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bp_ray.models.loading import quiet_hf_progress, resolve_model, use_torch_gelu

    quiet_hf_progress()
    path = resolve_model(spec, models_cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_heads, problem_type="regression", pad_token_id=tokenizer.pad_token_id)
    use_torch_gelu(model)
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
