"""Benchmark autoload's tuner against a fixed grid (the oracle) and two baselines.

    python benchmarks/run.py [--cases a,b,...] [--quick] [--json benchmarks/results.json]
                             [--tune-timeout 30] [--grid-window 0.6] [--final-window 3]
                             [--rounds 3]

For each case (``benchmarks/cases/``): measure every point of the grid once (``grid.py``), run
``autoload.tune``, then re-measure the tuner's pick, the oracle (the best grid point), PyTorch's
defaults and the hand-tuned recipe side by side in interleaved rounds. Prints two tables (results
and spreads) and writes every raw number to the JSON file. Progress goes to stderr. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `cases` and `grid` live beside this file
    sys.path.insert(0, str(HERE))

import cases  # noqa: E402
from grid import build_grid, log_spaced_divisors, nearest_divisor, worker_counts  # noqa: E402

ORACLE_TARGET = 0.95  # the tuner's median is at least this share of the oracle's
TIME_SHARE, TIME_FLOOR = 0.15, 30.0  # tuning may take max(15% of the grid's time, 30 s)
PRUNE_MARGIN = 0.8  # skip a grid point whose step alone is under this share of the best so far
ROLES = ("tuner", "oracle", "defaults", "recipe")
DEFAULT_JSON = HERE / "results.json"


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

    @property
    def workers(self) -> list[int]:
        return worker_counts(self.cpus, quick=self.quick)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark autoload.tune against a fixed grid (the oracle), PyTorch's "
                    "defaults and the hand-tuned recipe.",
    )
    parser.add_argument("--cases", help="comma-separated cases, by letter or name "
                        f"(default: all of {', '.join(cases.NAMES)})")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: small data sets, 3 batch sizes, workers {0,1}, "
                             "grid window 0.1 s, tune timeout 4 s, final window 0.2 s, 1 round "
                             "(explicit options below still win)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the raw numbers (default: %(default)s)")
    parser.add_argument("--tune-timeout", type=float, help="autoload.tune's budget, s (30)")
    parser.add_argument("--grid-window", type=float, help="steady window per grid point, s (0.6)")
    parser.add_argument("--final-window", type=float, help="window per re-measure, s (3)")
    parser.add_argument("--rounds", type=int, help="interleaved re-measure rounds (3)")
    parser.add_argument("--point-deadline", type=float, default=30.0,
                        help="a grid point or re-measure that runs longer (start-up included) "
                             "fails and counts as 0 samples/s (default: %(default)s s)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="measure every grid point, even one whose training step alone is "
                             f"slower than {PRUNE_MARGIN:g} x the best rate so far")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: float | None, full: float, small: float) -> float:
        return value if value is not None else (small if quick else full)

    settings = Settings(
        quick=quick,
        tune_timeout=pick(args.tune_timeout, 30.0, 4.0),
        grid_window=pick(args.grid_window, 0.6, 0.1),
        final_window=pick(args.final_window, 3.0, 0.2),
        rounds=int(pick(args.rounds, 3, 1)),
        point_deadline=args.point_deadline,
        exhaustive=args.exhaustive,
        batch_sizes=3 if quick else 8,
        cpus=usable_cpus(),
    )
    for name in ("tune_timeout", "grid_window", "final_window", "point_deadline"):
        if not getattr(settings, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if settings.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        args.selected = cases.select(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    return args, settings


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
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
    }


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
        "startup_seconds": m.startup_seconds,
        "warmup_seconds": m.warmup_seconds,
        "seconds": m.seconds,
        "samples": m.samples,
        "batches": m.batches,
        "data_wait_fraction": m.data_wait_fraction,
        "peak_host_bytes": m.peak_host_bytes,
    }


def _window(seconds: float, settings: Settings) -> Window:
    return Window(seconds=seconds, deadline=max(settings.point_deadline, 10 * seconds))


def step_bound(model: torch.nn.Module, loss: Any, dataset: Any, batch_size: int,
               amp: str | None, min_seconds: float) -> float:
    """Samples/s of the training step alone on one in-memory batch: no loader setting can beat
    it. Runs on a copy of the model (and a fresh SGD), so the case's model is untouched."""
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = next(iter(DataLoader(dataset, batch_size=batch_size)))
    dtype = None if amp is None else getattr(torch, amp)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            value = loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        value.mean().backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels for this shape, autocast's weight cache
    fastest, spent, steps = math.inf, 0.0, 0
    while steps < 1 or (steps < 3 and spent < min_seconds):
        began = time.perf_counter()
        step()
        took = time.perf_counter() - began
        fastest, spent, steps = min(fastest, took), spent + took, steps + 1
    return batch_size / fastest


