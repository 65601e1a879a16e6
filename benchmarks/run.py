"""Benchmark autoload's tuner against a fixed grid (the oracle) and two baselines.

    python benchmarks/run.py [--cases a,b,...] [--random N --seed S] [--quick] [--json PATH]
                             [--device cpu|cuda] [--tune-timeout 60] [--reuse-grid PATH] ...

For each case (``benchmarks/cases/``, and with ``--random`` workloads drawn by
``benchmarks/workloads.py``): measure every point of the grid once (``oracle.py``), or take it
from an earlier run's JSON (``--reuse-grid``), run ``autoload.tune``, then re-measure the
tuner's pick, the oracle (the best grid point), PyTorch's defaults and the hand-tuned recipe side
by side in interleaved rounds (``compare.py``). Prints the tables (``tables.py``) and writes every
raw number to the JSON file. Progress goes to stderr. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the benchmark's modules live beside this file
    sys.path.insert(0, str(HERE))

import job as job_mod  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from cases import Case  # noqa: E402
from common import log, write_json  # noqa: E402
from compare import (  # noqa: E402
    FIXED_TARGET,
    RANDOM_TARGET,
    distribution,
    evaluate,
    remeasure,
)
from grid import nearest_divisor  # noqa: E402
from oracle import (  # noqa: E402
    measure_grid,
    per_rank,  # noqa: E402
    reuse_grid,
)
from rich.console import Console  # noqa: E402
from settings import Settings, parse_args  # noqa: E402
from tables import random_table, results_table, spread_table  # noqa: E402

import autoload  # noqa: E402
from autoload import LoaderConfig, TrainingProbe  # noqa: E402
from autoload.distributed import follow  # noqa: E402
from autoload.errors import summary  # noqa: E402
from autoload.space import usable_cpus  # noqa: E402


def machine_info(device: str = "cpu") -> dict[str, Any]:
    model = platform.processor()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and model == platform.processor():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info: dict[str, Any] = {
        "usable_cpus": usable_cpus(), "os_cpu_count": os.cpu_count(), "cpu_model": model,
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "autoload": autoload.__version__, "optuna": optuna.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
        "start_method": torch.multiprocessing.get_start_method(allow_none=True),
        "device": device, "device_name": None,
    }
    try:  # workers hand batches over in /dev/shm: too small a one fails large batches
        info["shm_total_bytes"] = shutil.disk_usage("/dev/shm").total
    except OSError:
        info["shm_total_bytes"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update({
            "device_name": torch.cuda.get_device_name(), "gpu_memory_bytes": props.total_memory,
            "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        })
    return info


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
                               progress=progress, cache=False)  # measured, never remembered
    except Exception as exc:
        return {"config": None, "error": summary(exc), "trials": 0,
                "wall_seconds": time.perf_counter() - began}
    return {
        "config": result.config.to_dict(), "error": None, "trials": len(result.trials),
        "wall_seconds": time.perf_counter() - began, "elapsed_seconds": result.elapsed_seconds,
        "result": json.loads(result.to_json()),
    }


def run_case(case: Case, settings: Settings, reused: dict[str, Any] | None = None,
             reused_meta: dict[str, Any] | None = None,
             job: job_mod.Job | None = None) -> dict[str, Any] | None:
    """One case: the grid (or ``reused``, the case's entry of an earlier run's JSON), the tuner
    and the side-by-side re-measure; in a job, rank 0's record (the others return ``None``)."""
    device = torch.device(settings.device)
    torch.manual_seed(0)
    np.random.seed(0)
    dataset, model = case.make_dataset(), case.make_model()
    if model is not None and settings.cuda:
        model = model.to(device)  # before the optimizer, which holds the parameters
    model = job_mod.wrap(model, job)
    loss = case.loss if model is not None else None
    optimizer = None if model is None else torch.optim.SGD(model.parameters(), lr=0.01)
    probe = TrainingProbe(dataset, device=device, model=model, loss_fn=loss, optimizer=optimizer,
                          loader_options=job_mod.shard_options(dataset, job),
                          sync=None if job is None else job.channel.vote)
    if job is not None and not job.leader:
        if reused is None:
            follow(probe, job.channel)  # the grid
        run_tuner(case.name, dataset, model, loss, optimizer, settings)
        follow(probe, job.channel)  # the re-measure
        return None
    measuring = job_mod.measuring_probe(probe, job)
    if reused is None:
        grid_block, oracle, oracle_rate = measure_grid(case, model, measuring, settings,
                                                       job=job)
        if job is not None:
            measuring.finish("grid")
    else:
        grid_block, oracle, oracle_rate = reuse_grid(case.name, reused, reused_meta or {})
    log(f"[{case.name}] tuning for {settings.tune_timeout:g} s")
    tuner = run_tuner(case.name, dataset, model, loss, optimizer, settings)
    if tuner["error"]:
        log(f"[{case.name}] tune failed: {tuner['error']}")
    roles = _roles(case, tuner, oracle, settings, job)
    target = RANDOM_TARGET if case.spec else FIXED_TARGET
    rows = remeasure(case.name, measuring, roles, settings, target)
    if job is not None:
        measuring.finish("re-measure")
    outcome = evaluate(roles, rows, tuner["wall_seconds"], float(grid_block["seconds"]),
                       budget=settings.tune_timeout, target=target)
    log(f"[{case.name}] {outcome['verdict']}")
    return {
        "description": case.description, "bottleneck": case.bottleneck, "n": case.n,
        "spec": case.spec or None, "has_model": model is not None, "grid": grid_block,
        "oracle": None if oracle is None else {
            "config": oracle.to_dict(), "grid_samples_per_second": oracle_rate,
            "tried_by_tuner": _tried(oracle, tuner),
        },
        "tuner": tuner, "roles": {role: config.to_dict() for role, config in roles.items()},
        "remeasure": rows, "summary": outcome,
        "nproc": 1 if job is None else job.world.size,
    }


