"""The benchmark's fixed grid (the oracle), independent of the tuner's own search space.

The grid is the product of

- batch sizes: up to 8 divisors of the data set's size N in [8, 1024], chosen nearest (in log
  scale) to a geometric sequence from the smallest to the largest such divisor
  (:func:`log_spaced_divisors`), so every sample is served once per epoch;
- ``num_workers``: 0, 1, ..., CPUs, 2 x CPUs, 4 x CPUs (:func:`worker_counts`);
- ``prefetch_factor``: 2 and 4, only with workers;
- AMP: off and ``bfloat16``, only when the case has a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoload import LoaderConfig

__all__ = [
    "PREFETCH_FACTORS",
    "build_grid",
    "divisors_in",
    "log_spaced_divisors",
    "nearest_divisor",
    "worker_counts",
]

PREFETCH_FACTORS = (2, 4)
MIN_BATCH, MAX_BATCH, MAX_BATCH_SIZES = 8, 1024, 8


def divisors_in(n: int, low: int = MIN_BATCH, high: int = MAX_BATCH) -> list[int]:
    """The divisors of ``n`` within ``[low, high]``, ascending."""
    if n < 1:
        raise ValueError(f"n must be positive, but got {n}")
    return [d for d in range(max(1, low), min(n, high) + 1) if n % d == 0]


def log_spaced_divisors(n: int, k: int = MAX_BATCH_SIZES, low: int = MIN_BATCH,
                        high: int = MAX_BATCH) -> list[int]:
    """Up to ``k`` divisors of ``n`` in ``[low, high]``, as evenly spaced in log scale as the
    divisors allow.

    The targets are the geometric sequence of ``k`` points from the smallest to the largest
    divisor in range; the ``k`` divisors (ascending, distinct) are the ones that minimise the sum
    of the log distances to their targets, matched in order (a small dynamic programme). With
    ``k`` or fewer divisors in range, all of them are returned.

    Example:
        >>> log_spaced_divisors(16384)
        [8, 16, 32, 64, 128, 256, 512, 1024]
        >>> log_spaced_divisors(1000, 4)
        [8, 40, 200, 1000]
    """
    if k < 1:
        raise ValueError(f"k must be positive, but got {k}")
    candidates = divisors_in(n, low, high)
    if len(candidates) <= k:
        return candidates
    logs = [math.log(c) for c in candidates]
    if k == 1:  # the divisor nearest the geometric middle of the range
        middle = (logs[0] + logs[-1]) / 2
        return [candidates[min(range(len(logs)), key=lambda i: (abs(logs[i] - middle), i))]]
    targets = [logs[0] + (logs[-1] - logs[0]) * i / (k - 1) for i in range(k)]
    m = len(candidates)
    inf = math.inf
    # cost[i][j]: best total distance placing targets 0..i with target i on candidate j.
    cost = [[inf] * m for _ in range(k)]
    back = [[-1] * m for _ in range(k)]
    for j in range(m):
        cost[0][j] = abs(logs[j] - targets[0])
    for i in range(1, k):
        best, best_j = inf, -1
        for j in range(i, m):
            # the cheapest predecessor among candidates 0..j-1 (a running minimum)
            if cost[i - 1][j - 1] < best:
                best, best_j = cost[i - 1][j - 1], j - 1
            cost[i][j] = best + abs(logs[j] - targets[i])
            back[i][j] = best_j
    # ties go to the smaller divisor: the first minimum wins
    j = min(range(k - 1, m), key=lambda c: cost[k - 1][c])
    picked = [j]
    for i in range(k - 1, 0, -1):
        j = back[i][j]
        picked.append(j)
    return [candidates[j] for j in reversed(picked)]


def nearest_divisor(n: int, target: int = 64, low: int = MIN_BATCH, high: int = MAX_BATCH) -> int:
    """The divisor of ``n`` in ``[low, high]`` nearest ``target`` (the smaller one on a tie)."""
    candidates = divisors_in(n, low, high)
    if not candidates:
        raise ValueError(f"no divisor of {n} lies in [{low}, {high}]")
    return min(candidates, key=lambda d: (abs(d - target), d))


def worker_counts(cpus: int, quick: bool = False) -> list[int]:
    """0, 1, ..., ``cpus``, 2 x ``cpus``, 4 x ``cpus`` (just 0 and 1 when ``quick``)."""
    if quick:
        return [0, 1]
    return sorted({*range(cpus + 1), 2 * cpus, 4 * cpus})


def build_grid(batch_sizes: Sequence[int], workers: Sequence[int], *, has_model: bool,
               prefetch_factors: Sequence[int] = PREFETCH_FACTORS) -> list[LoaderConfig]:
    """Every grid point: AMP outermost (full precision first), then batch size, workers and
    prefetch factor."""
    amps: tuple[str | None, ...] = (None, "bfloat16") if has_model else (None,)
    grid: list[LoaderConfig] = []
    for amp in amps:
        for batch in batch_sizes:
            for w in workers:
                for prefetch in (prefetch_factors if w > 0 else (None,)):
                    grid.append(LoaderConfig(batch, w, prefetch, amp=amp))  # type: ignore[arg-type]
    return grid
