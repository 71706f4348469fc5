"""benchmarks/stats.py against values computed by hand."""

import math

import pytest

from benchmarks.stats import (
    INF,
    bootstrap,
    difference_of_means,
    mean_over,
    paired_bootstrap,
    paired_t_interval,
    ratio_of_medians,
    t_interval,
    to_target,
    value_at,
    window_curve,
)


def test_window_curve_takes_the_newest_completions():
    # steps of 4 completions at accuracy 0, 1, 0.5; window 6: after step 2 = (4*1 + 2*0) / 6, after step 3 =
    # (4*0.5 + 2*1) / 6
    steps = [(4, 0.0, 4), (8, 1.0, 4), (12, 0.5, 4)]
    assert window_curve(steps, 6) == [(4, None), (8, pytest.approx(4 / 6)), (12, pytest.approx(4 / 6))]
    assert window_curve(steps, 4) == [(4, 0.0), (8, 1.0), (12, 0.5)]


def test_completions_to_target_and_value_at():
    curve = [(4, None), (8, 0.4), (12, 0.7), (16, 0.6)]
    assert to_target(curve, 0.6) == 12 and to_target(curve, 0.4) == 8 and to_target(curve, 0.8) == INF
    assert value_at(curve, 7) is None and value_at(curve, 8) == 0.4 and value_at(curve, 15.9) == 0.7
    assert value_at(curve, 100) == 0.6


def test_mean_over_is_the_area_under_the_step_curve():
    curve = [(0, 0.0), (10, 1.0)]
    # on [0, 20]: 0 on [0, 10), 1 on [10, 20] -> 0.5 (201 points: 100 at 0, 101 at 1)
    assert mean_over(curve, 0, 20, points=201) == pytest.approx(101 / 201)
    with pytest.raises(ValueError, match="undefined"):
        mean_over([(5, 1.0)], 0, 10)


def test_ratio_of_medians_with_seeds_that_never_reached():
    assert ratio_of_medians([10, 20, 30], [5, 10, 15]) == 2.0
    assert ratio_of_medians([10, INF, INF], [5, 10, 15]) == INF  # the numerator's median never reached
    assert ratio_of_medians([10, 20, 30], [INF, INF, 5]) == 0.0
    assert math.isnan(ratio_of_medians([INF], [INF]))


def test_bootstrap_intervals():
    assert bootstrap([3.0, 3.0, 3.0]) == (3.0, 3.0)  # no spread, no interval
    lo, hi = bootstrap([1.0, 2.0, 3.0, 4.0, 5.0], n=2000)
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0 and lo < hi
    # paired: b = a + 1 on every seed, so every resample's difference of means is exactly -1
    a, b = [0.1, 0.5, 0.9, 0.3], [1.1, 1.5, 1.9, 1.3]
    assert paired_bootstrap(a, b, difference_of_means, n=500) == (pytest.approx(-1.0), pytest.approx(-1.0))
    with pytest.raises(ValueError, match="different sizes"):
        paired_bootstrap([1.0], [1.0, 2.0], difference_of_means)
    # an undefined ratio in some resample makes the interval undefined, not a number
    lo, hi = paired_bootstrap([INF, 10.0], [INF, 5.0], ratio_of_medians, n=200)
    assert math.isnan(lo) and math.isnan(hi)


def test_t_intervals_by_hand():
    # mean 3, sd sqrt(2.5) = 1.5811, t(4 df, 0.975) = 2.7764: half width 2.7764 * 1.5811 / sqrt(5) = 1.9632
    lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (lo, hi) == (pytest.approx(1.0368, abs=1e-4), pytest.approx(4.9632, abs=1e-4))
    # paired: the differences 1, 2, 3 (mean 2, sd 1, t(2 df) = 4.3027: half width 4.3027 / sqrt(3) = 2.4841)
    lo, hi = paired_t_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert (lo, hi) == (pytest.approx(-0.4841, abs=1e-4), pytest.approx(4.4841, abs=1e-4))
    assert t_interval([0.4, 0.4]) == (pytest.approx(0.4), pytest.approx(0.4))  # no spread
    assert all(math.isnan(x) for x in t_interval([0.4]))  # one seed: no interval
    with pytest.raises(ValueError, match="different sizes"):
        paired_t_interval([1.0], [1.0, 2.0])
