"""Percentile bootstrap over the test rows: confidence intervals and paired differences.

Resample i draws n row indices with replacement from the n test rows; every score is recomputed
on the drawn rows (metrics/__init__.py: sums of per-row statistics, so corpus-level BLEU and
chrF are recomputed as a whole, not averaged per row). The interval at level 1 - alpha (0.95 by
default) is the alpha/2 and 1 - alpha/2 percentiles of the resampled scores (Efron's percentile
interval, numpy's linear interpolation between order statistics).

A paired difference B - A of two models scored on the same rows uses the same drawn rows for
both in every resample, so what the rows have in common (easy rows, hard rows) cancels:

    diff_i = score_B(rows_i) - score_A(rows_i),   interval = percentiles of diff_i

Identical answers give diff_i = 0 on every resample: an interval of exactly [0, 0].

The indices come from numpy's default generator seeded with eval.seed, one resample at a time,
so they depend only on (seed, n, resample count): any two evaluations of the same split see the
same resamples, whenever and wherever they run.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def resample_indices(n: int, count: int, seed: int):
    """`count` arrays of n row indices drawn with replacement (none when n == 0)."""
    rng = np.random.default_rng(seed)
    for _ in range(count if n else 0):
        yield rng.integers(0, n, size=n)


def resampled(value_fns: list[Callable[[np.ndarray], dict[str, float]]], n: int, count: int,
              seed: int) -> list[dict[str, np.ndarray]]:
    """For each function (indices -> {score: value}), {score: (count,) array of its values on the resamples},
    every function on the same drawn rows."""
    draws: list[dict[str, list[float]]] = [{} for _ in value_fns]
    for idx in resample_indices(n, count, seed):
        for fn, out in zip(value_fns, draws):
            for key, value in fn(idx).items():
                out.setdefault(key, []).append(value)
    return [{key: np.asarray(values, dtype=np.float64) for key, values in out.items()} for out in draws]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """[low, high]: the (1 - level)/2 and (1 + level)/2 percentiles of the finite values (None if none are)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(low), float(high)]
