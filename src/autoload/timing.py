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
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Costs", "Recorder", "Shape", "Timing", "Verdict", "Window", "window_cv"]

Verdict = Literal["go", "done", "cut"]

_WAITED = 1e-3  # a fetch that took longer than this (and a quarter of the step) waited
_CV_BLOCKS = 8
_NEAR_END = 0.5  # of the window: an epoch that ends this soon is measured to its end
_STALLED = 4.0  # a fetch this many times the mean batch's time has stalled (see timing())


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


class _Columns:
    """A window's batches, column by column in flat arrays: appending one holds no Python
    object the garbage collector tracks (a record per batch would make full collections more
    frequent in a fast loop, and slow it down), and any span's samples are a difference of the
    running count."""

    def __init__(self) -> None:
        self.begin, self.got, self.done = array("d"), array("d"), array("d")
        self.fetch_cpu, self.main_cpu = array("d"), array("d")
        self.count = array("q", [0])  # samples through batch k: count[k + 1]

    def __len__(self) -> int:
        return len(self.done)

    def append(self, begin: float, got: float, done: float, samples: int, fetch_cpu: float,
               main_cpu: float) -> None:
        self.begin.append(begin)
        self.got.append(got)
        self.done.append(done)
        self.fetch_cpu.append(fetch_cpu)
        self.main_cpu.append(main_cpu)
        self.count.append(self.count[-1] + samples)

    def samples(self, i: int, j: int) -> int:
        """Samples of batches [i, j)."""
        return self.count[j] - self.count[i]


