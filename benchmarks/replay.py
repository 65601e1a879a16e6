"""Replay the tuner against recorded grids, in seconds: a tool for working on the search.

    python benchmarks/replay.py benchmarks/results.json [--noise 0.03] [--seeds 3]

Each case's grid in a results file of ``benchmarks/run.py`` holds every point's measured rate
and costs. A replay runs ``autoload.tune`` on that case with a probe that answers from the grid
(with fresh noise) on a fake clock, its space restricted to the grid's values, and prints the
grid rate of its pick over the grid's best. It judges the search alone: the probe and the
machine are fixed by the recording, and the final re-measure sees the recorded rates again. A
search that replays well can still lose to the real benchmark (which re-measures side by
side), never the other way round: the real benchmark has the last word.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import autoload  # noqa: E402
from autoload import LoaderConfig, Measurement, Probe, Window  # noqa: E402
from autoload.result import costs_from_dict  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GridProbe(Probe):
    """Answers from a recorded grid: the point's rate with fresh noise, its costs, its time."""

    def __init__(self, points: list[dict[str, Any]], clock: Clock, noise: float,
                 seed: int) -> None:
        self.points = {LoaderConfig.from_dict(p["config"]): p for p in points}
        self.clock, self.noise = clock, noise
        self.rng = np.random.default_rng(seed)

    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        point = self.points[config]
        if point.get("error"):
            self.clock.now += 1.0
            raise RuntimeError(point["error"])
        if point.get("skipped"):  # pruned: its step alone was too slow to matter
            self.clock.now += window.seconds
            rate = 0.5 * float(point["step_bound"] or 1.0)
            return Measurement(samples_per_second=rate, seconds=window.seconds, cut_short=True)
        self.clock.now += max(window.seconds, point.get("seconds", 0.0)) + (
            point.get("warmup_seconds") or 0.2)
        rate = point["samples_per_second"] * (1 + self.rng.normal(0, self.noise))
        return Measurement(samples_per_second=rate, seconds=window.seconds,
                           startup_seconds=point.get("startup_seconds") or 0.0,
                           data_wait_fraction=point.get("data_wait_fraction") or 0.0,
                           rate_cv=self.noise / 2, costs=costs_from_dict(point.get("costs")),
                           cut_short=bool(point.get("cut_short")))


def replay(case: dict[str, Any], *, noise: float, seed: int, timeout: float) -> dict[str, Any]:
    grid = case["grid"]
    clock = Clock()
    probe = GridProbe(grid["points"], clock, noise, seed)
    has_model = case["has_model"]
    amps = [a for a in grid["amp"] if a is not None]
    kwargs: dict[str, Any] = {}
    if has_model:
        kwargs = {"model": torch.nn.Linear(1, 1), "loss_fn": torch.nn.functional.mse_loss,
                  "amp": "auto" if amps else "off"}
    result = autoload.tune(
        TensorDataset(torch.zeros(case["n"], 1)), probe=probe, clock=clock, timeout=timeout,
        batch_size=grid["batch_sizes"], num_workers=grid["num_workers"],
        prefetch_factor=grid["prefetch_factors"], seed=seed, **kwargs)
    rates = {LoaderConfig.from_dict(p["config"]): p["samples_per_second"]
             for p in grid["points"]}
    best = max(rates.values())
    return {"pick": result.config, "ratio": rates.get(result.config, 0.0) / best,
            "trials": len(result.trials),
            "oracle": max(rates, key=rates.__getitem__)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/replay.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--noise", type=float, default=0.03,
                        help="each replayed window's rate varies this much (0.03)")
    parser.add_argument("--seeds", type=int, default=3, help="replays per case (3)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    ratios = []
    for path in args.results:
        data = json.loads(path.read_text())
        for name, case in data["cases"].items():
            got = [replay(case, noise=args.noise, seed=s, timeout=args.timeout)
                   for s in range(args.seeds)]
            worst = min(got, key=lambda g: g["ratio"])
            ratios += [g["ratio"] for g in got]
            print(f"{name:18s} median {statistics.median(g['ratio'] for g in got):.3f} worst "
                  f"{worst['ratio']:.3f} ({worst['pick'].label()}; oracle "
                  f"{worst['oracle'].label()}) trials {worst['trials']}")
    if ratios:
        mean = math.exp(statistics.fmean(math.log(max(r, 1e-9)) for r in ratios))
        print(f"all: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
              f"geometric mean {mean:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
