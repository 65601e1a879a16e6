"""The online tuning's state machine: the windows of the user's own batches, when one is
measured, when to switch, settle, drop a setting over the memory cap and tune again.

Pure: :class:`Tuner` is fed the seconds the training loop waited for each batch and the whole
cycle of each batch (the wait plus the user's step), never a clock or a process;
:mod:`autoload.online` runs the worker pools and feeds it, :mod:`autoload.settle` decides which
setting wins and what to measure next.

**What is measured.** A window is a run of batches served by one setting's pool, after its
warm-up (the first ``max(2, workers x prefetch)`` batches it serves: its workers' start and the
batches they had ready, which would flatter it); it ends once it holds ``min_batches`` batches
and ``min_seconds`` of cycles (or sooner, once its rate varies by less than ``SURE_NOISE``
over ``SURE_BLOCKS`` blocks: a steady pipeline needs no long look; or once it runs below
``LOSING`` times the best window so far: it cannot win), or at ``max_batches``.
Its rate is batches over the sum of their cycles, its noise the spread of that rate over blocks
of the window (a relative standard error). A tuning takes at most the planner's
:attr:`~autoload.settle.Planner.limit` windows, and :func:`settle_bound` batches.

**Holding.** Once settled, the first whole epoch at the settled setting is the reference; two
later epochs in a row slower by more than ``max(DROP, 3 x its noise)`` while the loop waited on
data start a new climb from the settled setting. A setting whose pool crossed the memory cap is
dropped with every setting that has as many workers and as deep a prefetch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from autoload.errors import ConfigError
from autoload.settle import (
    WAIT_SHARE,
    Measured,
    Planner,
    Setting,
    Space,
    by_setting,
    champion,
)

__all__ = ["DROP", "SLOW_EPOCHS", "OnlineOptions", "Tuner", "Tuning", "settle_bound", "warmup"]

SURE_NOISE, SURE_BLOCKS = 0.01, 4  # a window whose rate is this sure over so many blocks ends
LOSING = 0.75  # ... and one this far below the best window of the tuning, after min_batches
DROP = 0.10  # epochs this much slower than the reference, waiting on data: tune again
SLOW_EPOCHS = 2  # ... so many in a row (one slow epoch may be another process's burst)


@dataclass(frozen=True, kw_only=True)
class OnlineOptions:
    """Knobs of ``autoload.DataLoader(num_workers="auto", online=OnlineOptions(...))``; the
    defaults suit training. Tests and experiments inject the planner and the clock.

    Attributes:
        planner: What to measure, in which order; ``None`` for
            :class:`~autoload.settle.Climb`.
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
        pooled = by_setting(self._measured).get(best)
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