class Recorder:
    """Turns one window's timeline into a :class:`Timing`.

    Call :meth:`start` when the loader is built, :meth:`batch` after each step and
    :meth:`epoch_end` when a fetch finds the epoch's end; each returns whether to go on
    (``"go"``), or stop with the window complete (``"done"``) or cut short (``"cut"``), in
    constant time. :meth:`timing` gives the result; after an interruption (the soft time limit)
    it counts what was through its step by then.

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
        self._start = self._now = 0.0
        self._b = _Columns()
        self._origin: int | None = None  # index of the first measured batch
        self._origin_time = 0.0
        self._ends: list[tuple[float, int]] = []  # (time, measured batches) at each epoch end
        self._first_wait: int | None = None  # the first measured fetch that waited (see _ramp)
        self._verdict_now: Verdict = "go"
        self.worker_cpu: tuple[float, float] | None = None  # workers' CPU at origin, at the end

    # -- events ----------------------------------------------------------------------------

    def start(self, t: float) -> None:
        self._start = self._now = t

    def batch(self, *, begin: float, got: float, done: float, samples: int,
              fetch_cpu: float = 0.0, main_cpu: float = 0.0) -> Verdict:
        self._b.append(begin, got, done, samples, fetch_cpu, main_cpu)
        self._now = done
        if self._origin is None:
            if self._stream_warm():
                self._begin_measuring(done)
        elif not self._ends and self._first_wait is None:
            i = len(self._b) - 1 - self._origin
            if (self.shape.workers <= i < self.shape.in_flight
                    and got - begin > max(_WAITED, 0.25 * (done - got))):
                self._first_wait = i
        self._verdict_now = self._verdict(at_end=False)
        return self._verdict_now

    def epoch_end(self, t: float) -> Verdict:
        self._now = t
        if self._origin is None:
            self._begin_measuring(t)
            self._verdict_now = self._verdict(at_end=False)
        else:
            self._ends.append((t, self._m()))
            self._verdict_now = self._verdict(at_end=True)
        return self._verdict_now

    def synced(self, t: float) -> None:
        """The device finished its queued work at ``t``: the last step ended then, not when
        its kernels were launched."""
        if len(self._b) and t > self._b.done[-1]:
            self._b.done[-1] = t
            self._now = max(self._now, t)

    @property
    def batches_seen(self) -> int:
        return len(self._b)

    @property
    def measuring(self) -> bool:
        """Whether warm-up is over (the probe reads the workers' CPU clocks then)."""
        return self._origin is not None

    def _stream_warm(self) -> bool:
        # Without epochs a stream's warm-up ends after a set number of batches.
        return self.shape.epoch_batches is None and len(self._b) >= (
            self.shape.warmup_batches or max(2, self.shape.in_flight))

    def _begin_measuring(self, t: float) -> None:
        self._origin, self._origin_time = len(self._b), t

    # -- positions (measured batches, counted from the boundary) ----------------------------

    def _m(self) -> int:
        return 0 if self._origin is None else len(self._b) - self._origin

    def _done_after(self, k: int) -> float:
        """When the first ``k`` measured batches were through their step (the origin for 0)."""
        assert self._origin is not None
        return self._origin_time if k == 0 else self._b.done[self._origin + k - 1]

    def _samples(self, i: int, j: int) -> int:
        assert self._origin is not None
        return self._b.samples(self._origin + i, self._origin + j)

    def _first_epoch(self) -> int:
        """Measured batches of the first measured epoch (all of them before its end)."""
        return self._ends[0][1] if self._ends else self._m()

    # -- deciding --------------------------------------------------------------------------

    def _verdict(self, *, at_end: bool) -> Verdict:
        w = self.window
        over = (w.time_limit is not None and len(self._b) > 0
                and self._now - self._b.got[0] > w.time_limit)
        if self._origin is None:
            return "cut" if over else "go"
        m = self._m()
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
                and self._hopeful_rate() < w.abandon_below):
            return "cut"
        return "go"

    def _hopeful_rate(self) -> float:
        """What the window promises at best, to judge it hopeless by: the epoch's rate, once
        it is known (whole epochs, or the epoch projected from its head and a steady pace).

        Before the pace is known the epoch's start is all there is to judge, and it says
        little: the workers begin the first round after the boundary side by side, and the
        loader waits on a round trip to each, so that round comes in late and together, far
        slower than the rounds after it (on a random case, 3 workers at bs=365: 220-300 ms for
        the first round, 40-60 ms a batch after it; judged on the first round it read 3-4.5k/s
        and was cut, where it ran 6.5-7.4k/s). So a window is judged on its start alone only
        once a whole window has passed without a steady pace: then the first round's missing
        batches count as if they arrived now (a round that has not come in by then is slow)."""
        if self._ends or self._settled():
            return self._rate()
        elapsed = self._now - self._origin_time
        m, r = self._m(), self.shape.workers
        if elapsed < self.window.seconds:
            return math.inf
        if m >= r:
            return self._rate()
        return r * self._samples(0, m) / m / elapsed

    def _far_from_end(self) -> bool:
        """Whether the current epoch ends too late to wait for (then the window stops now)."""
        pace = self._pace()
        if self.shape.epoch_batches is None or pace is None:
            return True
        in_epoch = self._m() - (self._ends[-1][1] if self._ends else 0)
        return (self.shape.epoch_batches - in_epoch) * pace > _NEAR_END * self.window.seconds

    def _settled(self) -> bool:
        """Enough batches past the ramp for a steady pace: two rounds of the workers."""
        span = self._late_span()
        return span is not None and span[1] - span[0] >= 2 * max(1, self.shape.workers)

    # -- computing -------------------------------------------------------------------------

    def _ramp(self) -> int:
        """Batches after the boundary before the pipeline settles: the first fetch that
        waited after the first round of the workers (they fall behind: steady from there),
        else every requested batch, but no more than half of them."""
        n = self._first_epoch()
        if self.shape.workers == 0:
            return 1 if n > 1 else 0  # the first fetch builds the epoch's iterator
        if self._first_wait is not None:
            return self._first_wait
        return min(self.shape.in_flight, n // 2)

    def _late_span(self) -> tuple[int, int] | None:
        """Measured batches [i, j) of the first measured epoch's steady part: whole rounds of
        the workers counted from the boundary (each epoch hands its batches out round-robin
        from the first worker, and a round arrives as a burst), from the end of the ramp on."""
        r = max(1, self.shape.workers)
        start = -(-self._ramp() // r) * r
        rounds = (self._first_epoch() - start) // r
        return None if rounds < 1 else (start, start + rounds * r)

    def _pace(self) -> float | None:
        """Steady seconds per batch: the late span's time over its batches (whole rounds of the
        workers, so that no burst's wait is split)."""
        span = self._late_span()
        if span is None:
            return None
        i, j = span
        return (self._done_after(j) - self._done_after(i)) / (j - i)

    def _rate(self) -> float:
        """Samples per second of a training run, from what is measured so far."""
        m = self._m()
        if self._ends:  # whole epochs: every pause inside them counts, as in a training run
            t, n = self._ends[-1]
            return self._samples(0, n) / (t - self._origin_time) if t > self._origin_time else 0.0
        if m == 0:
            return 0.0
        span, pace = self._late_span(), self._pace()
        per_batch = self._samples(0, m) / m
        epoch = self.shape.epoch_batches
        if pace is not None and epoch is None:  # a stream: its steady pace
            return per_batch / pace
        if span is None or pace is None or epoch is None or m >= epoch:
            r = max(1, self.shape.workers)
            whole = m // r * r or m
            elapsed = self._done_after(whole) - self._origin_time
            return self._samples(0, whole) / elapsed if elapsed > 0 else 0.0
        # The epoch's head as measured (the bubble and the ramp), the rest at the steady pace.
        head = span[0]
        head_seconds = self._done_after(head) - self._origin_time
        return epoch * per_batch / (head_seconds + (epoch - head) * pace)

    def timing(self, *, interrupted: bool = False, stopped_at: float | None = None) -> Timing:
        """The window's result. ``interrupted``: the soft time limit stopped it, at
        ``stopped_at`` when known.

        The batch in progress at the cut counts neither its samples nor its time, unless it
        had taken far longer than the batches before it (``_STALLED`` times their mean): a
        fetch that never returns (items that stopped arriving) is then the window's story, and
        a rate over the batches before it alone would read a hang as fast."""
        cut = interrupted or self._verdict_now == "cut"
        if stopped_at is not None and self._stalled(stopped_at):
            self._now = stopped_at
        b = self._b
        startup = b.got[0] - self._start if len(b) else 0.0
        if self._origin is None or self._m() == 0:
            return _warmup_timing(b, start=self._start, now=self._now,
                                  workers=self.shape.workers, startup=startup)
        o = self._origin
        n = self._ends[-1][1] if self._ends else self._m()
        t_end = self._ends[-1][0] if self._ends else self._done_after(n)
        seconds = t_end - self._origin_time
        rate = self._rate()
        if self._now > self._done_after(self._m()):  # stalled: the wait counts
            rate = min(rate, self._samples(0, self._m()) / (self._now - self._origin_time))
        wait = sum(b.got[o + k] - b.begin[o + k] for k in range(n))
        marks = [(b.done[o + k], self._samples(0, k + 1)) for k in range(n)]
        return Timing(
            samples_per_second=rate, startup_seconds=startup,
            warmup_seconds=self._origin_time - self._start, seconds=seconds,
            samples=self._samples(0, n), batches=n, epochs=len(self._ends),
            data_wait_fraction=min(1.0, wait / seconds) if seconds > 0 else 0.0,
            cut_short=cut,
            rate_cv=None if cut else window_cv(self._origin_time, marks,
                                               min_block=max(1, self.shape.workers)),
            costs=self._costs(rate),
        )

    def _stalled(self, t: float) -> bool:
        """Whether the batch in progress at ``t`` has waited ``_STALLED`` times as long as a
        batch took on average so far (since the loader was built, start-up included)."""
        n = len(self._b)
        if n == 0:
            return True
        last = self._b.done[-1]
        return t - last > _STALLED * max((last - self._start) / n, 1e-6)

    def _costs(self, rate: float) -> Costs | None:
        """Per-batch means over the steady span of the first measured epoch."""
        span, pace = self._late_span(), self._pace()
        if span is None or pace is None or self._origin is None:
            return None
        workers = None
        if self.worker_cpu is not None and self.shape.workers > 0:  # read at origin and end
            workers = (self.worker_cpu[1] - self.worker_cpu[0]) / max(1, self._m())
        boundary, epoch = None, self.shape.epoch_batches
        if epoch is not None and rate > 0:
            per_batch = self._samples(0, self._m()) / self._m()
            boundary = epoch * per_batch / rate - epoch * pace
        return _span_costs(self._b, range(self._origin + span[0], self._origin + span[1]),
                           pace=pace, worker_cpu=workers, boundary=boundary)


def _span_costs(b: _Columns, late: range, *, pace: float, worker_cpu: float | None,
                boundary: float | None) -> Costs:
    """The costs of one batch, as means over the batches ``late``. ``boundary`` is the epoch's
    cost beyond its steady batches: what the rate says an epoch takes, less its paces."""
    first = late.start
    cpu_before = b.main_cpu[first - 1] if first > 0 else b.main_cpu[first]
    return Costs(
        batch_seconds=pace,
        fetch_seconds=statistics.fmean(b.got[k] - b.begin[k] for k in late),
        fetch_cpu_seconds=statistics.fmean(b.fetch_cpu[k] for k in late),
        step_seconds=statistics.fmean(b.done[k] - b.got[k] for k in late),
        main_cpu_seconds=(b.main_cpu[late.stop - 1] - cpu_before) / len(late),
        worker_cpu_seconds=worker_cpu, boundary_seconds=boundary,
    )


def _warmup_timing(b: _Columns, *, start: float, now: float, workers: int,
                   startup: float) -> Timing:
    """Cut short in warm-up: batches arrive in bursts from workers that started side by side,
    so only the time since the loader was built is safe (errs low); without workers, the time
    since the first batch."""
    n = len(b)
    if workers == 0 and n >= 2:
        samples, seconds = b.samples(1, n), max(now, b.done[-1]) - b.done[0]
    elif n:
        samples, seconds = b.samples(0, n), max(now, b.done[-1]) - start
    else:
        samples, seconds = 0, now - start
    return Timing(
        samples_per_second=samples / seconds if seconds > 0 else 0.0, startup_seconds=startup,
        warmup_seconds=now - start, seconds=seconds, samples=samples, batches=n,
        epochs=0, data_wait_fraction=0.0, cut_short=True, rate_cv=None, costs=None,
    )


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
