"""The benchmark's fixed grid (the oracle), independent of the tuner's own search space.

The grid is the product of

- batch sizes: up to 8 divisors of the data set's size N in [8, 1024], chosen nearest (in log
  scale) to a geometric sequence from the smallest to the largest such divisor
  (:func:`log_spaced_divisors`), so every sample is served once per epoch;
- ``num_workers``: 0, 1, ..., CPUs, 2 x CPUs, 4 x CPUs (:func:`worker_counts`), optionally capped
  to 0, 1 and log-spaced counts up to a maximum (:func:`cap_workers`);
- ``prefetch_factor``: 2 and 4, only with workers;
- ``pin_memory``: off only on CPU; off and on with a CUDA device;
- AMP: off and ``bfloat16`` on CPU (off, ``float16`` and, where supported, ``bfloat16`` on
  CUDA), only when the case has a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoload import LoaderConfig
from autoload.config import AmpDtype

__all__ = [
    "PREFETCH_FACTORS",
    "build_grid",
    "cap_workers",
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


def worker_counts(cpus: int, quick: bool = False, cap: int | None = None) -> list[int]:
    """0, 1, ..., ``cpus``, 2 x ``cpus``, 4 x ``cpus`` (just 0 and 1 when ``quick``), thinned by
    :func:`cap_workers` when ``cap`` is given."""
    if quick:
        return [0, 1]
    counts = sorted({*range(cpus + 1), 2 * cpus, 4 * cpus})
    return counts if cap is None else cap_workers(counts, cap)


def cap_workers(counts: Sequence[int], cap: int) -> list[int]:
    """The counts up to ``cap``, thinned to 0, 1, the powers of two and the largest one left.

    Example:
        >>> cap_workers(worker_counts(16), 8)
        [0, 1, 2, 4, 8]
        >>> cap_workers(worker_counts(6), 8)
        [0, 1, 2, 4, 6]
    """
    if cap < 1:
        raise ValueError(f"cap must be at least 1, but got {cap}")
    kept = sorted({w for w in counts if w <= cap})
    if not kept:
        return []
    return [w for w in kept if w <= 1 or w & (w - 1) == 0 or w == kept[-1]]


def build_grid(batch_sizes: Sequence[int], workers: Sequence[int], *, has_model: bool,
               prefetch_factors: Sequence[int] = PREFETCH_FACTORS,
               amps: Sequence[AmpDtype | None] | None = None,
               pin_memory: Sequence[bool] = (False,)) -> list[LoaderConfig]:
    """Every grid point: AMP outermost (full precision first), then batch size, workers,
    prefetch factor and ``pin_memory`` (off first).

    ``amps`` defaults to off and ``bfloat16`` (the CPU grid); without a model it is off only."""
    if not has_model:
        amps = (None,)
    elif amps is None:
        amps = (None, "bfloat16")
    grid: list[LoaderConfig] = []
    for amp in amps:
        for batch in batch_sizes:
            for w in workers:
                for prefetch in (prefetch_factors if w > 0 else (None,)):
                    for pin in pin_memory:
                        grid.append(LoaderConfig(batch, num_workers=w, prefetch_factor=prefetch,
                                                 pin_memory=pin, amp=amp))
    return grid
