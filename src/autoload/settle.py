"""The online mode's decisions: which loader setting to run next, when a window of the user's
own batches has measured it, which setting wins, and when a settled loader tunes again.

Pure: fed the seconds the training loop waited for each batch and the whole cycle of each
batch (the wait plus the user's step), never a clock or a process. :mod:`autoload.online`
runs the worker pools and feeds it.

**What is measured.** A window is a run of batches served by one setting's pool, after its
warm-up (the first ``max(2, workers x prefetch)`` batches it serves: its workers' start and the
batches they had ready, which would flatter it); it ends once it holds ``min_batches`` batches
and ``min_seconds`` of cycles (or sooner, once its rate varies by less than ``SURE_NOISE``
over ``SURE_BLOCKS`` blocks: a steady pipeline needs no long look; or once it runs below
``LOSING`` times the best window so far: it cannot win), or at ``max_batches``.
Its rate is batches over the sum of their cycles, its noise the spread of that rate over blocks
of the window (a relative standard error).

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
at most :attr:`Planner.limit` windows, and :func:`settle_bound` batches.

**Holding.** Once settled, the first whole epoch at the settled setting is the reference; two
later epochs in a row slower by more than ``max(DROP, 3 x its noise)`` while the loop waited on
data start a new climb from the settled setting. A setting whose pool crossed the memory cap is
dropped with every setting that has as many workers and as deep a prefetch.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from autoload.errors import ConfigError

__all__ = [
    "DROP", "HANDOFF", "MIN_GAIN", "SLOW_EPOCHS", "WAIT_SHARE", "Climb", "Measured",
    "OnlineOptions", "Planner", "Schedule", "Setting", "Space", "Tuner", "Tuning", "beats",
    "champion", "settle_bound",
]

WAIT_SHARE = 0.05  # below this share of its time waiting on data, the loop is not data-bound
MIN_GAIN = 0.02  # the least gain that buys a costlier setting, however quiet the machine
HANDOFF = 0.0005  # seconds: about what receiving a batch from a worker costs the loop
SURE_NOISE, SURE_BLOCKS = 0.01, 4  # a window whose rate is this sure over so many blocks ends
LOSING = 0.75  # ... and one this far below the best window of the tuning, after min_batches
DROP = 0.10  # epochs this much slower than the reference, waiting on data: tune again
SLOW_EPOCHS = 2  # ... so many in a row (one slow epoch may be another process's burst)
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
        if self.num_workers < 0:
            raise ValueError(f"`num_workers >= 0` must hold, but got {self.num_workers=}.")
        if (self.num_workers == 0) != (self.prefetch_factor is None):
            raise ValueError(
                "`prefetch_factor` must be set exactly when `num_workers > 0`, but got "
                f"({self.num_workers=}, {self.prefetch_factor=})."
            )
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ValueError(f"`prefetch_factor >= 1` must hold, but got {self.prefetch_factor=}.")

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


def _by_setting(measured: Iterable[Measured]) -> dict[Setting, Measured]:
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
    pooled = [m for m in _by_setting(measured).values() if m.feasible and m.batches]
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
        seen = _by_setting(measured)
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


@dataclass(frozen=True, kw_only=True)
class OnlineOptions:
    """Knobs of ``autoload.DataLoader(num_workers="auto", online=OnlineOptions(...))``; the
    defaults suit training. Tests and experiments inject the planner and the clock.

    Attributes:
        planner: What to measure, in which order; ``None`` for :class:`Climb`.
        clock: The seconds the measurements read (monotonic). Deadlines use real time.
        cpus: The CPUs this process may use; ``None`` for its share of the node's usable ones.
        min_batches: A window's least batches.
        max_batches: A window's most batches.
        min_seconds: A window's least seconds (unless ``max_batches`` comes first).
        hang_seconds: While the loader switches, a batch that takes this long means a hung
            worker; ``None`` for ``max(60 s, 10 x the longest wait so far)``.
        poll_seconds: How often a wait for a batch checks the workers and the memory cap.
    """

    planner: Planner | None = None
    clock: Callable[[], float] | None = None
    cpus: int | None = None
    min_batches: int = 8
    max_batches: int = 64
    min_seconds: float = 0.25
    hang_seconds: float | None = None
    poll_seconds: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_batches <= self.max_batches:
            raise ConfigError(
                "`1 <= min_batches <= max_batches` must hold, but got "
                f"({self.min_batches=}, {self.max_batches=})."
            )
        if self.poll_seconds <= 0 or self.min_seconds < 0:
            raise ConfigError(f"poll_seconds must be positive and min_seconds not negative, "
                              f"but got ({self.poll_seconds=}, {self.min_seconds=}).")
        if self.cpus is not None and self.cpus < 1:
            raise ConfigError(f"`cpus >= 1` must hold, but got {self.cpus=}.")


def warmup(setting: Setting) -> int:
    """Batches a new pool serves before its window starts: one round of its workers' start and
    every batch they had ready (served at the step's pace, they would flatter it)."""
    return max(2, setting.in_flight)


def settle_bound(planner: Planner, space: Space, options: OnlineOptions) -> int:
    """The most batches one tuning takes: per window, the last pool's batches in flight
    (served first), the new pool's warm-up and the window."""
    most = space.max_in_flight
    return planner.limit * (most + max(2, most) + options.max_batches)


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """Where an online loader stands (``loader.tuning``).

    Attributes:
        state: ``"tuning"`` while windows are measured, ``"settled"`` after.
        setting: What the loader runs now, or is switching to.
        serving: What served the last batch (the last setting's pool while it hands over).
        settled: The answer of the last tuning; ``None`` before the first settles.
        rate: The settled setting's batches per second in its windows.
        batches: Batches served so far.
        batches_to_settle: Batches the last tuning took; ``None`` before the first settles.
        bound: The most batches a tuning takes (:func:`settle_bound`).
        windows: Every window measured, across tunings.
        dropped: Settings whose pool crossed the memory cap.
        retunes: Tunings started again after an epoch ran slower than the settled rate.
        epochs: Epochs served to their end.
        cached: The cache file the first tuning started from, if one.
        stored: The cache file the settled answer went to, if one.
        workers: The worker counts it may set (one where the user fixed it).
    """

    state: Literal["tuning", "settled"]
    setting: Setting
    serving: Setting | None
    settled: Setting | None
    rate: float | None
    batches: int
    batches_to_settle: int | None
    bound: int
    windows: tuple[Measured, ...]
    dropped: tuple[Setting, ...]
    retunes: int
    epochs: int
    cached: str | None = None
    stored: str | None = None
    workers: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state, "setting": self.setting.to_dict(),
            "settled": None if self.settled is None else self.settled.to_dict(),
            "rate": self.rate, "batches": self.batches,
            "batches_to_settle": self.batches_to_settle, "bound": self.bound,
            "windows": [w.to_dict() for w in self.windows],
            "dropped": [d.to_dict() for d in self.dropped], "retunes": self.retunes,
            "epochs": self.epochs, "cached": self.cached, "stored": self.stored,
            "workers": list(self.workers),
        }


