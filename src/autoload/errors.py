"""autoload's errors, and the one line each is written as.

Every error autoload raises on purpose derives from :class:`AutoloadError`, so a caller can catch
one type. The CLI turns each into one line and a non-zero exit.

    AutoloadError
    ├── SpecError              a MODULE:ATTR spec that cannot be loaded
    ├── ConfigError            an argument or option that breaks a rule (also a ValueError)
    ├── DatasetError           a data set autoload cannot batch or size
    ├── ResultFileError        a result JSON that cannot be read
    ├── TuningFailedError      no configuration could be measured
    ├── WorkerError            a worker of a tuning loader (num_workers="auto") died or hung
    └── TrialFault             one configuration could not be measured; the study goes on
        ├── MemoryCapExceeded  its memory crossed the cap (the trial is infeasible)
        └── TrialTimeout       it ran past its deadline (a hung worker or ``__getitem__``)

A :class:`~autoload.Probe` raises the two :class:`TrialFault` kinds; the tuner records them
against the configuration and never lets them reach its caller. Exceptions raised by the user's
own code (an ImportError inside their module, an error in ``__getitem__`` that every trial hits)
keep their own type: autoload re-raises them, or chains them as the ``__cause__`` of a
:class:`TuningFailedError`. :func:`summary` is how any of them is written in one line.
"""

from __future__ import annotations

__all__ = [
    "AutoloadError",
    "ConfigError",
    "DatasetError",
    "MemoryCapExceeded",
    "ResultFileError",
    "SpecError",
    "TrialFault",
    "TrialTimeout",
    "TuningFailedError",
    "format_size",
    "summary",
    "WorkerError",
]


class AutoloadError(Exception):
    """Base class of every error autoload raises on purpose."""


class SpecError(AutoloadError):
    """A ``MODULE:ATTR`` spec has a bad format, or names a module or attribute that is missing."""


class ConfigError(AutoloadError, ValueError):
    """An argument breaks a rule; the message names the rule, the value and the way out."""


class DatasetError(AutoloadError):
    """The data set cannot be sized, indexed or batched as given."""


class ResultFileError(AutoloadError):
    """A result JSON file is missing, malformed or of an unknown version."""


class TuningFailedError(AutoloadError):
    """No configuration could be measured; ``__cause__`` holds the user's exception, if one."""


class WorkerError(AutoloadError):
    """A worker process of an ``autoload.DataLoader(num_workers="auto")`` died, or its pool
    stopped sending batches while the loader switched settings; no worker is left running."""


class TrialFault(AutoloadError):
    """One configuration could not be measured: the tuner records it and the study goes on."""


class MemoryCapExceeded(TrialFault):
    """A trial's memory crossed its cap; the trial is infeasible, not a user error.

    Example:
        >>> str(MemoryCapExceeded("host", 9 << 30, 8 << 30))
        'host memory 9.0 GiB crossed the cap 8.0 GiB'
    """

    def __init__(self, kind: str, peak: int, cap: int) -> None:
        super().__init__(f"{kind} memory {format_size(peak)} crossed the cap {format_size(cap)}")
        self.kind, self.peak, self.cap = kind, peak, cap


class TrialTimeout(TrialFault):
    """A trial ran past its deadline (a hung worker or ``__getitem__``)."""


def format_size(n: float) -> str:
    """A size in bytes as messages and reports write it: ``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary(exc: BaseException) -> str:
    """An exception in one line: its type and its message's last line, where a traceback
    carried in the message (torch's re-raise of a worker's error) puts the original error.

    Example:
        >>> summary(ValueError("cannot read item 3"))
        'ValueError: cannot read item 3'
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    if "DataLoader worker" in lines[0] and ("exited unexpectedly" in lines[0]
                                            or "killed by signal" in lines[0]):
        return f"worker died: {lines[0]}"
    last = lines[-1]
    if "in DataLoader worker process" in lines[0]:  # torch's re-raise: the original is last
        return last
    return last if last.startswith(name) else f"{name}: {last}"
