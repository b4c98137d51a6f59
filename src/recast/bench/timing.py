"""Timing A against B: interleaved rounds, per-pair ratios with their spread, pooled processes.

The rules ``recast bench --perf`` measures by, kept apart from what it measures:

- :func:`interleaved` runs the sides in turn after a warm-up, alternating the order each round, so
  that a drift of the machine falls on every side alike.
- :func:`paired_ratio` is the median of per-round ratios, with its interquartile range (how much
  single rounds scatter) and the median's own 50% confidence interval (how well the repeats pin
  the median down: it narrows as rounds are added, the quartiles do not).
- :func:`rounds_per_process` splits rounds over fresh processes: where a process's allocator
  places each model's weights biases every round of that process alike (the same pair of models
  measured 0.93 in one process and 0.98 in another), so figures pool several short processes.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def paired_ratio(a_times: Sequence[float], b_times: Sequence[float], unit: str = "s") -> dict[str, Any]:
    """The median of per-pair ratios ``a[i] / b[i]``, its interquartile range, the median's 50%
    confidence interval (:func:`median_interval`) and both sides' medians."""
    if len(a_times) != len(b_times) or not a_times:
        raise ValueError("paired_ratio needs as many A as B measurements, at least one")
    ratios = sorted(a / b for a, b in zip(a_times, b_times, strict=True))
    q1, q3 = _quantile(ratios, 0.25), _quantile(ratios, 0.75)
    middle = statistics.median(ratios)
    low, high = median_interval(ratios)
    return {"ratio": middle, "iqr": [q1, q3], "iqr_rel": (q3 - q1) / middle,
            "median_interval": [low, high], "median_interval_rel": (high - low) / middle, "repeats": len(ratios),
            "a": statistics.median(a_times), "b": statistics.median(b_times), "unit": unit}


QUARTILE_Z = 0.6745
"""The standard normal's 75% point: +-QUARTILE_Z standard deviations hold half of its mass."""


def median_interval(sorted_values: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 50% confidence interval for the median of already sorted values.

    How many of n rounds fall below the true median is Binomial(n, 1/2); the order statistics
    ``n/2 -+ QUARTILE_Z * sqrt(n) / 2`` (normal approximation) bracket the median about half of the
    time. No assumption about the shape of the timings, and no random resampling.
    """
    count = len(sorted_values)
    half_width = QUARTILE_Z * math.sqrt(count) / 2
    low = max(0, math.floor(count / 2 - half_width))
    high = min(count - 1, math.ceil(count / 2 + half_width) - 1)
    return sorted_values[low], sorted_values[max(low, high)]


def interleaved(sides: Sequence[Callable[[], Any]], repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of each side per round: ``warmup`` untimed calls each, then ``repeats`` rounds.

    Rounds alternate the order (A B, B A, A B, ...) so that whatever the machine does meanwhile
    falls on every side alike; the result has one list of ``repeats`` times per side.
    """
    for _ in range(warmup):
        for side in sides:
            side()
    times: list[list[float]] = [[] for _ in sides]
    gc.collect()  # a collection inside a timed call would land on whichever side allocated last
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(repeats):
            order = range(len(sides)) if round_ % 2 == 0 else reversed(range(len(sides)))
            for index in order:
                start = time.perf_counter()
                sides[index]()
                times[index].append(time.perf_counter() - start)
    finally:
        if was_enabled:
            gc.enable()
    return times


def ratio(a: float, b: float, unit: str) -> dict[str, Any]:
    """A over B with both figures (one measurement each: no spread)."""
    return {"ratio": a / b, "a": a, "b": b, "unit": unit, "repeats": 1}


def pooled(parts: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[float]]:
    """Each key's timings from every process's part, in process order."""
    return {key: [t for part in parts for t in part[key]] for key in keys}


def process_figures(parts: Sequence[dict[str, Any]], a_key: str, b_key: str) -> dict[str, Any]:
    """How many processes were pooled and each one's own median of per-pair ratios ``a / b``."""
    return {"processes": len(parts),
            "process_ratios": [paired_ratio(part[a_key], part[b_key])["ratio"] for part in parts]}


def rounds_per_process(total: int, processes: int) -> int:
    """Rounds each of ``processes`` fresh processes runs so that together they run at least ``total``."""
    return -(-total // processes)
