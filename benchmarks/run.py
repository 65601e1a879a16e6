"""Benchmark autoload's tuner against a fixed grid (the oracle) and two baselines.

    python benchmarks/run.py [--cases a,b,...] [--quick] [--json benchmarks/results.json]
                             [--device cpu|cuda] [--tune-timeout 30] [--grid-window 0.6]
                             [--final-window 2.5] [--rounds 3] [--extra-rounds 3]
                             [--point-limit 2.5] [--max-grid-workers K] [--reuse-grid PATH]

For each case (``benchmarks/cases/``): measure every point of the grid once (``grid.py``), or take
it from an earlier run's JSON (``--reuse-grid``), run ``autoload.tune``, then re-measure the
tuner's pick, the oracle (the best grid point), PyTorch's defaults and the hand-tuned recipe side
by side in interleaved rounds. Prints two tables (results and spreads) and writes every raw number
to the JSON file. Progress goes to stderr. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

import autoload
from autoload import LoaderConfig, TrainingProbe, Window
from autoload.config import AmpDtype
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `cases` and `grid` live beside this file
    sys.path.insert(0, str(HERE))

import cases  # noqa: E402
from grid import (  # noqa: E402
    MAX_BATCH,
    PREFETCH_FACTORS,
    build_grid,
    log_spaced_divisors,
    nearest_divisor,
    worker_counts,
)

ORACLE_TARGET = 0.95  # the tuner's median is at least this share of the oracle's
TIME_SHARE, TIME_FLOOR = 0.15, 30.0  # tuning may take max(15% of the grid's time, 30 s)
PRUNE_MARGIN = 0.8  # skip a grid point whose step alone is under this share of the best so far
# A warm-up step of WARMUP_SETTLES s or more runs at most WARMUP_SLACK x slower than later steps
# (its one-off costs, kernel choice and allocation, are small next to a step that long).
WARMUP_SETTLES, WARMUP_SLACK = 1.0, 3.0
ROLES = ("tuner", "oracle", "defaults", "recipe")
DEFAULT_JSON = HERE / "results.json"
CUDA_MAX_GRID_WORKERS = 8  # --max-grid-workers on CUDA: workers 0, 1, 2, 4, 8
POINT_LIMIT = 2.5  # s after its first batch a grid point measures at most (--point-limit)


@dataclass(frozen=True)
class Settings:
    quick: bool
    tune_timeout: float
    grid_window: float
    final_window: float
    rounds: int
    point_deadline: float
    exhaustive: bool
    batch_sizes: int  # how many batch sizes the grid takes
    cpus: int
    device: str = "cpu"
    max_grid_workers: int | None = None  # None: no cap
    prefetch_factors: tuple[int, ...] = PREFETCH_FACTORS
    amps: tuple[AmpDtype | None, ...] = (None, "bfloat16")  # for cases with a model
    pin_memory: tuple[bool, ...] = (False,)
    reuse_grid: Path | None = None
    extra_rounds: int = 0  # tuner and oracle only, while the oracle target is within noise
    point_limit: float | None = POINT_LIMIT  # None: a grid point measures until it settles

    @property
    def workers(self) -> list[int]:
        return worker_counts(self.cpus, quick=self.quick, cap=self.max_grid_workers)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark autoload.tune against a fixed grid (the oracle), PyTorch's "
                    "defaults and the hand-tuned recipe.",
    )
    parser.add_argument("--cases", help="comma-separated cases, by letter or name, of "
                        f"{', '.join(cases.NAMES)} (default: {_letters(cases.DEFAULT_CPU)} on "
                        f"CPU, {_letters(cases.DEFAULT_CUDA)} on CUDA; with --reuse-grid, those "
                        "of the reused file)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model trains and batches go (default: %(default)s); "
                             "cuda adds pin_memory and float16 to the grid and sizes the "
                             "defaults below for a ~5-minute run")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: small data sets, 3 batch sizes, workers {0,1}, "
                             "grid window 0.1 s, tune timeout 4 s, final window 0.2 s, 1 round "
                             "(explicit options below still win)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the raw numbers (default: %(default)s)")
    parser.add_argument("--tune-timeout", type=float, help="autoload.tune's budget, s (30)")
    parser.add_argument("--grid-window", type=float,
                        help="steady window per grid point, s (0.6; 0.15 on CUDA)")
    parser.add_argument("--final-window", type=float,
                        help="window per re-measure, s (2.5; 0.5 on CUDA)")
    parser.add_argument("--rounds", type=int, help="interleaved re-measure rounds (3)")
    parser.add_argument("--extra-rounds", type=int, metavar="N",
                        help="rounds of the tuner's pick and the oracle alone, added while the "
                             "0.95 target lies within their noise (3; 0 with --quick)")
    parser.add_argument("--grid-batch-sizes", type=int,
                        help="how many batch sizes the grid takes (8; 3 on CUDA and with --quick)")
    parser.add_argument("--max-grid-workers", type=int, metavar="K",
                        help="keep only worker counts 0, 1 and the powers of two up to K (and "
                             "the largest count <= K) in the grid (default: no cap on CPU, "
                             f"{CUDA_MAX_GRID_WORKERS} on CUDA)")
    parser.add_argument("--grid-prefetch", type=_positive_ints, metavar="LIST",
                        help="the grid's prefetch factors (2,4; 2 on CUDA)")
    parser.add_argument("--point-deadline", type=float, default=30.0,
                        help="a grid point or re-measure that runs longer (start-up included) "
                             "fails and counts as 0 samples/s (default: %(default)s s)")
    parser.add_argument("--point-limit", type=float, default=POINT_LIMIT,
                        help="a grid point still measuring this long after its first batch "
                             "ends with what it measured (slow batches); one that comes within "
                             f"{PRUNE_MARGIN:g} x the best is measured again without the limit "
                             "(0: no limit; default: %(default)s s)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="measure every grid point, even one whose training step alone is "
                             f"slower than {PRUNE_MARGIN:g} x the best rate so far")
    parser.add_argument("--reuse-grid", type=Path, metavar="PATH",
                        help="take each case's grid (every point's rate, the oracle, the grid's "
                             "wall time) from an earlier run's JSON instead of measuring it; "
                             "the tuner and the re-measure still run")
    args = parser.parse_args(argv)
    quick = args.quick
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.exit(2, f"{parser.prog}: error: --device cuda, but torch.cuda.is_available() is "
                       f"False (no usable GPU, or a CPU-only torch {torch.__version__})\n")

    def pick(value: float | None, full: float, small: float, gpu: float | None = None) -> float:
        if value is not None:
            return value
        if quick:
            return small
        return gpu if cuda and gpu is not None else full

    amps: tuple[AmpDtype | None, ...] = (None, "bfloat16")
    if cuda:
        amps = (None, "float16", "bfloat16") if torch.cuda.is_bf16_supported() \
            else (None, "float16")
    settings = Settings(
        quick=quick,
        tune_timeout=pick(args.tune_timeout, 30.0, 4.0),
        grid_window=pick(args.grid_window, 0.6, 0.1, gpu=0.15),
        final_window=pick(args.final_window, 2.5, 0.2, gpu=0.5),
        rounds=int(pick(args.rounds, 3, 1)),
        extra_rounds=int(pick(args.extra_rounds, 3, 0)),
        point_deadline=args.point_deadline,
        exhaustive=args.exhaustive,
        batch_sizes=int(pick(args.grid_batch_sizes, 8, 3, gpu=3)),
        cpus=usable_cpus(),
        device=args.device,
        max_grid_workers=args.max_grid_workers if args.max_grid_workers is not None
        else (CUDA_MAX_GRID_WORKERS if cuda else None),
        prefetch_factors=args.grid_prefetch or ((2,) if cuda else PREFETCH_FACTORS),
        amps=amps,
        pin_memory=(False, True) if cuda else (False,),
        reuse_grid=args.reuse_grid,
        point_limit=args.point_limit if args.point_limit > 0 else None,
    )
    for name in ("tune_timeout", "grid_window", "final_window", "point_deadline"):
        if not getattr(settings, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if settings.rounds < 1:
        parser.error("--rounds must be at least 1")
    if settings.extra_rounds < 0:
        parser.error("--extra-rounds must be at least 0")
    if settings.batch_sizes < 1:
        parser.error("--grid-batch-sizes must be at least 1")
    if settings.max_grid_workers is not None and settings.max_grid_workers < 1:
        parser.error("--max-grid-workers must be at least 1")
    args.reused = None
    try:
        if args.reuse_grid is not None:
            args.reused = load_reused(args.reuse_grid)
        if args.cases:
            args.selected = cases.select(args.cases)
        elif args.reused is not None:
            args.selected = [n for n in cases.NAMES if n in args.reused["cases"]]
        else:
            args.selected = list(cases.DEFAULT_CUDA if cuda else cases.DEFAULT_CPU)
        if args.reused is not None:
            check_reused(args.reused, args.reuse_grid, args.selected, settings)
    except ValueError as exc:
        parser.error(str(exc))
    return args, settings


def _letters(names: Sequence[str]) -> str:
    return ",".join(n.split("_", 1)[0] for n in names)


def load_reused(path: Path) -> dict[str, Any]:
    """An earlier run's JSON, read for ``--reuse-grid``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--reuse-grid: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
        raise ValueError(f"--reuse-grid: {path} is not a results file of benchmarks/run.py "
                         "(it has no 'cases')")
    return data


