"""The run's time budget: when the run ends, what the search keeps back for the final
re-measure, and the margin no plan may use."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["Budget"]

MARGIN = 0.05  # of the budget, left unplanned: a measurement can overrun by a step
FINAL_SHARE_MAX = 0.4  # of the budget, at most, kept for the final re-measure


class Budget:
    """The whole run's time, in one place.

    ``seconds=None`` means no time limit (a trial count ends the search): every deadline is
    then infinite and nothing is held back.

    Example:
        >>> budget = Budget(60.0, start=0.0, clock=lambda: 10.0)
        >>> budget.end, budget.left()
        (57.0, 47.0)
        >>> budget.keep_for_final(30.0); budget.reserve
        24.0
    """

    def __init__(self, seconds: float | None, *, start: float,
                 clock: Callable[[], float]) -> None:
        self.seconds, self.start, self.clock = seconds, start, clock
        self.reserve = 0.0

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    @property
    def end(self) -> float:
        """When every measurement must be over: the budget less its margin."""
        if self.seconds is None:
            return math.inf
        return self.start + (1 - MARGIN) * self.seconds

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds until :attr:`end`."""
        return self.end - self.clock()

    def search_left(self) -> float:
        """Seconds the search may still use: what is left less the final's reserve."""
        return self.left() - self.reserve

    def keep_for_final(self, wanted: float) -> None:
        """Hold ``wanted`` seconds back for the final re-measure, at most its share of the
        budget: on a short budget the final windows shrink rather than the search vanishing."""
        self.reserve = min(wanted, FINAL_SHARE_MAX * (self.seconds or 0.0))

    def hard_end(self) -> float:
        """The budget itself, margin included: the last moment anything may run."""
        return math.inf if self.seconds is None else self.start + self.seconds

    def hard_left(self, *, hold: float = 0.0) -> float:
        """Seconds until the budget itself ends (its margin included), less ``hold`` seconds
        kept for what must still run after (the final's step-alone bound)."""
        return self.hard_end() - hold - self.clock()

    def final_deadline(self, *, hold: float) -> float:
        """When the final re-measure must be over: inside the budget (the final may use the
        margin the search left), ``hold`` seconds before its end for the step-alone bound."""
        return self.hard_end() - hold

    def deadline(self, wanted: float, *, at_least: float) -> float:
        """A measurement's hard deadline from now: ``wanted`` seconds, but not past the
        budget's own end, so that a hang (a data set that stops answering) costs what is left
        of the budget and the run ends on time; yet ``at_least`` (what one window needs), so
        that a measurement begun near the end is not failed for want of time it was planned.

        Example:
            >>> budget = Budget(60.0, start=0.0, clock=lambda: 50.0)
            >>> budget.deadline(20.0, at_least=1.0), budget.deadline(20.0, at_least=12.0)
            (10.0, 12.0)
        """
        return min(wanted, max(self.hard_left(), at_least))
