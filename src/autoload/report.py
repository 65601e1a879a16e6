"""The terminal report and live progress: the only module that imports rich."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Column, Table
from rich.text import Text

from autoload.config import LoaderConfig
from autoload.memory import format_size
from autoload.result import FinalistRecord, ProgressEvent, TuneResult
from autoload.settle import Setting

__all__ = ["LiveProgress", "render_report", "report_text", "snippet", "training_arguments_snippet"]


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def snippet(result: TuneResult) -> str:
    """The winning settings as copy-pasteable Python."""
    lines = ["loader = autoload.DataLoader(", "    dataset,"]
    lines += [f"    {k}={v!r}," for k, v in result.dataloader_kwargs.items()]
    lines.append(")")
    if result.amp is not None:
        device_type = result.device.split(":")[0]
        lines.append(f"# train each step under: torch.autocast({device_type!r}, "
                     f"dtype=torch.{result.amp})")
        if result.amp == "float16":
            lines.append('# and scale the loss with scaler = torch.amp.GradScaler("cuda")')
    return "\n".join(lines)


def training_arguments_snippet(result: TuneResult) -> str:
    """The winning settings as Hugging Face ``TrainingArguments``, copy-pasteable
    (:meth:`TuneResult.training_arguments`)."""
    lines = ["args = TrainingArguments(", '    output_dir="out",  # and your other arguments']
    lines += [f"    {k}={v!r}," for k, v in result.training_arguments().items()]
    lines.append(")")
    return "\n".join(lines)


def render_report(result: TuneResult) -> RenderableType:
    """The whole report as one rich renderable."""
    head = Text.assemble(
        ("autoload", "bold"), f": best DataLoader settings on {result.device}, ",
        (f"{_rate(result.samples_per_second)} samples/s", "bold green"),
        f" ({len(result.trials)} trials over a space of {result.space_size}, "
        f"{result.elapsed_seconds:.0f} s)",
    )
    parts: list[RenderableType] = [
        head, _Finalists(result), Text("\n".join(_lines(result))),
        Text("Winning settings:", style="bold"), _python(snippet(result))]
    if result.framework == "transformers":
        parts += [Text("With the Hugging Face Trainer:", style="bold"),
                  _python(training_arguments_snippet(result))]
    return Group(*parts)


def report_text(result: TuneResult, *, width: int = 100) -> str:
    """The report as plain text (no colour, no markup), for a log."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render_report(result))
    return out.getvalue()


def _python(code: str) -> Syntax:
    return Syntax(code, "python", theme="ansi_dark", background_color="default")


