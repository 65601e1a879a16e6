"""One setting's worker pool for the online mode: a torch ``DataLoader`` fed, batch of indices by
batch of indices, from the epoch's :class:`Stream` while it is open (see :mod:`autoload.online`
for how pools hand an epoch over), and the few private parts of torch's iterator it needs.

A pool is its own loader's batch sampler: torch asks it for indices (to prefetch, or to load in
the training process without workers) and it takes them from the stream, remembering each batch
it handed out until torch serves it. Closed, it takes no more and ends once it has served what
it holds. Its wait for a batch polls (torch's ``timeout``, set for the wait only), so a dead
worker, a hang or a crossed memory cap is seen within ``poll`` seconds, in the training thread.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil

from autoload.settle import Setting

__all__ = ["END", "CapCrossed", "Pool", "PoolFault", "Stream", "leave_to_us"]

END = object()  # what a stream or a pool gives once it has nothing left


class Stream:
    """One epoch's batches of indices, each handed out once, in order."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self._front: deque[Any] = deque()

    def take(self) -> Any:
        if self._front:
            return self._front.popleft()
        return next(self._batches, END)

    def requeue(self, batches: Sequence[Any]) -> None:
        """Put batches a stopped pool held back at the head, in their order."""
        self._front.extendleft(reversed(batches))


class PoolFault(Exception):
    """A pool's workers died or hung: the loader stops every pool and raises WorkerError."""


class CapCrossed(Exception):
    """The memory watchdog stopped this loader's workers."""


class Pool:
    """One setting's workers, fed from the epoch's stream while open (see the module's doc)."""

    def __init__(self, setting: Setting, stream: Stream) -> None:
        self.setting, self.stream = setting, stream
        self.open = True
        self.handed: deque[Any] = deque()  # batches taken from the stream, not yet served
        self.loader: Any = None
        self.iterator: Any = None
        self.failed: BaseException | None = None

    def __iter__(self) -> Iterator[Any]:
        # torch asks for it at each iter() of the loader: one epoch's run of this pool.
        stream = self.stream
        while self.open and stream is self.stream:
            try:
                batch = stream.take()
            except BaseException as exc:
                # The sampler's error (or Ctrl-C) would surface inside torch, half-way through
                # building its iterator, whose workers could not then be stopped: it is raised
                # once torch is done (:meth:`raise_failed`), and this pool takes no more.
                self.failed = exc
                return
            if batch is END:
                return
            self.handed.append(batch)
            yield batch

    def raise_failed(self) -> None:
        failed, self.failed = self.failed, None
        if failed is not None:
            raise failed

    def resume(self, stream: Stream) -> None:
        """The next epoch, with the same workers."""
        self.stream, self.open = stream, True
        self.handed.clear()
        self.iterator = iter(self.loader)
        self.raise_failed()

    def pids(self) -> list[int]:
        return [w.pid for w in _workers(self.iterator) if w.pid is not None]

    def dead(self) -> list[Any]:
        return [w for w in _workers(self.iterator) if not w.is_alive()]

    def next(self, *, began: float, poll: float, hang: float | None, cap: Callable[[], bool],
             user_timeout: float) -> Any:
        """The next batch, or ``END`` once it served all it holds and has nothing to take
        (``began``: when the loop started waiting, on ``time.monotonic``)."""
        multi = self.setting.num_workers > 0
        while True:
            if multi:
                _set_timeout(self.iterator, poll)
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.raise_failed()
                return END
            except RuntimeError as exc:
                if not multi:
                    self._consumed()
                    raise
                waited = time.monotonic() - began
                if cap():
                    raise CapCrossed() from None
                if self.dead():
                    raise PoolFault(self._death()) from None
                if not str(exc).startswith("DataLoader timed out"):
                    self._consumed()
                    raise
                if hang is not None and waited > hang:
                    raise PoolFault(f"no batch came from the pool ({self.setting.label()}) for "
                                 f"{waited:.1f} s: a worker hung in the data set's __getitem__ "
                                 "or collate_fn") from None
                if user_timeout and waited > user_timeout:
                    raise RuntimeError(
                        f"DataLoader timed out after {user_timeout} seconds") from None
                continue
            except Exception:  # the user's error, raised again from a worker: torch goes on
                self._consumed()
                raise
            finally:
                if multi and self.iterator is not None:
                    _set_timeout(self.iterator, 0)
            index = self.handed.popleft()
            if self.failed is not None:
                if not isinstance(self.failed, Exception):
                    self.handed.appendleft(index)  # Ctrl-C: unserved, back to the stream
                self.raise_failed()
            return batch

    def _consumed(self) -> None:
        # torch took the failed batch off its queue: the loop will not see it, as with torch.
        if self.handed:
            self.handed.popleft()

    def _death(self) -> str:
        parts = []
        for w in self.dead():
            code = w.exitcode
            how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exit code {code}")
            parts.append(f"pid {w.pid}, {how}")
        return (f"a worker of the pool ({self.setting.label()}) died ({'; '.join(parts)}): the "
                "data set's __getitem__ or collate_fn ended the process")

    def shutdown(self, *, kill: bool) -> None:
        it, self.iterator, self.open = self.iterator, None, False
        if it is None:
            return
        if kill:
            for w in _workers(it):
                try:
                    psutil.Process(w.pid).kill()
                except (psutil.Error, TypeError):
                    pass
        _shutdown(it)


# -- torch's private parts, in one place ------------------------------------------------------
# The pools need four things torch's multiprocessing iterator does not offer publicly: its
# worker processes, a timeout for one wait, leaving its workers out of the SIGCHLD handler (so a
# death, or the watchdog's kill, is reported by next() and not raised in the middle of the
# user's step), and shutting its workers down now rather than when it is collected.

def _workers(it: Any) -> list[Any]:
    return list(getattr(it, "_workers", None) or [])


def _set_timeout(it: Any, seconds: float) -> None:
    if hasattr(it, "_timeout"):
        it._timeout = seconds


def leave_to_us(it: Any) -> None:
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(it))  # type: ignore[attr-defined]
        it._worker_pids_set = False


def _shutdown(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