def run_grid(name: str, probe: TrainingProbe, grid: list[LoaderConfig], settings: Settings,
             bound: Callable[[LoaderConfig], float] | None = None,
             ) -> tuple[list[dict[str, Any]], float]:
    """Measure the grid in order; with ``bound`` (and not ``--exhaustive``), skip a point whose
    step-alone bound is under ``PRUNE_MARGIN`` x the best rate measured so far."""
    window = _window(settings.grid_window, settings)
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
        point = _measure(probe, config, window)
        point["skipped"], point["step_bound"] = False, limit
        points.append(point)
        best = max(best, point["samples_per_second"])
        outcome = point["error"] or f"{point['samples_per_second']:,.0f}/s"
        log(f"[{name}] grid {i}/{len(grid)} {config.label()}: {outcome} "
            f"({point['wall_seconds']:.1f} s)")
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
                               device="cpu", timeout=settings.tune_timeout, seed=0,
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
    for r in range(settings.rounds):
        for config in _rotated(configs, r):
            row = _measure(probe, config, window)
            row["round"] = r
            rows.append(row)
            outcome = row["error"] or f"{row['samples_per_second']:,.0f}/s"
            log(f"[{name}] re-measure {len(rows)}/{total} {config.label()}: {outcome}")
    return rows


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
    rates: dict[LoaderConfig, list[float]] = {}
    for row in rows:
        rates.setdefault(LoaderConfig.from_dict(row["config"]), []).append(
            row["samples_per_second"])
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


def run_case(name: str, module: ModuleType, settings: Settings) -> dict[str, Any]:
    n = module.QUICK_N if settings.quick else module.N
    torch.manual_seed(0)
    np.random.seed(0)
    dataset = module.make_dataset(n)
    model = module.make_model()
    loss = module.LOSS if model is not None else None
    optimizer = None if model is None else torch.optim.SGD(model.parameters(), lr=0.01)
    cpu = torch.device("cpu")
    probe = TrainingProbe(dataset, device=cpu, model=model, loss_fn=loss, optimizer=optimizer)

    batch_sizes = log_spaced_divisors(n, settings.batch_sizes)
    grid = build_grid(batch_sizes, settings.workers, has_model=model is not None)
    log(f"[{name}] {module.DESCRIPTION}; n={n}, grid of {len(grid)} points")
    bounds: dict[tuple[int, str | None], dict[str, Any]] = {}

    def bound(config: LoaderConfig) -> float:
        key = (config.batch_size, config.amp)
        if key not in bounds:
            began = time.perf_counter()
            rate = step_bound(model, loss, dataset, config.batch_size, config.amp,
                              settings.grid_window / 3)
            bounds[key] = {"batch_size": key[0], "amp": key[1], "samples_per_second": rate,
                           "seconds": time.perf_counter() - began}
        return float(bounds[key]["samples_per_second"])

    points, grid_wall = run_grid(name, probe, grid, settings,
                                 bound=None if model is None else bound)
    best = max(range(len(points)), key=lambda i: points[i]["samples_per_second"])
    oracle = grid[best] if points[best]["samples_per_second"] > 0 else None

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
    roles["recipe"] = LoaderConfig(b64, settings.cpus, 2)
    rows = remeasure(name, probe, roles, settings)
    summary = evaluate(roles, rows, tuner["wall_seconds"], grid_wall)
    log(f"[{name}] {summary['verdict']}")
    return {
        "description": module.DESCRIPTION,
        "bottleneck": module.BOTTLENECK,
        "n": n,
        "has_model": model is not None,
        "grid": {
            "batch_sizes": batch_sizes,
            "num_workers": settings.workers,
            "prefetch_factors": [2, 4],
            "amp": [None, "bfloat16"] if model is not None else [None],
            "size": len(grid),
            "measured": sum(not p["skipped"] for p in points),
            "skipped": sum(p["skipped"] for p in points),
            "prune_margin": None if settings.exhaustive else PRUNE_MARGIN,
            "seconds": grid_wall,
            "step_bounds": list(bounds.values()),
            "points": points,
        },
        "oracle": None if oracle is None else {
            "config": oracle.to_dict(),
            "grid_samples_per_second": points[best]["samples_per_second"],
            "tried_by_tuner": _tried(oracle, tuner),
        },
        "tuner": tuner,
        "roles": {role: config.to_dict() for role, config in roles.items()},
        "remeasure": rows,
        "summary": summary,
    }


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
    table.caption = (("* the tuner never measured the oracle. " if starred else "")
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
    data: dict[str, Any] = {
        "format_version": 1,
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(),
        "settings": {
            "quick": settings.quick, "tune_timeout": settings.tune_timeout,
            "grid_window": settings.grid_window, "final_window": settings.final_window,
            "rounds": settings.rounds, "point_deadline": settings.point_deadline,
            "exhaustive": settings.exhaustive, "prune_margin": PRUNE_MARGIN,
            "batch_sizes": settings.batch_sizes, "num_workers": settings.workers,
            "cases": args.selected, "oracle_target": ORACLE_TARGET,
            "time_share": TIME_SHARE, "time_floor_seconds": TIME_FLOOR,
        },
        "cases": {},
        "elapsed_seconds": 0.0,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    status = 0
    for i, name in enumerate(args.selected, 1):
        log(f"== case {i}/{len(args.selected)}: {name}")
        try:
            data["cases"][name] = run_case(name, cases.load(name), settings)
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
    if data["cases"]:
        console.print(results_table(data["cases"]))
        console.print(spread_table(data["cases"]))
    console.print(f"{len(data['cases'])} case(s) in {data['elapsed_seconds']:.0f} s; "
                  f"raw numbers in {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
