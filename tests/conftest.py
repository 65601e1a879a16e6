"""Shared fixtures: a fake clock and a simulated throughput surface for the tuner."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from autoload import LoaderConfig, Measurement, Probe, Window


@pytest.fixture
def restore_sys_path() -> Iterator[None]:
    """The importer puts the working directory on sys.path for a module name: take it off."""
    saved = sys.path[:]
    yield
    sys.path[:] = saved


def worker_processes() -> list[psutil.Process]:
    """Child processes of this test process, multiprocessing's resource tracker aside."""
    return [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def surface(config: LoaderConfig) -> float:
    """A made-up throughput surface: best near bs=256, 2 workers, prefetch 4, bf16 on."""
    bs = 1.0 / (1.0 + (math.log2(config.batch_size) - 8) ** 2 / 4)
    workers = {0: 0.6, 1: 0.8, 2: 1.0}.get(config.num_workers, 0.9)
    prefetch = 1.0 if config.prefetch_factor in (None, 4) else 0.95
    amp = 1.1 if config.amp else 1.0
    return 10_000 * bs * workers * prefetch * amp


class SurfaceProbe(Probe):
    """Measures ``rate(config)`` with seeded noise and advances a fake clock by the window.

    ``noise`` is the coefficient of variation of one second of measuring: a window of T seconds
    is made of 8 blocks whose rates vary around the true rate, so its rate varies by
    noise / sqrt(T) and its ``rate_cv`` estimates that from the blocks, as the real probe does.
    ``drift`` adds run-to-run noise that no single window shows (the machine's load changing).
    """

    def __init__(self, clock: FakeClock, rate=surface, *, noise: float = 0.02,
                 drift: float = 0.0, seed: int = 0, fail=None, overhead: float = 0.1,
                 wait: float = 0.2) -> None:
        self.clock, self.rate, self.noise, self.drift, self.fail = clock, rate, noise, drift, fail
        self.rng = np.random.default_rng(seed)
        self.overhead, self.wait = overhead, wait
        self.calls: list[LoaderConfig] = []
        self.windows: list[float] = []

    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        self.calls.append(config)
        self.windows.append(window.seconds)
        self.clock.now += window.seconds + self.overhead
        if self.fail is not None:
            self.fail(config)
        true = self.rate(config) * (1 + self.rng.normal(0, self.drift))
        blocks = true * (1 + self.rng.normal(0, self.noise * math.sqrt(8 / window.seconds), 8))
        rate = float(blocks.mean())
        rate_cv = float(blocks.std(ddof=1) / rate / math.sqrt(8))
        return Measurement(rate, 0.05, 0.1, window.seconds, int(rate * window.seconds), 10,
                           self.wait, 100 << 20, rate_cv=rate_cv)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
