"""The oracle: every point of a case's fixed grid measured once, and its best point.

Cases with a model prune points that cannot win (their training step alone is slower than
0.8 x the best rate so far); slow points are cut short after ``--point-limit`` and measured
again whole when they come near the best, so the oracle always rests on a whole measurement.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from cases import Case
from common import log
from grid import build_grid, log_spaced_divisors
from settings import PRUNE_MARGIN, Settings

from autoload import LoaderConfig, Probe, Window
from autoload.errors import summary
from autoload.result import costs_to_dict

# A point's upper bound: the training step alone on one batch already on the device (the
# probe's own step_rate), which no loader setting can beat; None where there is none.
Bound = Callable[[LoaderConfig], float | None]


def measure(probe: Probe, config: LoaderConfig, window: Window) -> dict[str, Any]:
    """One measurement as a dict; a failure is recorded with its error and a rate of 0."""
    began = time.perf_counter()
    try:
        m = probe.measure(config, window)
    except Exception as exc:  # a failed point counts as 0
        return {"config": config.to_dict(), "samples_per_second": 0.0,
                "error": summary(exc), "wall_seconds": time.perf_counter() - began}
    return {
        "config": config.to_dict(), "samples_per_second": m.samples_per_second, "error": None,
        "wall_seconds": time.perf_counter() - began, "cut_short": m.cut_short,
        "startup_seconds": m.startup_seconds, "warmup_seconds": m.warmup_seconds,
        "seconds": m.seconds, "samples": m.samples, "batches": m.batches, "epochs": m.epochs,
        "data_wait_fraction": m.data_wait_fraction, "peak_host_bytes": m.peak_host_bytes,
        "peak_gpu_bytes": m.peak_gpu_bytes, "rate_cv": m.rate_cv,
        "costs": costs_to_dict(m.costs),
    }


def window(seconds: float, settings: Settings, time_limit: float | None = None) -> Window:
    return Window(seconds=seconds, deadline=max(settings.point_deadline, 10 * seconds),
                  time_limit=time_limit)


def run_grid(name: str, probe: Probe, grid: list[LoaderConfig], settings: Settings,
             bound: Bound | None = None) -> tuple[list[dict[str, Any]], float]:
    """Measure the grid in order; with ``bound`` (and not ``--exhaustive``), skip a point whose
    step-alone bound is under ``PRUNE_MARGIN`` x the best rate measured so far (by a whole
    measurement: one cut short errs low, and a bound is compared with real rates only).

    A point is cut short ``settings.point_limit`` s after its first batch. Such a point that
    comes within ``PRUNE_MARGIN`` x the best is measured again without the limit (its time
    counts), so the oracle always rests on a whole measurement."""
    limited = window(settings.grid_window, settings, settings.point_limit)
    points: list[dict[str, Any]] = []
    best = 0.0
    began = time.perf_counter()
    for i, config in enumerate(grid, 1):
        limit = None if bound is None or settings.exhaustive else bound(config)
        if limit is not None and limit < PRUNE_MARGIN * best:
            points.append({"config": config.to_dict(), "samples_per_second": 0.0,
                           "error": None, "skipped": True, "step_bound": limit})
            log(f"[{name}] grid {i}/{len(grid)} {config.label()}: skipped, its step alone runs "
                f"{limit:,.0f}/s < {PRUNE_MARGIN:g} x best {best:,.0f}/s")
            continue
        point = measure(probe, config, limited)
        point["skipped"], point["step_bound"] = False, limit
        points.append(point)
        if not point.get("cut_short"):
            best = max(best, point["samples_per_second"])
        outcome = point["error"] or f"{point['samples_per_second']:,.0f}/s"
        cut = ", cut short" if point.get("cut_short") else ""
        log(f"[{name}] grid {i}/{len(grid)} {config.label()}: {outcome} "
            f"({point['wall_seconds']:.1f} s{cut})")
    _measure_contenders_whole(name, probe, points, settings)
    return points, time.perf_counter() - began


def _measure_contenders_whole(name: str, probe: Probe, points: list[dict[str, Any]],
                              settings: Settings) -> None:
    """Points cut short within ``PRUNE_MARGIN`` of the best, best first, measured again
    without the limit until the best point is a whole measurement."""
    while True:
        best = max(p["samples_per_second"] for p in points)
        contenders = [p for p in points if p.get("cut_short")
                      and p["samples_per_second"] >= PRUNE_MARGIN * best]
        if not contenders:
            return
        point = max(contenders, key=lambda p: p["samples_per_second"])
        config = LoaderConfig.from_dict(point["config"])
        again = measure(probe, config, window(settings.grid_window, settings))
        again["skipped"], again["step_bound"] = False, point["step_bound"]
        again["cut_short_first"] = {"samples_per_second": point["samples_per_second"],
                                    "wall_seconds": point["wall_seconds"]}
        again["cut_short"] = False  # measured whole now (a fault counts 0, as usual)
        points[points.index(point)] = again
        log(f"[{name}] grid {config.label()} again, whole: "
            f"{again['error'] or format(again['samples_per_second'], ',.0f') + '/s'} "
            f"({again['wall_seconds']:.1f} s; cut short it measured "
            f"{point['samples_per_second']:,.0f}/s)")


def per_rank(n: int, job: Any) -> int:
    """Samples of one rank's shard (a DistributedSampler's: the data set split evenly)."""
    return n if job is None else -(-n // job.world.size)


def measure_grid(case: Case, model: Any, probe: Probe, settings: Settings,
                 job: Any = None) -> tuple[dict[str, Any], LoaderConfig | None, float]:
    """Measure the case's grid: the JSON's grid block, the oracle and its rate. A point whose
    training step alone (``probe.step_rate``, once a batch size and precision: in a job every
    rank at once, scored as the points are) cannot reach the best so far is skipped."""
    batch_sizes = log_spaced_divisors(per_rank(case.n, job), settings.batch_sizes,
                                      high=case.max_batch)
    amps = settings.amps if model is not None else (None,)
    grid = build_grid(batch_sizes, settings.workers, has_model=model is not None,
                      prefetch_factors=settings.prefetch_factors, amps=amps,
                      pin_memory=settings.pin_memory)
    log(f"[{case.name}] {case.description}; n={case.n}, grid of {len(grid)} points")
    bounds: dict[tuple[int, str | None], dict[str, Any]] = {}

    def bound(config: LoaderConfig) -> float | None:
        key = (config.batch_size, config.amp)
        if key not in bounds:
            began = time.perf_counter()
            rate = probe.step_rate(config, window(settings.grid_window / 3, settings))
            bounds[key] = {"batch_size": key[0], "amp": key[1], "samples_per_second": rate,
                           "seconds": time.perf_counter() - began}
        rate = bounds[key]["samples_per_second"]
        return None if rate is None else float(rate)

    points, grid_wall = run_grid(case.name, probe, grid, settings,
                                 bound=None if model is None else bound)
    best = max(range(len(points)), key=lambda i: points[i]["samples_per_second"])
    oracle = grid[best] if points[best]["samples_per_second"] > 0 else None
    block = {
        "batch_sizes": batch_sizes, "num_workers": settings.workers,
        "prefetch_factors": list(settings.prefetch_factors), "amp": list(amps),
        "pin_memory": list(settings.pin_memory), "size": len(grid),
        "measured": sum(not p["skipped"] for p in points),
        "skipped": sum(p["skipped"] for p in points),
        "prune_margin": None if settings.exhaustive else PRUNE_MARGIN,
        "seconds": grid_wall, "step_bounds": list(bounds.values()), "points": points,
    }
    return block, oracle, float(points[best]["samples_per_second"])


def reuse_grid(name: str, case: dict[str, Any], meta: dict[str, Any],
               ) -> tuple[dict[str, Any], LoaderConfig | None, float]:
    """The grid block, oracle and oracle rate of an earlier run's case, marked as reused."""
    block = copy.deepcopy(case["grid"])
    # where the points were measured: a grid reused twice keeps its first origin's time
    block.setdefault("measured_started", meta.get("started"))
    block["reused_from"] = meta.get("path")
    old = case.get("oracle")
    oracle = None if not old else LoaderConfig.from_dict(old["config"])
    rate = 0.0 if not old else float(old["grid_samples_per_second"])
    label = "none" if oracle is None else f"{oracle.label()} ({rate:,.0f}/s)"
    log(f"[{name}] grid reused from {block['reused_from']}: {len(block['points'])} points, "
        f"{float(block['seconds']):.0f} s, oracle {label}")
    return block, oracle, rate