def check_reused(data: dict[str, Any], path: Path, selected: Sequence[str],
                 settings: Settings) -> None:
    """Every selected case has a grid in ``data``, for this device and data set size."""
    device = (data.get("settings") or {}).get("device", "cpu")  # older files: CPU only
    if device != settings.device:
        raise ValueError(f"--reuse-grid: {path} was measured with --device {device}, "
                         f"this run uses --device {settings.device}")
    def has_grid(name: str) -> bool:
        grid = (data["cases"].get(name) or {}).get("grid") or {}
        return bool(grid.get("points")) and "seconds" in grid

    missing = [name for name in selected if not has_grid(name)]
    if missing:
        raise ValueError(f"--reuse-grid: {path} has no grid for {', '.join(missing)}; "
                         "choose other --cases")
    for name in selected:
        module = cases.load(name)
        n = module.QUICK_N if settings.quick else module.N
        if data["cases"][name].get("n") != n:
            raise ValueError(f"--reuse-grid: {name} has n={data['cases'][name].get('n')} in "
                             f"{path}, this run n={n} (--quick must match)")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "usable_cpus": usable_cpus(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "autoload": autoload.__version__,
        "optuna": optuna.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "start_method": torch.multiprocessing.get_start_method(allow_none=True),
        "device": device,
        "device_name": None,
    }
    try:  # workers hand batches over in /dev/shm: too small a one fails large batches
        info["shm_total_bytes"] = shutil.disk_usage("/dev/shm").total
    except OSError:
        info["shm_total_bytes"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update({
            "device_name": torch.cuda.get_device_name(),
            "gpu_memory_bytes": props.total_memory,
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        })
    return info


def _error_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _measure(probe: TrainingProbe, config: LoaderConfig, window: Window) -> dict[str, Any]:
    """One measurement as a dict; a failure is recorded with its error and a rate of 0."""
    began = time.perf_counter()
    try:
        m = probe.measure(config, window)
    except Exception as exc:  # a failed point counts as 0
        return {"config": config.to_dict(), "samples_per_second": 0.0,
                "error": _error_line(exc), "wall_seconds": time.perf_counter() - began}
    return {
        "config": config.to_dict(),
        "samples_per_second": m.samples_per_second,
        "error": None,
        "wall_seconds": time.perf_counter() - began,
        "cut_short": m.cut_short,
        "startup_seconds": m.startup_seconds,
        "warmup_seconds": m.warmup_seconds,
        "seconds": m.seconds,
        "samples": m.samples,
        "batches": m.batches,
        "data_wait_fraction": m.data_wait_fraction,
        "peak_host_bytes": m.peak_host_bytes,
        "peak_gpu_bytes": m.peak_gpu_bytes,
    }


def _window(seconds: float, settings: Settings, time_limit: float | None = None) -> Window:
    return Window(seconds=seconds, deadline=max(settings.point_deadline, 10 * seconds),
                  time_limit=time_limit)


class _Enough(Exception):
    """A step has run long enough to settle its bound."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise ``_Enough`` in the main thread after ``seconds`` (no alarm off the main thread, or
    for an infinite time)."""
    if not math.isfinite(seconds) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum: int, frame: Any) -> None:
        raise _Enough

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def step_bound(model: torch.nn.Module, loss: Any, dataset: Any, batch_size: int,
               amp: str | None, min_seconds: float, device: torch.device | None = None,
               below: float = 0.0) -> tuple[float, bool]:
    """Samples/s of the training step alone on one batch already on ``device`` (default CPU): no
    loader setting can beat it. Runs on a copy of the model (and a fresh SGD), so the case's model
    is untouched. On CUDA, float16 runs without a GradScaler (a little faster: still a bound).

    A slow warm-up step can settle it: when it took at least ``WARMUP_SETTLES`` seconds and even
    ``WARMUP_SLACK`` x its rate is under ``below``, that is returned as the bound (second value
    True) without timing more steps (a bf16 step at batch 1024 on a CPU without native bf16
    takes ~18 s). The warm-up step is interrupted (an alarm, between two native ops) once it has
    run that long, so it need not even finish."""
    device = torch.device("cpu") if device is None else device
    cuda = device.type == "cuda"
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = next(iter(DataLoader(dataset, batch_size=batch_size)))
    if cuda:
        x, y = x.to(device), y.to(device)
    dtype = None if amp is None else getattr(torch, amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            value = loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        value.mean().backward()
        optimizer.step()
        if cuda:  # time the kernels, not their launch
            torch.cuda.synchronize(device)

    enough = max(WARMUP_SETTLES, WARMUP_SLACK * batch_size / below) if below > 0 else math.inf
    began = time.perf_counter()
    try:
        with _alarm(enough):
            step()  # warm-up: allocator, kernels for this shape, autocast's weight cache
    except _Enough:
        pass  # interrupted: it has run long enough to settle the bound
    warmup = time.perf_counter() - began
    if warmup >= WARMUP_SETTLES and WARMUP_SLACK * batch_size / warmup < below:
        return WARMUP_SLACK * batch_size / warmup, True
    fastest, spent, steps = math.inf, 0.0, 0
    while steps < 1 or (steps < 3 and spent < min_seconds):
        began = time.perf_counter()
        step()
        took = time.perf_counter() - began
        fastest, spent, steps = min(fastest, took), spent + took, steps + 1
    return batch_size / fastest, False


def run_grid(name: str, probe: TrainingProbe, grid: list[LoaderConfig], settings: Settings,
             bound: Callable[[LoaderConfig, float], float] | None = None,
             ) -> tuple[list[dict[str, Any]], float]:
    """Measure the grid in order; with ``bound`` (and not ``--exhaustive``), skip a point whose
    step-alone bound is under ``PRUNE_MARGIN`` x the best rate measured so far (by a whole
    measurement: one cut short can read high).

    A point is cut short ``settings.point_limit`` s after its first batch. Such a point that
    comes within ``PRUNE_MARGIN`` x the best is measured again without the limit (its time
    counts), so the oracle always rests on a whole measurement."""
    window = _window(settings.grid_window, settings, settings.point_limit)
    points: list[dict[str, Any]] = []
    best = 0.0
    began = time.perf_counter()
    for i, config in enumerate(grid, 1):
        limit = None if bound is None or settings.exhaustive else bound(config, best)
        if limit is not None and limit < PRUNE_MARGIN * best:
            points.append({"config": config.to_dict(), "samples_per_second": 0.0,
                           "error": None, "skipped": True, "step_bound": limit})
            log(f"[{name}] grid {i}/{len(grid)} {config.label()}: skipped, its step alone runs "
                f"{limit:,.0f}/s < {PRUNE_MARGIN:g} x best {best:,.0f}/s")
            continue
        point = _measure(probe, config, window)
        point["skipped"], point["step_bound"] = False, limit
        points.append(point)
        if not point.get("cut_short"):  # a cut-short rate can flatter (a queue, no epoch end)
            best = max(best, point["samples_per_second"])
        outcome = point["error"] or f"{point['samples_per_second']:,.0f}/s"
        cut = ", cut short" if point.get("cut_short") else ""
        log(f"[{name}] grid {i}/{len(grid)} {config.label()}: {outcome} "
            f"({point['wall_seconds']:.1f} s{cut})")
    while True:  # contenders that were cut short, best first, until the best is whole
        best = max(p["samples_per_second"] for p in points)
        contenders = [p for p in points if p.get("cut_short")
                      and p["samples_per_second"] >= PRUNE_MARGIN * best]
        if not contenders:
            break
        point = max(contenders, key=lambda p: p["samples_per_second"])
        config = LoaderConfig.from_dict(point["config"])
        again = _measure(probe, config, _window(settings.grid_window, settings))
        again["skipped"], again["step_bound"] = False, point["step_bound"]
        again["cut_short_first"] = {"samples_per_second": point["samples_per_second"],
                                    "wall_seconds": point["wall_seconds"]}
        again["cut_short"] = False  # measured whole now (a fault counts 0, as usual)
        points[points.index(point)] = again
        log(f"[{name}] grid {config.label()} again, whole: "
            f"{again['error'] or format(again['samples_per_second'], ',.0f') + '/s'} "
            f"({again['wall_seconds']:.1f} s; cut short it measured "
            f"{point['samples_per_second']:,.0f}/s)")
    return points, time.perf_counter() - began


def run_tuner(name: str, dataset: Any, model: Any, loss: Any, optimizer: Any,
              settings: Settings) -> dict[str, Any]:
    def progress(event: autoload.ProgressEvent) -> None:
        best = "" if event.best is None else f", best {event.best:,.0f}/s"
        last = ""
        if event.last is not None:
            last = f" {event.last.config.label()} {event.last.state}"
        log(f"[{name}] tune {event.phase} {event.done}{last} "
            f"({event.elapsed:.1f}/{event.budget or 0:.0f} s{best})")

    began = time.perf_counter()
    try:
        result = autoload.tune(dataset, model=model, loss_fn=loss, optimizer=optimizer,
                               device=settings.device, timeout=settings.tune_timeout, seed=0,
                               progress=progress)
    except Exception as exc:
        return {"config": None, "error": _error_line(exc), "trials": 0,
                "wall_seconds": time.perf_counter() - began}
    return {
        "config": result.config.to_dict(),
        "error": None,
        "trials": len(result.trials),
        "wall_seconds": time.perf_counter() - began,
        "elapsed_seconds": result.elapsed_seconds,
        "result": json.loads(result.to_json()),
    }


def _rotated(configs: list[LoaderConfig], round_index: int) -> list[LoaderConfig]:
    shift = round_index % len(configs)
    return configs[shift:] + configs[:shift]


def remeasure(name: str, probe: TrainingProbe, roles: dict[str, LoaderConfig],
              settings: Settings) -> list[dict[str, Any]]:
    """Measure each distinct config of ``roles`` once per round, the order rotated each round."""
    configs: list[LoaderConfig] = []
    for config in roles.values():
        if config not in configs:
            configs.append(config)
    window = _window(settings.final_window, settings)
    rows: list[dict[str, Any]] = []
    total = settings.rounds * len(configs)
    for r in range(settings.rounds + settings.extra_rounds):
        if r >= settings.rounds:  # an extra round, for the oracle target alone
            if not oracle_undecided(roles, rows):
                break
            configs = [roles["tuner"], roles["oracle"]]
            total += len(configs)
        for config in _rotated(configs, r):
            row = _measure(probe, config, window)
            row["round"] = r
            rows.append(row)
            outcome = row["error"] or f"{row['samples_per_second']:,.0f}/s"
            log(f"[{name}] re-measure {len(rows)}/{total} {config.label()}: {outcome}"
                + (" (extra round: tuner/oracle within noise of the target)"
                   if r >= settings.rounds else ""))
    return rows


def rates_by_config(rows: list[dict[str, Any]]) -> dict[LoaderConfig, list[float]]:
    """The re-measured rates of each configuration, in the order measured."""
    rates: dict[LoaderConfig, list[float]] = {}
    for row in rows:
        rates.setdefault(LoaderConfig.from_dict(row["config"]), []).append(
            row["samples_per_second"])
    return rates


def oracle_undecided(roles: dict[str, LoaderConfig], rows: list[dict[str, Any]]) -> bool:
    """Whether the tuner/oracle target lies within the noise of the ratio measured so far:
    the ratio of medians, give or take the larger relative half-range of the two."""
    tuner, oracle = roles.get("tuner"), roles.get("oracle")
    if tuner is None or oracle is None or tuner == oracle:
        return False
    rates = rates_by_config(rows)
    mine, best = spread(rates.get(tuner, [])), spread(rates.get(oracle, []))
    if mine["median"] <= 0 or best["median"] <= 0:
        return False
    ratio = mine["median"] / best["median"]
    noise = max(mine["half_range"], best["half_range"])
    return ratio * (1 - noise) < ORACLE_TARGET < ratio * (1 + noise)


def spread(rates: Sequence[float]) -> dict[str, float]:
    """min, median, max and the relative half-range ``(max - min) / 2 / median``."""
    if not rates:
        return {"min": 0.0, "median": 0.0, "max": 0.0, "half_range": 0.0}
    med = float(statistics.median(rates))
    lo, hi = float(min(rates)), float(max(rates))
    return {"min": lo, "median": med, "max": hi,
            "half_range": (hi - lo) / 2 / med if med > 0 else 0.0}


def not_below(mine: dict[str, float], other: dict[str, float]) -> tuple[bool, float]:
    """Whether ``mine`` is not below ``other`` beyond the noise, and that noise: the larger
    relative half-range of the two."""
    noise = max(mine["half_range"], other["half_range"])
    return mine["median"] >= other["median"] * (1 - noise), noise


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def evaluate(roles: dict[str, LoaderConfig], rows: list[dict[str, Any]], tune_wall: float,
             grid_wall: float) -> dict[str, Any]:
    """Medians, ratios and the three targets."""
    rates = rates_by_config(rows)
    spreads = {role: spread(rates.get(config, [])) for role, config in roles.items()}
    zero = spread([])
    tuner, oracle = spreads.get("tuner", zero), spreads.get("oracle", zero)
    defaults, recipe = spreads["defaults"], spreads["recipe"]
    ok_defaults, noise_defaults = not_below(tuner, defaults)
    ok_recipe, noise_recipe = not_below(tuner, recipe)
    time_limit = max(TIME_SHARE * grid_wall, TIME_FLOOR)
    ratio = _ratio(tuner["median"], oracle["median"])
    targets = {
        "oracle": ratio is not None and ratio >= ORACLE_TARGET,
        "defaults": "tuner" in roles and ok_defaults,
        "recipe": "tuner" in roles and ok_recipe,
        "time": "tuner" in roles and tune_wall <= time_limit,
    }
    failed = [k for k, v in targets.items() if not v]
    return {
        "spreads": spreads,
        "tuner_over_oracle": ratio,
        "speedup_vs_defaults": _ratio(tuner["median"], defaults["median"]),
        "speedup_vs_recipe": _ratio(tuner["median"], recipe["median"]),
        "noise_vs_defaults": noise_defaults,
        "noise_vs_recipe": noise_recipe,
        "tune_seconds": tune_wall,
        "grid_seconds": grid_wall,
        "tune_over_grid": _ratio(tune_wall, grid_wall),
        "time_limit_seconds": time_limit,
        "targets": targets,
        "verdict": "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")",
    }


