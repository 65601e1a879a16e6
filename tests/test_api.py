"""The public surface: what ``import autoload`` offers, and nothing by accident."""

import autoload

PUBLIC = {
    "AmpDtype", "AutoloadError", "ConfigError", "Costs", "DataLoader", "DatasetError",
    "FinalistRecord", "LoaderConfig", "Measurement", "MemoryCapExceeded", "OnlineOptions",
    "Probe", "ProgressEvent", "ResultFileError", "SearchSpace", "Setting", "SpecError",
    "TrainingProbe", "TrialFault", "TrialRecord", "TrialTimeout", "TuneResult", "Tuning",
    "TuningFailedError", "Window", "WorkerError", "best_loader", "build_space", "tune",
}


def test_all_lists_the_public_names_and_each_exists():
    assert set(autoload.__all__) == PUBLIC
    assert all(hasattr(autoload, name) for name in PUBLIC)


def test_every_error_autoload_raises_on_purpose_is_an_autoload_error():
    for name in ("ConfigError", "DatasetError", "ResultFileError", "SpecError",
                 "TuningFailedError", "TrialFault", "MemoryCapExceeded", "TrialTimeout",
                 "WorkerError"):
        assert issubclass(getattr(autoload, name), autoload.AutoloadError)
    for fault in (autoload.MemoryCapExceeded, autoload.TrialTimeout):
        assert issubclass(fault, autoload.TrialFault)


def test_the_trial_faults_keep_their_old_homes_for_code_that_imports_them_there():
    from autoload.alarm import TrialTimeout as from_alarm
    from autoload.memory import MemoryCapExceeded as from_memory
    from autoload.probe import TrialTimeout as from_probe

    assert from_alarm is from_probe is autoload.TrialTimeout
    assert from_memory is autoload.MemoryCapExceeded