class _Blocks:
    """Cycles added up, with their rate over blocks of ``size`` batches (for the noise)."""

    def __init__(self, size: int) -> None:
        self.size, self.batches, self.seconds, self.waited = size, 0, 0.0, 0.0
        self.waited_cpu = 0.0
        self.rates: list[float] = []
        self._n, self._s = 0, 0.0

    def add(self, wait: float, cycle: float, wait_cpu: float = 0.0) -> None:
        self.batches += 1
        self.seconds += cycle
        self.waited += wait
        self.waited_cpu += wait_cpu
        self._n += 1
        self._s += cycle
        if self._n == self.size:
            if self._s > 0:
                self.rates.append(self._n / self._s)
            self._n, self._s = 0, 0.0

    @property
    def noise(self) -> float:
        if len(self.rates) < 2:
            return 0.0
        mean = statistics.fmean(self.rates)
        return statistics.stdev(self.rates) / mean / math.sqrt(len(self.rates)) if mean else 0.0

    def measured(self, setting: Setting, at: int) -> Measured:
        return Measured(setting=setting, batches=self.batches, seconds=self.seconds,
                        waited=self.waited, waited_cpu=self.waited_cpu, noise=self.noise,
                        at=at)


@dataclass
class _Epoch:
    blocks: _Blocks = field(default_factory=lambda: _Blocks(16))
    mixed: bool = False  # a batch came from another setting than the settled one


