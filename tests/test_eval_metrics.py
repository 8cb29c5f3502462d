"""The evaluation's statistics against independent computations: Wilson's interval and the exact sign test against
scipy, the normal interval against scipy's standard error, the sign-flip permutation test against an enumeration of
every sign flip, and outcome accuracy against exact fractions."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from scipy import stats

from posttrain.eval.metrics import (
    accuracy_interval,
    outcome_accuracy,
    permutation_test_p,
    sign_test_p,
    wilson_interval,
)

Z95 = 1.96
LEVEL = 2 * stats.norm.cdf(Z95) - 1  # the confidence level whose two-sided normal quantile is exactly 1.96


def test_wilson_interval_matches_scipy():
    for n in (1, 2, 7, 30, 250):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            expected = stats.binomtest(k, n).proportion_ci(confidence_level=LEVEL, method="wilson")
            lo, hi = wilson_interval(k, n)
            assert lo == pytest.approx(expected.low, abs=1e-12) and hi == pytest.approx(expected.high, abs=1e-12)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    with pytest.raises(ValueError, match="k=3, n=2"):
        wilson_interval(3, 2)


def test_accuracy_interval_is_wilson_for_outcomes_and_normal_for_rates():
    outcomes = [1.0] * 17 + [0.0] * 23
    assert accuracy_interval(outcomes) == wilson_interval(17, 40)
    rng = random.Random(0)
    for n in (2, 5, 40):
        rates = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n - 1)] + [0.5]
        mean, sem = sum(rates) / n, stats.sem(rates)  # sem: sample standard deviation / sqrt(n)
        lo, hi = accuracy_interval(rates)
        assert lo == pytest.approx(max(0.0, mean - Z95 * sem), abs=1e-12)
        assert hi == pytest.approx(min(1.0, mean + Z95 * sem), abs=1e-12)
    assert accuracy_interval([0.5]) == (0.5, 0.5)  # one item: no spread to measure
    assert accuracy_interval([0.75, 1.0, 1.0, 1.0])[1] == 1.0  # clipped to [0, 1]
    with pytest.raises(ValueError, match="no items"):
        accuracy_interval([])


def test_sign_test_is_exact():
    assert sign_test_p([True] * 5, [False] * 5) == 1 / 32
    # 3 wins, 1 loss, 2 ties: P(X >= 3 | n=4, p=1/2) = 5/16; ties do not count
    better = [True, True, True, False, True, False]
    worse = [False, False, False, True, True, False]
    assert sign_test_p(better, worse) == 5 / 16
    assert sign_test_p(worse, better) == 15 / 16
    assert sign_test_p([True], [True]) == 1.0
    # per-item success rates: items where the rates differ count, the rest are ties
    assert sign_test_p([0.5, 0.25, 1.0, 0.0], [0.25, 0.25, 0.5, 0.0]) == 1 / 4


def test_sign_test_matches_scipy_binomial_test():
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(1, 80)
        better = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
        worse = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
        wins = sum(b > w for b, w in zip(better, worse))
        losses = sum(w > b for b, w in zip(better, worse))
        expected = stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
        assert sign_test_p(better, worse) == pytest.approx(expected, rel=1e-12)


def exact_sign_flip_p(better: list[float], worse: list[float]) -> float:
    """The definition: the share of all 2^n sign flips of the differences whose sum reaches the observed one."""
    d = [Fraction(b) - Fraction(w) for b, w in zip(better, worse)]
    observed = sum(d)
    flips = list(itertools.product((1, -1), repeat=len(d)))
    return sum(sum(s * x for s, x in zip(signs, d)) >= observed for signs in flips) / len(flips)


def test_permutation_test_matches_the_enumeration_of_every_sign_flip():
    rng = random.Random(2)
    for _ in range(3):
        better = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(12)]
        worse = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(12)]
        exact = exact_sign_flip_p(better, worse)
        resamples = 100_000
        p = permutation_test_p(better, worse, resamples=resamples)
        assert abs(p - exact) < 5 * math.sqrt(exact * (1 - exact) / resamples) + 2 / resamples, (p, exact)
    assert permutation_test_p(better, worse, seed=3) == permutation_test_p(better, worse, seed=3)  # seeded


def test_permutation_test():
    # every item improves by the same amount: only the all-positive flip reaches the observed sum, P = 2^-10
    p = permutation_test_p([0.5] * 10, [0.0] * 10, resamples=200_000)
    assert abs(p - 2**-10) < 5e-4
    # no change anywhere: every flip ties the observed sum of 0
    assert permutation_test_p([0.25, 1.0], [0.25, 1.0]) == 1.0
    # a large gain on few items outweighs small losses on more: the sign test misses it, this test does not
    better, worse = [1.0] * 12 + [0.0] * 20, [0.0] * 12 + [0.125] * 20
    assert sign_test_p(better, worse) > 0.5 and permutation_test_p(better, worse) < 0.01


def test_outcome_accuracy_is_the_mean_over_scored_values():
    values = [1.0, None, 0.0, 1.0, None, 0.5]
    assert outcome_accuracy(values) == float(Fraction(5, 2) / 4)
    assert outcome_accuracy([0.0, 1.0, 1.0]) == 2 / 3
    assert math.isnan(outcome_accuracy([None, None])) and math.isnan(outcome_accuracy([]))