def _roles(case: Case, tuner: dict[str, Any], oracle: LoaderConfig | None,
           settings: Settings, job: job_mod.Job | None = None) -> dict[str, LoaderConfig]:
    b64 = nearest_divisor(per_rank(case.n, job), 64)
    roles: dict[str, LoaderConfig] = {}
    if tuner["config"] is not None:
        roles["tuner"] = LoaderConfig.from_dict(tuner["config"])
    if oracle is not None:
        roles["oracle"] = oracle
    roles["defaults"] = LoaderConfig(b64)
    roles["recipe"] = LoaderConfig(b64, num_workers=settings.cpus, prefetch_factor=2,
                                   pin_memory=settings.cuda)
    return roles


def _tried(config: LoaderConfig, tuner: dict[str, Any]) -> bool:
    """Whether one of the tuner's trials measured ``config``."""
    trials = (tuner.get("result") or {}).get("trials", [])
    return any(t["config"] == config.to_dict() for t in trials)


def _reused_meta(args: Any, settings: Settings, machine: dict[str, Any]) -> dict[str, Any]:
    if args.reused is None:
        return {}
    before = args.reused.get("machine") or {}
    for key in ("usable_cpus", "cpu_model", "device_name"):
        if key in before and before[key] != machine.get(key):
            log(f"warning: --reuse-grid {settings.reuse_grid} was measured with {key} "
                f"{before[key]!r}, this machine has {machine.get(key)!r}")
    return {"path": str(settings.reuse_grid), "started": args.reused.get("started")}


def run_all(args: Any, settings: Settings, data: dict[str, Any], started: float,
            job: job_mod.Job | None = None) -> int:
    """Every selected case in turn; the JSON is rewritten after each one (by rank 0 alone in
    a job)."""
    meta = _reused_meta(args, settings, data["machine"])
    status = 0
    for i, case in enumerate(args.selected, 1):
        if job is not None and not job.leader:
            reused = None if args.reused is None else args.reused["cases"][case.name]
            run_case(case, settings, reused=reused, reused_meta=meta, job=job)
            continue
        log(f"== case {i}/{len(args.selected)}: {case.name} ({case.description})")
        try:
            reused = None if args.reused is None else args.reused["cases"][case.name]
            data["cases"][case.name] = run_case(case, settings, reused=reused,
                                                reused_meta=meta, job=job)
        except KeyboardInterrupt:
            log(f"[{case.name}] interrupted; the cases before it are kept")
            data["interrupted"] = case.name
            status = 130
        except Exception as exc:  # one broken case does not lose the others
            log(f"[{case.name}] crashed: {summary(exc)}")
            data.setdefault("errors", {})[case.name] = summary(exc)
            status = 1
        data["random_summary"] = distribution(data["cases"])
        data["elapsed_seconds"] = time.time() - started
        write_json(args.json, data)  # after each case, so an interrupted run keeps its results
        if status == 130:
            break
    return status


def main(argv: Sequence[str] | None = None,
         console_factory: Callable[[], Console] | None = None) -> int:
    args, settings = parse_args(argv)
    job = job_mod.start()
    if args.nproc > 1 and job is None:
        return job_mod.launch(sys.argv[1:] if argv is None else list(argv), args.nproc)
    if job is not None:  # the node's CPUs are shared among its ranks
        settings = replace(settings, cpus=max(1, settings.cpus // job.world.local_size))
    started = time.time()
    data: dict[str, Any] = {
        "format_version": 1,
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(settings.device),
        "settings": {**settings.to_dict(), "cases": [c.name for c in args.selected],
                     "random": args.random, "seed": args.seed},
        "cases": {}, "elapsed_seconds": 0.0,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data["settings"]["nproc"] = 1 if job is None else job.world.size
    status = run_all(args, settings, data, started, job)
    if job is not None and not job.leader:
        return status
    console = console_factory() if console_factory else Console(
        width=None if sys.stdout.isatty() else 170)
    if settings.cuda:
        console.print(f"Device: {data['machine']['device_name']} (CUDA "
                      f"{data['machine']['cuda']}, {data['machine']['usable_cpus']} usable CPUs)")
    if data["cases"]:
        console.print(results_table(data["cases"]))
        console.print(spread_table(data["cases"]))
    if data.get("random_summary"):
        console.print(random_table(data["cases"], data["random_summary"], args.seed))
    console.print(f"{len(data['cases'])} case(s) in {data['elapsed_seconds']:.0f} s; "
                  f"raw numbers in {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