class Tuner:
    """The online mode's state machine. :meth:`served` after every batch (which setting's pool
    served it, the wait in ``next()``, the whole cycle); :attr:`target` is what the loader
    should run; :meth:`crossed_cap` when a pool crossed the memory cap; :meth:`epoch_begin`
    and :meth:`epoch_end` around each epoch.
    """

    def __init__(self, *, start: Setting, planner: Planner, space: Space,
                 options: OnlineOptions,
                 on_settle: Callable[[Tuner], None] | None = None) -> None:
        self.planner, self.space, self.options = planner, space, options
        self.on_settle = on_settle
        self.state: Literal["tuning", "settled"] = "tuning"
        self.target = start
        self.settled: Setting | None = None
        self.rate: float | None = None
        self.batches = 0
        self.batches_to_settle: int | None = None
        self.retunes = 0
        self.epochs = 0
        self.dropped: list[Setting] = []
        self.history: list[Measured] = []
        self._measured: list[Measured] = []
        self._began = 0
        self._served_by_target = 0
        self._window = _Blocks(max(4, start.num_workers))
        self._epoch = _Epoch()
        self._reference: Measured | None = None
        self._slow = 0
        self.bound = settle_bound(planner, space, options)
        self._propose()

    # -- events -------------------------------------------------------------------------------

    def served(self, setting: Setting, *, wait: float, cycle: float,
               wait_cpu: float = 0.0) -> None:
        """A batch from the pool of ``setting``: the loop waited ``wait`` seconds for it (its
        thread computing ``wait_cpu`` of them), and ``cycle`` seconds passed from asking for it
        to asking for the next."""
        self.batches += 1
        self._epoch.blocks.add(wait, cycle)
        if setting != self.settled:
            self._epoch.mixed = True
        if self.state != "tuning" or setting != self.target:
            return
        self._served_by_target += 1
        if self._served_by_target <= warmup(setting):
            return
        self._window.add(wait, cycle, wait_cpu)
        w = self._window
        if w.batches >= self.options.max_batches or (w.batches >= self.options.min_batches
                                                     and self._enough(w)):
            self._record(w.measured(setting, self.batches))
            self._propose()

    def crossed_cap(self, setting: Setting) -> bool:
        """The pool of ``setting`` crossed the memory cap: drop it (and every setting with as
        many workers and as deep a prefetch). False when nothing could be dropped (no workers,
        or nothing else in the space): the loader then keeps it, unwatched."""
        if setting.num_workers == 0 or not any(
                not self._excluded(s, extra=setting) for s in self._fallbacks()):
            return False
        self.dropped.append(setting)
        self._record(Measured(setting=setting, batches=0, seconds=0.0, waited=0.0, noise=0.0,
                              feasible=False, at=self.batches))
        if self.state == "tuning":
            if self._excluded(self.target):
                self._propose()
        elif self.settled is not None and self._excluded(self.settled):
            self._retune(self._below(self.settled))
        return True

    def epoch_begin(self) -> None:
        self._epoch = _Epoch()

    def epoch_end(self) -> None:
        """An epoch served to its end: once settled, compare its rate with the reference."""
        self.epochs += 1
        epoch, self._epoch = self._epoch, _Epoch()
        if self.state != "settled" or epoch.mixed or not epoch.blocks.batches:
            return
        assert self.settled is not None
        seen = epoch.blocks.measured(self.settled, self.batches)
        if self._reference is None:
            self._reference = seen
            return
        ref = self._reference
        slow = (seen.rate < ref.rate * (1 - max(DROP, 3 * ref.noise))
                and seen.wait_share > WAIT_SHARE)
        self._slow = self._slow + 1 if slow else 0
        if self._slow >= SLOW_EPOCHS:
            self._retune(self.settled)

    # -- decisions ----------------------------------------------------------------------------

    def _record(self, measured: Measured) -> None:
        self._measured.append(measured)
        self.history.append(measured)

    def _enough(self, window: _Blocks) -> bool:
        """Whether a window of ``min_batches`` or more may end (see the module's doc)."""
        if window.seconds >= self.options.min_seconds:
            return True
        if len(window.rates) >= SURE_BLOCKS and window.noise <= SURE_NOISE:
            return True
        best = max((m.rate for m in self._measured if m.feasible and m.batches), default=None)
        return (best is not None and window.seconds > 0
                and window.batches / window.seconds < LOSING * best)

    def _propose(self) -> None:
        proposal = None
        while len(self._measured) < self.planner.limit:
            proposal = self.planner.propose(self.target, tuple(self._measured))
            if proposal is None:
                break
            if self.space.contains(proposal) and not self._excluded(proposal):
                break
            # Out of the space, or as large as a setting that crossed the cap: void, not run.
            self._record(Measured(setting=proposal, batches=0, seconds=0.0, waited=0.0,
                                  noise=0.0, feasible=False, at=self.batches))
            proposal = None
        if proposal is None:
            self._settle()
            return
        if proposal != self.target:
            self._served_by_target = 0
        self.target = proposal
        self._window = _Blocks(max(4, proposal.num_workers))

    def _settle(self) -> None:
        best = champion(self._measured)
        if best is None:  # everything measured crossed the cap
            best = self._below(self.target) if self._excluded(self.target) else self.target
        pooled = _by_setting(self._measured).get(best)
        self.state, self.settled, self.target = "settled", best, best
        self.rate = pooled.rate if pooled is not None and pooled.feasible else None
        self.batches_to_settle = self.batches - self._began
        self._reference, self._slow = None, 0
        if self.on_settle is not None:
            self.on_settle(self)

    def _retune(self, start: Setting) -> None:
        self.state, self.retunes = "tuning", self.retunes + 1
        self._measured, self._began = [], self.batches
        keep = start == self.target
        self.target = start
        self._propose()
        if keep and self.target == start:  # already running and warm
            self._served_by_target = warmup(start)

    def _below(self, setting: Setting) -> Setting:
        """The next setting down the worker ladder that is not dropped, else the cheapest."""
        for w in sorted((w for w in self.space.workers if w < setting.num_workers),
                        reverse=True):
            lower = self.space.setting(w, setting.prefetch_factor, setting.pin_memory)
            if not self._excluded(lower):
                return lower
        return min((s for s in self._fallbacks() if not self._excluded(s)),
                   key=lambda s: s.cost, default=setting)

    def _fallbacks(self) -> list[Setting]:
        s = self.space
        return [s.setting(w, p if w else None, pin)
                for w in s.workers for p in s.prefetch for pin in s.pin]

    def _excluded(self, setting: Setting, extra: Setting | None = None) -> bool:
        if setting.num_workers == 0:
            return False
        dropped = self.dropped + ([extra] if extra is not None else [])
        return any(setting.num_workers >= d.num_workers
                   and (setting.prefetch_factor or 0) >= (d.prefetch_factor or 0)
                   for d in dropped)

    def status(self, serving: Setting | None, *, cached: str | None = None,
               stored: str | None = None) -> Tuning:
        return Tuning(state=self.state, setting=self.target, serving=serving,
                      settled=self.settled, rate=self.rate, batches=self.batches,
                      batches_to_settle=self.batches_to_settle, bound=self.bound,
                      windows=tuple(self.history), dropped=tuple(self.dropped),
                      retunes=self.retunes, epochs=self.epochs, cached=cached, stored=stored,
                      workers=self.space.workers)
