"""autoload's errors.

Every error autoload raises on purpose derives from :class:`AutoloadError`, so a caller can catch
one type. The CLI turns each into one line and a non-zero exit.

    AutoloadError
    ├── SpecError          a MODULE:ATTR spec that cannot be loaded
    ├── ConfigError        an argument or option that breaks a rule
    ├── DatasetError       a data set autoload cannot batch or size
    ├── ResultFileError    a result JSON that cannot be read
    ├── TuningFailedError  no configuration could be measured
    └── WorkerError        a worker of a tuning loader (num_workers="auto") died or hung

Exceptions raised by the user's own code (an ImportError inside their module, an error in
``__getitem__`` that every trial hits) keep their own type: autoload re-raises them, or chains
them as the ``__cause__`` of a :class:`TuningFailedError`.
"""

from __future__ import annotations

__all__ = [
    "AutoloadError",
    "ConfigError",
    "DatasetError",
    "ResultFileError",
    "SpecError",
    "TuningFailedError",
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
