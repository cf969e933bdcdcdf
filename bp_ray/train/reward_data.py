"""Reward-model examples and metrics: prompt text -> seed-averaged PickScore / aesthetic (paper Section 4.2).

Pure (frames, lists, tensors): `reward.py` runs it inside Ray Train workers, `models/reward_model.py` at inference.
Labels are standardised per head with the training split's mean and std; the statistics travel with the checkpoint
(`reward_head.json`) so predictions come back in the scorers' own units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bp_ray.data import columns as C
from bp_ray.models.reward_heads import HEADS, STYLE, HeadSpec, label_column, reward_text

ROLES = ("low", "high")


def read_labels(labels_dir: Path, roles: Sequence[str] = ROLES) -> tuple[pd.DataFrame, int]:
    """Label files of `bp-ray rewards label` -> (rows of the wanted roles with finite labels, rows dropped).

    Each row is one rendered prompt: `prompt` (what was rendered), `intent` (its pair's low prompt) and the
    seed-averaged scores."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ValueError(f"rm.label_roles={list(roles)}: expected a non-empty subset of {list(ROLES)}")
    files = sorted(Path(labels_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no label files (part-*.parquet) in {labels_dir}: run `bp-ray rewards label` first")
    wanted = [C.PAIR_ID, "role", C.PROMPT, "intent", *map(label_column, HEADS)]
    frame = pd.concat([pd.read_parquet(f, columns=wanted) for f in files], ignore_index=True)
    frame = frame[frame["role"].isin(roles)]
    finite = np.isfinite(frame[[label_column(h) for h in HEADS]].to_numpy(dtype=np.float64)).all(axis=1)
    kept = frame[finite].sort_values([C.PAIR_ID, "role"], kind="stable").reset_index(drop=True)
    return kept, int((~finite).sum())


def read_style_labels(positive: Sequence[str], negative: Sequence[str], rows: int) -> tuple[pd.DataFrame, int]:
    """(rows, duplicates dropped) for a style reward model: each distinct prompt of the first `rows` of every
    positive file labelled 1, of every negative file 0, in the shape of `read_labels` (a prompt is its own intent,
    and its own pair, so held-out rows are whole prompts). A prompt found on both sides is dropped."""
    from bp_ray.data.prompt_io import read_prompts
    from bp_ray.data.prompt_rules import dedup_key

    if not positive or not negative:
        raise ValueError("rm.target=style needs rm.style_positive and rm.style_negative: prompt files of SD-style "
                         "prompts and of plain captions")
    parts = []
    for label, files in ((1.0, positive), (0.0, negative)):
        for path in files:
            table, _ = read_prompts(path, rows)
            parts.append(pd.DataFrame({C.PROMPT: table["prompt"].str.strip(), label_column(STYLE): label}))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame[frame[C.PROMPT].str.len() > 0]
    frame["key"] = frame[C.PROMPT].map(dedup_key)
    labels_per_key = frame.groupby("key")[label_column(STYLE)].nunique()
    ambiguous = frame["key"].isin(labels_per_key[labels_per_key > 1].index)
    kept = frame[~ambiguous].drop_duplicates("key")
    kept = kept.assign(**{C.PAIR_ID: kept["key"], "role": "high", "intent": kept[C.PROMPT]})
    return kept.drop(columns="key").reset_index(drop=True), len(frame) - len(kept)


def fit_head_spec(train: pd.DataFrame, heads: Sequence[str], inputs: Sequence[str],
                  log_odds: bool = False) -> HeadSpec:
    """Standardisation from the training rows (a constant label gets std 1, not a division by zero); none for
    log-odds heads, whose targets are the 0 / 1 labels themselves."""
    if log_odds:
        return HeadSpec(list(heads), list(inputs), [0.0] * len(heads), [1.0] * len(heads), log_odds=True)
    values = train[[label_column(h) for h in heads]].to_numpy(dtype=np.float64)
    std = values.std(axis=0)
    return HeadSpec(list(heads), list(inputs), values.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist())


@dataclass
class RMExample:
    """One text and its standardised targets; NaN where this text does not train that head."""

    input_ids: list[int]
    targets: list[float]


def build_rm_examples(tokenizer: Any, frame: pd.DataFrame, spec: HeadSpec, max_length: int) -> list[RMExample]:
    """Rows -> examples. Heads reading the same text share one example; a head with another input gets its own."""
    targets = (frame[[label_column(h) for h in spec.heads]].to_numpy(dtype=np.float64) - spec.mean) / spec.std
    examples = []
    for mode in dict.fromkeys(spec.inputs):  # each distinct input once, in head order
        columns = [i for i, m in enumerate(spec.inputs) if m == mode]
        texts = [reward_text(mode, low, high) for low, high in zip(frame["intent"], frame[C.PROMPT], strict=True)]
        # Left truncation would drop the user's prompt; the end of a long prompt matters least. A fast tokenizer
        # fails on an empty list (no held-out rows, rm.eval_fraction=0).
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
        for row, tokens in enumerate(ids):
            row_targets = [float(targets[row, i]) if i in columns else float("nan") for i in range(len(spec.heads))]
            examples.append(RMExample(list(tokens), row_targets))
    return examples


def collate_rm(examples: Sequence[RMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask (B, T), targets (B, heads) with NaN where a head is not trained."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :len(example.input_ids)] = 1
    targets = torch.tensor([e.targets for e in examples], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def _known(targets: torch.Tensor) -> torch.Tensor:
    known = torch.isfinite(targets)
    if not bool(known.any()):
        raise ValueError("no finite target in the batch")
    return known


def masked_mse(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite targets only (B, heads)."""
    known = _known(targets)
    diff = predictions.float()[known] - targets[known]
    return (diff * diff).mean()


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of log-odds against 0 / 1 targets, over the finite targets only (B, heads)."""
    known = _known(targets)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float()[known], targets[known])


def head_loss(spec: HeadSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a reward model trains on: cross-entropy for log-odds heads, else MSE on the standardised labels."""
    return masked_bce if spec.log_odds else masked_mse


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson of the ranks (ties get their average rank)."""
    return pearson(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())


def classification_report(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Held-out accuracy of a 0 / 1 head (score above 0.5), the accuracy of always answering the majority class,
    and the ROC AUC (the chance that a random positive outscores a random negative)."""
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64) > 0.5
    positives, negatives = predicted[actual], predicted[~actual]
    auc = float("nan")
    if len(positives) and len(negatives):
        ranks = pd.Series(np.concatenate([positives, negatives])).rank().to_numpy()
        auc = float((ranks[:len(positives)].sum() - len(positives) * (len(positives) + 1) / 2)
                    / (len(positives) * len(negatives)))
    majority = max(actual.mean(), 1 - actual.mean()) if len(actual) else float("nan")
    return {f"rm/{STYLE}/accuracy": float(((predicted > 0.5) == actual).mean()) if len(actual) else float("nan"),
            f"rm/{STYLE}/majority_accuracy": float(majority), f"rm/{STYLE}/auc": auc}


def regression_report(head: str, predicted: np.ndarray, actual: np.ndarray, train_mean: float) -> dict[str, float]:
    """Held-out MSE, Pearson, Spearman of one head in the scorer's units, and the MSE of always predicting the
    training mean (the baseline a useful reward model beats)."""
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    return {f"rm/{head}/mse": float(np.mean((predicted - actual) ** 2)),
            f"rm/{head}/mean_baseline_mse": float(np.mean((train_mean - actual) ** 2)),
            f"rm/{head}/pearson": pearson(predicted, actual),
            f"rm/{head}/spearman": spearman(predicted, actual)}
