"""Statistics of human pairwise preference votes: win rate with its Wilson interval, the sign test, side bias and
inter-rater agreement (Cohen's and Fleiss' kappa). Pure functions of counts and labels; no I/O.

A vote compares system b with system a on one item (a user prompt): b wins, ties or loses. A tie counts half a
win in the win rate and is left out of the sign test, which only asks whether b wins more often than it loses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

CONFIDENCE = 0.95
"""Level of the win-rate interval in the human results."""


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion p = successes / n.

    With z = Phi^-1((1 + confidence) / 2) (1.959964 at 95%):
        centre     = (p + z^2 / (2n)) / (1 + z^2 / n)
        half-width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    and the interval is centre -/+ half-width, always inside [0, 1].

    successes may be fractional (a tie counts half): each vote then scores 0, 1/2 or 1, whose variance is at most
    the Bernoulli p (1 - p), so the interval is, if anything, a little wide. n = 0 gives (nan, nan): no votes say
    nothing, and nan reads as "not computable" (null in JSON, a dash in the report) rather than a claim of [0, 1].
    """
    if n < 0 or not 0.0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf((1.0 + confidence) / 2.0))
    p = successes / n
    shrink = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # rounding can push a bound a hair past [0, 1] when p is 0 or 1
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(wins: float, ties: float, losses: float) -> float:
    """(wins + ties / 2) / (wins + ties + losses); nan when there are no votes."""
    n = wins + ties + losses
    return (wins + ties / 2.0) / n if n else math.nan


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of wins out of wins + losses under p = 0.5 (scipy.stats.binomtest).

    Ties are not passed in: they say neither system is better, so they carry no information on the direction.
    No wins and no losses give 1.0 (nothing against "equally good").
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}")
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(int(wins), int(wins + losses), 0.5).pvalue)


def side_bias(left_wins: int, right_wins: int) -> tuple[float, float]:
    """(share of decided votes won by the left image, two-sided binomial p of that share against 1/2).

    share_left = left_wins / (left_wins + right_wins); the p-value is sign_test(left_wins, right_wins). Sides are
    drawn at random, so a share far from 1/2 says raters favour a side, not a system. No decided votes give
    (nan, 1.0).
    """
    decided = left_wins + right_wins
    share = left_wins / decided if decided else math.nan
    return share, sign_test(left_wins, right_wins)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items (a[i] and b[i] label item i).

    p_o = share of items with a[i] == b[i]; p_e = sum over labels k of (share of a equal to k) * (share of b equal
    to k); kappa = (p_o - p_e) / (1 - p_e). p_e = 1 (both raters gave one and the same label to every item) gives
    nan: agreement is total but so is the agreement chance predicts, and kappa is 0/0.

    Labels must mean the same thing for both raters: which system was preferred ("a", "tie", "b"), not which side,
    since each rater saw their own left/right order.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs one label per item from each rater, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("cohen_kappa needs at least one item")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    if math.isclose(expected, 1.0):
        return math.nan
    return (observed - expected) / (1.0 - expected)


def fleiss_kappa(counts: ArrayLike) -> float:
    """Fleiss' kappa of an items x categories matrix: counts[i, j] raters put item i in category j.

    With n_i = sum_j n_ij raters on item i (each n_i >= 2, and they may differ between items):
        P_i  = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))     share of item i's rater pairs that agree
        Pbar = mean_i P_i
        p_j  = sum_i n_ij / sum_i n_i                     share of all ratings in category j
        P_e  = sum_j p_j^2
        kappa = (Pbar - P_e) / (1 - P_e)
    With the same n on every item this is Fleiss (1971), Psychological Bulletin 76(5). P_e = 1 (every rating in
    one category) gives nan, as in cohen_kappa.
    """
    table = np.asarray(counts, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError(f"fleiss_kappa needs a non-empty items x categories matrix, got shape {table.shape}")
    if (table < 0).any():
        raise ValueError("fleiss_kappa counts must be >= 0")
    raters = table.sum(axis=1)
    if (raters < 2).any():
        raise ValueError(f"every item needs at least 2 ratings, got {raters.min():g} on item {int(raters.argmin())}")
    per_item = ((table ** 2).sum(axis=1) - raters) / (raters * (raters - 1))
    category_share = table.sum(axis=0) / raters.sum()
    expected = float((category_share ** 2).sum())
    if math.isclose(expected, 1.0):
        return math.nan
    return (float(per_item.mean()) - expected) / (1.0 - expected)
