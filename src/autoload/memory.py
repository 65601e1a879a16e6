"""Memory of the process tree, the cap watchdog, the OOM predicate and worker clean-up."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import torch

# MemoryCapExceeded and format_size live in errors.py; still importable from here.
from autoload.errors import ConfigError, MemoryCapExceeded, format_size

__all__ = [
    "MemoryCapExceeded",
    "cpu_seconds",
    "tree_pids",
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


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PROC = Path("/proc")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from ``/proc/PID/task/*/children`` (cheap: psutil's
    ``children()`` scans every process on the machine)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def tree_pids(root: int | None = None) -> list[int]:
    """``root`` (this process by default) and all its descendants."""
    root = os.getpid() if root is None else root
    if not _PROC.is_dir():
        try:
            proc = psutil.Process(root)
            return [root, *(p.pid for p in proc.children(recursive=True))]
        except psutil.Error:
            return [root]
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(psutil.Process(pid).memory_full_info().pss)
    except (psutil.Error, OSError, AttributeError):
        return _rss(pid)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds the processes ``pids`` have used (those that are gone count
    nothing)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except (psutil.Error, OSError):
                continue
    return total


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc time unit


class ProcessTreeMemory:
    """Host memory of a process and all its descendants, cheap to sample.

    Shared pages are counted once: each process contributes its PSS (proportional set size).
    PSS is costly to read: the kernel walks the page tables, about 4 ms for a process with
    torch loaded, on cores the training loop needs. So PSS is read for at most one process per
    ``pss_interval`` seconds (the one read longest ago), and a process's PSS in between is its
    last PSS plus its RSS change since. A worker seen for the first time is assumed to share
    as much as a sibling read before it (its RSS times the sibling's PSS/RSS ratio), until its
    turn comes: forked workers start alike. RSS alone would count the pages forked workers
    share with their parent once per worker.
    """

    def __init__(
        self, pid: int | None = None, *, pss_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = os.getpid() if pid is None else pid
        self._pss_interval = pss_interval
        self._clock = clock
        self._last: dict[int, tuple[int, int, float]] = {}  # pid -> (pss, rss, when read)
        self._last_read = -float("inf")

    def pids(self) -> list[int]:
        return tree_pids(self._root)

    def sample(self) -> int:
        """Bytes used by the tree now."""
        now = self._clock()
        rss = {pid: r for pid in self.pids() if (r := _rss(pid)) is not None}
        for gone in set(self._last) - set(rss):
            del self._last[gone]
        unread = [pid for pid in rss if pid not in self._last]
        if unread and (self._root in unread or not self._ratio()):
            self._read_pss(unread[0], rss[unread[0]], now)
        elif now - self._last_read >= self._pss_interval:
            oldest = min(rss, key=lambda pid: self._last[pid][2] if pid in self._last else -1.0)
            self._read_pss(oldest, rss[oldest], now)
        ratio = self._ratio() or 1.0
        total = 0
        for pid, r in rss.items():
            if pid in self._last:
                pss, then, _ = self._last[pid]
                total += max(0, pss + r - then)
            else:
                total += int(r * ratio)
        return total

    def _read_pss(self, pid: int, rss: int, now: float) -> None:
        pss = _pss(pid)
        if pss is not None:
            self._last[pid] = (pss, rss, now)
            self._last_read = now

    def _ratio(self) -> float | None:
        """PSS over RSS of the workers read so far (the root process aside)."""
        ratios = [pss / rss for pid, (pss, rss, _) in self._last.items()
                  if pid != self._root and rss > 0]
        return max(ratios) if ratios else None


class MemoryWatchdog:
    """A thread that tracks the tree's peak memory (four times a second) and stops a trial
    that crosses the cap.

    On crossing it sets :attr:`exceeded` and kills the trial's worker processes (the children
    that were not there when the watchdog started, or the pids ``victims()`` returns when
    given), so a worker allocating past the cap cannot take the machine down; the probe's loop
    then raises :class:`MemoryCapExceeded`. ``victims`` is for a watchdog that runs beside
    code that is not autoload's (the online loader's, in the user's training loop): it kills
    the workers autoload started and nothing else.
    """

    def __init__(self, cap: int | None, *, interval: float = 0.25,
                 memory: ProcessTreeMemory | None = None,
                 victims: Callable[[], Iterable[int]] | None = None) -> None:
        self.cap = cap
        self.peak = 0
        self.exceeded = threading.Event()
        self._interval = interval
        self._memory = memory or ProcessTreeMemory()
        self._victims = victims
        self._stop = threading.Event()
        self._before = set(self._memory.pids())
        self.cpu_seconds = 0.0  # what the watchdog's own thread used: its cost to the trial
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
        began = time.thread_time()
        while not self._stop.wait(self._interval):
            self._check(self._memory.sample())
        self.cpu_seconds = time.thread_time() - began

    def _check(self, used: int) -> None:
        self.peak = max(self.peak, used)
        if self.cap is not None and used > self.cap and not self.exceeded.is_set():
            self.exceeded.set()
            chosen = (list(self._victims()) if self._victims is not None
                      else [pid for pid in self._memory.pids() if pid not in self._before])
            for pid in chosen:
                try:
                    proc = psutil.Process(pid)
                    if not _is_helper(proc):
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
    return set(tree_pids()[1:])


def default_memory_cap(share: int = 1) -> int:
    """What the tree uses now plus 80% of the memory available now, of which this process's
    tree gets one ``share`` (the ranks of a job on one node divide it)."""
    available = 0.8 * psutil.virtual_memory().available / max(1, share)
    return ProcessTreeMemory().sample() + int(available)
