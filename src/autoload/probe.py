"""One probe: a short training window under one configuration, measured.

No Optuna and no printing here. A probe either returns a :class:`Measurement` or raises; the tuner
decides what a failure means for the study.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import signal
import statistics
import threading
import time
import traceback
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from autoload.config import LoaderConfig
from autoload.errors import AutoloadError, DatasetError
from autoload.memory import MemoryCapExceeded, MemoryWatchdog, child_pids, reap_children
from autoload.state import TrainingState

__all__ = [
    "LossFn",
    "Measurement",
    "Probe",
    "StepFn",
    "TrainingProbe",
    "TrialTimeout",
    "Window",
    "move_to_device",
]

LossFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[[nn.Module, Any], torch.Tensor]
"""A custom training step: ``step(model, batch_on_device) -> loss``."""


class TrialTimeout(Exception):
    """A trial ran past its deadline (a hung worker or ``__getitem__``)."""


@dataclass(frozen=True)
class Window:
    """How long one probe measures.

    Attributes:
        seconds: Steady-state time to measure, after warm-up.
        min_batches: Steady batches measured at least, even past ``seconds`` (slow steps).
        max_warmup: Warm-up ends after this many seconds past the first batch even if the
            prefetch queue may not be drained yet (large, slow batches).
        time_limit: Soft bound on the probe after its first batch: past it the probe ends
            with what it measured so far (warm-up batches too, if it never left warm-up) and
            sets ``cut_short``. Start-up is not counted: persistent workers pay it once per
            training run, and ``deadline`` bounds it.
        abandon_below: A rate (samples/s) that, once a third of the window has shown the
            configuration stays under it, ends the window early: a hopeless configuration
            need not be measured precisely.
        max_batches: Steady batches measured at most.
        deadline: Hard bound on the whole probe, start-up included; past it the trial fails.
    """

    seconds: float = 1.0
    min_batches: int = 2
    max_batches: int = 100_000
    deadline: float = 60.0
    max_warmup: float = 2.0
    time_limit: float | None = None
    abandon_below: float | None = None


@dataclass(frozen=True)
class Measurement:
    """What one probe saw.

    Attributes:
        samples_per_second: Steady-state rate, warm-up excluded.
        startup_seconds: From building the loader to the first batch (worker start-up).
        warmup_seconds: From building the loader to the end of warm-up.
        seconds: Length of the steady window.
        samples: Samples in the steady window.
        batches: Batches in the steady window.
        data_wait_fraction: Share of the steady window spent waiting for the next batch.
        peak_host_bytes: Peak memory of the main process plus all workers (PSS).
        peak_gpu_bytes: Peak GPU memory allocated, or ``None`` off CUDA.
        cut_short: The window ended early because the rate stayed under ``abandon_below``.
        rate_cv: How much the rate of a window like this one varies (its coefficient of
            variation), from the spread of the rate over consecutive blocks of its batches;
            ``None`` for a window cut short or of fewer than 4 batches.
    """

    samples_per_second: float
    startup_seconds: float
    warmup_seconds: float
    seconds: float
    samples: int
    batches: int
    data_wait_fraction: float
    peak_host_bytes: int = 0
    peak_gpu_bytes: int | None = None
    cut_short: bool = False
    rate_cv: float | None = None


class Probe(ABC):
    """Measures one configuration. Implement it to drive the tuner against anything.

    Contract: :meth:`measure` returns a :class:`Measurement`, or raises. It must leave no worker
    process behind and leave any model or optimizer it touched as it found them. It raises
    :class:`~autoload.memory.MemoryCapExceeded` for a crossed cap and :class:`TrialTimeout`
    for a deadline; any other exception is treated as a fault of the configuration or the
    user's code.
    """

    @abstractmethod
    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        """Run one window under ``config`` and measure it."""

    def step_rate(self, config: LoaderConfig, window: Window) -> float | None:
        """Samples per second of the training step alone, on one batch already on the device
        (an upper bound for any loader); ``None`` when there is no step to measure."""
        return None


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move tensors inside tensors, tuples, lists and dicts to ``device``, keeping the shape."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)(  # type: ignore[call-arg]
            {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values: Sequence[Any] = list(batch.values()) if isinstance(batch, Mapping) else (
        batch if isinstance(batch, (list, tuple)) else ()
    )
    for value in values:
        n = _batch_len(value)
        if n is not None:
            return n
    return None


def _default_step(model: nn.Module, batch: Any, loss_fn: LossFn) -> torch.Tensor:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        return loss_fn(model(x), y)
    raise DatasetError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, targets); "
        "make items (x, y) pairs, or pass step=lambda model, batch: loss to tune()."
    )


_COLLATE_HINTS = ("stack expects each tensor to be equal size", "default_collate",
                  "each element in list of batch should be of equal size")


def _epoch_batches(loader: DataLoader[Any]) -> float:
    try:
        return len(loader)
    except TypeError:  # an IterableDataset without a length
        return math.inf


def _made_share(produced: Sequence[int], first: int, last: int) -> float:
    """Of the batches consumed between steady batches ``first`` and ``last``, the share the
    workers made meanwhile (at most 1); 1 without workers. (A span never runs past the point
    where the workers had made the whole epoch: the window switches to whole epochs there.)"""
    if last <= first or len(produced) <= last:
        return 1.0
    return min(1.0, (produced[last] - produced[first]) / (last - first))


class _CountingCollate:
    """The loader's collate function, counting the batches each worker has made.

    The main process sees when it consumes a batch, not when a worker made it: batches queued
    earlier can flatter a loader slower than the step. Each worker adds to its own slot of a
    shared array (no lock needed), so the probe can tell how fast the workers really produce.
    """

    def __init__(self, collate: Callable[[Any], Any], slots: Any) -> None:
        self.collate, self.slots = collate, slots

    def __call__(self, items: Any) -> Any:
        batch = self.collate(items)
        info = get_worker_info()
        if info is not None:
            self.slots[info.id] += 1
        return batch


_Point = tuple[float, int, int]  # (time, samples, batches) of a steady window at one moment


def _steady_span(waits: Sequence[_Point], start: _Point, end: _Point) -> tuple[_Point, _Point]:
    """The part of a steady window that gives the loader's rate.

    ``waits`` are the moments at which a fetch began that then waited on the workers. The
    fetches before the first wait were served from the queue the workers filled earlier, at the
    step's pace, not the loader's: the span starts at the first wait (if two batches follow it).
    Workers that keep the step waiting deliver in bursts, so a span ending inside a burst
    counts part of one; the span ends at the last wait when that keeps at least half of it.
    """
    if waits and end[2] - waits[0][2] >= 2:
        start = waits[0]
    last = waits[-1] if waits else start
    if last[2] - start[2] >= 2 and last[0] - start[0] >= 0.5 * (end[0] - start[0]):
        end = last
    return start, end


_CV_BLOCKS = 8


def window_cv(start: float, marks: Sequence[tuple[float, int]],
              min_block: int = 1) -> float | None:
    """The coefficient of variation of a window's rate, from its rate over consecutive blocks.

    ``marks`` holds (time, samples so far) after each batch of a window that began at
    ``start``. Up to 8 blocks of (about) equally many batches, at least ``min_block`` each (a
    burst from the workers is one batch per worker): the window's rate is about their mean, so
    its CV is theirs over the square root of their count. Noise slower than the window is not
    seen here; the tuner adds what repeated windows show.
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


