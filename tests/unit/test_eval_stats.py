"""Evaluation statistics against hand-computed values (t quantiles from tables, p-values from closed forms)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bp_ray.eval.stats import (
    PairedComparison,
    mean_ci,
    paired_comparison,
    per_prompt,
    system_table,
    to_records,
    win_table,
)

METRICS = ("pickscore", "aesthetic")

# 3 prompts x 2 seeds x 3 systems, rows deliberately out of order: (system, prompt_id, seed, pickscore, aesthetic)
ROWS = [
    ("sft", 2, 1, 18.0, 7.0), ("original", 0, 0, 20.0, 5.0), ("ppo", 1, 1, 22.0, 6.5),
    ("original", 0, 1, 22.0, 6.0), ("original", 1, 0, 19.0, 4.0), ("original", 1, 1, 21.0, 5.0),
    ("original", 2, 0, 18.0, 6.0), ("original", 2, 1, 18.0, 6.0), ("sft", 0, 0, 21.0, 5.0),
    ("sft", 0, 1, 23.0, 7.0), ("sft", 1, 0, 20.0, 5.0), ("sft", 1, 1, 20.0, 5.0),
    ("sft", 2, 0, 17.0, 6.0), ("ppo", 0, 0, 22.0, 6.0), ("ppo", 0, 1, 24.0, 6.0),
    ("ppo", 1, 0, 22.0, 5.5), ("ppo", 2, 0, 20.0, 6.0), ("ppo", 2, 1, 22.0, 8.0),
]
# per-prompt means over the two seeds, by hand:
#   original: pickscore (20+22)/2=21, (19+21)/2=20, 18;      aesthetic 5.5, 4.5, 6.0
#   sft:      pickscore 22, 20, (17+18)/2=17.5;              aesthetic 6.0, 5.0, 6.5
#   ppo:      pickscore 23, 22, 21;                          aesthetic 6.0, (5.5+6.5)/2=6.0, 7.0


def score_table() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=["system", "prompt_id", "seed", *METRICS])


def test_mean_ci_is_the_student_t_half_width():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sample sd sqrt(5/3) = 1.2909944; se = 1.2909944 / 2 = 0.6454972; t_{0.975,3} = 3.182446
    # -> 3.182446 * 0.6454972 = 2.054260
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(2.054260, rel=1e-5)
    # t_{0.95,3} = 2.353363 -> 2.353363 * 0.6454972 = 1.519089
    assert mean_ci([1.0, 2.0, 3.0, 4.0], confidence=0.90)[1] == pytest.approx(1.519089, rel=1e-5)


def test_mean_ci_of_one_value_has_nan_half_width_and_of_none_raises():
    mean, half = mean_ci([5.0])
    assert mean == 5.0 and math.isnan(half)
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])


def test_per_prompt_averages_over_seeds():
    table = per_prompt(score_table(), METRICS)
    assert list(table.columns) == ["system", "prompt_id", "pickscore", "aesthetic", "num_seeds"]
    assert list(table["system"]) == ["original"] * 3 + ["ppo"] * 3 + ["sft"] * 3
    assert list(table["prompt_id"]) == [0, 1, 2] * 3
    assert list(table["pickscore"]) == pytest.approx([21, 20, 18, 23, 22, 21, 22, 20, 17.5])
    assert list(table["aesthetic"]) == pytest.approx([5.5, 4.5, 6.0, 6.0, 6.0, 7.0, 6.0, 5.0, 6.5])
    assert list(table["num_seeds"]) == [2] * 9


def test_per_prompt_rejects_a_repeated_image():
    scores = pd.concat([score_table(), score_table().iloc[:1]])
    with pytest.raises(ValueError, match="repeated"):
        per_prompt(scores, METRICS)


def test_wins_ties_losses_and_win_rate_split_ties():
    result = paired_comparison([2.0, 1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0], system="ppo", baseline="original",
                               metric="pickscore")
    # diffs [+1, 0, -0.5, +2] -> 2 wins, 1 tie, 1 loss; win rate (2 + 0.5 * 1) / 4 = 0.625; mean diff 2.5 / 4
    assert (result.n, result.wins, result.ties, result.losses) == (4, 2, 1, 1)
    assert result.win_rate == pytest.approx(0.625)
    assert result.mean_diff == pytest.approx(0.625)


def test_paired_t_and_wilcoxon_match_closed_forms():
    result = paired_comparison([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], system="ppo", baseline="sft", metric="aesthetic")
    # diffs [1, 2, 3]: mean 2, sd 1 -> t = 2 / (1 / sqrt 3) = 2 sqrt 3 = 3.4641016
    assert result.t_stat == pytest.approx(3.4641016, rel=1e-6)
    # t with 2 dof has CDF 1/2 + t / (2 sqrt(2 + t^2)) -> two-sided p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(6/7)
    assert result.p_t == pytest.approx(0.0741799, rel=1e-5)
    # half-width t_{0.975,2} * sd / sqrt 3 = 4.302653 / 1.7320508 = 2.484138
    assert result.ci == pytest.approx(2.484138, rel=1e-5)
    # signed ranks all positive, W- = 0; exact null: P(W- <= 0) = 1 / 2^3 -> two-sided p = 2 / 8
    assert result.p_wilcoxon == pytest.approx(0.25)


def test_wilcoxon_drops_ties_including_rounding_level_ones():
    result = paired_comparison([2.0, 1.0 + 1e-12, 0.5, 3.0], [1.0] * 4, system="ppo", baseline="original",
                               metric="pickscore")
    # 1e-12 is a tie: ranks of the other |diffs| 0.5, 1, 2 are 1, 2, 3 with W- = 1 (the -0.5);
    # exact null over 2^3 sign patterns: P(W- <= 1) = 2 / 8 -> two-sided p = 0.5
    # (ranked as a positive diff instead, n = 4 and p would be 2 * 3 / 16 = 0.375)
    assert result.ties == 1
    assert result.p_wilcoxon == pytest.approx(0.5)


def test_all_ties_give_p_one_and_t_zero():
    result = paired_comparison([0.1 + 0.2, 1.0, 2.0], [0.3, 1.0, 2.0], system="sft", baseline="original",
                               metric="relevance")
    assert (result.ties, result.win_rate) == (3, 0.5)
    assert (result.t_stat, result.p_t, result.p_wilcoxon) == (0.0, 1.0, 1.0)


def test_identical_nonzero_diffs_give_infinite_t():
    result = paired_comparison([6.0, 5.0, 6.5], [5.5, 4.5, 6.0], system="sft", baseline="original",
                               metric="aesthetic")
    # diffs [0.5, 0.5, 0.5]: sd 0 -> t = 0.5 / 0 = +inf, p_t = 0, half-width 0;
    # Wilcoxon: 3 positive, W- = 0; tied ranks, exhaustive permutations: P(W- <= 0) = 1/8 -> two-sided 0.25
    assert (result.t_stat, result.p_t, result.ci) == (math.inf, 0.0, 0.0)
    assert result.p_wilcoxon == pytest.approx(0.25)
    assert to_records([result])[0]["t_stat"] is None


def test_one_prompt_gives_nan_interval_and_p_values():
    result = paired_comparison([2.0], [1.0], system="ppo", baseline="original", metric="pickscore")
    assert (result.n, result.wins, result.mean_diff) == (1, 1, 1.0)
    assert all(math.isnan(v) for v in (result.ci, result.t_stat, result.p_t, result.p_wilcoxon))


def test_paired_comparison_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="3 system values but 2 baseline values"):
        paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0], system="ppo", baseline="original", metric="pickscore")
    with pytest.raises(ValueError, match="no prompts"):
        paired_comparison([], [], system="ppo", baseline="original", metric="pickscore")


def test_system_table_rows_follow_the_given_order():
    rows = system_table(per_prompt(score_table(), METRICS), METRICS, ["ppo", "original"])
    assert [row["system"] for row in rows] == ["ppo", "original"]
    assert rows[1]["n"] == 3
    # original pickscore per prompt [21, 20, 18]: mean 59/3 = 19.666667; deviations 4/3, 1/3, -5/3
    # -> var (16 + 1 + 25) / 9 / 2 = 7/3, se = sqrt(7/9) = 0.8819171; t_{0.975,2} = 4.302653 -> 3.794583
    assert rows[1]["pickscore_mean"] == pytest.approx(19.666667, rel=1e-6)
    assert rows[1]["pickscore_ci"] == pytest.approx(3.794583, rel=1e-5)
    # ppo aesthetic [6, 6, 7]: mean 19/3
    assert rows[0]["aesthetic_mean"] == pytest.approx(6.333333, rel=1e-6)


def test_system_table_names_absent_systems():
    with pytest.raises(ValueError, match="llm"):
        system_table(per_prompt(score_table(), METRICS), METRICS, ["original", "llm"])


def test_win_table_pairs_every_system_with_every_baseline():
    comparisons = win_table(per_prompt(score_table(), METRICS), METRICS, ["original", "sft", "ppo"])
    keys = [(c.baseline, c.system, c.metric) for c in comparisons]
    assert keys == [("original", "sft", "pickscore"), ("original", "sft", "aesthetic"),
                    ("original", "ppo", "pickscore"), ("original", "ppo", "aesthetic"),
                    ("sft", "original", "pickscore"), ("sft", "original", "aesthetic"),
                    ("sft", "ppo", "pickscore"), ("sft", "ppo", "aesthetic")]
    sft_vs_original = comparisons[0]
    # pickscore diffs [22-21, 20-20, 17.5-18] = [1, 0, -0.5] -> 1 win, 1 tie, 1 loss, win rate 0.5
    assert (sft_vs_original.wins, sft_vs_original.ties, sft_vs_original.losses) == (1, 1, 1)
    assert sft_vs_original.win_rate == pytest.approx(0.5)
    # ppo vs sft aesthetic diffs [6-6, 6-5, 7-6.5] = [0, 1, 0.5] -> 2 wins, 1 tie: (2 + 0.5) / 3
    assert comparisons[7].win_rate == pytest.approx(2.5 / 3)


def test_win_table_skips_absent_baseline_and_pairs_on_common_prompts():
    table = per_prompt(score_table(), METRICS)
    # no sft checkpoint evaluated, and ppo lost prompt 2
    table = table[(table["system"] != "sft") & ~((table["system"] == "ppo") & (table["prompt_id"] == 2))]
    comparisons = win_table(table, METRICS, ["original", "sft", "ppo"])
    assert [(c.baseline, c.system, c.metric) for c in comparisons] == [("original", "ppo", "pickscore"),
                                                                         ("original", "ppo", "aesthetic")]
    # pickscore on prompts 0, 1: diffs [23-21, 22-20] = [2, 2]
    assert comparisons[0].n == 2 and comparisons[0].mean_diff == pytest.approx(2.0)


def test_records_are_strict_json():
    one_prompt = paired_comparison([2.0], [1.0], system="ppo", baseline="original", metric="pickscore")
    records = to_records([one_prompt])
    assert records[0]["p_t"] is None and records[0]["ci"] is None and records[0]["win_rate"] == 1.0
    assert set(records[0]) == set(PairedComparison.__dataclass_fields__)
    json.dumps(records, allow_nan=False)