def run_case(name: str, module: ModuleType, settings: Settings,
             reused: dict[str, Any] | None = None, reused_meta: dict[str, Any] | None = None,
             ) -> dict[str, Any]:
    """One case: the grid (or ``reused``, the case's entry of an earlier run's JSON), the tuner
    and the side-by-side re-measure."""
    n = module.QUICK_N if settings.quick else module.N
    device = torch.device(settings.device)
    torch.manual_seed(0)
    np.random.seed(0)
    dataset = module.make_dataset(n)
    model = module.make_model()
    if model is not None and settings.cuda:
        model = model.to(device)  # before the optimizer, which holds the parameters
    loss = module.LOSS if model is not None else None
    optimizer = None if model is None else torch.optim.SGD(model.parameters(), lr=0.01)
    probe = TrainingProbe(dataset, device=device, model=model, loss_fn=loss, optimizer=optimizer)

    if reused is None:
        grid_block, oracle, oracle_rate = _measure_grid(
            name, module, n, dataset, model, loss, probe, settings)
    else:
        grid_block, oracle, oracle_rate = _reuse_grid(name, reused, reused_meta or {})
    grid_wall = float(grid_block["seconds"])

    log(f"[{name}] tuning for {settings.tune_timeout:g} s")
    tuner = run_tuner(name, dataset, model, loss, optimizer, settings)
    if tuner["error"]:
        log(f"[{name}] tune failed: {tuner['error']}")

    b64 = nearest_divisor(n, 64)
    roles: dict[str, LoaderConfig] = {}
    if tuner["config"] is not None:
        roles["tuner"] = LoaderConfig.from_dict(tuner["config"])
    if oracle is not None:
        roles["oracle"] = oracle
    roles["defaults"] = LoaderConfig(b64, 0)
    roles["recipe"] = LoaderConfig(b64, settings.cpus, 2, pin_memory=settings.cuda)
    rows = remeasure(name, probe, roles, settings)
    summary = evaluate(roles, rows, tuner["wall_seconds"], grid_wall)
    log(f"[{name}] {summary['verdict']}")
    return {
        "description": module.DESCRIPTION,
        "bottleneck": module.BOTTLENECK,
        "n": n,
        "has_model": model is not None,
        "grid": grid_block,
        "oracle": None if oracle is None else {
            "config": oracle.to_dict(),
            "grid_samples_per_second": oracle_rate,
            "tried_by_tuner": _tried(oracle, tuner),
        },
        "tuner": tuner,
        "roles": {role: config.to_dict() for role, config in roles.items()},
        "remeasure": rows,
        "summary": summary,
    }


