"""The terminal report and live progress: the only module that imports rich."""

from __future__ import annotations

import time
from collections import Counter
from types import TracebackType

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from autoload.memory import format_size
from autoload.result import ProgressEvent, TuneResult

__all__ = ["LiveProgress", "render_report", "snippet"]


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def snippet(result: TuneResult) -> str:
    """The winning settings as copy-pasteable Python."""
    lines = ["loader = DataLoader(", "    dataset,"]
    lines += [f"    {k}={v!r}," for k, v in result.loader_kwargs.items()]
    lines.append(")")
    if result.amp is not None:
        device_type = result.device.split(":")[0]
        lines.append(f"# train each step under: torch.autocast({device_type!r}, "
                     f"dtype=torch.{result.amp})")
        if result.amp == "float16":
            lines.append('# and scale the loss with scaler = torch.amp.GradScaler("cuda")')
    return "\n".join(lines)


def render_report(result: TuneResult) -> RenderableType:
    """The whole report as one rich renderable."""
    head = Text.assemble(
        ("autoload", "bold"), f": best DataLoader settings on {result.device}, ",
        (f"{_rate(result.samples_per_second)} samples/s", "bold green"),
        f" ({len(result.trials)} trials over a space of {result.space_size}, "
        f"{result.elapsed_seconds:.0f} s)",
    )
    return Group(head, _finalists_table(result), Text("\n".join(_lines(result))),
                 Text("Winning settings:", style="bold"),
                 Syntax(snippet(result), "python", theme="ansi_dark", background_color="default"))


def _finalists_table(result: TuneResult) -> Table:
    predicted = any(f.predicted for f in result.finalists)
    table = Table(title="Best configurations, re-measured side by side", title_justify="left",
                  caption=("predicted: the pipeline model's rate before measuring; "
                           if predicted else "")
                  + "spread: half the min-max range of the repeated measurements; "
                  "wait: share of the time spent waiting for data", caption_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("configuration", overflow="fold")
    table.add_column("samples/s", justify="right", no_wrap=True)
    if predicted:
        table.add_column("predicted", justify="right", no_wrap=True)
    table.add_column("spread", justify="right", no_wrap=True)
    table.add_column("start", justify="right", no_wrap=True)
    table.add_column("host mem", justify="right", no_wrap=True)
    gpu = any(f.peak_gpu_bytes for f in result.finalists)
    if gpu:
        table.add_column("GPU mem", justify="right", no_wrap=True)
    table.add_column("wait", justify="right", no_wrap=True)
    table.add_column("", justify="left", no_wrap=True)
    for f in result.finalists:
        row = [f.config.label(), _rate(f.median)]
        if predicted:
            row.append("-" if f.predicted is None else _rate(f.predicted))
        row += [
            f"±{50 * (max(f.rates) - min(f.rates)) / f.median:.0f}%"
            if f.median and len(f.rates) > 1 else "-",
            "-" if f.startup_seconds is None else f"{f.startup_seconds:.2f} s",
            "-" if f.peak_host_bytes is None else format_size(f.peak_host_bytes),
        ]
        if gpu:
            row.append(format_size(f.peak_gpu_bytes) if f.peak_gpu_bytes else "-")
        role = "" if f.role == "candidate" else f.role
        tag = (f"winner ({role})" if role else "winner") if f.config == result.config else role
        row += [_pct(f.data_wait_fraction), tag]
        table.add_row(*row, style="bold" if f.config == result.config else None)
    return table


def _lines(result: TuneResult) -> list[str]:
    lines = []
    for name, label in (("defaults", "PyTorch defaults"), ("recipe", "hand-tuned recipe")):
        speedup = result.speedup(name)
        if name == result.winner.role:
            lines.append(f"the {label} won: no other setting measured faster here")
        elif speedup is not None:
            lines.append(f"{speedup:.2f}x faster than {label} "
                         f"({_rate(result.baselines[name])} samples/s)")
    bad = Counter((t.state, t.reason) for t in result.trials if t.state in ("infeasible", "failed"))
    if bad:
        lines.append(f"{_count(sum(bad.values()), 'trial')} infeasible or failed:")
        lines.extend(f"  {count} x {state}: {reason}" for (state, reason), count in bad.items())
    repeats = sum(t.state == "repeat" for t in result.trials)
    if repeats:
        lines.append(f"{_count(repeats, 'trial')} repeated a measured configuration and "
                     f"{'was' if repeats == 1 else 'were'} not run again")
    lines += _bound_lines(result)
    n, epoch = result.samples_per_epoch, result.epoch_seconds()
    if epoch is not None and n is not None:
        lines.append(f"one epoch of {n:,} samples: about {epoch:.1f} s")
    if result.config.drop_last and n is not None:
        lines.append(f"drop_last: each epoch drops {result.dropped_per_epoch} of {n} samples")
    return lines + list(result.notes)


def _bound_lines(result: TuneResult) -> list[str]:
    """What bounds the winner: the model's view, and the step alone as an upper bound unless
    the measurement has broken it (then it is not one)."""
    lines = []
    if result.limit:
        lines.append(f"bound: the pipeline model expects the winner to be bound by "
                     f"{result.limit}")
    if result.step_rate:
        share = result.samples_per_second / result.step_rate
        if share > 1.05:
            lines.append(f"the training step alone measured {_rate(result.step_rate)} "
                         f"samples/s, under the winner's rate: the machine was busier then, so "
                         "it bounds nothing here")
        else:
            line = (f"the training step alone (batch already on {result.device}) runs "
                    f"{_rate(result.step_rate)} samples/s; the winner reaches {share:.0%} of it")
            if share < 0.8 and result.bound == "training step" and result.config.num_workers:
                line += " (slower than alone: the workers share its CPU cores)"
            lines.append(line)
    elif result.fetch_rate:
        lines.append(f"one process fetches {_rate(result.fetch_rate)} samples/s; the winner "
                     f"reaches {result.samples_per_second / result.fetch_rate:.1f}x that")
    return lines


class LiveProgress:
    """A progress callback for :func:`autoload.tune` that draws a rich progress bar.

    Example:
        >>> with LiveProgress(Console(quiet=True)) as progress:
        ...     pass  # autoload.tune(dataset, progress=progress)
    """

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[best]}"), console=console, transient=False,
        )
        self._task: TaskID | None = None
        self._started = time.monotonic()

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        self._task = self._progress.add_task("autoload: starting", total=None, best="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        if self._task is None:
            return
        if event.phase == "search":
            of = f" of {event.total}" if event.total else ""
            description = f"search: trial {event.done}{of}"
        else:
            description = f"re-measure: {event.done} of {event.total}"
        total: float | None
        if event.budget:
            total, completed = event.budget, min(event.elapsed, event.budget)
        else:
            total, completed = float(event.total or 0) or None, float(event.done)
        best = "" if event.best is None or event.best_config is None else (
            f"best {_rate(event.best)}/s ({event.best_config.label()})"
        )
        self._progress.update(self._task, description=description, total=total,
                              completed=completed, best=best)
