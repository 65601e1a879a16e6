"""autoload.DataLoader against torch's DataLoader: the same loop, the same settings.

    python benchmarks/loaders.py [--rounds 3] [--quick] [--json PATH]

autoload.DataLoader forks its workers with the training process's objects frozen out of the
garbage collector's reach (``src/autoload/loader.py``). For each of ``fidelity.py``'s workloads
at ``num_workers`` the CPU count and 4x the CPU count, the plain training loop of
``examples/train.py`` runs over each loader in interleaved pairs (which goes first alternates),
and the table prints autoload's rate over torch's (the median over rounds of each pair).
"""

from __future__ import annotations

import argparse
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
from autoload import LoaderConfig
from autoload.final import interleaved
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import write_json  # noqa: E402
from fidelity import plain_rate, workloads  # noqa: E402

LOADERS = {"torch": torch.utils.data.DataLoader, "autoload": autoload.DataLoader}


def compare(rounds: int, plain_seconds: float, quick: bool, cpus: int) -> list[dict[str, Any]]:
    rows = []
    for w in workloads(quick):
        dataset, net = w.make(), w.model()
        for workers in (cpus, 4 * cpus):
            config = LoaderConfig(w.batch_size, num_workers=workers, prefetch_factor=2)
            rates: dict[str, list[float]] = {name: [] for name in LOADERS}
            for r in range(rounds):
                for name in interleaved(list(LOADERS), r):
                    rate = plain_rate(dataset, net, config, plain_seconds, LOADERS[name])
                    rates[name].append(rate)
                    print(f"[{w.name}, {w.epochs}] round {r + 1} {config.label()} {name}: "
                          f"{rate:,.0f}/s", file=sys.stderr, flush=True)
            pairs = zip(rates["autoload"], rates["torch"], strict=True)
            rows.append({"workload": w.name, "epochs": w.epochs, "config": config.to_dict(),
                         **rates, "ratio": statistics.median(a / b for a, b in pairs)})
    return rows


def table(rows: list[dict[str, Any]]) -> Table:
    out = Table(title="The plain loop over autoload.DataLoader against torch's (median of rounds)")
    for col in ("workload", "epochs", "config", "torch /s", "autoload /s", "autoload / torch"):
        out.add_column(col, justify="left" if col in ("workload", "epochs", "config")
                       else "right")
    for row in rows:
        out.add_row(row["workload"], row["epochs"], LoaderConfig.from_dict(row["config"]).label(),
                    f"{statistics.median(row['torch']):,.0f}",
                    f"{statistics.median(row['autoload']):,.0f}", f"{row['ratio']:.3f}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/loaders.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain-seconds", type=float, default=4.0,
                        help="each loop times whole epochs for at least this long (4)")
    parser.add_argument("--quick", action="store_true", help="smaller data sets, 1 round")
    parser.add_argument("--json", type=Path, default=HERE / "loaders.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=r"This DataLoader will create")
    torch.manual_seed(0)
    started, cpus = time.perf_counter(), usable_cpus()
    rows = compare(1 if args.quick else args.rounds, args.plain_seconds, args.quick, cpus)
    data = {"cpus": cpus, "rows": rows, "seconds": time.perf_counter() - started}
    write_json(args.json, data)
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(table(rows))
    console.print(f"{data['seconds']:.0f} s; raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