class _OutOfTime(Exception):
    """The soft time limit passed: stop measuring and keep what was measured."""


class _Alarm:
    """One real-time timer for two limits, in the main thread (a no-op elsewhere).

    The hard limit bounds a hang (a stuck ``__getitem__`` at ``num_workers=0``, a worker that
    never answers): it raises :class:`TrialTimeout`. The soft limit, armed once the first batch
    is in, interrupts a step that would overrun the trial's share of the budget (a huge batch, a
    slow autocast): it raises ``_OutOfTime`` and the probe keeps what it measured. Python runs the
    handler between interpreter steps, so a long native op delays it by that op's length.
    """

    def __init__(self, hard_seconds: float) -> None:
        self.enabled = (threading.current_thread() is threading.main_thread()
                        and hasattr(signal, "SIGALRM"))
        self._hard_seconds = hard_seconds
        self._hard = self._soft = None  # type: float | None
        self._previous: Any = None

    def __enter__(self) -> _Alarm:
        if self.enabled:
            self._previous = signal.signal(signal.SIGALRM, self._fire)
            self._hard = time.monotonic() + self._hard_seconds
            self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)

    def soft_in(self, seconds: float) -> None:
        if self.enabled:
            self._soft = time.monotonic() + max(seconds, 0.001)
            self._arm()

    def soft_off(self) -> None:
        """Measuring is over: a soft limit passing now must not interrupt the clean-up."""
        self._soft = None

    def _arm(self) -> None:
        pending = [t for t in (self._hard, self._soft) if t is not None]
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(min(pending) - time.monotonic(), 0.001))

    def _fire(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self._hard is not None and now >= self._hard:
            self._hard = None
            raise TrialTimeout(f"the trial ran past its {self._hard_seconds:.0f} s deadline")
        if self._soft is not None and now >= self._soft:
            self._soft = None
            self._arm()
            raise _OutOfTime
        self._arm()


class TrainingProbe(Probe):
    """Runs the seed article's training loop (or a data-only loop) over a real DataLoader.

    Args:
        dataset: The data set.
        device: Where batches go and the model trains.
        model: Trained during the window and restored afterwards; ``None`` measures data only.
        loss_fn: ``loss_fn(model(x), y)``; required with a model unless ``step`` is given.
        optimizer: Stepped each batch and restored afterwards; SGD(lr=0.01) if ``None``.
        step: A custom training step ``step(model, batch) -> loss`` for batches that are not
            ``(x, y)`` pairs.
        loader_options: The user's fixed DataLoader arguments, passed untouched.
        memory_cap: Bytes the process tree may use; ``None`` for no cap.
        gpu_memory_cap: Bytes of GPU memory a trial may allocate; ``None`` for no cap.
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        device: torch.device,
        model: nn.Module | None = None,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        step: StepFn | None = None,
        loader_options: Mapping[str, Any] | None = None,
        memory_cap: int | None = None,
        gpu_memory_cap: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.dataset = dataset
        self.device = device
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        if model is not None and optimizer is None:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        self.step = step
        self.loader_options = dict(loader_options or {})
        self.memory_cap = memory_cap
        self.gpu_memory_cap = gpu_memory_cap
        self.clock = clock

    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        before = child_pids()
        saved = None if self.model is None else TrainingState.capture(self.model, self.optimizer)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with warnings.catch_warnings():
                # The search asks for more workers than CPUs on purpose.
                warnings.filterwarnings("ignore", message=r"This DataLoader will create")
                # torch warns, then raises the pickling error itself: the error is the record.
                warnings.filterwarnings("ignore", message=r"Got pickle error")
                # Python 3.12+ warns on fork() beside threads; the memory watchdog's thread
                # holds no lock a worker needs.
                warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead")
                with MemoryWatchdog(self.memory_cap) as dog, _Alarm(window.deadline) as alarm:
                    try:
                        result = self._run(config, window, dog, alarm)
                    except (MemoryCapExceeded, AutoloadError, TrialTimeout):
                        raise
                    except Exception as exc:
                        if dog.exceeded.is_set():  # the watchdog killed the workers
                            raise MemoryCapExceeded("host", dog.peak, dog.cap or 0) from exc
                        self._explain_collate(exc)
                        raise
            peak_gpu = torch.cuda.max_memory_allocated(self.device) if cuda else None
            return replace(result, peak_host_bytes=dog.peak, peak_gpu_bytes=peak_gpu)
        finally:
            # A full collection costs a quarter second with torch and optuna loaded: run it only
            # when a loader iterator caught in a reference cycle still holds workers.
            if child_pids() - before:
                gc.collect()
            reap_children(before)
            if saved is not None:
                saved.restore()
            if cuda:
                torch.cuda.empty_cache()

    def _explain_collate(self, exc: Exception) -> None:
        if "collate_fn" in self.loader_options or "batch_sampler" in self.loader_options:
            return
        if any(hint in str(exc) for hint in _COLLATE_HINTS):
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DatasetError(
                f"the default collate cannot batch these items ({first}); pass a collate_fn in "
                "loader_options that pads or packs them."
            ) from exc

    def _make_step(self, config: LoaderConfig) -> Callable[[Any], None]:
        device, pin = self.device, config.pin_memory
        if self.model is None:
            def copy_only(batch: Any) -> None:
                move_to_device(batch, device, pin)
            return copy_only

        model, optimizer, loss_fn, user_step = self.model, self.optimizer, self.loss_fn, self.step
        assert optimizer is not None  # set in __init__ whenever there is a model
        dtype = None if config.amp is None else getattr(torch, config.amp)
        scaler = (
            torch.amp.GradScaler("cuda") if config.amp == "float16" and device.type == "cuda"
            else None
        )
        model.train()

        def train(batch: Any) -> None:
            batch = move_to_device(batch, device, pin)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if user_step is not None:
                    loss = user_step(model, batch)
                else:
                    if loss_fn is None:
                        raise DatasetError("a model needs a loss_fn (or a step) to train.")
                    loss = _default_step(model, batch, loss_fn)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss.mean()).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.mean().backward()  # type: ignore[no-untyped-call]
                optimizer.step()

        return train

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, config: LoaderConfig, window: Window, dog: MemoryWatchdog,
             alarm: _Alarm) -> Measurement:
        clock = self.clock
        step = self._make_step(config)
        # Batches before measuring: the first (start-up) and one more (lazy init, caches), or
        # as many as the workers queue while starting (set below for whole epochs).
        warmup = max(2, config.num_workers * (config.prefetch_factor or 0))
        kwargs = config.dataloader_arguments(self.loader_options, timeout=window.deadline)
        made: Any = None  # batches made by each worker, when there are workers
        if config.num_workers > 0:
            context = kwargs.get("multiprocessing_context")
            if isinstance(context, str):
                context = multiprocessing.get_context(context)
            made = (context or multiprocessing).RawArray("q", config.num_workers)
            kwargs["collate_fn"] = _CountingCollate(kwargs.get("collate_fn") or default_collate,
                                                    made)
        start = clock()
        loader: DataLoader[Any] = DataLoader(self.dataset, **kwargs)
        it: Iterator[Any] = iter(loader)
        seen = samples = batches = 0
        startup = warmup_end = steady_start = last_step = 0.0
        wait = 0.0
        warming = True
        cut_short = False
        waits: list[_Point] = []  # where the steady fetches that waited on the workers began
        marks: list[tuple[float, int]] = []  # (time, samples so far) after each steady batch
        produced: list[int] = []  # batches the workers had made when each steady fetch began
        epoch_batches, epoch_starts = _epoch_batches(loader), 1
        epochs: list[_Point] = []  # where the epochs begun since the steady window began
        whole_epochs = made is not None and epoch_batches <= (
            config.num_workers * (config.prefetch_factor or 2))
        if whole_epochs:
            # Measured from one epoch's end to another's, when nothing is queued: the queue
            # start-up filled needs no draining, only the first steps' lazy init.
            warmup = 2
        try:
            while True:
                if made is not None and not warming:
                    produced.append(sum(made))
                    if not whole_epochs and produced[-1] >= epoch_starts * epoch_batches:
                        # The workers have made the whole epoch: the step now eats their stock
                        # alone (with the cores to itself), and the next epoch starts with an
                        # empty queue. Only whole epochs, from one's end to another's, weigh
                        # the two as a training run does.
                        whole_epochs = True
                fetch = clock()
                batch = next(it, _END)
                if batch is _END:  # epochs run back to back; persistent workers stay up
                    if not warming:
                        epochs.append((fetch, samples, batches))
                        if whole_epochs and len(epochs) >= 2 and (
                            batches >= window.max_batches
                            or (fetch - steady_start >= window.seconds
                                and batches >= window.min_batches)
                        ):
                            break  # whole epochs measured: no need to start another
                    it = iter(loader)
                    epoch_starts += 1
                    batch = next(it, _END)
                    if batch is _END:
                        raise DatasetError(
                            "the DataLoader yielded no batch in a whole epoch; check the data "
                            "set's length and the sampler."
                        )
                got = clock()
                step(batch)
                stepped = last_step = clock()
                dog.raise_if_exceeded()
                self._check_gpu_cap()
                seen += 1
                if seen == 1:
                    startup = got - start
                    if window.time_limit is not None:
                        alarm.soft_in(window.time_limit - (clock() - got))
                over_time = (window.time_limit is not None
                             and clock() - start - startup > window.time_limit)
                if warming and over_time:
                    raise _OutOfTime
                if warming:
                    # Warm-up drains the batches the workers queued during start-up, which would
                    # flatter the rate of a loader slower than the step. It ends early once a
                    # fetch had to wait on the workers (the queue is empty: drained), or after
                    # max_warmup seconds of no waiting: then the step is the slower side and the
                    # queue's content does not change the rate.
                    warmed = clock() - start - startup
                    drained = seen >= 2 and got - fetch > max(1e-3, 0.25 * (stepped - got))
                    if seen >= warmup or drained or (seen >= 2 and warmed >= window.max_warmup):
                        self._sync()
                        warmup_end = steady_start = clock()
                        warming = False
                    continue
                if (config.num_workers > 0
                        and got - fetch > max(1e-3, 0.25 * (stepped - got))):
                    waits.append((fetch, samples, batches))
                batches += 1
                samples += _batch_len(batch) or config.batch_size
                wait += got - fetch
                marks.append((stepped, samples))
                elapsed = clock() - steady_start
                # When the workers are asked for a whole epoch at once, they make it and then
                # idle until the next: measure whole epochs, from one's start to another's.
                # Otherwise workers that keep the step waiting deliver batches in bursts, up to
                # one per worker: measure two bursts at least past the first wait, not part of
                # one.
                if whole_epochs:
                    cycled = len(epochs) >= 2
                else:
                    cycled = (not waits or wait < 0.1 * elapsed
                              or batches - waits[0][2] > 2 * config.num_workers)
                if batches >= window.max_batches or (
                    elapsed >= window.seconds and batches >= window.min_batches and cycled
                ):
                    break
                if over_time or (window.abandon_below is not None and batches >= window.min_batches
                                 and elapsed >= window.seconds / 3
                                 and samples < window.abandon_below * elapsed):
                    cut_short = True
                    break
            self._sync()
            if made is not None:
                produced.append(sum(made))
            if whole_epochs and len(epochs) >= 2:
                first, last = epochs[0], epochs[-1]
            elif whole_epochs:  # cut short before a whole epoch was measured
                raise _OutOfTime
            else:
                first, last = _steady_span(waits, (steady_start, 0, 0),
                                           (clock(), samples, batches))
            steady_start, seconds = first[0], last[0] - first[0]
            samples, batches = last[1] - first[1], last[2] - first[2]
            # Batches taken from the workers' queue faster than they make new ones only drain
            # it, which cannot last: count what the workers made in the span when that is less.
            samples = round(samples * _made_share(produced, first[2], last[2]))
            marks = [(t, s - first[1]) for t, s in marks[first[2]:last[2]]]
            rate_cv = None if cut_short else window_cv(steady_start, marks,
                                                       min_block=config.num_workers)
        except _OutOfTime:
            alarm.soft_off()
            cut_short, rate_cv = True, None
            # Up to the last step that ended: the batch in progress is neither counted nor timed.
            warmup_end = warmup_end or clock()
            if whole_epochs and epochs and batches > epochs[0][2]:
                # Inside the second epoch: from the first one's end, the refill included.
                steady_start = epochs[0][0]
                samples, batches = samples - epochs[0][1], batches - epochs[0][2]
            elif made is not None and (batches == 0 or whole_epochs):
                # Workers make batches side by side and deliver them in bursts: with no epoch
                # end to measure from, only the time since the loader was built is safe.
                samples, batches = seen * config.batch_size, seen
                steady_start = start
            elif batches == 0:  # still warming up: measure what came after the first batch
                samples, batches = (seen - 1) * config.batch_size, seen - 1
                steady_start = start + startup
            elif len(produced) > batches:  # cut inside the steady window: as above
                samples = round(samples * _made_share(produced, 0, batches))
            end = last_step
            if batches <= 0:  # not even a second batch in time: the first, start-up included
                samples, batches, steady_start, end = config.batch_size, 1, start, clock()
            seconds = end - steady_start
        except BaseException as exc:
            # The traceback's frames hold the iterator (DataLoader's own methods have it as
            # `self`), which would keep its workers alive until the exception is gone.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            alarm.soft_off()
            # Drop the only references so the workers shut down now, even while an exception's
            # traceback keeps this frame alive.
            del it, loader
        return Measurement(
            samples_per_second=samples / seconds if seconds > 0 else 0.0,
            startup_seconds=startup,
            warmup_seconds=warmup_end - start,
            seconds=seconds,
            samples=samples,
            batches=batches,
            data_wait_fraction=min(1.0, wait / seconds) if seconds > 0 else 0.0,
            cut_short=cut_short,
            rate_cv=rate_cv,
        )

    def step_rate(self, config: LoaderConfig, window: Window) -> float | None:
        if self.model is None:
            return None
        saved = TrainingState.capture(self.model, self.optimizer)
        try:
            in_process = replace(config, num_workers=0, prefetch_factor=None, pin_memory=False)
            loader = DataLoader(self.dataset,
                                **in_process.dataloader_arguments(self.loader_options))
            batch = move_to_device(next(iter(loader)), self.device)
            del loader
            step = self._make_step(config)
            n = _batch_len(batch) or config.batch_size
            for _ in range(2):  # warm-up: allocator, autocast caches
                step(batch)
            self._sync()
            steps, start = 0, self.clock()
            while steps < window.min_batches or self.clock() - start < window.seconds:
                step(batch)
                steps += 1
            self._sync()
            return steps * n / (self.clock() - start)
        finally:
            saved.restore()

    def _check_gpu_cap(self) -> None:
        if self.gpu_memory_cap is not None and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            if peak > self.gpu_memory_cap:
                raise MemoryCapExceeded("GPU", peak, self.gpu_memory_cap)


_END = object()