def _measure_grid(name: str, module: ModuleType, n: int, dataset: Any, model: Any, loss: Any,
                  probe: TrainingProbe, settings: Settings,
                  ) -> tuple[dict[str, Any], LoaderConfig | None, float]:
    """Measure the case's grid: the JSON's grid block, the oracle and its rate."""
    device = torch.device(settings.device)
    batch_sizes = log_spaced_divisors(n, settings.batch_sizes,
                                      high=getattr(module, "MAX_BATCH", MAX_BATCH))
    amps = settings.amps if model is not None else (None,)
    grid = build_grid(batch_sizes, settings.workers, has_model=model is not None,
                      prefetch_factors=settings.prefetch_factors, amps=amps,
                      pin_memory=settings.pin_memory)
    log(f"[{name}] {module.DESCRIPTION}; n={n}, grid of {len(grid)} points")
    bounds: dict[tuple[int, str | None], dict[str, Any]] = {}

    def bound(config: LoaderConfig, best: float) -> float:
        key = (config.batch_size, config.amp)
        if key not in bounds:
            began = time.perf_counter()
            rate, warmup_only = step_bound(model, loss, dataset, config.batch_size, config.amp,
                                           settings.grid_window / 3, device=device,
                                           below=PRUNE_MARGIN * best)
            bounds[key] = {"batch_size": key[0], "amp": key[1], "samples_per_second": rate,
                           "seconds": time.perf_counter() - began, "warmup_only": warmup_only}
        return float(bounds[key]["samples_per_second"])

    points, grid_wall = run_grid(name, probe, grid, settings,
                                 bound=None if model is None else bound)
    best = max(range(len(points)), key=lambda i: points[i]["samples_per_second"])
    oracle = grid[best] if points[best]["samples_per_second"] > 0 else None
    block = {
        "batch_sizes": batch_sizes,
        "num_workers": settings.workers,
        "prefetch_factors": list(settings.prefetch_factors),
        "amp": list(amps),
        "pin_memory": list(settings.pin_memory),
        "size": len(grid),
        "measured": sum(not p["skipped"] for p in points),
        "skipped": sum(p["skipped"] for p in points),
        "prune_margin": None if settings.exhaustive else PRUNE_MARGIN,
        "seconds": grid_wall,
        "step_bounds": list(bounds.values()),
        "points": points,
    }
    return block, oracle, float(points[best]["samples_per_second"])


