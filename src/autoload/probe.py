"""One probe: a short training window under one configuration, measured.

No Optuna and no printing here. A probe either returns a :class:`Measurement` or raises; the tuner
decides what a failure means for the study. The window's timing logic lives in
:mod:`autoload.timing`; this module runs the loader and the step and feeds it timestamps.
"""

from __future__ import annotations

import gc
import itertools
import time
import traceback
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from autoload import cpuload
from autoload.alarm import Alarm, OutOfTime
from autoload.config import LoaderConfig, batches_per_epoch
from autoload.errors import AutoloadError, DatasetError, MemoryCapExceeded, TrialTimeout, summary
from autoload.loader import DataLoader
from autoload.memory import (
    MemoryWatchdog,
    child_pids,
    cpu_seconds,
    reap_children,
)
from autoload.result import Measurement
from autoload.sources import loss_of
from autoload.state import TrainingState
from autoload.timing import Recorder, Shape, Timing, Window

__all__ = [
    "LossFn",
    "Measurement",
    "Probe",
    "StepFn",
    "TrainingProbe",
    "TrialTimeout",
    "Window",
    "batch_bytes",
    "make_step",
    "move_to_device",
]

LossFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[[nn.Module, Any], torch.Tensor]
"""A custom training step: ``step(model, batch_on_device) -> loss``."""


class Probe(ABC):
    """Measures one configuration. Implement it to drive the tuner against anything.

    Contract: :meth:`measure` returns a :class:`Measurement`, or raises. It must leave no worker
    process behind and leave any model or optimizer it touched as it found them. It raises
    :class:`~autoload.MemoryCapExceeded` for a crossed cap and :class:`~autoload.TrialTimeout`
    for a deadline (both :class:`~autoload.TrialFault`: the study records them and goes on);
    another :class:`~autoload.AutoloadError` ends the study; any other exception is treated as
    a fault of the configuration or the user's code. A measurement's ``costs`` feed the tuner's
    model of the pipeline; a probe that leaves them out gets a search that learns from rates
    alone.
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


def _values(batch: Any) -> Sequence[Any]:
    if isinstance(batch, Mapping):
        return list(batch.values())
    return batch if isinstance(batch, (list, tuple)) else ()


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    for value in _values(batch):
        n = _batch_len(value)
        if n is not None:
            return n
    return None


def batch_bytes(batch: Any) -> int:
    """Bytes of all tensors in a batch."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    return sum(batch_bytes(v) for v in _values(batch))


def _default_step(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """``loss_fn(model(x), y)`` for ``(x, y)`` batches; for a dict batch, the Hugging Face
    convention: the model takes the batch's keys and returns its own ``.loss``."""
    if isinstance(batch, Mapping) and loss_fn is None:
        return loss_of(model(**batch), f"{type(model).__name__}(**batch)")
    if loss_fn is None:
        raise DatasetError(
            f"a model needs a loss (loss_fn=, --loss) or a step (step=, --step) to train on "
            f"{type(batch).__name__} batches; only dict batches fed to a model that returns "
            ".loss need neither."
        )
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        return loss_fn(model(x), y)
    raise DatasetError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, targets); "
        "make items (x, y) pairs, or pass step=lambda model, batch: loss to tune()."
    )


_COLLATE_HINTS = ("stack expects each tensor to be equal size", "default_collate",
                  "each element in list of batch should be of equal size")
_END = object()
_CODES = {"go": 0, "done": 1, "cut": 2, "fault": 3}
_VERDICTS = {code: name for name, code in _CODES.items()}


class PeerFault(Exception):
    """Another rank of a distributed job could not take its step; this one stopped too."""


class _ShortFirstEpoch(Sampler[int]):
    """The loader's sampler, with a first epoch of ``first`` indices only: the probe's warm-up,
    so that measuring starts at an epoch boundary, where nothing is queued. Later epochs are
    the sampler's own, whole."""

    def __init__(self, inner: Sampler[int], first: int) -> None:
        self.inner, self.first, self.epochs = inner, first, 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        indices = iter(self.inner)
        self.epochs += 1
        return itertools.islice(indices, self.first) if self.epochs == 1 else indices


