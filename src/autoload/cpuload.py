"""How much of the CPUs other processes took while the tuner measured.

A rate measured beside another busy process is the loader's share of a machine it does not have
to itself: on two cores kept busy by two other processes one configuration's rate varied by 55%
from second to second, and a model fitted to such rates predicted a tenth of what the finals
measured. So each window reads the CPU time of the CPUs this process may run on
(``/proc/stat``, per CPU) at its start and end, less what the tuner's own process tree used
(itself, its loader workers, and children it has reaped), and the rest is the others' share.
Steal time (a hypervisor giving the CPU to another guest) counts as others' work too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from autoload.memory import CLOCK_TICKS, cpu_seconds, tree_pids

__all__ = ["BUSY", "CpuReading", "others_share", "read"]

BUSY = 0.2  # other processes took at least this share of the CPUs: the machine was busy

_STAT = Path("/proc/stat")
# user nice system idle iowait irq softirq steal: every field but idle and iowait is work.
_WORK_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True, kw_only=True)
class CpuReading:
    """CPU seconds used so far: by every process on ``cpus`` CPUs, and by the tuner's tree."""

    busy: float
    own: float
    cpus: int


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_seconds(allowed: set[int] | None) -> tuple[float, int] | None:
    """Work seconds of the CPUs this process may use, summed, and how many they are."""
    try:
        lines = _STAT.read_text().splitlines()
    except OSError:
        return None
    total, cpus = 0, 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            index = int(name[3:])
            fields = [int(v) for v in rest.split()]
        except ValueError:
            continue
        if allowed is not None and index not in allowed:
            continue
        total += sum(fields[i] for i in _WORK_FIELDS if i < len(fields))
        cpus += 1
    return (total / CLOCK_TICKS, cpus) if cpus else None


def _own_seconds(root: int) -> float:
    """CPU seconds of ``root`` (with the children it has waited for: reaped workers' time
    stays counted) and its live descendants."""
    try:
        times = psutil.Process(root).cpu_times()
        mine = float(times.user + times.system + times.children_user + times.children_system)
    except psutil.Error:
        mine = 0.0
    return mine + cpu_seconds(tree_pids(root)[1:])


def read(root: int | None = None) -> CpuReading | None:
    """The CPU time so far; ``root`` is the tuner's process tree (this process by default;
    under torchrun, the agent that started every rank of the node). ``None`` where
    ``/proc/stat`` cannot be read."""
    busy = _busy_seconds(_allowed_cpus())
    if busy is None:
        return None
    return CpuReading(busy=busy[0], own=_own_seconds(os.getpid() if root is None else root),
                      cpus=busy[1])


def others_share(before: CpuReading | None, after: CpuReading | None,
                 seconds: float) -> float | None:
    """The share of the CPUs (0 to 1) that processes outside the tuner's tree used over
    ``seconds`` of wall time between two readings.

    Example:
        >>> a = CpuReading(busy=10.0, own=4.0, cpus=2)
        >>> b = CpuReading(busy=13.0, own=5.0, cpus=2)
        >>> others_share(a, b, seconds=2.0)
        0.5
    """
    if before is None or after is None or seconds <= 0 or before.cpus != after.cpus:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(1.0, max(0.0, others / (seconds * after.cpus)))