def _reuse_grid(name: str, case: dict[str, Any], meta: dict[str, Any],
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


def _tried(config: LoaderConfig, tuner: dict[str, Any]) -> bool:
    """Whether one of the tuner's trials measured ``config``."""
    trials = (tuner.get("result") or {}).get("trials", [])
    return any(t["config"] == config.to_dict() for t in trials)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _label(data: dict[str, Any] | None) -> str:
    return "-" if data is None else LoaderConfig.from_dict(data).label()


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="autoload benchmark: tuner vs oracle (best grid point) and baselines")
    for column in ("case", "bottleneck", "oracle", "tuner", "tuner/oracle", "vs defaults",
                   "vs recipe", "tune s / grid s", "trials", "verdict"):
        justify = "left" if column in ("case", "bottleneck", "oracle", "tuner", "verdict") \
            else "right"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, case in results.items():
        s = case["summary"]
        oracle = case["oracle"]
        oracle_label = _label(None if oracle is None else oracle["config"])
        if oracle is not None and not oracle["tried_by_tuner"]:
            oracle_label += " *"
        style = "green" if s["verdict"] == "PASS" else "red"
        table.add_row(
            name, case["bottleneck"], oracle_label,
            _label(case["tuner"]["config"]) if case["tuner"]["config"] else "failed",
            _fmt_ratio(s["tuner_over_oracle"]), _fmt_ratio(s["speedup_vs_defaults"]),
            _fmt_ratio(s["speedup_vs_recipe"]),
            f"{s['tune_seconds']:.0f} / {s['grid_seconds']:.0f}"
            f" ({100 * (s['tune_over_grid'] or 0):.0f}%)",
            str(case["tuner"]["trials"]), f"[{style}]{s['verdict']}[/{style}]",
        )
    starred = any(c["oracle"] is not None and not c["oracle"]["tried_by_tuner"]
                  for c in results.values())
    reused = sorted({str(c["grid"]["reused_from"]) for c in results.values()
                     if c["grid"].get("reused_from")})
    table.caption = (("* the tuner never measured the oracle. " if starred else "")
                     + (f"Grid (oracle, grid s) reused from {', '.join(reused)}, not measured "
                        "in this run; the roles were re-measured here. " if reused else "")
                     + f"Targets: tuner/oracle >= {ORACLE_TARGET}; not below defaults or recipe "
                     "beyond the noise (the larger relative half-range of the two); tune time <= "
                     f"max({TIME_SHARE:g} x grid time, {TIME_FLOOR:g} s).")
    return table


