"""The online mode's decisions: which setting wins, and which one to measure next.

Pure: it reads windows of the user's own batches (:class:`Measured`) and never a clock or a
process; :mod:`autoload.tuning` keeps the windows and the state, :mod:`autoload.online` runs the
worker pools.

**The tie rule.** A setting beats another when its rate is higher by more than
``max(MIN_GAIN, 2 x the combined standard error)``. The winner (:func:`champion`) is the
cheapest setting (fewest workers, then the lowest prefetch, then unpinned) that the fastest
one does not beat: ties go to fewer workers.

**The default planner** (:class:`Climb`) starts where it is told: a remembered answer, else no
workers (nothing to start; the window says what loading costs in the training process and how
much of it is computing). Unless loading is too cheap for workers to pay, it jumps to the worker
count that would load a batch per step, then walks the ladder of worker counts: up while each
step beats the best so far, when the loop waited on data for more than ``WAIT_SHARE`` of its
time; down while each step ties, when it did not (or when the first step up gained nothing).
Then prefetch factors above 2 (with ``prefetch_factor="auto"``, only if the loop still waits),
then ``pin_memory`` (only where it is tuned). Each setting is measured once, so a tuning takes
at most :attr:`Planner.limit` windows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from autoload.config import check_workers
from autoload.errors import ConfigError

__all__ = [
    "HANDOFF", "MIN_GAIN", "WAIT_SHARE", "Climb", "Measured", "Planner", "Schedule", "Setting",
    "Space", "beats", "by_setting", "champion",
]

WAIT_SHARE = 0.05  # below this share of its time waiting on data, the loop is not data-bound
MIN_GAIN = 0.02  # the least gain that buys a costlier setting, however quiet the machine
HANDOFF = 0.0005  # seconds: about what receiving a batch from a worker costs the loop
DEFAULT_PREFETCH = (2, 4, 8)  # with prefetch_factor="auto"
TORCH_PREFETCH = 2  # torch's default, kept when prefetch_factor is left out


@dataclass(frozen=True)
class Setting:
    """What the online mode tunes: none of it changes the batches or their order.

    Attributes:
        num_workers: Worker processes; 0 loads in the training process.
        prefetch_factor: Batches each worker loads ahead; ``None`` exactly when
            ``num_workers`` is 0.
        pin_memory: Page-locked batches, for copies to a CUDA device.
    """

    num_workers: int
    prefetch_factor: int | None = None
    pin_memory: bool = False

    def __post_init__(self) -> None:
        check_workers(self.num_workers, self.prefetch_factor)

    @property
    def in_flight(self) -> int:
        """Batches the pool holds at most: loading, or loaded and not yet served."""
        return self.num_workers * (self.prefetch_factor or 0)

    @property
    def cost(self) -> tuple[int, int, bool]:
        """What the tie rule saves: workers first, then prefetched batches, then pinning."""
        return self.num_workers, self.prefetch_factor or 0, self.pin_memory

    def label(self) -> str:
        """``w=2 pf=4 pin``."""
        parts = [f"w={self.num_workers}"]
        if self.prefetch_factor is not None:
            parts.append(f"pf={self.prefetch_factor}")
        if self.pin_memory:
            parts.append("pin")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "prefetch_factor": self.prefetch_factor,
                "pin_memory": self.pin_memory}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Setting:
        return cls(int(data["num_workers"]), data.get("prefetch_factor"),
                   bool(data.get("pin_memory", False)))


@dataclass(frozen=True, kw_only=True)
class Space:
    """The values the online mode may set; one value where the user fixed it."""

    workers: tuple[int, ...]
    prefetch: tuple[int, ...]
    pin: tuple[bool, ...]

    @classmethod
    def build(cls, *, cpus: int, num_workers: int | Literal["auto"],
              prefetch_factor: int | None | Literal["auto"],
              pin_memory: bool | Literal["auto"], cuda: bool) -> Space:
        """The ladder of worker counts (0, 1, then powers of two, and 1x, 2x and 4x ``cpus``,
        up to 4x ``cpus``: workers past the cores pay off on items that wait), the prefetch
        factors (2, 4, 8 with ``"auto"``; left out, torch's 2: a deeper prefetch moves rates by
        a few percent at most, and each try costs a pool of workers) and pinning (both, only
        toward CUDA)."""
        if num_workers == "auto":
            top = 4 * cpus
            ladder = {0, 1, cpus, 2 * cpus, top}
            power = 2
            while power < top:
                ladder.add(power)
                power *= 2
            workers = tuple(sorted(w for w in ladder if w <= top))
        else:
            workers = (num_workers,)
        prefetch = (DEFAULT_PREFETCH if prefetch_factor == "auto"
                    else (prefetch_factor or TORCH_PREFETCH,))
        pin: tuple[bool, ...] = ((False, True) if cuda else (False,)) \
            if pin_memory == "auto" else (bool(pin_memory),)
        return cls(workers=workers, prefetch=prefetch, pin=pin)

    def setting(self, workers: int, prefetch: int | None, pin: bool) -> Setting:
        return Setting(workers, (prefetch or self.prefetch[0]) if workers else None, pin)

    def recipe(self, cpus: int) -> Setting:
        """The common hand-tuned recipe, in this space: workers = CPUs, prefetch 2, pinned
        toward CUDA."""
        workers = min(self.workers, key=lambda w: (abs(w - cpus), -w))
        prefetch = min(self.prefetch, key=lambda p: (abs(p - 2), p))
        return self.setting(workers, prefetch, max(self.pin))

    def start(self, cpus: int) -> Setting:
        """Where a first tuning starts: no workers when their count is tuned (nothing to start,
        and its window says what loading costs, see :class:`Climb`), else the recipe."""
        recipe = self.recipe(cpus)
        return self.setting(0, None, recipe.pin_memory) if 0 in self.workers and len(
            self.workers) > 1 else recipe

    def contains(self, setting: Setting) -> bool:
        return (setting.num_workers in self.workers and setting.pin_memory in self.pin
                and (setting.num_workers == 0 or setting.prefetch_factor in self.prefetch))

    @property
    def max_in_flight(self) -> int:
        return max(self.workers) * max(self.prefetch)


@dataclass(frozen=True, kw_only=True)
class Measured:
    """One window: a setting's batches, as the training loop saw them.

    Attributes:
        setting: What served the batches.
        batches: Batches in the window.
        seconds: Their cycles added up: each the wait in ``next()`` plus the user's step.
        waited: The part of ``seconds`` the loop spent waiting in ``next()``.
        waited_cpu: The training thread's CPU time in ``next()``: without workers, most of
            ``waited`` for items that compute, little for items that wait (a read, a sleep).
        noise: The relative standard error of the window's rate.
        feasible: False for a setting whose pool crossed the memory cap (its rate is void).
        at: Batches the loader had served when the window closed.
    """

    setting: Setting
    batches: int
    seconds: float
    waited: float
    noise: float
    waited_cpu: float = 0.0
    feasible: bool = True
    at: int = 0

    @property
    def rate(self) -> float:
        """Batches per second."""
        return self.batches / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        return self.waited / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting.to_dict(), "batches": self.batches,
                "seconds": self.seconds, "waited": self.waited, "waited_cpu": self.waited_cpu,
                "noise": self.noise, "feasible": self.feasible, "at": self.at}


def _pooled(windows: Sequence[Measured]) -> Measured:
    """The windows of one setting as one."""
    first = windows[0]
    if len(windows) == 1:
        return first
    noise = math.sqrt(sum(w.noise ** 2 for w in windows)) / len(windows)
    return Measured(setting=first.setting, batches=sum(w.batches for w in windows),
                    seconds=sum(w.seconds for w in windows),
                    waited=sum(w.waited for w in windows),
                    waited_cpu=sum(w.waited_cpu for w in windows), noise=noise,
                    feasible=all(w.feasible for w in windows), at=windows[-1].at)


def by_setting(measured: Iterable[Measured]) -> dict[Setting, Measured]:
    """The windows of each setting, pooled into one."""
    groups: dict[Setting, list[Measured]] = {}
    for m in measured:
        groups.setdefault(m.setting, []).append(m)
    return {s: _pooled(ws) for s, ws in groups.items()}


def beats(a: Measured, b: Measured) -> bool:
    """Whether ``a`` is faster than ``b`` by more than the noise of both (and ``MIN_GAIN``)."""
    margin = max(MIN_GAIN, 2 * math.hypot(a.noise, b.noise))
    return a.rate > b.rate * (1 + margin)


def champion(measured: Iterable[Measured]) -> Setting | None:
    """The cheapest feasible setting the fastest one does not beat (see the module's doc)."""
    pooled = [m for m in by_setting(measured).values() if m.feasible and m.batches]
    if not pooled:
        return None
    top = max(pooled, key=lambda m: m.rate)
    return min((m for m in pooled if not beats(top, m)), key=lambda m: m.setting.cost).setting


class Planner(ABC):
    """Chooses what the online loader measures next. Implement it to steer the tuning.

    Contract: :meth:`propose` is a function of its arguments (the tuner may call it again with
    the same ones); it returns ``None`` once it has nothing more to try, and the tuner then
    settles on :func:`champion` of the windows. It proposes at most :attr:`limit` settings per
    tuning (the tuner settles after that many windows whatever it proposes). A proposal that
    crossed the memory cap, or that has as many workers and as deep a prefetch as one that did,
    is recorded as infeasible without being run.
    """

    @abstractmethod
    def propose(self, current: Setting, measured: Sequence[Measured]) -> Setting | None:
        """The next setting to measure. ``current`` is what the loader runs now (where a
        tuning starts); ``measured`` the windows of this tuning, oldest first."""

    @property
    @abstractmethod
    def limit(self) -> int:
        """The most windows one tuning takes."""


class Schedule(Planner):
    """Exactly these settings, in this order (a setting may come back), then the champion.

    Example:
        >>> plan = Schedule([Setting(0), Setting(2, 2)])
        >>> plan.propose(Setting(0), []).label(), plan.limit
        ('w=0', 2)
    """

    def __init__(self, settings: Sequence[Setting]) -> None:
        if not settings:
            raise ConfigError("a schedule needs at least one setting, but got none.")
        self.settings = tuple(settings)

    def propose(self, current: Setting, measured: Sequence[Measured]) -> Setting | None:
        return self.settings[len(measured)] if len(measured) < len(self.settings) else None

    @property
    def limit(self) -> int:
        return len(self.settings)


class Climb(Planner):
    """The default planner (see the module's doc).

    A climb that starts without workers first asks whether workers can pay at all: they take
    the loading off the loop but cost a hand-off of about ``HANDOFF`` seconds a batch, so if the
    loading less the hand-off is under ``WAIT_SHARE`` of the loop's time, they cannot, and the
    climb goes straight to pinning. Otherwise it jumps to the rung that would load a
    batch per step: ``1.25 x load / step`` workers, at most the CPUs for items that computed
    (the training thread's CPU time was most of the wait), at most the ladder's top for items
    that waited (and no more than the loop can receive: one a ``HANDOFF``). From there it
    walks.

    Example:
        >>> space = Space.build(cpus=2, num_workers="auto", prefetch_factor="auto",
        ...                     pin_memory=False, cuda=False)
        >>> plan = Climb(space, cpus=2)
        >>> items_that_wait = Measured(setting=Setting(0), batches=10, seconds=1.0,
        ...                            waited=0.8, waited_cpu=0.01, noise=0.01)
        >>> plan.propose(Setting(0), [items_that_wait]).label()
        'w=8 pf=2'
    """

    def __init__(self, space: Space, *, cpus: int) -> None:
        self.space, self.cpus = space, cpus

    @property
    def limit(self) -> int:
        return len(self.space.workers) + len(self.space.prefetch) - 1 + len(self.space.pin) - 1

    def propose(self, current: Setting, measured: Sequence[Measured]) -> Setting | None:
        if not measured:
            return current
        space, start = self.space, measured[0].setting
        seen = by_setting(measured)
        pin = start.pin_memory
        ladder = [space.setting(w, start.prefetch_factor, pin) for w in space.workers]
        workers = start in ladder
        if workers and start.num_workers == 0 and seen[start].feasible:
            jump = self._jump(seen[start], ladder)
            if jump is None:
                workers = False  # loading is too cheap for workers to pay
            elif jump not in seen:
                return jump
            elif seen[jump].feasible and beats(seen[start], seen[jump]):
                # The hand-off costs more than the loading it saves: more workers pay it too.
                workers = False
            else:
                start = jump
        if workers:
            if (step := self._workers(seen, ladder, ladder.index(start))) is not None:
                return step
        best = champion(m for m in measured if m.setting in ladder) or start
        if best.num_workers and best in seen and seen[best].wait_share > WAIT_SHARE:
            deeper = [replace(best, prefetch_factor=p) for p in space.prefetch
                      if p > (best.prefetch_factor or 0)]
            if (step := _walk(seen, best, deeper, up=True)[0]) is not None:
                return step
        if len(space.pin) > 1:
            best = champion(m for m in measured if m.setting.pin_memory == pin) or start
            flipped = replace(best, pin_memory=not pin)
            if flipped not in seen:
                return flipped
        return None

    def _jump(self, alone: Measured, ladder: list[Setting]) -> Setting | None:
        """From a window without workers: the rung whose workers would load a batch per step,
        or ``None`` when loading is too cheap for any."""
        load = alone.waited / alone.batches
        step = (alone.seconds - alone.waited) / alone.batches
        if (load - HANDOFF) / (load + step) <= WAIT_SHARE:
            return None  # what workers could take off the loop, less the hand-off, is too little
        computes = alone.waited_cpu >= 0.5 * alone.waited
        top = self.cpus if computes else ladder[-1].num_workers
        # The loop takes a batch per step, and no faster than it can receive one.
        want = max(1, min(top, math.ceil(1.25 * load / max(step, HANDOFF))))
        return next((s for s in ladder if s.num_workers >= want), ladder[-1])

    @staticmethod
    def _workers(seen: dict[Setting, Measured], ladder: list[Setting], i: int) -> Setting | None:
        """The next step of the walk along the worker ladder from rung ``i``, or ``None`` when
        it has ended. A start that crossed the memory cap hands the walk to the next rung
        down."""
        while not seen[ladder[i]].feasible:
            if i == 0:
                return None
            i -= 1
            if ladder[i] not in seen:
                return ladder[i]
        origin = ladder[i]
        if seen[origin].wait_share > WAIT_SHARE:  # waiting on data: more workers may help
            step, moved = _walk(seen, origin, ladder[i + 1:], up=True)
            if step is not None or moved:
                return step
        return _walk(seen, origin, ladder[:i][::-1], up=False)[0]


def _walk(seen: dict[Setting, Measured], origin: Setting, steps: Sequence[Setting], *,
          up: bool) -> tuple[Setting | None, bool]:
    """Replay a walk from ``origin`` along ``steps``: the first step not measured yet (or
    ``None`` when the walk has ended), and whether any step was taken. Up, a step is taken when
    it beats the fastest so far; down, when the fastest so far does not beat it (a tie goes to
    the cheaper setting)."""
    if origin not in seen or not seen[origin].feasible:
        return None, False
    top, moved = seen[origin], False
    for step in steps:
        if step not in seen:
            return step, moved
        found = seen[step]
        taken = beats(found, top) if up else not beats(top, found)
        if not found.feasible or not taken:
            return None, moved
        moved = True
        if found.rate > top.rate:
            top = found
    return None, moved
