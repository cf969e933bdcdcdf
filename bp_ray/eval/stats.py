"""Evaluation statistics: per-prompt means over seeds, per-system means with t intervals, and paired comparisons.

Input is a long score table, one row per image: `prompt_id`, `system` (the prompt rewriter: original, tags, sft,
ppo, llm, ...), `seed`, and one float column per metric (higher is better for every metric). Every system rewrites
the same user prompts, so systems are compared prompt by prompt (paired) on the mean over seeds: the prompt, not
the image, is the unit of analysis, because seeds of one prompt are not independent samples of the system.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from bp_ray.data import columns as C

# Columns of the score table besides `seed` (C.SEED) and the metrics; kept here while eval is the only user.
PROMPT_ID = "prompt_id"
SYSTEM = "system"
NUM_SEEDS = "num_seeds"

CONFIDENCE = 0.95
"""Level of every interval in the tables (system_table `<metric>_ci`, PairedComparison.ci)."""
TIE_TOL = 1e-9
"""|difference of per-prompt means| at or below this is a tie: identical rewrites can differ by rounding only."""
WILCOXON_ZERO_METHOD = "wilcox"
"""Ties are dropped before ranking, so the signed-rank test only sees the prompts where one system won."""


def mean_ci(values: ArrayLike, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Mean of 1-D values and the half-width of its Student-t confidence interval.

    half-width = t_{(1 + confidence) / 2, n - 1} * std(ddof=1) / sqrt(n). One value gives half-width nan (no
    spread to estimate); no values raise ValueError.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"mean_ci needs 1-D values, got shape {array.shape}")
    if array.size == 0:
        raise ValueError("mean_ci needs at least one value, got an empty array")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    n = array.size
    mean = float(array.mean())
    if n == 1:
        return mean, math.nan
    sem = array.std(ddof=1) / math.sqrt(n)
    return mean, float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1) * sem)


def per_prompt(scores: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Long score table (one row per image) -> one row per (system, prompt_id) with each metric averaged over seeds.

    Columns: system, prompt_id, the metrics, num_seeds (images averaged); rows sorted by system, then prompt_id.
    A NaN score is skipped by the mean (pandas default) but its image still counts in num_seeds. A repeated
    (system, prompt_id, seed) raises: it would silently weight one image twice.
    """
    metrics = list(metrics)
    keys = [SYSTEM, PROMPT_ID]
    _require_columns(scores, [*keys, C.SEED, *metrics], "scores")
    repeated = scores.duplicated([*keys, C.SEED])
    if repeated.any():
        first = scores.loc[repeated, [*keys, C.SEED]].iloc[0].tolist()
        raise ValueError(f"{int(repeated.sum())} repeated (system, prompt_id, seed) rows in scores, e.g. {first}")
    grouped = scores.groupby(keys, sort=True)
    table = grouped[metrics].mean()
    table[NUM_SEEDS] = grouped.size()
    return table.reset_index()[[*keys, *metrics, NUM_SEEDS]]


@dataclass
class PairedComparison:
    """One system against one baseline on one metric, paired over the prompts both have.

    Differences are system - baseline of per-prompt means over seeds (positive: the system is better).
    - A tie is |diff| <= tie_tol (default 1e-9); a win is diff > tie_tol, a loss diff < -tie_tol.
    - win_rate = (wins + 0.5 * ties) / n: ties are split evenly, as in the paper-style win-rate tables.
    - mean_diff is the mean difference and ci the half-width of its 95% Student-t interval (nan when n == 1).
    - t_stat, p_t: two-sided paired t-test (scipy.stats.ttest_rel); identical non-zero differences give
      t_stat = +-inf and p_t = 0.0 (scipy's limit; to_records writes the inf as None).
    - p_wilcoxon: two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) with zero_method="wilcox": ties
      (snapped to exactly 0 first) are dropped and the remaining differences ranked; method "auto" (exact up to
      50 differences, exhaustive permutations up to 13 when ranks tie, else the normal approximation).
    - When every difference is a tie, t_stat = 0.0 and both p-values are 1.0 (no evidence of a difference).
    - n < 2 gives t_stat, p_t and p_wilcoxon nan, even for a tie: one prompt cannot be tested.
    """

    system: str
    baseline: str
    metric: str
    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    mean_diff: float
    ci: float
    t_stat: float
    p_t: float
    p_wilcoxon: float