class _Finalists:
    """The finalists' table, fitted to the width rich gives it: columns that do not fit are
    left out, least useful first (start-up, memory, wait, spread, prediction), so that no
    configuration or number is ever folded over two lines."""

    _OPTIONAL = ("predicted", "spread", "wait", "host mem", "GPU mem", "start")  # kept first

    def __init__(self, result: TuneResult) -> None:
        self.result = result

    def _columns(self) -> dict[str, list[str]]:
        result, finalists = self.result, self.result.finalists
        columns = {
            "configuration": [f.config.label() for f in finalists],
            "samples/s": [_rate(f.median) for f in finalists],
            "predicted": ["-" if f.predicted is None else _rate(f.predicted) for f in finalists],
            "spread": [f"±{50 * (max(f.rates) - min(f.rates)) / f.median:.0f}%"
                       if f.median and len(f.rates) > 1 else "-" for f in finalists],
            "start": ["-" if f.startup_seconds is None else f"{f.startup_seconds:.2f} s"
                      for f in finalists],
            "host mem": ["-" if f.peak_host_bytes is None else format_size(f.peak_host_bytes)
                         for f in finalists],
            "GPU mem": [format_size(f.peak_gpu_bytes) if f.peak_gpu_bytes else "-"
                        for f in finalists],
            "wait": [_pct(f.data_wait_fraction) for f in finalists],
            "": [_tag(f, result) for f in finalists],
        }
        if not any(f.predicted for f in finalists) or not _prediction_trusted(result):
            del columns["predicted"]
        if all(f.data_wait_fraction is None for f in finalists):
            del columns["wait"]
        if not any(f.peak_gpu_bytes for f in finalists):
            del columns["GPU mem"]
        return columns

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        columns = self._columns()
        kept = [name for name in columns if name not in self._OPTIONAL]
        for name in self._OPTIONAL:
            if name in columns:
                trial = self._table(columns, [n for n in columns if n in (*kept, name)])
                # rich's own measure (its box puts a divider between columns beside the
                # padding), unclamped: Measurement.get never returns more than it is given
                wide = options.update_width(10 * options.max_width + 1000)
                if Measurement.get(console, wide, trial).maximum <= options.max_width:
                    kept.append(name)
        yield self._table(columns, [name for name in columns if name in kept])

    def _table(self, columns: dict[str, list[str]], order: list[str]) -> Table:
        caption = []
        if "predicted" in order:
            caption.append("predicted: the pipeline model's rate before measuring")
        if "spread" in order:
            caption.append("spread: half the min-max range of the repeated measurements")
        if "wait" in order:
            caption.append("wait: share of the time spent waiting for data")
        table = Table(title="Best configurations, re-measured side by side",
                      title_justify="left", caption="; ".join(caption) or None,
                      caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for name in order:
            table.add_column(name, justify="left" if name in ("configuration", "") else "right",
                             no_wrap=True)
        for i, f in enumerate(self.result.finalists):
            table.add_row(*(columns[name][i] for name in order),
                          style="bold" if f.config == self.result.config else None)
        return table


def _prediction_trusted(result: TuneResult) -> bool:
    """Whether the pipeline model's figures can be shown: it predicted the winner within 2x
    of what the winner measured (else the machine was busier than when it was calibrated, or
    it did not fit this pipeline, and its other figures are no better)."""
    predicted, measured = result.winner.predicted, result.winner.median
    return predicted is not None and measured > 0 and 0.5 <= predicted / measured <= 2


def _prediction_lines(result: TuneResult) -> list[str]:
    if not any(f.predicted for f in result.finalists) or _prediction_trusted(result):
        return []
    predicted = result.winner.predicted
    if predicted is None:
        return ["the pipeline model had no prediction for the winner (it was not fitted to "
                "it), so its predictions are left out"]
    return [f"the pipeline model predicted {_rate(predicted)} samples/s for the winner, which "
            f"measured {_rate(result.winner.median)}: off by more than 2x (the machine was "
            "busier or quieter than when the model was calibrated, or the model does not fit "
            "this pipeline), so its predictions and its bound are left out"]


def _tag(f: FinalistRecord, result: TuneResult) -> str:
    role = "" if f.role == "candidate" else f.role
    return (f"winner ({role})" if role else "winner") if f.config == result.config else role


def _busy_lines(result: TuneResult) -> list[str]:
    """A busy machine, said first: every figure after it is the loader's share of CPUs that
    other processes were using too."""
    if not result.busy or result.others_cpu is None:
        return []
    return [f"the machine was busy: other processes used {result.others_cpu:.0%} of the CPUs "
            "while autoload measured (median over its windows), so these rates are what the "
            "loader got beside them, and configurations may rank differently on a quiet "
            "machine (the finalists were re-measured in more interleaved rounds where time "
            "allowed). Tune again when it is quiet: this result is kept marked in the cache "
            "and is never handed back as a quiet machine's"]


def _lines(result: TuneResult) -> list[str]:
    lines = _busy_lines(result)
    if result.cached:
        lines.append(f"from the cache ({result.cached}): this machine tuned the same data, "
                     "model and options before; --no-cache (cache=False) measures again")
    for name, label in (("defaults", "PyTorch defaults"), ("recipe", "hand-tuned recipe")):
        speedup = result.speedup(name)
        if name == result.winner.role:
            lines.append(f"the {label} won: no other setting measured faster here")
        elif speedup is not None:
            lines.append(f"{speedup:.2f}x faster than {label} "
                         f"({_rate(result.baselines[name])} samples/s)")
            if name == "defaults":
                lines += _split_lines(result)
    bad = Counter((t.state, t.reason) for t in result.trials if t.state in ("infeasible", "failed"))
    if bad:
        lines.append(f"{_count(sum(bad.values()), 'trial')} infeasible or failed:")
        lines.extend(f"  {count} x {state}: {reason}" for (state, reason), count in bad.items())
    if result.faults:
        lines.append("finalists that faulted when re-measured side by side, left out:")
        lines.extend(f"  {reason}" for reason in result.faults)
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
    return lines + result.batch_size_advice() + list(result.notes)


def _split_lines(result: TuneResult) -> list[str]:
    """The speed-up over the defaults split: what the loader's settings give alone (nothing
    in training changes), and what a new batch size and autocast (which change training) add."""
    defaults, alone = result.baselines.get("defaults"), result.loader_only()
    if not defaults or alone is None or alone.config == result.config or not alone.median:
        return []
    changes = []
    if result.config.batch_size != alone.config.batch_size:
        changes.append(f"batch size {alone.config.batch_size} -> {result.config.batch_size}")
    if result.amp is not None:
        changes.append(f"{result.amp} autocast")
    if not changes:
        return []
    return [f"  the loader settings alone give {alone.median / defaults:.2f}x "
            f"({alone.config.label()}: no change to training)",
            f"  {' and '.join(changes)} {'add' if len(changes) > 1 else 'adds'} "
            f"{result.samples_per_second / alone.median:.2f}x, and "
            f"{'change' if len(changes) > 1 else 'changes'} training (see below)"]


def _bound_lines(result: TuneResult) -> list[str]:
    """What bounds the winner: the model's view, and the step alone as an upper bound unless
    the measurement has broken it (then it is not one)."""
    lines = _prediction_lines(result)
    if result.predicted_bottleneck and (_prediction_trusted(result)
                         or not any(f.predicted for f in result.finalists)):
        lines.append(f"bound: the pipeline model expects the winner to be bound by "
                     f"{result.predicted_bottleneck}")
    if result.step_rate:
        share = result.samples_per_second / result.step_rate
        if share > 1.05:
            lines.append(f"the training step alone measured {_rate(result.step_rate)} "
                         f"samples/s, under the winner's rate: the machine was busier then, so "
                         "it bounds nothing here")
        else:
            line = (f"the training step alone (batch already on {result.device}) runs "
                    f"{_rate(result.step_rate)} samples/s; the winner reaches {share:.0%} of it")
            if (share < 0.8 and result.measured_bottleneck == "training step"
                    and result.config.num_workers):
                line += " (slower than alone: the workers share its CPU cores)"
            lines.append(line)
    elif result.fetch_rate:
        lines.append(f"one process fetches {_rate(result.fetch_rate)} samples/s; the winner "
                     f"reaches {result.samples_per_second / result.fetch_rate:.1f}x that")
    return lines


def render_cache(found: list[tuple[Path, dict[str, Any] | None]],
                 folder: Path) -> RenderableType:
    """The cached results (``autoload cache list``), one row a file; the id is what
    ``autoload show`` takes."""
    rows = []
    for path, data in found:
        if data is not None and data.get("kind") == "online":
            rows.append(_online_row(path, data))
            continue
        if data is None or "config" not in data:
            rows.append({"id": path.stem[:12], "stored": "", "data": "(unreadable)"})
            continue
        parts = (data.get("cache") or {}).get("fingerprint") or {}
        model = (parts.get("model") or {}).get("class") or "-"
        kind = (parts.get("data") or {}).get("type", "?")
        rows.append({
            "id": path.stem[:12], "stored": _stored((data.get("cache") or {}).get("stored")),
            "data": str(kind).split(".")[-1], "model": str(model).split(".")[-1],
            "device": str(data.get("device")),
            "winner": LoaderConfig.from_dict(data["config"]).label(),
            "samples/s": _rate(float(data.get("samples_per_second") or 0)),
        })
    return _Fitted(f"Cached results in {folder}", rows,
                   required=("id", "stored", "data", "winner", "samples/s"),
                   optional=("model", "device"), shrink="data")


def _online_row(path: Path, data: dict[str, Any]) -> dict[str, str]:
    """A settled answer of ``autoload.DataLoader(num_workers="auto")``."""
    parts = (data.get("cache") or {}).get("fingerprint") or {}
    kind = (parts.get("data") or {}).get("type", "?")
    try:
        winner = f"{Setting.from_dict(data['setting']).label()} (online)"
    except (KeyError, TypeError, ValueError):
        winner = "(unreadable)"
    rate = data.get("samples_per_second") or data.get("batches_per_second") or 0
    return {"id": path.stem[:12], "stored": _stored((data.get("cache") or {}).get("stored")),
            "data": str(kind).split(".")[-1], "model": "-", "device": str(data.get("device")),
            "winner": winner, "samples/s": _rate(float(rate))}


def _stored(when: Any) -> str:
    """The day an entry was stored, in the local zone."""
    try:
        return datetime.fromisoformat(str(when)).astimezone().strftime("%Y-%m-%d")
    except ValueError:
        return "-"


class _Fitted:
    """A table fitted to the width rich gives it, no cell ever wrapped: the ``required``
    columns always, each ``optional`` one (most useful first) only if it fits, and when even
    the required ones do not, the ``shrink`` column's cells cut short with an ellipsis."""

    def __init__(self, title: str, rows: list[dict[str, str]], *, required: tuple[str, ...],
                 optional: tuple[str, ...], shrink: str) -> None:
        self.title, self.rows, self.required, self.optional = title, rows, required, optional
        self.shrink = shrink

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = options.update_width(10 * options.max_width + 1000)

        def fits(table: Table) -> bool:
            return Measurement.get(console, wide, table).maximum <= options.max_width

        kept = list(self.required)
        for name in self.optional:
            if fits(self._table([*kept, name])):
                kept.append(name)
        order = [name for name in (*self.required, *self.optional) if name in kept]
        longest = max((len(row.get(self.shrink, "")) for row in self.rows), default=0)
        cut = next((n for n in range(longest, 3, -1) if fits(self._table(order, n))), 4)
        yield self._table(order, cut)

    def _table(self, order: list[str], cut: int | None = None) -> Table:
        table = Table(title=self.title, title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False, padding=(0, 1, 0, 0))
        for name in order:
            table.add_column(name, justify="right" if name == "samples/s" else "left",
                             no_wrap=True)
        for row in self.rows:
            cells = []
            for name in order:
                cell = row.get(name, "")
                if name == self.shrink and cut is not None and len(cell) > cut:
                    cell = cell[:cut - 1] + "…"
                cells.append(cell)
            table.add_row(*cells)
        return table


# Columns the live line leaves free at the right: a terminal echoes Ctrl-C as "^C" after it, and
# on a line as wide as the terminal the echo wraps, so every later redraw lands on a new line
# and the last frame shows twice.
_ECHO_ROOM = 3


class _OneLineProgress(Progress):
    """A progress display kept to one line short of the terminal's width."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield _EchoRoom(self.make_tasks_table(self.tasks))


class _EchoRoom:
    """A renderable drawn ``_ECHO_ROOM`` columns narrower than it may be."""

    def __init__(self, inner: RenderableType) -> None:
        self.inner = inner

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width - _ECHO_ROOM)
        yield from console.render(self.inner, options.update_width(width))


class LiveProgress:
    """A progress callback for :func:`autoload.tune` that draws a rich progress bar.

    Example:
        >>> with LiveProgress(Console(quiet=True)) as progress:
        ...     pass  # autoload.tune(dataset, progress=progress)
    """

    def __init__(self, console: Console | None = None) -> None:
        self._progress = _OneLineProgress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20), TimeElapsedColumn(),
            TextColumn("{task.fields[best]}",
                       table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=console, transient=False,
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
