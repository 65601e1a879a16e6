"""autoload: find the fastest PyTorch DataLoader settings for your data, model and machine."""

from autoload.config import AmpDtype, LoaderConfig
from autoload.errors import (
    AutoloadError,
    ConfigError,
    DatasetError,
    MemoryCapExceeded,
    ResultFileError,
    SpecError,
    TrialFault,
    TrialTimeout,
    TuningFailedError,
    WorkerError,
)
from autoload.loader import DataLoader
from autoload.probe import Probe, TrainingProbe
from autoload.result import FinalistRecord, Measurement, ProgressEvent, TrialRecord, TuneResult
from autoload.settle import Setting
from autoload.space import SearchSpace, build_space
from autoload.timing import Costs, Window
from autoload.tuner import best_loader, tune
from autoload.tuning import OnlineOptions, Tuning

__version__ = "0.1.0"

__all__ = [
    "AmpDtype",
    "AutoloadError",
    "ConfigError",
    "Costs",
    "DataLoader",
    "DatasetError",
    "FinalistRecord",
    "LoaderConfig",
    "Measurement",
    "MemoryCapExceeded",
    "OnlineOptions",
    "Probe",
    "ProgressEvent",
    "ResultFileError",
    "SearchSpace",
    "Setting",
    "SpecError",
    "TrainingProbe",
    "TrialFault",
    "TrialRecord",
    "TrialTimeout",
    "TuneResult",
    "Tuning",
    "TuningFailedError",
    "Window",
    "WorkerError",
    "best_loader",
    "build_space",
    "tune",
]
