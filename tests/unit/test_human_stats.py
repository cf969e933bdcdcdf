"""Human-preference statistics against values computed by hand from each formula (arithmetic in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bp_ray.eval.human_stats import cohen_kappa, fleiss_kappa, side_bias, sign_test, wilson_interval, win_rate


def test_wilson_interval_of_7_out_of_10():
    # z = Phi^-1(0.975) = 1.959964; p = 0.7, z^2 = 3.841459, z^2/n = 0.3841459, shrink = 1 + z^2/n = 1.3841459
    # centre = (0.7 + z^2/(2n)) / shrink = (0.7 + 0.1920729) / 1.3841459 = 0.644493
    # half   = z / shrink * sqrt(p(1-p)/n + z^2/(4n^2)) = 1.416010 * sqrt(0.021 + 0.0096036) = 1.416010 * 0.174939
    #        = 0.247715  ->  [0.396778, 0.892208]
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.396778, abs=1e-5)
    assert high == pytest.approx(0.892208, abs=1e-5)


def test_wilson_interval_counts_a_tie_as_half_a_success():
    # 4 wins + 1 tie of 7 votes -> 4.5 / 7 = 0.642857; z^2/n = 0.548780, shrink = 1.548780
    # centre = (0.642857 + 0.274390) / 1.548780 = 0.592238
    # half = (1.959964 / 1.548780) * sqrt(0.642857 * 0.357143 / 7 + 3.841459 / 196) = 1.265487 * 0.228906 = 0.289678
    low, high = wilson_interval(4.5, 7)
    assert (low, high) == pytest.approx((0.302560, 0.881917), abs=1e-5)


def test_wilson_interval_edges():
    # 0 of 10: centre = 0.1920729 / 1.3841459 = 0.138766 = half (1.416010 * sqrt(0.0096036)) -> [0, 0.277533]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)
    # 10 of 10 mirrors it
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.277533, 1.0), abs=1e-5)
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


def test_win_rate_counts_ties_half():
    # (23 + 5/2) / (23 + 5 + 12) = 25.5 / 40
    assert win_rate(23, 5, 12) == pytest.approx(0.6375)
    assert win_rate(0, 4, 0) == pytest.approx(0.5)  # all ties: neither system better
    assert math.isnan(win_rate(0, 0, 0))


def test_sign_test_is_the_exact_two_sided_binomial():
    # P(X >= 8 | n=10, p=1/2) = (C(10,8) + C(10,9) + C(10,10)) / 2^10 = (45 + 10 + 1) / 1024 = 0.0546875; x2
    assert sign_test(8, 2) == pytest.approx(0.109375)
    assert sign_test(2, 8) == pytest.approx(0.109375)
    # 10 of 10: 2 / 1024
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(5, 5) == pytest.approx(1.0)
    assert sign_test(0, 0) == 1.0  # only ties (or nothing): no evidence either way


def test_side_bias_share_and_p():
    # 3 of 4 decided votes went left: share 0.75; p = 2 * (C(4,3) + C(4,4)) / 16 = 10/16
    assert side_bias(3, 1) == pytest.approx((0.75, 0.625))
    share, p = side_bias(0, 0)
    assert math.isnan(share) and p == 1.0


def test_cohen_kappa_2x2_table():
    # rater A x rater B: yes/yes 20, yes/no 5, no/yes 10, no/no 15 (50 items)
    # p_o = (20 + 15) / 50 = 0.7; A says yes 25/50, B 30/50
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_3_categories():
    first = ["b", "b", "b", "b", "b", "a", "a", "tie", "tie", "b"]
    second = ["b", "b", "b", "a", "b", "a", "tie", "tie", "b", "b"]
    # agree on items 0, 1, 2, 4, 5, 7, 9 -> p_o = 7/10
    # first: b 6, a 2, tie 2; second: b 6, a 2, tie 2 -> p_e = (6*6 + 2*2 + 2*2) / 100 = 0.44
    # kappa = (0.7 - 0.44) / 0.56 = 13/28
    assert cohen_kappa(first, second) == pytest.approx(13 / 28)


def test_cohen_kappa_edges():
    assert cohen_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == pytest.approx(1.0)
    # always opposite, one label each: p_o = 0, p_e = 1*0 + 0*1 = 0 -> kappa 0
    assert cohen_kappa(["a", "a"], ["b", "b"]) == pytest.approx(0.0)
    # both only ever say "tie": p_e = 1, kappa = 0/0
    assert math.isnan(cohen_kappa(["tie"] * 4, ["tie"] * 4))
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        cohen_kappa([], [])


WIKIPEDIA_FLEISS = np.array([  # 10 items x 5 categories, 14 raters per item
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
])


def test_fleiss_kappa_classic_example():
    # column sums 20, 28, 39, 21, 32 of 140 ratings -> P_e = (20^2 + 28^2 + 39^2 + 21^2 + 32^2) / 140^2 = 4170 / 19600
    # sum_ij n_ij^2 over all rows = 828 -> Pbar = (828 - 10 * 14) / (10 * 14 * 13) = 688 / 1820 = 0.378022
    # kappa = (0.378022 - 0.212755) / (1 - 0.212755) = 0.209931
    assert fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(0.209931, abs=1e-6)


def test_fleiss_kappa_with_different_numbers_of_raters():
    counts = [[2, 0, 0], [1, 1, 0], [0, 1, 2]]  # categories a, tie, b; n_i = 2, 2, 3
    # P_i = (4 - 2) / 2 = 1, (1 + 1 - 2) / 2 = 0, (1 + 4 - 3) / 6 = 1/3 -> Pbar = 4/9
    # p_j = 3/7, 2/7, 2/7 -> P_e = (9 + 4 + 4) / 49 = 17/49
    # kappa = (4/9 - 17/49) / (32/49) = (43/441) * (49/32) = 43/288
    assert fleiss_kappa(counts) == pytest.approx(43 / 288)


def test_fleiss_kappa_edges():
    assert fleiss_kappa([[3, 0, 0], [0, 2, 0], [0, 0, 4]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[0, 3, 0], [0, 2, 0]]))  # every rating a tie: P_e = 1
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 0, 0], [1, 1, 0]])  # one rater on the first item
    with pytest.raises(ValueError):
        fleiss_kappa(np.zeros((0, 3)))