def paired_comparison(system_values: ArrayLike, baseline_values: ArrayLike, *, system: str, baseline: str,
                      metric: str, tie_tol: float = TIE_TOL) -> PairedComparison:
    """Compare aligned per-prompt values (same prompts, same order, each (n,)); conventions in PairedComparison.

    Raises ValueError when the arrays are not 1-D, differ in length, are empty or hold NaN / inf.
    """
    system_array = np.asarray(system_values, dtype=np.float64)
    baseline_array = np.asarray(baseline_values, dtype=np.float64)
    label = f"{system} vs {baseline} on {metric}"
    if system_array.ndim != 1 or baseline_array.ndim != 1:
        raise ValueError(f"{label}: need 1-D arrays, got shapes {system_array.shape} and {baseline_array.shape}")
    if system_array.size != baseline_array.size:
        raise ValueError(f"{label}: {system_array.size} system values but {baseline_array.size} baseline values")
    if system_array.size == 0:
        raise ValueError(f"{label}: no prompts to compare")
    if not (np.isfinite(system_array).all() and np.isfinite(baseline_array).all()):
        raise ValueError(f"{label}: values must be finite (a prompt whose every image failed to score?)")

    # 1. counts
    diffs = system_array - baseline_array
    n = int(diffs.size)
    wins, losses = int((diffs > tie_tol).sum()), int((diffs < -tie_tol).sum())
    ties = n - wins - losses
    mean_diff, ci = mean_ci(diffs)

    # 2. tests
    if n < 2:
        t_stat = p_t = p_wilcoxon = math.nan
    elif ties == n:
        # scipy would return nan (zero variance) or, for rounding-level diffs, a meaningless huge t
        t_stat, p_t, p_wilcoxon = 0.0, 1.0, 1.0
    else:
        if np.ptp(diffs) == 0.0:
            # no spread: scipy gives the same limit but warns of catastrophic cancellation
            t_stat, p_t = math.copysign(math.inf, mean_diff), 0.0
        else:
            t_result = stats.ttest_rel(system_array, baseline_array)
            t_stat, p_t = float(t_result.statistic), float(t_result.pvalue)
        # scipy's zero_method looks for exact zeros, so rounding-level ties are snapped to 0 first
        snapped = np.where(np.abs(diffs) <= tie_tol, 0.0, diffs)
        p_wilcoxon = float(stats.wilcoxon(snapped, zero_method=WILCOXON_ZERO_METHOD).pvalue)

    return PairedComparison(system=system, baseline=baseline, metric=metric, n=n, wins=wins, ties=ties,
                            losses=losses, win_rate=(wins + 0.5 * ties) / n, mean_diff=mean_diff, ci=ci,
                            t_stat=t_stat, p_t=p_t, p_wilcoxon=p_wilcoxon)


def system_table(per_prompt_df: pd.DataFrame, metrics: Sequence[str], systems: Sequence[str]) -> list[dict[str, Any]]:
    """One row per system, in the given order: system, n (prompts), `<metric>_mean` and `<metric>_ci` per metric.

    The interval is over prompts (per-prompt means from per_prompt), at CONFIDENCE. Systems absent from the frame
    raise ValueError naming them.
    """
    _require_columns(per_prompt_df, [SYSTEM, PROMPT_ID, *metrics], "per_prompt_df")
    present = set(per_prompt_df[SYSTEM])
    missing = [name for name in systems if name not in present]
    if missing:
        raise ValueError(f"systems not in the per-prompt frame: {missing}; present: {sorted(present)}")
    rows = []
    for name in systems:
        part = per_prompt_df[per_prompt_df[SYSTEM] == name]
        row: dict[str, Any] = {"system": name, "n": len(part)}
        for metric in metrics:
            row[f"{metric}_mean"], row[f"{metric}_ci"] = mean_ci(part[metric].to_numpy())
        rows.append(row)
    return rows


def win_table(per_prompt_df: pd.DataFrame, metrics: Sequence[str], systems: Sequence[str],
              baselines: Sequence[str] = ("original", "sft"), *, tie_tol: float = TIE_TOL) -> list[PairedComparison]:
    """Paired comparisons of every system against every baseline, ordered baseline, system, metric.

    Baselines and systems absent from the frame are skipped (e.g. no sft checkpoint was evaluated); a system is
    not compared with itself. Values are paired on prompt_id over the prompts both systems have (inner join), so
    n counts only those. Raises ValueError when a present pair shares no prompt or a system repeats a prompt_id.
    """
    metrics = list(metrics)
    _require_columns(per_prompt_df, [SYSTEM, PROMPT_ID, *metrics], "per_prompt_df")
    present = set(per_prompt_df[SYSTEM])
    comparisons = []
    for baseline in baselines:
        if baseline not in present:
            continue
        baseline_rows = per_prompt_df.loc[per_prompt_df[SYSTEM] == baseline, [PROMPT_ID, *metrics]]
        for name in systems:
            if name == baseline or name not in present:
                continue
            system_rows = per_prompt_df.loc[per_prompt_df[SYSTEM] == name, [PROMPT_ID, *metrics]]
            try:
                joined = system_rows.merge(baseline_rows, on=PROMPT_ID, how="inner", suffixes=("_system", "_base"),
                                           validate="one_to_one").sort_values(PROMPT_ID)
            except pd.errors.MergeError as error:
                raise ValueError(f"{name} vs {baseline}: a prompt_id appears twice for one system") from error
            if joined.empty:
                raise ValueError(f"{name} vs {baseline}: no prompt_id in common")
            for metric in metrics:
                comparisons.append(paired_comparison(
                    joined[f"{metric}_system"].to_numpy(), joined[f"{metric}_base"].to_numpy(),
                    system=name, baseline=baseline, metric=metric, tie_tol=tie_tol))
    return comparisons


def to_records(comparisons: Iterable[PairedComparison]) -> list[dict[str, Any]]:
    """Comparisons as plain dicts for JSON; nan and +-inf become None, so json.dumps(allow_nan=False) works."""
    return [{key: _json_safe(value) for key, value in asdict(comparison).items()} for comparison in comparisons]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; has {list(frame.columns)}")
