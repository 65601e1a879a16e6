"""``autoload.DataLoader(num_workers="auto")``: the loader settings tuned during the user's own
epochs, on the batches the loop trains on. Nothing the loop sees changes but the speed.

**One stream per epoch, handed from pool to pool.** An epoch begins as torch's does: a base
seed drawn from the loader's ``generator`` (or the global generator), then one iterator over the
batch sampler (the user's, or the one torch built from ``batch_size``, ``shuffle``, ``sampler``
and ``drop_last``). That iterator is the epoch's stream, and each index batch leaves it once. A
*pool* is one setting's workers: a torch ``DataLoader`` (autoload's, so its workers fork with
the heap frozen) whose batch sampler is the pool itself, handing it the stream's batches while
the pool is open. To switch, the old pool is closed: it takes no more indices, serves the
batches it already holds, in order, and ends; the new pool starts at once and takes the stream
from there, so its workers start and prefetch while the old ones drain (their start is hidden
behind the drain). A drained pool is parked, its workers idle, while the tuning may come back to
it (the walk usually settles on the setting before the last one it measured): switching back
costs no start. The loop gets the old pool's batches, then the new pool's: every batch of
the sampler, once, in the sampler's order. Each pool remembers the batches it was handed and
has not served; when a pool is stopped (the memory cap), those go back to the head of the
stream for the next pool. Pools persist across epochs unless ``persistent_workers=False``.

Why not restart one torch loader with new settings at a point in the epoch: its sampler would
start the epoch again (and draw again from the generator), and a sampler cannot be resumed in
general. Why not tune only at epoch boundaries: one window per epoch would take many epochs to
settle, and the workers' start could not be hidden.

**Seeds.** The epoch's base seed is drawn exactly where torch draws it (every epoch, or only the
first with ``persistent_workers=True``), and the sampler draws its own when the stream is first
read, as torch's does, so the shuffled order equals torch's for the same ``generator`` or global
seed. Pools seed their workers from a private generator, seeded with the epoch's base seed:
they never draw from the user's. Random numbers drawn inside workers (augmentations) differ from
torch's fixed loader, as they differ between any two ``num_workers`` of torch's.

**Waits and faults.** While it waits for a batch, the loader looks every ``poll_seconds`` at the
workers and the memory cap (torch's ``timeout``, set for the wait only, so torch's own checks
run). A worker that dies raises :class:`~autoload.errors.WorkerError` (torch's SIGCHLD handler
is told to leave the pool's workers alone, so the error comes from ``next()``, never from the
middle of the user's step); while the loader switches, a batch that takes ``hang_seconds``
means a hung worker and raises it too. Either way, and on Ctrl-C, every pool's workers are
killed before the error leaves. A pool whose tree crosses the memory cap is killed by the
watchdog (:class:`~autoload.memory.MemoryWatchdog`, told to kill this loader's workers only),
its setting dropped, its batches handed to the next pool: the loop never sees it. An epoch left
before its end (``break``, an exception) stops its pools; the next starts them again.

The pools are :mod:`autoload.pool`'s; the windows, when to settle and when to tune again
:mod:`autoload.tuning`'s; which setting wins and what to try next :mod:`autoload.settle`'s.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data

from autoload import cache
from autoload.errors import ConfigError, WorkerError
from autoload.memory import MemoryWatchdog, default_memory_cap, parse_size
from autoload.pool import END, CapCrossed, Pool, PoolFault, Stream, leave_to_us
from autoload.settle import Climb, Setting, Space
from autoload.space import usable_cpus
from autoload.tuning import OnlineOptions, Tuner, Tuning
from autoload.world import current_world

__all__ = ["FORMAT_VERSION", "OnlineLoader", "UserOptions"]

FORMAT_VERSION = 1  # of the cache entry
HANG_FLOOR = 60.0  # seconds: the least a batch may take during a switch before it is a hang


@dataclass(frozen=True, kw_only=True)
class UserOptions:
    """What the user gave the loader that the pools must honour."""

    num_workers: int | str
    prefetch_factor: int | str | None
    pin_memory: bool | str
    persistent_workers: bool | None
    timeout: float
    worker_init_fn: Callable[[int], None] | None
    multiprocessing_context: Any
    pin_memory_device: str | None


class OnlineLoader:
    """The online mode's runtime behind one ``autoload.DataLoader`` (see the module's doc).

    Args:
        outer: The user's loader: its data set, batch sampler (or sampler), collate_fn and
            generator are the ones every pool uses.
        user: The options the pools honour.
        make_loader: Builds one pool's torch loader (``autoload.DataLoader`` with fixed ints).
        memory_cap: Bytes the process tree may use (``"8GiB"``...); ``None`` for the default.
        cache: Start from (and store) a remembered answer.
        cache_dir: The cache's folder.
        options: The tuning's knobs.
    """

    def __init__(self, outer: torch.utils.data.DataLoader[Any], *, user: UserOptions,
                 make_loader: Callable[..., Any], memory_cap: int | str | None,
                 cache: bool, cache_dir: str | os.PathLike[str] | None,
                 options: OnlineOptions) -> None:
        if isinstance(outer.dataset, torch.utils.data.IterableDataset):
            raise ConfigError(
                "num_workers='auto' hands an epoch's indices from one pool of workers to the "
                "next, and an IterableDataset has no indices (its order depends on the worker "
                "count); pass a fixed num_workers, or tune it offline with autoload.tune()."
            )
        # What every pool uses, copied: holding the user's loader would make a cycle (it holds
        # this), and its workers would outlive it until a garbage collection.
        self.dataset, self.collate_fn = outer.dataset, outer.collate_fn
        self.batch_sampler, self.sampler = outer.batch_sampler, outer.sampler
        self.generator, self.batch_size, self.drop_last = (outer.generator, outer.batch_size,
                                                           outer.drop_last)
        self._outer = weakref.ref(outer)
        self.user, self.options, self.make_loader = user, options, make_loader
        self.clock = options.clock or time.perf_counter
        self._memory_cap, self._cache, self._cache_dir = memory_cap, cache, cache_dir
        self._tuner: Tuner | None = None
        self._parts: dict[str, Any] | None = None
        self._cached: str | None = None
        self._stored: str | None = None
        self._cap: int | None = None
        self._share = 1
        self._watch = True
        self._dog: MemoryWatchdog | None = None
        self._pids: tuple[int, ...] = ()
        self._victims: list[tuple[int, ...]] = [()]
        self._current: Pool | None = None
        self._draining: list[Pool] = []
        self._parked: Pool | None = None
        self._stream: Stream | None = None
        self._switching: Setting | None = None  # switching from this setting
        self._serving: Setting | None = None
        self._epoch: object | None = None
        self._seeded: int | None = None
        self._longest = 0.0

    # -- the user's view ---------------------------------------------------------------------

    @property
    def tuning(self) -> Tuning:
        return self._ensure().status(self._serving, cached=self._cached, stored=self._stored)

    def epoch(self) -> _Epoch:
        self.abandon()
        token = object()
        self._epoch = token
        return _Epoch(self, token)

    # -- setting up --------------------------------------------------------------------------

    def _ensure(self) -> Tuner:
        if self._tuner is not None:
            return self._tuner
        world = current_world()
        share = world.local_size if world is not None else 1
        cpus = self.options.cpus or max(1, usable_cpus() // share)
        cuda = torch.cuda.is_available()
        user = self.user
        space = Space.build(cpus=cpus, num_workers=user.num_workers,  # type: ignore[arg-type]
                            prefetch_factor=user.prefetch_factor,  # type: ignore[arg-type]
                            pin_memory=user.pin_memory, cuda=cuda)  # type: ignore[arg-type]
        start = space.start(cpus)
        if self._cache:
            self._parts = cache.fingerprint(
                dataset=self.dataset, model=None, step=None, loss_fn=None, optimizer=None,
                device="cuda" if cuda else "cpu", loader_options=self._identity(),
                bounds={"mode": "online", "workers": space.workers,
                        "prefetch": space.prefetch, "pin": space.pin},
                world=None if world is None else world.to_dict())
            remembered = self._remembered(space)
            if remembered is not None:
                start = remembered
        self._share = share
        if self._memory_cap is not None:  # checked now; the default is read when first needed
            self._cap = parse_size(self._memory_cap) // share
        planner = self.options.planner or Climb(space, cpus=cpus)
        self._tuner = Tuner(start=start, planner=planner, space=space, options=self.options,
                            on_settle=_weakly(self._settled))
        return self._tuner

    def _identity(self) -> dict[str, Any]:
        """What the cache key holds of the loader: whatever changes the batches."""
        sampler = self._index_sampler()
        inner = getattr(sampler, "sampler", None)
        return {"batch_size": self.batch_size, "drop_last": self.drop_last,
                "sampler": type(sampler).__name__,
                "inner_sampler": None if inner is None else type(inner).__name__,
                "batches": len(sampler),
                "collate_fn": self.collate_fn,
                "persistent_workers": self.user.persistent_workers}

    def _index_sampler(self) -> Any:
        """What torch iterates for an epoch: the batch sampler, or the sampler without one."""
        return self.batch_sampler if self.batch_sampler is not None else self.sampler

    def _remembered(self, space: Space) -> Setting | None:
        assert self._parts is not None
        found = cache.read(self._parts, self._cache_dir)
        if found is None:
            return None
        path, data = found
        try:
            if data.get("kind") != "online" or data.get("format_version") != FORMAT_VERSION:
                return None
            setting = Setting.from_dict(data["setting"])
        except (KeyError, TypeError, ValueError):
            return None
        if not space.contains(setting):
            return None
        self._cached = str(path)
        return setting

    def _settled(self, tuner: Tuner) -> None:
        if self._parts is None or tuner.settled is None or tuner.rate is None:
            return
        size = self.batch_size
        entry = {"kind": "online", "format_version": FORMAT_VERSION,
                 "setting": tuner.settled.to_dict(), "batches_per_second": tuner.rate,
                 "samples_per_second": None if size is None else tuner.rate * size,
                 "batch_size": size, "batches_to_settle": tuner.batches_to_settle,
                 "windows": [w.to_dict() for w in tuner.history[-32:]],
                 "device": "cuda" if torch.cuda.is_available() else "cpu"}
        path = cache.write(self._parts, entry, self._cache_dir)
        self._stored = None if path is None else str(path)

    # -- epochs ------------------------------------------------------------------------------

    def begin(self) -> None:
        tuner = self._ensure()
        tuner.epoch_begin()
        if not self.user.persistent_workers or self._seeded is None:
            # Where torch's iterator draws its base seed: the generator's state stays torch's.
            self._seeded = int(torch.empty((), dtype=torch.int64).random_(
                generator=self.generator).item())
        self._stream = Stream(iter(self._index_sampler()))
        target, current = tuner.target, self._current
        if current is None:
            self._start(target)
        elif current.setting == target:
            current.resume(self._stream)
        else:  # a switch at the epoch's start: the old pool has nothing left to serve
            self._switch(target)

    def end(self) -> None:
        assert self._tuner is not None
        self._epoch = None
        self._tuner.epoch_end()
        if self.user.persistent_workers is False:
            for pool in (self._current, self._parked):
                if pool is not None:
                    pool.shutdown(kill=False)
            self._current = self._parked = None
            self._watch_pids()

    def abandon(self) -> None:
        """An epoch left before its end: stop its pools (the next epoch starts them again)."""
        if self._epoch is not None:
            self._epoch = None
            self._stop_all()

    def next(self, *, first: bool = False) -> Any:
        """The epoch's next batch (``StopIteration`` at its end); ``first`` begins the
        epoch."""
        tuner = self._ensure()
        try:
            if first:
                self.begin()
            if self._dog is not None and self._dog.exceeded.is_set():
                self._on_cap()
            if self._current is None:
                self._start(tuner.target)
            elif tuner.target != self._current.setting:
                self._switch(tuner.target)  # to the parked pool, if it is the target
            if self._parked is not None and tuner.state == "settled":
                self._park(None)
            while True:
                pool = self._draining[0] if self._draining else self._current
                assert pool is not None  # _start sets the current pool, or raises
                began = time.monotonic()
                try:
                    batch = pool.next(began=began, poll=self.options.poll_seconds,
                                      hang=self._hang(), cap=self._cap_crossed,
                                      user_timeout=self.user.timeout)
                except CapCrossed:
                    self._on_cap()
                    continue
                self._longest = max(self._longest, time.monotonic() - began)
                if batch is END:
                    if pool is self._current:
                        raise StopIteration
                    self._park(self._draining.pop(0))
                    continue
                if pool is self._current:
                    self._switching = None
                self._serving = pool.setting
                return batch
        except PoolFault as fault:
            where = self._where()
            self._stop_all()
            raise WorkerError(
                f"{fault}{where}; no worker is left. Run with num_workers=0 to see the error in "
                "this process, or pass a fixed num_workers to train without switching."
            ) from None
        except (KeyboardInterrupt, SystemExit):
            self._stop_all()
            raise

    def serving(self) -> Setting | None:
        return self._serving

    # -- pools -------------------------------------------------------------------------------

    def _park(self, pool: Pool | None) -> None:
        """Keep a drained pool's workers, idle, while the tuning may come back to it (the walk
        usually settles on the setting before the last it measured): one pool at most, none
        once settled and none without workers (those start for free)."""
        assert self._tuner is not None
        old, self._parked = self._parked, None
        keep = (pool is not None and pool.setting.num_workers > 0
                and self._tuner.state == "tuning")
        for stale in (old, None if keep else pool):
            if stale is not None:
                stale.shutdown(kill=False)
        if keep:
            self._parked = pool
        self._watch_pids()

    def _start(self, setting: Setting) -> None:
        """The pool for ``setting``, fed from the epoch's stream: the current one. A parked
        pool of that setting takes the stream at once, else new workers start."""
        assert self._stream is not None
        parked = self._parked
        if parked is not None and parked.setting == setting:
            self._parked, self._current = None, parked
            parked.resume(self._stream)
            self._watch_pids()
            self._show(setting)
            return
        pool = Pool(setting, self._stream)
        u = self.user
        kwargs: dict[str, Any] = {
            "num_workers": setting.num_workers, "collate_fn": self.collate_fn,
            "pin_memory": setting.pin_memory,
            "generator": torch.Generator().manual_seed(self._seeded or 0),
        }
        if self.batch_sampler is not None:
            kwargs["batch_sampler"] = pool
        else:
            kwargs.update(sampler=pool, batch_size=None)
        if u.pin_memory_device:
            kwargs["pin_memory_device"] = u.pin_memory_device
        if setting.num_workers:
            kwargs.update(prefetch_factor=setting.prefetch_factor, persistent_workers=True,
                          worker_init_fn=u.worker_init_fn,
                          multiprocessing_context=u.multiprocessing_context)
        with warnings.catch_warnings():
            # More workers than CPUs is on purpose: items that wait pay off past the cores.
            warnings.filterwarnings("ignore", message=r"This DataLoader will create")
            warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead")
            pool.loader = self.make_loader(self.dataset, **kwargs)
            pool.iterator = iter(pool.loader)
        leave_to_us(pool.iterator)
        self._current = pool
        self._watch_pids()
        self._show(setting)
        pool.raise_failed()

    def _switch(self, target: Setting) -> None:
        assert self._current is not None
        old = self._current
        old.open = False  # it takes no more indices: it serves what it holds, then ends
        self._draining.append(old)
        self._switching = old.setting
        self._start(target)

    def _pools(self) -> list[Pool]:
        """Every pool with workers up: draining (oldest first), current, parked."""
        return [*self._draining, *(p for p in (self._current, self._parked) if p is not None)]

    def _stop_all(self) -> None:
        """Kill every pool's workers; the batches they held go back to the stream."""
        pools = self._pools()
        held = [batch for pool in pools for batch in pool.handed]
        self._draining, self._current, self._parked = [], None, None
        try:
            for pool in pools:
                pool.shutdown(kill=True)
        finally:
            if self._stream is not None:
                self._stream.requeue(held)
            self._watch_pids()

    def _on_cap(self) -> None:
        """The watchdog stopped this loader's workers: drop the largest setting running, hand
        its batches to the next pool."""
        assert self._tuner is not None
        running = [p.setting for p in self._pools() if p.setting.num_workers]
        self._stop_all()
        if self._dog is not None:
            self._dog.__exit__(None, None, None)
            self._dog = None
        if running:
            blamed = max(running, key=lambda s: (s.in_flight, s.num_workers))
            self._watch = self._tuner.crossed_cap(blamed)
            self._switching = blamed
        self._start(self._tuner.target)

    def _cap_crossed(self) -> bool:
        return self._dog is not None and self._dog.exceeded.is_set()

    def _watch_pids(self) -> None:
        """Keep the watchdog's list of this loader's workers, and run it while there are."""
        self._pids = tuple(pid for pool in self._pools() for pid in pool.pids())
        self._victims[0] = self._pids
        if self._pids and self._dog is None and self._watch:
            if self._cap is None:  # the tree now, plus 80% of the memory available now
                self._cap = default_memory_cap(self._share)
            # The watchdog's thread holds the box, not this object, which stays collectable.
            box = self._victims
            self._dog = MemoryWatchdog(self._cap, victims=lambda: box[0]).__enter__()
        elif not self._pids and self._dog is not None:
            self._dog.__exit__(None, None, None)
            self._dog = None

    def _hang(self) -> float | None:
        if self._switching is None:
            return None
        if self.options.hang_seconds is not None:
            return self.options.hang_seconds
        return max(HANG_FLOOR, 10 * self._longest)

    def _where(self) -> str:
        if self._switching is None or self._current is None:
            return ""
        return f" while the loader switched from {self._switching.label()} to " \
               f"{self._current.setting.label()}"

    def _show(self, setting: Setting) -> None:
        """``loader.num_workers`` and its neighbours read what runs now."""
        o = self._outer()
        if o is None:
            return
        o.num_workers = setting.num_workers
        o.prefetch_factor = setting.prefetch_factor
        o.pin_memory = setting.pin_memory

    def shutdown(self) -> None:
        """Stop every pool and the watchdog (the loader is done)."""
        self._epoch = None
        self._stop_all()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to stop)
            pass


