"""autoload.DataLoader(num_workers="auto") in a plain training loop, against fixed settings.

    python benchmarks/online.py [--quick] [--cases a,b] [--random N --seed S] [--epochs K]
                                [--rounds R] [--json PATH]

For each case (``cases/``, and ``--random`` draws from ``workloads.py``) the batch size is the
largest power of two that still makes epochs of at least 100 batches. The same plain loop
(``examples/train.py``'s: the step of the case's model, or nothing for a data-only case) runs K
epochs over a fresh loader for each side: ``num_workers="auto"`` (``cache=False``: a first run),
and a small grid of fixed ``num_workers`` x ``prefetch_factor`` (persistent workers), which holds
``num_workers=0`` and the recipe (workers = CPUs, prefetch 2). The sides run in interleaved order
(``autoload.final.interleaved``), each once a round, for several rounds; each side's numbers are
its medians over the rounds.

Per case: the first three epochs' time of "auto" over the best fixed side's (the grid point
fastest over those epochs; target <= 1.10), its rate from epoch 3 on over the best fixed side's
(the grid point fastest from epoch 3 on; target >= 0.97), both against ``num_workers=0`` and the
recipe, what it settled on and the batches it took. Progress goes to stderr, the table to
stdout, every number to ``benchmarks/online.json`` (rewritten after each case).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import autoload
from autoload.final import interleaved
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import cases  # noqa: E402
import workloads  # noqa: E402
from cases import Case  # noqa: E402
from common import log, write_json  # noqa: E402

FIRST_TARGET = 1.10  # auto's first three epochs over the best fixed side's, at most
RATE_TARGET = 0.97  # auto's rate from epoch 3 on over the best fixed side's, at least
MIN_BATCHES = 100  # an epoch's least batches
AUTO = "auto"


def batch_size(n: int) -> int:
    """The largest power of two that leaves at least ``MIN_BATCHES`` batches an epoch.

    Example:
        >>> batch_size(16384), batch_size(2048), batch_size(150)
        (128, 16, 1)
    """
    size = 1
    while n // (2 * size) >= MIN_BATCHES:
        size *= 2
    return size


def grid(cpus: int, quick: bool) -> list[tuple[int, int | None]]:
    """The fixed sides: workers 0, 1, CPUs, 2x and 4x CPUs, prefetch 2 and 4 (quick: no 4x CPUs,
    prefetch 2 only)."""
    counts = sorted({0, 1, cpus, 2 * cpus} | (set() if quick else {4 * cpus}))
    prefetch = (2,) if quick else (2, 4)
    return [(w, p) for w in counts for p in ((None,) if w == 0 else prefetch)]


def label(side: tuple[int, int | None] | str) -> str:
    if side == AUTO:
        return AUTO
    w, p = side  # type: ignore[misc]
    return f"w={w}" if w == 0 else f"w={w} pf={p}"


def run(case: Case, dataset: Any, side: tuple[int, int | None] | str, size: int,
        epochs: int) -> dict[str, Any]:
    """K epochs of the plain loop over a fresh loader: the time at each epoch's end (from the
    first ``iter()``), and, for "auto", where its tuning stood."""
    if side == AUTO:
        loader = autoload.DataLoader(dataset, batch_size=size, shuffle=True, num_workers=AUTO,
                                     cache=False)
    else:
        w, p = side  # type: ignore[misc]
        loader = autoload.DataLoader(dataset, batch_size=size, shuffle=True, num_workers=w,
                                     prefetch_factor=p, persistent_workers=w > 0)
    torch.manual_seed(0)
    net = case.make_model()
    opt = None if net is None else torch.optim.SGD(net.parameters(), lr=0.01)
    ends: list[float] = []
    began = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            if net is None or opt is None:
                continue
            x, y = batch[0], batch[1]
            loss = case.loss(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
        ends.append(time.perf_counter() - began)
    out: dict[str, Any] = {"ends": ends}
    if side == AUTO:
        tuning = loader.tuning
        assert tuning is not None
        out["tuning"] = tuning.to_dict()
    del loader
    return out


def summarize(sides: dict[str, list[dict[str, Any]]], samples: int, epochs: int,
              recipe: str) -> dict[str, Any]:
    """Each side's medians (first three epochs' seconds, samples per second from epoch 3 on),
    the best fixed sides and auto's ratios."""
    first = {s: statistics.median(r["ends"][2] for r in runs) for s, runs in sides.items()}
    rate = {s: statistics.median(samples * (epochs - 2) / (r["ends"][-1] - r["ends"][1])
                                 for r in runs) for s, runs in sides.items()}
    fixed = [s for s in sides if s != AUTO]
    best_first = min(fixed, key=lambda s: first[s])
    best_rate = max(fixed, key=lambda s: rate[s])
    tunings = [r["tuning"] for r in sides[AUTO]]
    settle = [t["batches_to_settle"] for t in tunings if t["batches_to_settle"] is not None]
    settled = [t["settled"] for t in tunings]
    return {
        "first3": first, "rate": rate, "best_first3": best_first, "best_rate": best_rate,
        "first3_ratio": first[AUTO] / first[best_first],
        "rate_ratio": rate[AUTO] / rate[best_rate],
        "vs_w0": {"first3": first[AUTO] / first["w=0"], "rate": rate[AUTO] / rate["w=0"]},
        "vs_recipe": {"first3": first[AUTO] / first[recipe], "rate": rate[AUTO] / rate[recipe]},
        "batches_to_settle": statistics.median(settle) if settle else None,
        "settled": settled,
        "pass": (first[AUTO] / first[best_first] <= FIRST_TARGET
                 and rate[AUTO] / rate[best_rate] >= RATE_TARGET),
    }