def make_step(config: LoaderConfig, *, device: torch.device, model: nn.Module | None,
              optimizer: torch.optim.Optimizer | None, loss_fn: LossFn | None,
              step: StepFn | None) -> Callable[[Any], None]:
    """A plain training step under ``config``: the copy to the device (non-blocking
    when pinned), the forward pass under autocast, the loss, ``zero_grad``, backward and
    ``step`` (through a ``GradScaler`` for float16 on CUDA); without a model, the copy alone."""
    pin = config.pin_memory
    if model is None or optimizer is None:
        def copy_only(batch: Any) -> None:
            move_to_device(batch, device, pin)
        return copy_only

    dtype = None if config.amp is None else getattr(torch, config.amp)
    scaler = (torch.amp.GradScaler("cuda")
              if config.amp == "float16" and device.type == "cuda" else None)
    model.train()

    def train(batch: Any) -> None:
        batch = move_to_device(batch, device, pin)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if step is not None:
                loss = loss_of(step(model, batch), "the step")
            else:
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


def _warmup_batches(config: LoaderConfig) -> int:
    # Every worker makes a batch (its lazy init), and the step runs twice (its own).
    return max(2, config.num_workers)


class TrainingProbe(Probe):
    """Runs a plain training loop (or a data-only loop) over a real DataLoader.

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
        sync: In a distributed job, a vote among the ranks before each step (the largest
            code wins: go, done, cut, fault), so that all of them take the same steps and DDP's
            all-reduce never waits on a rank that stopped; see :mod:`autoload.distributed`.
        cpu_root: The process whose tree is the tuner's own when the window reads what other
            processes took of the CPUs (this process; in a job, the agent of the node's ranks).
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
        sync: Callable[[int], int] | None = None,
        cpu_root: int | None = None,
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
        self.sync = sync
        self.cpu_root = cpu_root

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
                with MemoryWatchdog(self.memory_cap) as dog, Alarm(window.deadline) as alarm:
                    timing, size, others = self._guarded(config, window, dog, alarm)
            peak_gpu = torch.cuda.max_memory_allocated(self.device) if cuda else None
            costs = None if timing.costs is None else replace(timing.costs, batch_bytes=size)
            return Measurement(
                samples_per_second=timing.samples_per_second,
                startup_seconds=timing.startup_seconds, warmup_seconds=timing.warmup_seconds,
                seconds=timing.seconds, samples=timing.samples, batches=timing.batches,
                epochs=timing.epochs, data_wait_fraction=timing.data_wait_fraction,
                peak_host_bytes=dog.peak, peak_gpu_bytes=peak_gpu, cut_short=timing.cut_short,
                rate_cv=timing.rate_cv, costs=costs, others_cpu=others,
            )
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

    def _guarded(self, config: LoaderConfig, window: Window, dog: MemoryWatchdog,
                 alarm: Alarm) -> tuple[Timing, int, float | None]:
        """:meth:`_run`, with the errors a crossed cap or a bad collate cause made plain."""
        try:
            return self._run(config, window, dog, alarm)
        except AutoloadError:  # a crossed cap, a deadline, a bad data set: already plain
            raise
        except Exception as exc:
            if dog.exceeded.is_set():  # the watchdog killed the workers
                raise MemoryCapExceeded("host", dog.peak, dog.cap or 0) from exc
            self._explain_collate(exc)
            raise

    def _explain_collate(self, exc: Exception) -> None:
        if "collate_fn" in self.loader_options or "batch_sampler" in self.loader_options:
            return
        if any(hint in str(exc) for hint in _COLLATE_HINTS):
            raise DatasetError(
                f"the default collate cannot batch these items ({summary(exc)}); pass a "
                "collate_fn in loader_options that pads or packs them."
            ) from exc

    def _loader(self, config: LoaderConfig, window: Window) -> tuple[DataLoader[Any], Shape]:
        """The DataLoader under ``config``, its first epoch shortened to the warm-up where the
        data set has a sampler to shorten."""
        kwargs = config.dataloader_arguments(self.loader_options, timeout=window.deadline)
        warmup = _warmup_batches(config)
        epoch = None
        if not isinstance(self.dataset, IterableDataset):
            sampler = kwargs.pop("sampler", None)
            if sampler is None:
                shuffle = bool(kwargs.pop("shuffle", False))
                sampler = (RandomSampler(self.dataset, generator=kwargs.get("generator"))  # type: ignore[arg-type]
                           if shuffle else SequentialSampler(self.dataset))  # type: ignore[arg-type]
            else:
                kwargs.pop("shuffle", None)
            n = len(sampler)
            epoch = batches_per_epoch(n, config.batch_size, config.drop_last)
            if epoch > warmup + 1:  # else the first epoch is short enough as it is
                sampler = _ShortFirstEpoch(sampler, warmup * config.batch_size)
            kwargs["sampler"] = sampler
        shape = Shape(
            batch_size=config.batch_size, workers=config.num_workers,
            in_flight=config.num_workers * (config.prefetch_factor or 0),
            epoch_batches=epoch,
            warmup_batches=warmup if epoch is None or epoch > warmup + 1 else None,
        )
        return DataLoader(self.dataset, **kwargs), shape

    def _make_step(self, config: LoaderConfig) -> Callable[[Any], None]:
        assert self.model is None or self.optimizer is not None  # set in __init__
        return make_step(config, device=self.device, model=self.model,
                         optimizer=self.optimizer, loss_fn=self.loss_fn, step=self.step)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, config: LoaderConfig, window: Window, dog: MemoryWatchdog,
             alarm: Alarm) -> tuple[Timing, int, float | None]:
        """Epochs back to back until the recorder has seen enough; the timing, the bytes of
        one batch, and the share of the CPUs other processes took meanwhile."""
        clock, step = self.clock, self._make_step(config)
        before = child_pids()
        cpu_before, began = cpuload.read(self.cpu_root), clock()
        loader, shape = self._loader(config, window)
        recorder = Recorder(shape, window)
        workers: set[int] = set()
        size = 0
        recorder.start(clock())
        it: Iterator[Any] = iter(loader)
        try:
            verdict: str = "go"
            while verdict == "go" or self.sync is not None:
                begin, cpu = clock(), time.thread_time()
                batch, error = self._fetch(it)
                if batch is _END:  # epochs run back to back; persistent workers stay up
                    if self.device.type == "cuda":  # the epoch ends when its kernels do
                        self._sync()
                        begin = clock()
                    verdict = _epoch_end(recorder, begin, workers)
                    it = iter(loader)
                    continue
                if self.sync is not None:
                    agreed = self._vote(verdict, error)
                    if agreed != "go":
                        verdict = "cut" if agreed == "cut" or verdict == "go" else "done"
                        break
                got, fetch_cpu = clock(), time.thread_time() - cpu
                step(batch)
                done = clock()
                dog.raise_if_exceeded()
                self._check_gpu_cap()
                n = _batch_len(batch) or config.batch_size
                verdict = recorder.batch(begin=begin, got=got, done=done, samples=n,
                                         fetch_cpu=fetch_cpu, main_cpu=time.process_time())
                if not size:
                    size = batch_bytes(batch)
                    workers = child_pids() - before
                    if window.time_limit is not None and self.sync is None:
                        alarm.soft_in(window.time_limit - (clock() - got))
            interrupted, stopped_at = verdict == "cut", None
        except OutOfTime:
            interrupted, stopped_at = True, clock()
        except BaseException as exc:
            # The traceback's frames hold the iterator (DataLoader's own methods have it as
            # `self`), which would keep its workers alive until the exception is gone.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            alarm.soft_off()
        if self.device.type == "cuda" and not interrupted:
            self._sync()
            recorder.synced(clock())
        if recorder.measuring and recorder.worker_cpu is not None:
            recorder.worker_cpu = (recorder.worker_cpu[0], cpu_seconds(workers))
        # Read while the workers live: their CPU time is the tuner's own, not the others'.
        others = cpuload.others_share(cpu_before, cpuload.read(self.cpu_root), clock() - began)
        # Drop the only references so the workers shut down now.
        del it, loader
        return recorder.timing(interrupted=interrupted, stopped_at=stopped_at), size, others

    def _fetch(self, it: Iterator[Any]) -> tuple[Any, BaseException | None]:
        """The next batch (or the epoch's end). In a job a fault is held back for the vote,
        so that no rank steps (and waits in DDP's all-reduce) while another cannot."""
        # No exception is kept in a local name here: a raised one's traceback holds this
        # frame, whose locals hold the loader's iterator, and the cycle would keep the
        # workers alive until a full collection.
        try:
            return next(it, _END), None
        except Exception as exc:
            if isinstance(exc, TrialTimeout) or str(exc).startswith("DataLoader timed out"):
                # The alarm, or the workers' own timeout, while waiting for a batch.
                stalled = self._stalled(exc)  # before the frames that tell the index go
                traceback.clear_frames(exc.__traceback__)
                if self.sync is not None:
                    return None, TrialTimeout(stalled)
                raise TrialTimeout(stalled) from None
            if self.sync is not None:
                return None, exc
            raise

    def _stalled(self, exc: BaseException) -> str:
        """A deadline that passed while the loop waited for a batch: items stopped arriving.
        In the main process the traceback still holds the data set's ``__getitem__`` frame,
        and so the index it hung on."""
        index = _index_in(exc.__traceback__, self.dataset)
        if index is not None:
            where = f"the data set's __getitem__ did not return index {index}"
        else:
            where = "no batch came from the DataLoader"
        return (f"items stopped arriving: {where} before the trial's deadline ({exc}); a hang "
                "in the data set (a stalled file system or network?), or in its collate_fn")

    def _vote(self, verdict: str, error: BaseException | None) -> str:
        """Every rank's verdict before the step: the window goes on only if all say so."""
        assert self.sync is not None
        agreed = _VERDICTS[self.sync(_CODES["fault"] if error else _CODES[verdict])]
        if error is not None:
            raise error
        if agreed == "fault":
            raise PeerFault("another rank's measurement failed (see its reason)")
        return agreed

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
            start = self.clock()
            steps = _steps_for(window, lambda: step(batch), self.clock, self.sync)
            self._sync()
            return steps * n / (self.clock() - start)
        finally:
            saved.restore()

    def _check_gpu_cap(self) -> None:
        if self.gpu_memory_cap is not None and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            if peak > self.gpu_memory_cap:
                raise MemoryCapExceeded("GPU", peak, self.gpu_memory_cap)


def _index_in(tb: TracebackType | None, dataset: Any) -> Any:
    """The index argument of ``dataset.__getitem__`` in a traceback (the outermost such call:
    a wrapper's own index, as the sampler gave it), or ``None``."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        if code.co_name in ("__getitem__", "__getitems__") and code.co_argcount >= 2:
            value = frame.f_locals.get(code.co_varnames[1])
            if frame.f_locals.get("self") is dataset:
                return value
            if found is None:
                found = value
        tb = tb.tb_next
    return found


def _epoch_end(recorder: Recorder, t: float, workers: set[int]) -> str:
    """The recorder's verdict at an epoch's end; the workers' CPU clocks start with the
    measured part of the window."""
    if recorder.batches_seen == 0:
        raise DatasetError(
            "the DataLoader yielded no batch in a whole epoch; check the data set's length "
            "and the sampler."
        )
    measuring = recorder.measuring
    verdict = recorder.epoch_end(t)
    if not measuring and recorder.measuring and workers:
        recorder.worker_cpu = (cpu_seconds(workers), 0.0)
    return verdict


def _steps_for(window: Window, step: Callable[[], None], clock: Callable[[], float],
               sync: Callable[[int], int] | None) -> int:
    """Take steps until the window is over; in a job every rank takes the same number (DDP)."""
    steps, start = 0, clock()
    while True:
        enough = steps >= window.min_batches and clock() - start >= window.seconds
        if sync is not None:
            enough = sync(_CODES["done" if enough else "go"]) != _CODES["go"]
        if enough:
            return steps
        step()
        steps += 1
