"""Memory of the process tree, the cap watchdog, the OOM predicate and worker clean-up."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable

import psutil
import torch

from autoload.errors import ConfigError

__all__ = [
    "MemoryCapExceeded",
    "MemoryWatchdog",
    "ProcessTreeMemory",
    "format_size",
    "is_oom",
    "parse_size",
    "reap_children",
]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


class MemoryCapExceeded(Exception):
    """A trial's memory crossed its cap; the trial is infeasible, not a user error."""

    def __init__(self, kind: str, peak: int, cap: int) -> None:
        super().__init__(f"{kind} memory {format_size(peak)} crossed the cap {format_size(cap)}")
        self.kind, self.peak, self.cap = kind, peak, cap


def parse_size(text: str | int | float) -> int:
    """Bytes from a size such as ``8GiB``, ``500MB`` or a plain number of bytes.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value: float = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"a memory size must be a number with an optional unit such as 8GiB or 500MB, "
                f"but got {text!r}."
            )
        value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"a memory size must be positive, but got {text!r}.")
    return int(value)


def format_size(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error, and nothing else."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _is_helper(proc: psutil.Process) -> bool:
    # multiprocessing's resource tracker and forkserver may start during a trial and outlive it
    # by design; they are not DataLoader workers.
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False
    return "resource_tracker" in cmdline or "forkserver" in cmdline


class ProcessTreeMemory:
    """Host memory of a process and all its descendants.

    Shared pages are counted once: each process contributes its PSS (proportional set size),
    read at most every ``pss_interval`` seconds because reading it walks the page tables. In
    between, a process's PSS is extrapolated by its RSS change since the last PSS reading (RSS
    alone would count pages shared by forked workers once per worker).
    """

    def __init__(
        self, pid: int | None = None, *, pss_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = psutil.Process(pid)
        self._pss_interval = pss_interval
        self._clock = clock
        self._last: dict[int, tuple[int, int]] = {}  # pid -> (pss, rss) at the last PSS read
        self._last_pss_time = -float("inf")

    def processes(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return [self._root]

    def sample(self) -> int:
        """Bytes used by the tree now."""
        now = self._clock()
        precise = now - self._last_pss_time >= self._pss_interval
        if precise:
            self._last_pss_time = now
        total, seen = 0, set()
        for proc in self.processes():
            try:
                pid = proc.pid
                seen.add(pid)
                if precise or pid not in self._last:
                    info = proc.memory_full_info()
                    self._last[pid] = (info.pss, info.rss)
                    total += info.pss
                else:
                    pss, rss = self._last[pid]
                    total += max(0, pss + proc.memory_info().rss - rss)
            except (psutil.Error, OSError):
                continue
        for gone in set(self._last) - seen:
            del self._last[gone]
        return total


class MemoryWatchdog:
    """A thread that tracks the tree's peak memory and stops a trial that crosses the cap.

    On crossing it sets :attr:`exceeded` and kills the trial's worker processes (the children
    that were not there when the watchdog started), so a worker allocating past the cap cannot
    take the machine down; the probe's loop then raises :class:`MemoryCapExceeded`.
    """

    def __init__(self, cap: int | None, *, interval: float = 0.1,
                 memory: ProcessTreeMemory | None = None) -> None:
        self.cap = cap
        self.peak = 0
        self.exceeded = threading.Event()
        self._interval = interval
        self._memory = memory or ProcessTreeMemory()
        self._stop = threading.Event()
        self._before = {p.pid for p in self._memory.processes()}
        self._thread = threading.Thread(target=self._run, name="autoload-memory", daemon=True)

    def __enter__(self) -> MemoryWatchdog:
        self.peak = self._memory.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._check(self._memory.sample())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._check(self._memory.sample())

    def _check(self, used: int) -> None:
        self.peak = max(self.peak, used)
        if self.cap is not None and used > self.cap and not self.exceeded.is_set():
            self.exceeded.set()
            for proc in self._memory.processes():
                if proc.pid not in self._before and not _is_helper(proc):
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass

    def raise_if_exceeded(self) -> None:
        if self.exceeded.is_set() and self.cap is not None:
            raise MemoryCapExceeded("host", self.peak, self.cap)


def reap_children(before: Iterable[int], *, grace: float = 5.0) -> list[int]:
    """Wait for child processes born since ``before`` to exit; kill those that do not.

    Returns the pids that had to be killed. multiprocessing's helpers are left alone.
    """
    before = set(before)
    try:
        new = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and not _is_helper(p)]
    except psutil.Error:
        return []
    _, alive = _wait(new, grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _wait(alive, grace)
    return [p.pid for p in alive]


def _wait(procs: list[psutil.Process], timeout: float) -> tuple[list[psutil.Process],
                                                                list[psutil.Process]]:
    # torch's SIGCHLD handler raises RuntimeError in the main thread when a worker it still
    # tracks dies; while reaping, that is expected, so wait on.
    for _ in range(3):
        try:
            gone, alive = psutil.wait_procs(procs, timeout=timeout)
            return list(gone), list(alive)
        except RuntimeError:
            continue
    return [], [p for p in procs if p.is_running()]


def child_pids() -> set[int]:
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def default_memory_cap() -> int:
    """What the tree uses now plus 80% of the memory available now."""
    return ProcessTreeMemory().sample() + int(0.8 * psutil.virtual_memory().available)
