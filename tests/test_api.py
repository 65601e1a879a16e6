"""The public surface: what ``import autoload`` offers, and nothing by accident."""

import autoload

PUBLIC = {
    "AmpDtype", "AutoloadError", "ConfigError", "Costs", "DataLoader", "DatasetError",
    "FinalistRecord", "LoaderConfig", "Measurement", "OnlineOptions", "Probe", "ProgressEvent",
    "ResultFileError", "SearchSpace", "Setting", "SpecError", "TrainingProbe", "TrialRecord",
    "TuneResult", "Tuning", "TuningFailedError", "Window", "WorkerError", "best_loader",
    "build_space", "tune",
}


def test_all_lists_the_public_names_and_each_exists():
    assert set(autoload.__all__) == PUBLIC
    assert all(hasattr(autoload, name) for name in PUBLIC)


def test_every_error_autoload_raises_on_purpose_is_an_autoload_error():
    for name in ("ConfigError", "DatasetError", "ResultFileError", "SpecError",
                 "TuningFailedError", "WorkerError"):
        assert issubclass(getattr(autoload, name), autoload.AutoloadError)
