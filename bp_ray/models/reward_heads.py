"""What a reward model's heads predict and read: head names, input modes, and the label standardisation saved
beside the weights (`reward_head.json`) so predictions come back in the scorers' own units."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HEADS = ("pickscore", "aesthetic")
STYLE = "style"
"""The one head of a style reward model (rm.target=style): how much a text reads like an SD prompt, as a
probability (0 to 1) or, with rm.style_loss=logistic, as log-odds."""
INPUTS = ("high", "low+high")
HEAD_FILE = "reward_head.json"
PAIR_TEMPLATE = "Input: {low}\nOutput: {high}"
"""The text a `low+high` head reads: the user's prompt, then the prompt that was rendered."""


def label_column(head: str) -> str:
    return f"{head}_mean"


def reward_text(mode: str, low: str, high: str) -> str:
    """What a head reads: the rendered prompt alone (`high`) or the user's prompt and the rendered one."""
    if mode == "high":
        return high
    if mode == "low+high":
        # str.replace, not str.format: prompts may contain braces.
        return PAIR_TEMPLATE.replace("{low}", low).replace("{high}", high)
    raise ValueError(f"unknown reward-model input {mode!r}: expected one of {', '.join(INPUTS)}")


@dataclass
class HeadSpec:
    """Everything inference needs besides the weights: head order, inputs and label standardisation."""

    heads: list[str]
    inputs: list[str]
    mean: list[float]
    std: list[float]
    log_odds: bool = False
    """The heads predict log-odds of a 0 / 1 label (rm.style_loss=logistic), unstandardised."""

    def save(self, folder: Path) -> None:
        (Path(folder) / HEAD_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> HeadSpec:
        path = Path(folder) / HEAD_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a bp-ray reward model")
        return cls(**json.loads(path.read_text()))

    def to_units(self, standardised: np.ndarray) -> np.ndarray:
        """(N, heads) standardised predictions -> the scorers' units."""
        return standardised * np.asarray(self.std) + np.asarray(self.mean)

    def to_probability(self, units: np.ndarray) -> np.ndarray:
        """Scores in the heads' units -> the probability of label 1 (identity unless the heads give log-odds)."""
        units = np.asarray(units, np.float64)
        return 1.0 / (1.0 + np.exp(-units)) if self.log_odds else units
