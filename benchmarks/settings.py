"""The benchmark's settings: command-line options, their defaults per device, and which cases
run (fixed ones, random draws, or those of a reused grid)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cases
import torch
import workloads
from cases import Case
from grid import PREFETCH_FACTORS, worker_counts

from autoload.config import AmpDtype
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results.json"
CUDA_MAX_GRID_WORKERS = 8  # --max-grid-workers on CUDA: workers 0, 1, 2, 4, 8
POINT_LIMIT = 2.5  # s after its first batch a grid point measures at most (--point-limit)
PRUNE_MARGIN = 0.8  # skip a grid point whose step alone is under this share of the best so far


@dataclass(frozen=True, kw_only=True)
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "quick": self.quick, "tune_timeout": self.tune_timeout,
            "grid_window": self.grid_window, "final_window": self.final_window,
            "rounds": self.rounds, "extra_rounds": self.extra_rounds,
            "point_deadline": self.point_deadline, "point_limit": self.point_limit,
            "exhaustive": self.exhaustive, "prune_margin": PRUNE_MARGIN,
            "batch_sizes": self.batch_sizes, "num_workers": self.workers,
            "device": self.device, "max_grid_workers": self.max_grid_workers,
            "prefetch_factors": list(self.prefetch_factors), "amp": list(self.amps),
            "pin_memory": list(self.pin_memory),
            "reuse_grid": None if self.reuse_grid is None else str(self.reuse_grid),
        }


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark autoload.tune against a fixed grid (the oracle), PyTorch's "
                    "defaults and the hand-tuned recipe.",
    )
    add = parser.add_argument
    add("--cases", help="comma-separated fixed cases, by letter or name, of "
        f"{', '.join(cases.NAMES)} (default: {_letters(cases.DEFAULT_CPU)} on CPU, "
        f"{_letters(cases.DEFAULT_CUDA)} on CUDA, none with --random; with --reuse-grid, those "
        "of the reused file)")
    add("--random", type=int, metavar="N", default=0,
        help="also run N workloads drawn at random from --seed (benchmarks/workloads.py)")
    add("--seed", type=int, default=0, help="the random workloads' seed (default: %(default)s)")
    add("--nproc", type=int, default=1, metavar="N",
        help="run as an N-rank torchrun job on this machine (DDP models, a shard per rank, "
             "every measurement collective; see benchmarks/job.py)")
    add("--device", choices=("cpu", "cuda"), default="cpu",
        help="where the model trains and batches go (default: %(default)s); cuda adds "
             "pin_memory and float16 to the grid and sizes the defaults below for a short run")
    add("--quick", action="store_true",
        help="a smoke test: small data sets, 3 batch sizes, workers {0,1}, grid window 0.1 s, "
             "tune timeout 4 s, final window 0.2 s, 1 round (explicit options below still win)")
    add("--json", type=Path, default=DEFAULT_JSON,
        help="where to write the raw numbers (default: %(default)s)")
    add("--tune-timeout", type=float, help="autoload.tune's budget, s (60: its default)")
    add("--grid-window", type=float, help="window per grid point, s (0.6; 0.15 on CUDA)")
    add("--final-window", type=float, help="window per re-measure, s (2.5; 0.5 on CUDA)")
    add("--rounds", type=int, help="interleaved re-measure rounds (3)")
    add("--extra-rounds", type=int, metavar="N",
        help="rounds of the tuner's pick and the oracle alone, added while the target lies "
             "within their noise (3; 0 with --quick)")
    add("--grid-batch-sizes", type=int,
        help="how many batch sizes the grid takes (8; 3 on CUDA and with --quick)")
    add("--max-grid-workers", type=int, metavar="K",
        help="keep only worker counts 0, 1 and the powers of two up to K (and the largest count "
             f"<= K) in the grid (default: no cap on CPU, {CUDA_MAX_GRID_WORKERS} on CUDA)")
    add("--grid-prefetch", type=_positive_ints, metavar="LIST",
        help="the grid's prefetch factors (2,4; 2 on CUDA)")
    add("--point-deadline", type=float, default=30.0,
        help="a grid point or re-measure that runs longer (start-up included) fails and counts "
             "as 0 samples/s (default: %(default)s s)")
    add("--point-limit", type=float, default=POINT_LIMIT,
        help="a grid point still measuring this long after its first batch ends with what it "
             f"measured (slow batches); one that comes within {PRUNE_MARGIN:g} x the best is "
             "measured again without the limit (0: no limit; default: %(default)s s)")
    add("--exhaustive", action="store_true",
        help="measure every grid point, even one whose training step alone is slower than "
             f"{PRUNE_MARGIN:g} x the best rate so far")
    add("--reuse-grid", type=Path, metavar="PATH",
        help="take each case's grid (every point's rate, the oracle, the grid's wall time) from "
             "an earlier run's JSON instead of measuring it; the tuner and the re-measure still "
             "run")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """The options, the settings they make, and in ``args.selected`` the cases to run."""
    parser = _parser()
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.exit(2, f"{parser.prog}: error: --device cuda, but torch.cuda.is_available() is "
                       f"False (no usable GPU, or a CPU-only torch {torch.__version__})\n")
    settings = _settings(args)
    _check(parser, settings, args)
    args.reused = None
    try:
        if args.reuse_grid is not None:
            args.reused = load_reused(args.reuse_grid)
        args.selected = select_cases(args, settings)
        if args.reused is not None:
            check_reused(args.reused, args.reuse_grid, args.selected, settings)
    except ValueError as exc:
        parser.error(str(exc))
    return args, settings


def _settings(args: argparse.Namespace) -> Settings:
    quick, cuda = args.quick, args.device == "cuda"

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
    return Settings(
        quick=quick,
        tune_timeout=pick(args.tune_timeout, 60.0, 4.0),
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


def _check(parser: argparse.ArgumentParser, settings: Settings,
           args: argparse.Namespace) -> None:
    for name in ("tune_timeout", "grid_window", "final_window", "point_deadline"):
        if not getattr(settings, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name, low in (("rounds", 1), ("extra_rounds", 0), ("batch_sizes", 1)):
        if getattr(settings, name) < low:
            flag = "grid-batch-sizes" if name == "batch_sizes" else name.replace("_", "-")
            parser.error(f"--{flag} must be at least {low}")
    if settings.max_grid_workers is not None and settings.max_grid_workers < 1:
        parser.error("--max-grid-workers must be at least 1")
    if args.random < 0:
        parser.error("--random must be at least 0")
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")


def select_cases(args: argparse.Namespace, settings: Settings) -> list[Case]:
    """The cases to run: --cases (or the device's defaults when nothing else is asked), then
    --random draws; with --reuse-grid and neither, the reused file's cases."""
    reused = args.reused
    names: list[str] = []
    drawn: list[Case] = []
    if reused is not None and not args.cases and not args.random:
        for name, case in reused["cases"].items():
            if name in cases.NAMES:
                names.append(name)
            elif case.get("spec"):
                drawn.append(workloads.case(workloads.Spec(**case["spec"])))
    else:
        if args.cases or not args.random:
            names = cases.select(args.cases) if args.cases else list(
                cases.DEFAULT_CUDA if settings.cuda else cases.DEFAULT_CPU)
        drawn = [workloads.case(spec, settings.quick)
                 for spec in workloads.draw(args.random, args.seed)]
    return [cases.fixed(name, settings.quick) for name in names] + drawn


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


def check_reused(data: dict[str, Any], path: Path, selected: Sequence[Case],
                 settings: Settings) -> None:
    """Every selected case has a grid in ``data``, for this device and data set size."""
    device = (data.get("settings") or {}).get("device", "cpu")
    if device != settings.device:
        raise ValueError(f"--reuse-grid: {path} was measured with --device {device}, "
                         f"this run uses --device {settings.device}")

    def has_grid(name: str) -> bool:
        grid = (data["cases"].get(name) or {}).get("grid") or {}
        return bool(grid.get("points")) and "seconds" in grid

    missing = [case.name for case in selected if not has_grid(case.name)]
    if missing:
        raise ValueError(f"--reuse-grid: {path} has no grid for {', '.join(missing)}; "
                         "choose other --cases")
    for case in selected:
        if data["cases"][case.name].get("n") != case.n:
            raise ValueError(f"--reuse-grid: {case.name} has n={data['cases'][case.name].get('n')}"
                             f" in {path}, this run n={case.n} (--quick must match)")
