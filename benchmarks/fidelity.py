"""Does the probe read what a plain training loop gets?

    python benchmarks/fidelity.py [--rounds 3] [--window 1.0] [--quick] [--json PATH]

For each workload and each configuration (``num_workers`` 0, the CPU count and 4x the CPU
count), measure side by side, interleaved, in rounds:

- **plain**: the training loop of ``examples/train.py`` over the loader ``best_loader`` returns
  (``autoload.DataLoader``; persistent workers, epochs back to back, nothing instrumented),
  timed over whole epochs after the first (which pays the workers' start-up), for at least
  ``--plain-seconds`` and one epoch;
- **probe**: ``TrainingProbe.measure`` with the window the tuner's search uses for a 60 s budget.

and print probe / plain per configuration (the median over rounds of each side). Each workload
comes with short epochs (16 batches or fewer, which the probe measures whole) and long ones (an
epoch several times the probe's window, which it projects). A last table measures what the
instrument itself costs: the plain loop with and without the probe's memory watchdog running
beside it, at 4x the CPU count. Targets: median |1 - ratio| <= 3%, none beyond 10%; the
watchdog costs under 2%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import Dataset

from autoload import DataLoader, LoaderConfig, TrainingProbe, Window
from autoload.final import interleaved
from autoload.memory import MemoryWatchdog
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cases import a_inmemory, b_cpu_items, c_io_wait  # noqa: E402
from common import write_json  # noqa: E402

TARGET_MEDIAN, TARGET_MAX, TARGET_INSTRUMENT = 0.03, 0.10, 0.02


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    epochs: str  # "short" or "long"
    make: Callable[[], Dataset[Any]]
    model: Callable[[], nn.Module | None]
    batch_size: int


def workloads(quick: bool) -> list[Workload]:
    scale = 4 if quick else 1
    return [
        Workload(name="in-memory rows, MLP", epochs="short", batch_size=1000,
                 make=lambda: a_inmemory.make_dataset(16000), model=a_inmemory.make_model),
        Workload(name="in-memory rows, MLP", epochs="long", batch_size=250,
                 make=lambda: a_inmemory.make_dataset(500_000 // scale),
                 model=a_inmemory.make_model),
        Workload(name="images made per item, CNN", epochs="short", batch_size=256,
                 make=lambda: b_cpu_items.make_dataset(2048), model=b_cpu_items.make_model),
        Workload(name="images made per item, CNN", epochs="long", batch_size=64,
                 make=lambda: b_cpu_items.make_dataset(8192 // scale),
                 model=b_cpu_items.make_model),
        Workload(name="items that wait 2 ms, data only", epochs="short", batch_size=128,
                 make=lambda: c_io_wait.make_dataset(2048), model=lambda: None),
        Workload(name="items that wait 2 ms, data only", epochs="long", batch_size=32,
                 make=lambda: c_io_wait.make_dataset(6144 // scale), model=lambda: None),
    ]


SEGMENT_SECONDS = 1.0


def plain_rate(dataset: Dataset[Any], net: nn.Module | None, config: LoaderConfig,
               min_seconds: float, loader_class: type[TorchLoader[Any]] = DataLoader) -> float:
    """The loop of examples/train.py over the loader best_loader returns: the median rate
    over segments of whole epochs (each 1 s at least) after the first epoch, which pays the
    workers' start-up.

    A median over segments, not one rate over the whole run, because some costs come once per
    run but late: each worker's first full garbage collection touches every object it inherited
    from the training process, so the kernel copies those pages (0.6-0.9 s with 8 workers on two
    cores, a few seconds into the run). A long run pays that once; a run of a few seconds would
    count it as if every epoch did.
    """
    loader = loader_class(dataset, **config.loader_kwargs())
    opt = None if net is None else torch.optim.SGD(net.parameters(), lr=0.01)
    ends: list[float] = []
    while len(ends) < 2 or ends[-1] - ends[0] < min_seconds:
        for x, y in loader:
            if net is None:
                continue
            assert opt is not None
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
        ends.append(time.perf_counter())
    n = len(dataset)  # type: ignore[arg-type]
    rates, last = [], 0
    for i in range(1, len(ends)):
        if ends[i] - ends[last] >= SEGMENT_SECONDS or (i == len(ends) - 1 and not rates):
            rates.append((i - last) * n / (ends[i] - ends[last]))
            last = i
    return statistics.median(rates)


def probe_window(seconds: float) -> Window:
    """The window the tuner's search uses: its time limit is four windows."""
    return Window(seconds=seconds, deadline=60.0, time_limit=4 * seconds)


