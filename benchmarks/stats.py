"""The statistics of benchmarks/sample_efficiency.py, apart from the machinery that runs the arms: learning
curves against generated completions, completions to a target, the area under a curve, Student-t intervals of
means over seeds (paired where two arms share their seeds) and percentile bootstrap intervals. A seed that never reaches a target
counts as needing more completions than any budget (math.inf), so medians and intervals stay defined."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence

INF = math.inf


def window_curve(steps: Sequence[tuple[int, float, int]], window: int) -> list[tuple[int, float | None]]:
    """steps: (cumulative completions generated after the step, the step's mean accuracy, its fresh completions).
    Returns (cumulative completions, accuracy over the last `window` generated completions) after every step;
    None until `window` completions were generated. A step counts whole or, at the window's far edge, in part."""
    out, recent = [], []
    for done, acc, n in steps:
        recent.append((n, acc))
        need, num = window, 0.0
        for k, a in reversed(recent):
            take = min(k, need)
            num, need = num + take * a, need - take
            if need == 0:
                break
        out.append((done, num / window if need == 0 else None))
    return out


def to_target(curve: Sequence[tuple[int, float | None]], target: float) -> float:
    """Completions generated when the curve first reaches `target`; INF if it never does."""
    for done, acc in curve:
        if acc is not None and acc >= target - 1e-9:
            return float(done)
    return INF


def value_at(curve: Sequence[tuple[int, float | None]], at: float) -> float | None:
    """The curve's value at `at` completions: the last point at or before it (a step function); None before the
    first defined point."""
    out = None
    for done, acc in curve:
        if done > at:
            break
        if acc is not None:
            out = acc
    return out


def mean_over(curve: Sequence[tuple[int, float | None]], start: float, end: float, points: int = 200) -> float:
    """The area under the step curve between `start` and `end` completions, divided by (end - start): the mean
    accuracy over that range of generated completions, sampled at `points` evenly spaced places."""
    xs = [start + (end - start) * i / (points - 1) for i in range(points)]
    ys = [value_at(curve, x) for x in xs]
    if any(y is None for y in ys):
        raise ValueError(f"curve undefined inside [{start}, {end}]")
    return sum(ys) / points


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def bootstrap(values: Sequence[float], stat: Callable[[list[float]], float] = median, n: int = 10000,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of stat over seeds resampled with replacement."""
    rng = random.Random(seed)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return _percentiles(draws, level)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], stat: Callable[[list[float], list[float]], float],
                     n: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of stat(a*, b*) where a* and b* take the same resampled seed indices (the arms ran
    with the same seeds: the same prompt order and sampling seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different sizes: {len(a)} and {len(b)}")
    rng = random.Random(seed)
    idx = range(len(a))
    draws = []
    for _ in range(n):
        pick = [rng.choice(idx) for _ in idx]
        draws.append(stat([a[i] for i in pick], [b[i] for i in pick]))
    return _percentiles(sorted(draws), level)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The Student-t interval of the mean over seeds: mean +- t(n-1) * sd / sqrt(n). With 5 seeds a
    percentile bootstrap is about 0.6 of this width (it ignores that the spread itself is estimated from 5
    values). NaN for fewer than two values."""
    from scipy import stats as scipy_stats

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired_t_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The t interval of mean(a - b) over seeds that both arms ran (the same prompt order and sampling seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different sizes: {len(a)} and {len(b)}")
    return t_interval([x - y for x, y in zip(a, b)], level)


def ratio_of_medians(num: list[float], den: list[float]) -> float:
    """median(num) / median(den) with INF for a median that never reached the target: INF / finite = INF,
    finite / INF = 0, INF / INF = NaN (undefined)."""
    a, b = median(num), median(den)
    if a == INF and b == INF:
        return math.nan
    if b == INF:
        return 0.0
    return INF if a == INF else a / b


def difference_of_means(a: list[float], b: list[float]) -> float:
    return statistics.fmean(a) - statistics.fmean(b)


def _percentiles(draws: list[float], level: float) -> tuple[float, float]:
    """Lower and upper percentile of sorted draws; NaN draws (undefined) count as the worst case of neither
    side: the interval is NaN when any draw is NaN."""
    if any(math.isnan(d) for d in draws):
        return math.nan, math.nan
    lo = draws[int(math.floor((1 - level) / 2 * (len(draws) - 1)))]
    hi = draws[int(math.ceil((1 + level) / 2 * (len(draws) - 1)))]
    return lo, hi


def fmt(x: float, digits: int = 2) -> str:
    if math.isnan(x):
        return "undefined"
    if x == INF:
        return "inf"
    return f"{x:.{digits}f}"
