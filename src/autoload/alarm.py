"""One real-time timer for a hard and a soft limit, in the main thread."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from autoload.errors import TrialTimeout  # raised here; still importable from here

__all__ = ["Alarm", "OutOfTime", "TrialTimeout"]


class OutOfTime(Exception):
    """The soft limit passed: stop measuring and keep what was measured."""


class Alarm:
    """SIGALRM-based limits for code that may block: a no-op off the main thread.

    The hard limit bounds a hang (a stuck ``__getitem__`` at ``num_workers=0``, a worker that
    never answers): it raises :class:`TrialTimeout`. The soft limit, armed with
    :meth:`soft_in`, interrupts a step that would overrun its share of the budget (a huge batch,
    a slow autocast): it raises :class:`OutOfTime`, and the caller keeps what it measured.
    Python runs the handler between interpreter steps, so a long native op delays it by that
    op's length.

    Example:
        >>> with Alarm(hard_seconds=60) as alarm:
        ...     alarm.soft_in(30)
        ...     alarm.soft_off()
    """

    def __init__(self, hard_seconds: float | None = None) -> None:
        self.enabled = (threading.current_thread() is threading.main_thread()
                        and hasattr(signal, "SIGALRM"))
        self._hard_seconds = hard_seconds
        self._hard: float | None = None
        self._soft: float | None = None
        self._previous: signal._HANDLER = None

    def __enter__(self) -> Alarm:
        if self.enabled:
            self._previous = signal.signal(signal.SIGALRM, self._fire)
            if self._hard_seconds is not None:
                self._hard = time.monotonic() + self._hard_seconds
            self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)

    def soft_in(self, seconds: float) -> None:
        """Raise :class:`OutOfTime` ``seconds`` from now (at least a millisecond)."""
        if self.enabled:
            self._soft = time.monotonic() + max(seconds, 0.001)
            self._arm()

    def soft_off(self) -> None:
        """Measuring is over: a soft limit passing now must not interrupt the clean-up."""
        self._soft = None

    def _arm(self) -> None:
        pending = [t for t in (self._hard, self._soft) if t is not None]
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(min(pending) - time.monotonic(), 0.001))

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._hard is not None and now >= self._hard:
            self._hard = None
            raise TrialTimeout(f"the trial ran past its {self._hard_seconds:.3g} s deadline")
        if self._soft is not None and now >= self._soft:
            self._soft = None
            self._arm()
            raise OutOfTime
        self._arm()
