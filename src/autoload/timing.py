"""A probe window's timing: a recorder fed timestamps that decides when the window has measured
enough and what rate it measured. It reads no clock and knows no loader, so tests drive it with
synthetic timelines.

What it measures is what a training run gets: samples per second over whole epochs, with the
workers persistent (their start-up is paid once per run). The probe shortens the loader's first
epoch to a warm-up of a few batches, so that every window starts at an epoch boundary, where
nothing is queued: no batch made before the window can flatter it, and the bubble at the start of
an epoch (the workers refill an empty pipeline while the step waits) is inside the window.

- When the window reaches the end of an epoch, the rate is over whole epochs: exact.
- When an epoch is longer than the window, the epoch is projected: the time measured since the
  boundary (its bubble included), plus the batches left of the epoch at the steady pace of the
  window's late part. The late part starts once the pipeline has settled (the first fetch that
  waits after the first round of workers, or once every requested batch has been through it) and
  spans whole rounds of the workers, which deliver in bursts of up to one batch each.
- A window cut short (a time limit, a hopeless rate) gives a rate that errs low, never high.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["Costs", "Recorder", "Shape", "Timing", "Verdict", "Window", "window_cv"]

Verdict = Literal["go", "done", "cut"]

_WAITED = 1e-3  # a fetch that took longer than this (and a quarter of the step) waited
_CV_BLOCKS = 8
_NEAR_END = 0.5  # of the window: an epoch that ends this soon is measured to its end


@dataclass(frozen=True, kw_only=True)
class Window:
    """How long one probe measures.

    Attributes:
        seconds: Time to measure after warm-up.
        min_batches: Batches measured at least, even past ``seconds`` (slow steps).
        max_batches: Batches measured at most.
        deadline: Hard bound on the whole probe, start-up included; past it the trial fails.
        time_limit: Soft bound after the first batch: past it the window ends with what it
            measured and is marked cut short. Start-up is not counted (persistent workers pay
            it once per run; ``deadline`` bounds it).
        abandon_below: A rate (samples/s) that, once a third of the window shows the
            configuration stays under it, ends the window early: a hopeless configuration need
            not be measured precisely.
    """

    seconds: float = 1.0
    min_batches: int = 2
    max_batches: int = 100_000
    deadline: float = 60.0
    time_limit: float | None = None
    abandon_below: float | None = None


@dataclass(frozen=True, kw_only=True)
class Shape:
    """What the recorder knows of the loader.

    Attributes:
        batch_size: Samples per batch (a batch's own length wins when it has one).
        workers: Worker processes; 0 loads in the main process.
        in_flight: Batches the loader keeps requested (workers x prefetch_factor).
        epoch_batches: Batches of a full epoch; ``None`` for a stream without a length.
        warmup_batches: Batches of the first epoch (shortened for warm-up); ``None`` when the
            first epoch is a full one, or a stream's warm-up when there is no epoch.
    """

    batch_size: int
    workers: int = 0
    in_flight: int = 0
    epoch_batches: int | None = None
    warmup_batches: int | None = None


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Per-batch costs seen in a window, for the pipeline model (means over the steady part).

    Attributes:
        batch_seconds: The pipeline's steady pace: seconds per batch.
        fetch_seconds: Main process, inside ``next(loader)``: loading the batch itself without
            workers, waiting for and receiving it from the workers with them.
        fetch_cpu_seconds: Main thread CPU time inside ``next(loader)``.
        step_seconds: The training step (the copy to the device included).
        main_cpu_seconds: The main process's CPU time (all its threads).
        worker_cpu_seconds: All workers' CPU time; ``None`` without workers or when unknown.
        boundary_seconds: What an epoch costs beyond ``epoch_batches x batch_seconds`` (the
            bubble at its start); ``None`` without epochs.
        batch_bytes: Bytes of the tensors of one batch.
    """

    batch_seconds: float
    fetch_seconds: float
    fetch_cpu_seconds: float
    step_seconds: float
    main_cpu_seconds: float
    worker_cpu_seconds: float | None = None
    boundary_seconds: float | None = None
    batch_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class Timing:
    """What a window measured (see :class:`~autoload.result.Measurement` for the fields)."""

    samples_per_second: float
    startup_seconds: float
    warmup_seconds: float
    seconds: float
    samples: int
    batches: int
    epochs: int
    data_wait_fraction: float
    cut_short: bool
    rate_cv: float | None
    costs: Costs | None


@dataclass(frozen=True)
class _Batch:
    begin: float  # the fetch began
    got: float  # the batch arrived
    done: float  # its step ended
    samples: int
    fetch_cpu: float
    main_cpu: float  # the process's CPU clock when the step ended


class Recorder:
    """Turns one window's timeline into a :class:`Timing`.

    Call :meth:`start` when the loader is built, :meth:`batch` after each step and
    :meth:`epoch_end` when a fetch finds the epoch's end; each returns whether to go on
    (``"go"``), or stop with the window complete (``"done"``) or cut short (``"cut"``).
    :meth:`timing` gives the result; after an interruption (the soft time limit) it counts what
    was through its step by then.

    Example:
        >>> rec = Recorder(Shape(batch_size=10, epoch_batches=4, warmup_batches=2),
        ...                Window(seconds=0.35))
        >>> rec.start(0.0)
        >>> for i in range(2):
        ...     _ = rec.batch(begin=0.1 * i, got=0.1 * i + 0.05, done=0.1 * i + 0.1, samples=10)
        >>> rec.epoch_end(0.2)
        'go'
        >>> t = 0.2
        >>> for i in range(4):
        ...     verdict = rec.batch(begin=t, got=t + 0.05, done=t + 0.1, samples=10)
        ...     t += 0.1
        >>> rec.epoch_end(t)
        'done'
        >>> round(rec.timing().samples_per_second)
        100
    """

    def __init__(self, shape: Shape, window: Window) -> None:
        self.shape, self.window = shape, window
        self._start = 0.0
        self._now = 0.0
        self._batches: list[_Batch] = []
        self._origin: int | None = None  # index of the first measured batch
        self._origin_time = 0.0
        self._ends: list[tuple[float, int]] = []  # (time, batches before) of measured epoch ends
        self._cpu_at_origin = 0.0
        self._verdict_now: Verdict = "go"
        self.worker_cpu: tuple[float, float] | None = None  # workers' CPU at origin, at the end

    # -- events ----------------------------------------------------------------------------

    def start(self, t: float) -> None:
        self._start = self._now = t

    def batch(self, *, begin: float, got: float, done: float, samples: int,
              fetch_cpu: float = 0.0, main_cpu: float = 0.0) -> Verdict:
        self._batches.append(_Batch(begin, got, done, samples, fetch_cpu, main_cpu))
        self._now = done
        if self._origin is None and self._stream_warm():
            self._begin_measuring(done)
        self._verdict_now = self._verdict(at_end=False)
        return self._verdict_now

    def epoch_end(self, t: float) -> Verdict:
        self._now = t
        if self._origin is None:
            self._begin_measuring(t)
            self._verdict_now = self._verdict(at_end=False)
        else:
            self._ends.append((t, len(self._batches) - self._origin))
            self._verdict_now = self._verdict(at_end=True)
        return self._verdict_now

    def synced(self, t: float) -> None:
        """The device finished its queued work at ``t``: the last step ended then, not when
        its kernels were launched."""
        if self._batches and t > self._batches[-1].done:
            self._batches[-1] = replace(self._batches[-1], done=t)
            self._now = max(self._now, t)

    @property
    def batches_seen(self) -> int:
        return len(self._batches)

    @property
    def measuring(self) -> bool:
        """Whether warm-up is over (the probe reads the workers' CPU clocks then)."""
        return self._origin is not None

    def _stream_warm(self) -> bool:
        # Without epochs a stream's warm-up ends after a set number of batches.
        return self.shape.epoch_batches is None and len(self._batches) >= (
            self.shape.warmup_batches or max(2, self.shape.in_flight))

    def _begin_measuring(self, t: float) -> None:
        self._origin, self._origin_time = len(self._batches), t
        self._cpu_at_origin = self._batches[-1].main_cpu if self._batches else 0.0

    # -- deciding --------------------------------------------------------------------------

    def _verdict(self, *, at_end: bool) -> Verdict:
        w = self.window
        first = self._batches[0].got if self._batches else None
        over = (w.time_limit is not None and first is not None
                and self._now - first > w.time_limit)
        if self._origin is None:
            return "cut" if over else "go"
        m = len(self._batches) - self._origin
        elapsed = self._now - self._origin_time
        if m >= w.max_batches:
            return "done"
        enough = elapsed >= w.seconds and m >= w.min_batches
        if self._ends:
            if enough and (at_end or self._far_from_end()):
                return "done"
        elif enough and self._settled() and self._far_from_end():
            return "done"
        if over:
            return "cut"
        if (w.abandon_below is not None and m >= w.min_batches and elapsed >= w.seconds / 3
                and self._rate() < w.abandon_below):
            return "cut"
        return "go"

    def _far_from_end(self) -> bool:
        """Whether the current epoch ends too late to wait for (then the window stops now)."""
        pace = self._pace()
        if self.shape.epoch_batches is None or pace is None:
            return True
        left = self.shape.epoch_batches - self._in_epoch()
        return left * pace > _NEAR_END * self.window.seconds

    def _in_epoch(self) -> int:
        assert self._origin is not None
        last = self._ends[-1][1] if self._ends else 0
        return len(self._batches) - self._origin - last

    def _settled(self) -> bool:
        """Enough batches past the ramp for a steady pace: two rounds of the workers."""
        late = self._late_span()
        return late is not None and late[1] - late[0] >= 2 * max(1, self.shape.workers)

    # -- computing -------------------------------------------------------------------------

    def _measured(self) -> list[_Batch]:
        assert self._origin is not None
        return self._batches[self._origin:]

    def _first_epoch(self) -> list[_Batch]:
        """The measured batches of the first measured epoch (all, before its end)."""
        batches = self._measured()
        return batches[: self._ends[0][1]] if self._ends else batches

    def _ramp(self, batches: Sequence[_Batch]) -> int:
        """Batches after the boundary before the pipeline settles: the first fetch that
        waited after the first round of the workers (they fall behind: steady from there),
        else every requested batch, but no more than half of them."""
        w = self.shape.workers
        if w == 0:
            return 1 if len(batches) > 1 else 0  # the first fetch builds the epoch's iterator
        for i in range(w, min(len(batches), self.shape.in_flight)):
            b = batches[i]
            if b.got - b.begin > max(_WAITED, 0.25 * (b.done - b.got)):
                return i
        return min(self.shape.in_flight, len(batches) // 2)

    def _late_span(self) -> tuple[int, int] | None:
        """Indices [i, j) of the first measured epoch's steady part: whole rounds of the
        workers counted from the boundary (each epoch hands its batches out round-robin from
        the first worker, and a round arrives as a burst), from the end of the ramp on."""
        batches, r = self._first_epoch(), max(1, self.shape.workers)
        start = -(-self._ramp(batches) // r) * r
        rounds = (len(batches) - start) // r
        return None if rounds < 1 else (start, start + rounds * r)

    def _pace(self) -> float | None:
        """Steady seconds per batch: the median over up to 8 blocks of whole rounds of the late
        span. A median, because some costs come once per run but late (each worker's first
        full garbage collection copies the pages it inherited from the training process: most
        of a second with 8 workers on two cores), and a window that happens to hold one would
        otherwise project it onto every epoch."""
        span = self._late_span()
        if span is None:
            return None
        batches, r = self._first_epoch(), max(1, self.shape.workers)
        i, j = span
        rounds = (j - i) // r
        k = min(_CV_BLOCKS, rounds)
        paces = []
        for block in range(k):
            first, last = i + block * rounds // k * r, i + (block + 1) * rounds // k * r
            before = batches[first - 1].done if first > 0 else self._origin_time
            paces.append((batches[last - 1].done - before) / (last - first))
        return statistics.median(paces)

    def _rate(self) -> float:
        """Samples per second of a training run, from what is measured so far."""
        batches = self._measured()
        if self._ends:
            return self._whole_epochs_rate(batches)
        if not batches:
            return 0.0
        span, pace = self._late_span(), self._pace()
        per_batch = statistics.fmean(b.samples for b in batches)
        epoch = self.shape.epoch_batches
        if pace is not None and epoch is None:  # a stream: its steady pace
            return per_batch / pace
        if span is None or pace is None or epoch is None or len(batches) >= epoch:
            r = max(1, self.shape.workers)
            whole = batches[: len(batches) // r * r] or batches
            elapsed = whole[-1].done - self._origin_time
            return sum(b.samples for b in whole) / elapsed if elapsed > 0 else 0.0
        # The epoch's head as measured (the bubble and the ramp), the rest at the steady pace.
        head = span[0]
        head_seconds = (batches[head - 1].done if head else self._origin_time) - self._origin_time
        return epoch * per_batch / (head_seconds + (epoch - head) * pace)

    def _whole_epochs_rate(self, batches: Sequence[_Batch]) -> float:
        """Over the whole epochs measured; of three or more, one that took over twice the
        median epoch's time is left out (a once-a-run stall, as in :meth:`_pace`)."""
        times = [self._origin_time] + [t for t, _ in self._ends]
        counts = [0] + [n for _, n in self._ends]
        epochs = [(times[k + 1] - times[k], sum(b.samples for b in batches[counts[k]:
                                                                           counts[k + 1]]))
                  for k in range(len(self._ends))]
        if len(epochs) >= 3:
            typical = statistics.median(t for t, _ in epochs)
            epochs = [(t, n) for t, n in epochs if t <= 2 * typical]
        seconds = sum(t for t, _ in epochs)
        return sum(n for _, n in epochs) / seconds if seconds > 0 else 0.0

    def timing(self, *, interrupted: bool = False) -> Timing:
        """The window's result. ``interrupted``: the soft time limit stopped it."""
        cut = interrupted or self._verdict_now == "cut"
        startup = self._batches[0].got - self._start if self._batches else 0.0
        if self._origin is None or not self._measured():
            return self._warmup_timing(startup)
        batches = self._measured()
        if self._ends:
            t_end, n = self._ends[-1]
            batches = batches[:n]
        else:
            t_end = batches[-1].done
        seconds = t_end - self._origin_time
        rate = self._rate()
        wait = sum(b.got - b.begin for b in batches)
        marks = [(b.done, s) for b, s in zip(batches, _cumulative(batches), strict=True)]
        return Timing(
            samples_per_second=rate, startup_seconds=startup,
            warmup_seconds=self._origin_time - self._start, seconds=seconds,
            samples=sum(b.samples for b in batches), batches=len(batches),
            epochs=len(self._ends),
            data_wait_fraction=min(1.0, wait / seconds) if seconds > 0 else 0.0,
            cut_short=cut,
            rate_cv=None if cut else window_cv(self._origin_time, marks,
                                               min_block=max(1, self.shape.workers)),
            costs=self._costs(rate),
        )

    def _warmup_timing(self, startup: float) -> Timing:
        """Cut short in warm-up: batches arrive in bursts from workers that started side by
        side, so only the time since the loader was built is safe (errs low); without workers,
        the time since the first batch."""
        batches = self._batches
        if self.shape.workers == 0 and len(batches) >= 2:
            samples = sum(b.samples for b in batches[1:])
            seconds = batches[-1].done - batches[0].done
        elif batches:
            samples, seconds = sum(b.samples for b in batches), batches[-1].done - self._start
        else:
            samples, seconds = 0, self._now - self._start
        return Timing(
            samples_per_second=samples / seconds if seconds > 0 else 0.0,
            startup_seconds=startup, warmup_seconds=self._now - self._start, seconds=seconds,
            samples=samples, batches=len(batches), epochs=0,
            data_wait_fraction=0.0, cut_short=True, rate_cv=None, costs=None,
        )

    def _costs(self, rate: float) -> Costs | None:
        span, pace = self._late_span(), self._pace()
        if span is None or pace is None:
            return None
        batches = self._first_epoch()
        late = batches[span[0]:span[1]]
        first_cpu = batches[span[0] - 1].main_cpu if span[0] > 0 else self._cpu_at_origin
        boundary = None
        epoch = self.shape.epoch_batches
        if epoch is not None and rate > 0:
            per_batch = statistics.fmean(b.samples for b in batches)
            boundary = epoch * per_batch / rate - epoch * pace
        workers = None
        if self.worker_cpu is not None and self.shape.workers > 0:  # read at origin and end
            workers = (self.worker_cpu[1] - self.worker_cpu[0]) / max(1, len(self._measured()))
        return Costs(
            batch_seconds=pace,
            fetch_seconds=statistics.fmean(b.got - b.begin for b in late),
            fetch_cpu_seconds=statistics.fmean(b.fetch_cpu for b in late),
            step_seconds=statistics.fmean(b.done - b.got for b in late),
            main_cpu_seconds=(late[-1].main_cpu - first_cpu) / len(late),
            worker_cpu_seconds=workers,
            boundary_seconds=boundary,
        )


def _cumulative(batches: Sequence[_Batch]) -> list[int]:
    total, out = 0, []
    for b in batches:
        total += b.samples
        out.append(total)
    return out


def window_cv(start: float, marks: Sequence[tuple[float, int]],
              min_block: int = 1) -> float | None:
    """The coefficient of variation of a window's rate, from its rate over consecutive blocks.

    ``marks`` holds (time, samples so far) after each batch of a window that began at
    ``start``. Up to 8 blocks of (about) equally many batches, at least ``min_block`` each (a
    burst from the workers is one batch per worker): the window's rate is about their mean, so
    its CV is theirs over the square root of their count. Noise slower than the window is not
    seen here; the search adds what repeated windows show.
    """
    k = min(_CV_BLOCKS, len(marks) // max(1, min_block))
    if k < 4:
        return None
    rates = []
    last_time, last_samples = start, 0
    for i in range(1, k + 1):
        time_i, samples_i = marks[round(i * len(marks) / k) - 1]
        if time_i <= last_time:
            return None
        rates.append((samples_i - last_samples) / (time_i - last_time))
        last_time, last_samples = time_i, samples_i
    mean = statistics.fmean(rates)
    return statistics.stdev(rates) / mean / math.sqrt(k) if mean > 0 else None
