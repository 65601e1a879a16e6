"""How much one configuration's measured rate varies from run to run, and the windows that
follow from it."""

from __future__ import annotations

import math
import statistics

__all__ = ["Noise"]

_GUESS = 0.03  # one second of measuring varies this much until something is measured


class Noise:
    """The run-to-run coefficient of variation (CV) of a rate, scaled to one second of
    measuring (a window of T seconds varies by ``per_second / sqrt(T)``).

    Two sources, and the larger wins: what windows show inside (the spread of their rate over
    blocks of batches, which misses noise slower than a window) and what the pilot's repeated
    windows of one configuration showed (which catches the machine's drift).

    Example:
        >>> noise = Noise()
        >>> noise.add_window(rate_cv=0.02, seconds=4.0); round(noise.per_second, 3)
        0.04
        >>> round(noise.window_cv(1.0), 3)
        0.04
    """

    def __init__(self) -> None:
        self.blocks: list[float] = []
        self.pilot: float | None = None

    def add_window(self, *, rate_cv: float, seconds: float) -> None:
        self.blocks.append(rate_cv * math.sqrt(seconds))

    def add_pilot(self, rates: list[float], seconds: float) -> None:
        """Repeated windows of one configuration, each ``seconds`` long."""
        mean = statistics.fmean(rates)
        if len(rates) >= 2 and mean > 0:
            self.pilot = statistics.stdev(rates) / mean * math.sqrt(seconds)

    @property
    def per_second(self) -> float:
        estimates = [statistics.median(self.blocks)] if self.blocks else []
        if self.pilot is not None:
            estimates.append(self.pilot)
        return max(estimates, default=_GUESS)

    def window_cv(self, seconds: float) -> float:
        """The expected CV of one window's rate."""
        return self.per_second / math.sqrt(seconds)

    def gap(self, sigmas: float, seconds: float) -> float:
        """A relative difference between two windows' rates that is ``sigmas`` standard
        deviations of the noise."""
        return sigmas * math.sqrt(2) * self.window_cv(seconds)

    def window_for(self, target_cv: float, low: float, high: float) -> float:
        """Seconds of measuring for a rate within ``target_cv``, kept within [low, high]."""
        return min(max((self.per_second / target_cv) ** 2, low), high)