def spread_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="Re-measured side by side: samples/s over the rounds")
    for column in ("case", "role", "config", "min", "median", "max", "± half-range"):
        table.add_column(column, justify="left" if column in ("case", "role", "config")
                         else "right")
    for name, case in results.items():
        roles = case["roles"]
        for role in ROLES:
            if role not in roles:
                table.add_row(name, role, "failed", "-", "-", "-", "-")
                continue
            sp = case["summary"]["spreads"][role]
            same = [r for r in ROLES if r in roles and r != role and roles[r] == roles[role]
                    and ROLES.index(r) < ROLES.index(role)]
            label = _label(roles[role]) + (f" (= {same[0]})" if same else "")
            table.add_row(name, role, label, f"{sp['min']:,.0f}", f"{sp['median']:,.0f}",
                          f"{sp['max']:,.0f}", f"{100 * sp['half_range']:.1f}%")
        table.add_section()
    return table


def main(argv: Sequence[str] | None = None,
         console_factory: Callable[[], Console] | None = None) -> int:
    args, settings = parse_args(argv)
    started = time.time()
    machine = machine_info(settings.device)
    data: dict[str, Any] = {
        "format_version": 1,
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine,
        "settings": {
            "quick": settings.quick, "tune_timeout": settings.tune_timeout,
            "grid_window": settings.grid_window, "final_window": settings.final_window,
            "rounds": settings.rounds, "extra_rounds": settings.extra_rounds,
            "point_deadline": settings.point_deadline,
            "point_limit": settings.point_limit,
            "exhaustive": settings.exhaustive, "prune_margin": PRUNE_MARGIN,
            "batch_sizes": settings.batch_sizes, "num_workers": settings.workers,
            "cases": args.selected, "oracle_target": ORACLE_TARGET,
            "time_share": TIME_SHARE, "time_floor_seconds": TIME_FLOOR,
            "device": settings.device, "max_grid_workers": settings.max_grid_workers,
            "prefetch_factors": list(settings.prefetch_factors),
            "amp": list(settings.amps), "pin_memory": list(settings.pin_memory),
            "reuse_grid": None if settings.reuse_grid is None else str(settings.reuse_grid),
        },
        "cases": {},
        "elapsed_seconds": 0.0,
    }
    reused_meta: dict[str, Any] = {}
    if args.reused is not None:
        reused_meta = {"path": str(settings.reuse_grid), "started": args.reused.get("started")}
        before = args.reused.get("machine") or {}
        for key in ("usable_cpus", "cpu_model", "device_name"):
            if key in before and before[key] != machine.get(key):
                log(f"warning: --reuse-grid {settings.reuse_grid} was measured with {key} "
                    f"{before[key]!r}, this machine has {machine.get(key)!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    status = 0
    for i, name in enumerate(args.selected, 1):
        log(f"== case {i}/{len(args.selected)}: {name}")
        try:
            reused = None if args.reused is None else args.reused["cases"][name]
            data["cases"][name] = run_case(name, cases.load(name), settings, reused=reused,
                                           reused_meta=reused_meta)
        except KeyboardInterrupt:
            log(f"[{name}] interrupted; the cases before it are kept")
            data["interrupted"] = name
            status = 130
        except Exception as exc:  # one broken case does not lose the others
            log(f"[{name}] crashed: {_error_line(exc)}")
            data.setdefault("errors", {})[name] = _error_line(exc)
            status = 1
        data["elapsed_seconds"] = time.time() - started
        write_json(args.json, data)  # after each case, so an interrupted run keeps its results
        if status == 130:
            break
    console = console_factory() if console_factory else Console(
        width=None if sys.stdout.isatty() else 170)
    if settings.cuda:
        console.print(f"Device: {machine['device_name']} (CUDA {machine['cuda']}, "
                      f"{machine['usable_cpus']} usable CPUs)")
    if data["cases"]:
        console.print(results_table(data["cases"]))
        console.print(spread_table(data["cases"]))
    console.print(f"{len(data['cases'])} case(s) in {data['elapsed_seconds']:.0f} s; "
                  f"raw numbers in {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
