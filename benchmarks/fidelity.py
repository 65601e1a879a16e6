"""Does the probe read what a plain training loop gets?

    python benchmarks/fidelity.py [--rounds 5] [--window 1.0] [--windows search,final]
                                  [--quick] [--only 0,6] [--json PATH]

For each workload and each of its configurations (by default ``num_workers`` 0, the CPU count
and 4x the CPU count), measure side by side, interleaved, in rounds:

- **plain, torch's loader** and **plain, autoload's loader**: the training loop of
  ``examples/train.py`` (persistent workers, epochs back to back, nothing instrumented) over
  ``torch.utils.data.DataLoader`` (what a user who copies ``loader_kwargs`` gets) and over
  ``autoload.DataLoader`` (what ``best_loader`` returns), timed over whole epochs after the
  first (which pays the workers' start-up), for at least ``--plain-seconds`` and one epoch;
- **probe, search window**: ``TrainingProbe.measure`` with the window the tuner's search uses
  for a 60 s budget (``--window``, 1.0 s);
- **probe, finals window**: the same with the window the finals re-measure with
  (``autoload.final``: ``FINAL_WINDOW`` x the search window, at least 4 batches, a soft limit of
  the window plus twice the probe's overhead plus 0.5 s).

The sides of a round run in an order rotated every round (``autoload.final.interleaved``), and
each ratio is the median over rounds of that round's probe / plain: probe over torch's loader
and probe over autoload's, for each window. Both probe windows are sides of the same rounds
rather than a flag that switches the window, so a row compares them on the same machine state;
the table keeps to ~130 columns by printing the plain rates and, per window, its rate and its
two ratios as ``torch | autoload`` in one cell (``--windows search`` or ``--windows final``
measures one window only, a quicker run).

The workloads (``--only`` takes their indices):

0-5. in-memory rows with an MLP, images made per item with a CNN, items that wait 2 ms (data
     only); each with short epochs of 16 batches or fewer, which the probe measures whole, and
     long ones, which it projects;
6.   one-round epochs: images made per item, 2,400 of them, so an epoch is no more batches than
     ``num_workers x prefetch_factor`` (``bs=300 w=8 pf=1``, ``bs=300 w=4 pf=2``: 8 batches;
     ``bs=800 w=4 pf=2``: 3): the workers' first round of prefetches is the whole epoch;
7.   heavy step, cheap items: in-memory 3x64x64 images and a six-conv CNN of ~65 ms a step at
     batch size 64 on one core (``cases/heavy_step.py``), at ``num_workers`` 0, CPUs and 4x
     CPUs, prefetch 2 and 4: workers only take cores from the model;
8.   one-round epochs longer than the window: 6,300 items that wait 2 ms, 14 batches of 450
     at ``w=8 pf=4`` and ``w=4 pf=4`` (every batch requested at the epoch's start), an epoch of
     1.5-3 s, so the probe projects an epoch the workers make in one round.

A last line measures what the instrument itself costs: the plain loop with and without the
probe's memory watchdog running beside it, at 4x the CPU count. Targets, for each loader and
each window: median |1 - ratio| <= 3%, none beyond 10%; the watchdog costs under 2%.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from autoload import DataLoader, LoaderConfig, TrainingProbe, Window, cpuload
from autoload.final import interleaved
from autoload.memory import MemoryWatchdog
from autoload.search import FINAL_WINDOW
from autoload.space import usable_cpus

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cases import a_inmemory, b_cpu_items, c_io_wait, heavy_step  # noqa: E402
from common import write_json  # noqa: E402

TARGET_MEDIAN, TARGET_MAX, TARGET_INSTRUMENT = 0.03, 0.10, 0.02


def default_configs(batch_size: int, cpus: int) -> list[LoaderConfig]:
    """``num_workers`` 0, the CPU count and 4x the CPU count (prefetch 2)."""
    return [LoaderConfig(batch_size),
            LoaderConfig(batch_size, num_workers=cpus, prefetch_factor=2),
            LoaderConfig(batch_size, num_workers=4 * cpus, prefetch_factor=2)]


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    epochs: str  # "short", "long" or "one round"
    make: Callable[[], Dataset[Any]]
    model: Callable[[], nn.Module | None]
    batch_size: int
    # The configurations to measure, from the CPU count; None: default_configs(batch_size).
    configs: Callable[[int], list[LoaderConfig]] | None = None

    def loader_configs(self, cpus: int) -> list[LoaderConfig]:
        return (default_configs(self.batch_size, cpus) if self.configs is None
                else self.configs(cpus))


def _one_round_configs(cpus: int) -> list[LoaderConfig]:
    """Epochs of no more batches than num_workers x prefetch_factor, whatever the CPU count."""
    return [LoaderConfig(300, num_workers=8, prefetch_factor=1),
            LoaderConfig(300, num_workers=4, prefetch_factor=2),
            LoaderConfig(800, num_workers=4, prefetch_factor=2)]


def _long_round_configs(cpus: int) -> list[LoaderConfig]:
    """One-round epochs longer than a window: 14 batches of 450 against 32 and 16 in flight."""
    return [LoaderConfig(450, num_workers=8, prefetch_factor=4),
            LoaderConfig(450, num_workers=4, prefetch_factor=4)]


def _heavy_step_configs(cpus: int) -> list[LoaderConfig]:
    return [LoaderConfig(64)] + [LoaderConfig(64, num_workers=w, prefetch_factor=pf)
                                 for w in (cpus, 4 * cpus) for pf in (2, 4)]


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
        # 2,400 items (1,600 quick): 8 (6) batches of 300, 3 (2) of 800.
        Workload(name="images made per item, CNN", epochs="one round", batch_size=300,
                 make=lambda: b_cpu_items.make_dataset(1600 if quick else 2400),
                 model=b_cpu_items.make_model, configs=_one_round_configs),
        # 1,024 items (512 quick): 16 (8) batches of 64, under a second an epoch on two cores.
        Workload(name="heavy step, cheap items, CNN", epochs="short", batch_size=64,
                 make=lambda: heavy_step.make_dataset(heavy_step.QUICK_N if quick
                                                      else heavy_step.N),
                 model=heavy_step.make_model, configs=_heavy_step_configs),
        # 6,300 items that wait 2 ms (3,150 quick): 14 (7) batches of 450, all requested at
        # once, and an epoch of 1.5-3 s, longer than the search's window, so that the probe
        # projects an epoch that is one round of the workers.
        Workload(name="items that wait 2 ms, data only", epochs="one round, long",
                 batch_size=450, make=lambda: c_io_wait.make_dataset(6300 // (2 if quick else 1)),
                 model=lambda: None, configs=_long_round_configs),
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


# The probe's start-up and wind-down outside its window, which the finals' soft limit allows
# twice (``_Remeasure._measure``). The tuner uses each configuration's measured overhead; 1.0 s
# stands in for it here (a few workers on two cores take 0.3-1 s).
FINAL_OVERHEAD = 1.0


def final_window(search_seconds: float) -> Window:
    """The window the finals re-measure with when the budget leaves room for it
    (``autoload.final._plan`` and ``_Remeasure._measure``)."""
    seconds = FINAL_WINDOW * search_seconds
    return Window(seconds=seconds, deadline=60.0, min_batches=4,
                  time_limit=seconds + 2 * FINAL_OVERHEAD + 0.5)


# Sides of a round: the plain loop over each loader, the probe in each window.
PLAINS = {"plain_torch": TorchLoader, "plain_autoload": DataLoader}
PROBES = ("probe", "probe_final")  # the search's window, the finals'
# JSON keys of the ratios: (probe side, plain side) -> key. "ratio" (the search window over
# autoload's loader) is the key earlier runs wrote.
RATIO_KEYS = {("probe", "plain_torch"): "ratio_torch", ("probe", "plain_autoload"): "ratio",
              ("probe_final", "plain_torch"): "ratio_final_torch",
              ("probe_final", "plain_autoload"): "ratio_final"}


# A side measured while other processes took more than this share of the CPUs is measured
# again (the whole round of its configuration, so its sides still share one machine state): the
# benchmark is about the probe's reading, not about what a neighbour took from the loop.
QUIET = 0.10
BUSY_RETRIES = 2


def _measured(measure: Callable[[], float]) -> tuple[float, float | None]:
    """A rate and the share of the CPUs other processes took while it was measured."""
    before, began = cpuload.read(), time.perf_counter()
    rate = measure()
    return rate, cpuload.others_share(before, cpuload.read(), time.perf_counter() - began)


def _in_doubt(ratios: dict[str, list[float]]) -> bool:
    """Whether a row's verdict could turn on more rounds: some ratio's median lies off by more
    than the median target."""
    return any(abs(1 - statistics.median(r)) > TARGET_MEDIAN for r in ratios.values() if r)


def measure_workload(w: Workload, configs: Sequence[LoaderConfig], rounds: int,
                     windows: dict[str, Window], plain_seconds: float,
                     extra_rounds: int = 0) -> list[dict[str, Any]]:
    """Each configuration's plain rates (torch's loader, autoload's) and probe rates (one per
    window in ``windows``, keyed by side), all in every round in an order rotated per round,
    the configurations in the library's interleaved order. Each ratio is the median over rounds
    of that round's probe / plain: a round's sides share the machine's state of the moment,
    which drifts by more than the target from one minute to the next.

    A configuration's round in which another process took more than ``QUIET`` of the CPUs
    during any side is measured again (``BUSY_RETRIES`` times at most; the busy readings are
    kept apart in the JSON). After ``rounds``, a configuration whose verdict is in doubt (a
    median ratio off by more than the target) gets up to ``extra_rounds`` more, one at a time,
    as ``benchmarks/compare.py`` does while a target lies within the noise: every round counts
    in its median, the first ones too."""
    dataset, net = w.make(), w.model()
    loss = None if net is None else nn.functional.cross_entropy
    probe = TrainingProbe(dataset, device=torch.device("cpu"), model=net, loss_fn=loss)
    sides = [*PLAINS, *windows]
    rates: dict[tuple[LoaderConfig, str], list[float]] = {}
    loads: dict[LoaderConfig, list[float | None]] = {c: [] for c in configs}
    busy: dict[LoaderConfig, list[dict[str, Any]]] = {c: [] for c in configs}

    def one_round(config: LoaderConfig, r: int) -> None:
        for attempt in range(BUSY_RETRIES + 1):
            got: dict[str, tuple[float, float | None]] = {}
            for side in interleaved(sides, r + attempt):
                if side in PLAINS:
                    got[side] = _measured(lambda side=side: plain_rate(
                        dataset, net, config, plain_seconds, PLAINS[side]))
                else:
                    got[side] = _measured(lambda side=side: probe.measure(
                        config, windows[side]).samples_per_second)
                print(f"[{w.name}, {w.epochs}] round {r + 1} {config.label()} {side}: "
                      f"{got[side][0]:,.0f}/s (others {got[side][1] or 0:.0%})",
                      file=sys.stderr, flush=True)
            worst = max((o for _, o in got.values() if o is not None), default=None)
            if worst is None or worst <= QUIET or attempt == BUSY_RETRIES:
                break
            busy[config].append({side: list(v) for side, v in got.items()})
        for side, (rate, _) in got.items():
            rates.setdefault((config, side), []).append(rate)
        loads[config].append(worst)

    def ratios(config: LoaderConfig) -> dict[str, list[float]]:
        return {key: [a / b for a, b in zip(rates[(config, probed)], rates[(config, plain)],
                                            strict=True)]
                for (probed, plain), key in RATIO_KEYS.items()
                if probed in windows and plain in PLAINS}

    for r in range(rounds):
        for config in interleaved(configs, r):
            one_round(config, r)
    for r in range(rounds, rounds + extra_rounds):
        doubtful = [c for c in configs if _in_doubt(ratios(c))]
        if not doubtful:
            break
        for config in interleaved(doubtful, r):
            one_round(config, r)
    rows = []
    n = len(dataset)  # type: ignore[arg-type]
    for config in configs:
        row: dict[str, Any] = {
            "workload": w.name, "epochs": w.epochs, "config": config.to_dict(),
            "batches_per_epoch": -(-n // config.batch_size), "n": n,
            **{side: rates[(config, side)] for side in sides},
            # "plain": the key earlier runs wrote for the loop over autoload's loader.
            "plain": rates[(config, "plain_autoload")],
            "others_cpu": loads[config], "busy_rounds": busy[config],
        }
        row.update({key: statistics.median(r) for key, r in ratios(config).items()})
        rows.append(row)
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


def verdicts(rows: list[dict[str, Any]]) -> list[tuple[str, float, float, bool]]:
    """For each window measured and each loader: (what, median |1 - ratio|, largest, passes)."""
    out = []
    for (probed, plain), key in RATIO_KEYS.items():
        errors = [abs(1 - row[key]) for row in rows if key in row]
        if errors:
            median, largest = statistics.median(errors), max(errors)
            what = (f"{'search' if probed == 'probe' else 'finals'} window over "
                    f"{'torch' if plain == 'plain_torch' else 'autoload'}'s loader")
            out.append((what, median, largest,
                        median <= TARGET_MEDIAN and largest <= TARGET_MAX))
    return out


def fidelity_table(rows: list[dict[str, Any]]) -> Table:
    probes = [p for p in PROBES if any(p in row for row in rows)]
    table = Table(title="Probe against a plain training loop (median of rounds). Rates /s: the "
                        "plain loop over torch's and autoload's loader, the probe in the "
                        "search's and the finals' window; ratios probe / plain, torch | autoload")
    columns = ["workload", "epochs", "config", "b/epoch", "rounds", "torch", "autoload"]
    for p in probes:
        name = "search" if p == "probe" else "finals"
        columns += [name, f"{name} / plain"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("workload", "epochs", "config")
                         else "right", no_wrap=col not in ("workload", "epochs"))
    for row in rows:
        cells = [row["workload"], row["epochs"], LoaderConfig.from_dict(row["config"]).label(),
                 str(row["batches_per_epoch"]), str(len(row["plain"])),
                 f"{statistics.median(row['plain_torch']):,.0f}" if "plain_torch" in row
                 else "-",
                 f"{statistics.median(row.get('plain_autoload') or row['plain']):,.0f}"]
        for p in probes:
            torch_key, autoload_key = (("ratio_torch", "ratio") if p == "probe"
                                       else ("ratio_final_torch", "ratio_final"))
            ratios = " | ".join(f"{row[k]:.3f}" if k in row else "-"
                                for k in (torch_key, autoload_key))
            cells += [f"{statistics.median(row[p]):,.0f}" if p in row else "-", ratios]
        table.add_row(*cells)
    table.caption = "\n".join(
        f"{what}: median |1 - ratio| {median:.1%} (target <= {TARGET_MEDIAN:.0%}), largest "
        f"{largest:.1%} (target <= {TARGET_MAX:.0%}): {'PASS' if ok else 'FAIL'}"
        for what, median, largest, ok in verdicts(rows))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/fidelity.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=1.0,
                        help="the search's probe window, s (1.0: the search's for a 60 s "
                             "budget); the finals' is FINAL_WINDOW x this")
    parser.add_argument("--windows", default="search,final",
                        help="the probe windows to measure: search, final or both (default)")
    parser.add_argument("--plain-seconds", type=float, default=4.0,
                        help="the plain loop times whole epochs for at least this long (4)")
    parser.add_argument("--extra-rounds", type=int, default=3,
                        help="more rounds, one at a time, for a configuration whose verdict "
                             "is in doubt after --rounds (3)")
    parser.add_argument("--quick", action="store_true", help="smaller data sets, 1 round")
    parser.add_argument("--only", help="comma-separated workload indices to run: 0-5 the "
                        "original six (rows, images, waits; short, long), 6 one-round "
                        "epochs, 7 heavy step with cheap items, 8 one-round epochs longer than "
                        "the window")
    parser.add_argument("--json", type=Path, default=HERE / "fidelity.json")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    cpus = usable_cpus()
    wanted = {w.strip() for w in args.windows.split(",") if w.strip()}
    if not wanted or wanted - {"search", "final"}:
        parser.error("--windows takes search, final or search,final")
    windows = {side: window for side, name, window in (
        ("probe", "search", probe_window(args.window)),
        ("probe_final", "final", final_window(args.window))) if name in wanted}
    warnings.filterwarnings("ignore", message=r"This DataLoader will create")
    torch.manual_seed(0)
    chosen = workloads(args.quick)
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {
        "cpus": cpus, "rounds": rounds, "window": args.window,
        "windows": {side: dataclasses.asdict(window) for side, window in windows.items()},
        "final_overhead": FINAL_OVERHEAD, "quiet": QUIET, "rows": rows}
    for w in chosen:  # the JSON after each workload: an interrupted run keeps what it finished
        rows += measure_workload(w, w.loader_configs(cpus), rounds, windows, args.plain_seconds,
                                 0 if args.quick else args.extra_rounds)
        write_json(args.json, {**data, "seconds": time.perf_counter() - started})
    data["instrument"] = cost = instrument_cost(max(rounds, 3), args.plain_seconds, cpus)
    data["seconds"] = time.perf_counter() - started
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
