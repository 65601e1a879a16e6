"""The error tree and the one line each exception is written as."""

import pytest

import autoload
from autoload.errors import format_size, summary


def test_a_memory_cap_crossed_says_which_memory_and_both_sizes():
    exc = autoload.MemoryCapExceeded("host", 9 << 30, 8 << 30)
    assert str(exc) == "host memory 9.0 GiB crossed the cap 8.0 GiB"
    assert (exc.kind, exc.peak, exc.cap) == ("host", 9 << 30, 8 << 30)


@pytest.mark.parametrize(("size", "written"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                              (150 << 20, "150 MiB"), (5 << 40, "5.0 TiB")])
def test_sizes_are_written_in_binary_units(size, written):
    assert format_size(size) == written


@pytest.mark.parametrize(("exc", "line"), [
    (ValueError("cannot read item 3"), "ValueError: cannot read item 3"),
    (KeyboardInterrupt(), "KeyboardInterrupt"),
    (RuntimeError("  \n"), "RuntimeError"),
    # A message that carries a traceback: its last line is the original error.
    (ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most "
                "recent call last):\n  File \"x.py\", line 1\nValueError: bad item"),
     "ValueError: bad item"),
    # torch re-raises a type it cannot rebuild as a RuntimeError: the original still wins.
    (RuntimeError("Caught KeyError in DataLoader worker process 1.\nTraceback:\nKeyError: 'x'"),
     "KeyError: 'x'"),
    (RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly"),
     "worker died: DataLoader worker (pid(s) 123) exited unexpectedly"),
    (RuntimeError("DataLoader worker (pid 9) is killed by signal: Segmentation fault."),
     "worker died: DataLoader worker (pid 9) is killed by signal: Segmentation fault."),
    (autoload.TrialTimeout("items stopped arriving"), "TrialTimeout: items stopped arriving"),
])
def test_an_exception_is_one_line_naming_its_type_and_its_last_line(exc, line):
    assert summary(exc) == line