class _Epoch:
    """One epoch of an online loader: what ``iter(loader)`` returns. It times each batch (the
    wait in ``next()``, and the cycle up to the next call) for the tuner."""

    def __init__(self, run: OnlineLoader, token: object) -> None:
        self._run, self._token = run, token
        self._begun = self._ended = False
        # The last batch: what served it, the wait for it (and its CPU time), when it was asked.
        self._last: tuple[Setting, float, float, float] | None = None

    def __iter__(self) -> _Epoch:
        return self

    def __len__(self) -> int:
        return len(self._run._index_sampler())

    def __next__(self) -> Any:
        run = self._run
        now = run.clock()
        if self._ended:
            raise StopIteration
        if run._epoch is not self._token:
            raise ConfigError(
                "an iterator of an autoload.DataLoader(num_workers='auto') was used after "
                "iter() was called on the loader again; one epoch runs at a time."
            )
        tuner = run._ensure()
        if self._last is not None:
            serving, wait, cpu, asked = self._last
            tuner.served(serving, wait=wait, cycle=now - asked, wait_cpu=cpu)
            self._last = None
        first, self._begun = not self._begun, True
        # The CPU time of the wait tells loading that computes from loading that waits; only
        # the tuning asks (a clock read less a batch, once settled).
        tuning = tuner.state == "tuning"
        cpu = time.thread_time() if tuning else 0.0
        try:
            batch = run.next(first=first)
        except StopIteration:
            self._ended = True
            run.end()
            raise
        served = run.serving()
        assert served is not None
        self._last = (served, run.clock() - now, time.thread_time() - cpu if tuning else 0.0,
                      now)
        return batch

    def close(self) -> None:
        if self._begun and not self._ended and self._run._epoch is self._token:
            self._run.abandon()
        self._ended = True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to stop)
            pass


def _weakly(method: Callable[[Tuner], None]) -> Callable[[Tuner], None]:
    """``method``, without keeping its object alive: the tuner it is given to belongs to that
    object, and a cycle would keep the workers up until a garbage collection."""
    ref = weakref.WeakMethod(method)

    def call(tuner: Tuner) -> None:
        bound = ref()
        if bound is not None:
            bound(tuner)

    return call