def _settled_label(settled: list[dict[str, Any] | None]) -> str:
    labels = sorted({autoload.Setting.from_dict(s).label() for s in settled if s})
    return ", ".join(labels) or "-"


def table(results: dict[str, dict[str, Any]]) -> Table:
    out = Table(title="num_workers='auto' in a plain loop, against fixed settings "
                      "(medians over rounds)")
    for col in ("case", "bs x batches", "best fixed", "3 epochs / best (<=1.10)",
                "rate from 3 / best (>=0.97)", "vs w=0 (3 ep, rate)",
                "vs recipe (3 ep, rate)", "settled on", "batches to settle", "verdict"):
        out.add_column(col, justify="left" if col in ("case", "best fixed", "settled on",
                                                      "verdict", "bs x batches") else "right")
    for name, case in results.items():
        s = case["summary"]
        best = s["best_first3"] if s["best_first3"] == s["best_rate"] \
            else f"{s['best_first3']} / {s['best_rate']}"
        settle = "-" if s["batches_to_settle"] is None else f"{s['batches_to_settle']:.0f}"
        out.add_row(
            name, f"{case['batch_size']} x {case['batches']}", best,
            f"{s['first3_ratio']:.2f}", f"{s['rate_ratio']:.2f}",
            f"{s['vs_w0']['first3']:.2f}, {s['vs_w0']['rate']:.2f}",
            f"{s['vs_recipe']['first3']:.2f}, {s['vs_recipe']['rate']:.2f}",
            _settled_label(s["settled"]), settle, "pass" if s["pass"] else "MISS",
        )
    return out


def bench(case: Case, *, epochs: int, rounds: int, cpus: int, quick: bool) -> dict[str, Any]:
    dataset = case.make_dataset()
    size = batch_size(case.n)
    sides: list[tuple[int, int | None] | str] = [AUTO, *grid(cpus, quick)]
    runs: dict[str, list[dict[str, Any]]] = {label(s): [] for s in sides}
    # Untimed: the process's first training loop pays for warming torch up (its thread pool,
    # autograd's first backward), which would land on whichever side ran first.
    run(case, dataset, (0, None), size, 1)
    for r in range(rounds):
        for side in interleaved(sides, r):
            result = run(case, dataset, side, size, epochs)
            runs[label(side)].append(result)
            note = ""
            if "tuning" in result:
                t = result["tuning"]
                settled = autoload.Setting.from_dict(t["settled"]).label() if t["settled"] \
                    else "not settled"
                note = f" ({settled} after {t['batches_to_settle']} batches)"
            log(f"[{case.name}] round {r + 1} {label(side)}: "
                f"{', '.join(f'{e:.2f}' for e in result['ends'])} s{note}")
    summary = summarize(runs, case.n, epochs, recipe=label((cpus, 2)))
    return {"description": case.description, "n": case.n, "batch_size": size,
            "batches": -(-case.n // size), "spec": case.spec, "runs": runs,
            "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/online.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="fixed cases by letter or name (default: a-e; none "
                                        "with --random unless given)")
    parser.add_argument("--random", type=int, default=0, metavar="N",
                        help="also N workloads drawn from --seed (benchmarks/workloads.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="epochs per run (6; 4 with --quick)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small data sets, a smaller grid, 4 epochs, 1 round")
    parser.add_argument("--json", type=Path, default=HERE / "online.json")
    args = parser.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 3)
    if epochs < 3 or rounds < 1:
        parser.error("--epochs must be at least 3 and --rounds at least 1")
    try:
        names = cases.select(args.cases) if args.cases else (
            [] if args.random else list(cases.DEFAULT_CPU))
    except ValueError as exc:
        parser.error(str(exc))
    chosen = [cases.fixed(name, args.quick) for name in names] + [
        workloads.case(spec, args.quick) for spec in workloads.draw(args.random, args.seed)]
    warnings.filterwarnings("ignore", message=r"This DataLoader will create")
    cpus = usable_cpus()
    # The machine's load average (1, 5, 15 minutes) at the start and the end: every number here
    # is a wall-clock time, and other processes on the cores shift them all.
    data: dict[str, Any] = {"cpus": cpus, "epochs": epochs, "rounds": rounds,
                            "quick": args.quick, "seed": args.seed if args.random else None,
                            "load_average": {"start": os.getloadavg()}, "cases": {}}
    started = time.perf_counter()
    for case in chosen:
        data["cases"][case.name] = bench(case, epochs=epochs, rounds=rounds, cpus=cpus,
                                         quick=args.quick)
        data["seconds"] = time.perf_counter() - started
        data["load_average"]["end"] = os.getloadavg()
        write_json(args.json, data)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table(data["cases"]))
    passed = sum(c["summary"]["pass"] for c in data["cases"].values())
    console.print(f"{passed} of {len(chosen)} cases meet both targets; "
                  f"{data['seconds']:.0f} s; raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
