"""The learning-rate shape every world trainer uses."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.0) -> float:
    """LR factor at `step` of `steps`: linear warmup over `warmup` steps, then cosine from 1 down to `floor`.

    A floor above zero keeps a short run's last steps small but not wasted.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