def measure_workload(w: Workload, configs: Sequence[LoaderConfig], rounds: int,
                     window: Window, plain_seconds: float) -> list[dict[str, Any]]:
    """Each configuration's plain and probe rates, back to back in every round (which goes
    first alternates), the configurations in the library's interleaved order. The ratio is the
    median over rounds of each round's pair: a pair shares the machine's state of the moment,
    which drifts by more than the target from one minute to the next."""
    dataset, net = w.make(), w.model()
    loss = None if net is None else nn.functional.cross_entropy
    probe = TrainingProbe(dataset, device=torch.device("cpu"), model=net, loss_fn=loss)
    rates: dict[tuple[LoaderConfig, str], list[float]] = {}
    for r in range(rounds):
        for config in interleaved(configs, r):
            for side in (("plain", "probe") if r % 2 == 0 else ("probe", "plain")):
                if side == "plain":
                    rate = plain_rate(dataset, net, config, plain_seconds)
                else:
                    rate = probe.measure(config, window).samples_per_second
                rates.setdefault((config, side), []).append(rate)
                print(f"[{w.name}, {w.epochs}] round {r + 1} {config.label()} {side}: "
                      f"{rate:,.0f}/s", file=sys.stderr, flush=True)
    rows = []
    n = len(dataset)  # type: ignore[arg-type]
    for config in configs:
        plain, probed = rates[(config, "plain")], rates[(config, "probe")]
        rows.append({
            "workload": w.name, "epochs": w.epochs, "config": config.to_dict(),
            "batches_per_epoch": -(-n // config.batch_size), "n": n,
            "plain": plain, "probe": probed,
            "ratio": statistics.median(a / b for a, b in zip(probed, plain, strict=True)),
        })
    return rows


def instrument_cost(rounds: int, plain_seconds: float, cpus: int) -> dict[str, Any]:
    """The plain loop with and without the memory watchdog beside it, interleaved pairs; and
    the watchdog thread's own CPU time as a share of the machine's (an upper bound on what it
    takes from the loop, free of the machine's noise)."""
    dataset, net = a_inmemory.make_dataset(64000), a_inmemory.make_model()
    config = LoaderConfig(1000, num_workers=4 * cpus, prefetch_factor=2)
    rates: dict[str, list[float]] = {"without": [], "with": []}
    shares = []
    for r in range(rounds):
        for side in interleaved(["without", "with"], r):
            if side == "with":
                began = time.perf_counter()
                with MemoryWatchdog(None) as dog:
                    rate = plain_rate(dataset, net, config, plain_seconds)
                shares.append(dog.cpu_seconds / (cpus * (time.perf_counter() - began)))
            else:
                rate = plain_rate(dataset, net, config, plain_seconds)
            rates[side].append(rate)
            print(f"[instrument] round {r + 1} {side} watchdog: {rate:,.0f}/s", file=sys.stderr,
                  flush=True)
    ratios = [a / b for a, b in zip(rates["with"], rates["without"], strict=True)]
    return {"config": config.to_dict(), **rates, "ratio": statistics.median(ratios),
            "cpu_share": statistics.median(shares)}


def fidelity_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Probe against a plain training loop (median of rounds)")
    for col in ("workload", "epochs", "config", "batches/epoch", "plain /s", "probe /s",
                "probe / plain"):
        table.add_column(col, justify="left" if col in ("workload", "epochs", "config")
                         else "right")
    for row in rows:
        table.add_row(row["workload"], row["epochs"], LoaderConfig.from_dict(row["config"]).label(),
                      str(row["batches_per_epoch"]), f"{statistics.median(row['plain']):,.0f}",
                      f"{statistics.median(row['probe']):,.0f}", f"{row['ratio']:.3f}")
    errors = [abs(1 - row["ratio"]) for row in rows]
    verdict = ("PASS" if statistics.median(errors) <= TARGET_MEDIAN
               and max(errors) <= TARGET_MAX else "FAIL")
    table.caption = (f"median |1 - ratio| {statistics.median(errors):.1%} (target <= "
                     f"{TARGET_MEDIAN:.0%}), largest {max(errors):.1%} (target <= "
                     f"{TARGET_MAX:.0%}): {verdict}")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/fidelity.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=1.0,
                        help="the probe's window, s (1.0: the search's for a 60 s budget)")
    parser.add_argument("--plain-seconds", type=float, default=4.0,
                        help="the plain loop times whole epochs for at least this long (4)")
    parser.add_argument("--quick", action="store_true", help="smaller data sets, 1 round")
    parser.add_argument("--only", help="comma-separated workload indices (0-5) to run")
    parser.add_argument("--json", type=Path, default=HERE / "fidelity.json")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    cpus = usable_cpus()
    def configs(bs: int) -> list[LoaderConfig]:
        return [LoaderConfig(bs), LoaderConfig(bs, num_workers=cpus, prefetch_factor=2),
                LoaderConfig(bs, num_workers=4 * cpus, prefetch_factor=2)]
    warnings.filterwarnings("ignore", message=r"This DataLoader will create")
    torch.manual_seed(0)
    chosen = workloads(args.quick)
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for w in chosen:
        rows += measure_workload(w, configs(w.batch_size), rounds, probe_window(args.window),
                                 args.plain_seconds)
    cost = instrument_cost(max(rounds, 3), args.plain_seconds, cpus)
    data = {"cpus": cpus, "rounds": rounds, "window": args.window, "rows": rows,
            "instrument": cost, "seconds": time.perf_counter() - started}
    write_json(args.json, data)
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(fidelity_table(rows))
    verdict = "PASS" if cost["cpu_share"] <= TARGET_INSTRUMENT else "FAIL"
    console.print(f"instrument: at {LoaderConfig.from_dict(cost['config']).label()} the memory "
                  f"watchdog's thread used {cost['cpu_share']:.2%} of the {cpus} CPUs (target "
                  f"< {TARGET_INSTRUMENT:.0%}): {verdict}; the plain loop ran "
                  f"{cost['ratio']:.3f}x as fast beside it as without (median of "
                  f"{len(cost['with'])} interleaved pairs, within the machine's noise).")
    console.print(f"{data['seconds']:.0f} s; raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
