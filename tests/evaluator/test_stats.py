"""Wilson intervals, exact McNemar, Newcombe's paired interval and the non-inferiority verdict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from evaluator.stats import mcnemar_exact, newcombe_paired_ci, non_inferiority, paired_difference, wilson


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (34, 50), (50, 50), (321, 450), (1, 500)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


@pytest.mark.parametrize("b,c", [(5, 3), (0, 0), (0, 7), (12, 2), (40, 55)])
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(b: int, c: int) -> None:
    ref = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9)
    assert mcnemar_exact(5, 3) == pytest.approx(0.7265625)  # the shipped 34/50 vs 32/50 comparison


def test_newcombe_paired_interval_published_example() -> None:
    # Newcombe (1998), Stat Med 17:2635, Table II example (a): 36 / 12 / 2 / 0 -> method 10: 0.0569, 0.3404.
    # There p1 - p2 = (b - c) / n with b = 12; here the difference is arm - baseline = (c - b) / n.
    assert newcombe_paired_ci(36, 2, 12, 0) == pytest.approx((0.0569, 0.3404), abs=5e-5)
    lo, hi = newcombe_paired_ci(36, 12, 2, 0)
    assert (lo, hi) == pytest.approx((-0.3404, -0.0569), abs=5e-5)


def test_newcombe_coverage_near_95_percent() -> None:
    rng = np.random.default_rng(0)
    n, p_base, p_arm, corr_share = 200, 0.7, 0.66, 0.8
    hits = 0
    trials = 400
    for _ in range(trials):
        base = rng.random(n) < p_base
        same = rng.random(n) < corr_share  # most pairs share the outcome, as paired episodes do
        arm = np.where(same, base, rng.random(n) < p_arm)
        true = (corr_share * p_base + (1 - corr_share) * p_arm) - p_base
        lo, hi = paired_difference(base.tolist(), arm.tolist()).ci95
        hits += lo <= true <= hi
    assert 0.92 <= hits / trials <= 0.99


def test_paired_difference_and_verdicts() -> None:
    base = [True] * 34 + [False] * 16
    arm = [True] * 29 + [False] * 5 + [True] * 3 + [False] * 13  # 5 baseline-only, 3 arm-only
    c = paired_difference(base, arm)
    assert (c.both, c.baseline_only, c.arm_only, c.neither) == (29, 5, 3, 13)
    assert c.difference == pytest.approx(-0.04) and c.ci95[0] < c.difference < c.ci95[1]
    assert c.mcnemar_p == pytest.approx(0.7265625)
    assert non_inferiority(c.ci95) == "not shown"  # 50 pairs cannot show a 3-point margin
    same = [True] * 400 + [False] * 100
    assert non_inferiority(paired_difference(same, same).ci95) == "non-inferior"
    worse = [True] * 300 + [False] * 200
    assert non_inferiority(paired_difference(same, worse).ci95) == "inferior"
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="margin"):
        non_inferiority((0.0, 0.1), margin=3)
