"""Shared fixtures: a fake clock and a simulated throughput surface for the tuner."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from autoload import LoaderConfig, Measurement, Probe, Window


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory) -> Iterator[None]:
    """Runs set up once for a module remember results in the session's folder, never the
    user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> None:
    """Each test remembers results in a cache folder of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def quiet_machine(request, monkeypatch) -> None:
    """Windows read no other process's load, unless a test asks for the real reading
    (``@pytest.mark.machine_load``): the suite must give the same answers on a busy machine
    (CI's, a developer's beside a build) as on a quiet one."""
    if request.node.get_closest_marker("machine_load") is None:
        import autoload.cpuload

        monkeypatch.setattr(autoload.cpuload, "read", lambda root=None: None)


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
        return Measurement(samples_per_second=rate, startup_seconds=0.05, warmup_seconds=0.1,
                           seconds=window.seconds, samples=int(rate * window.seconds),
                           batches=10, data_wait_fraction=self.wait, peak_host_bytes=100 << 20,
                           rate_cv=rate_cv)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def simulated(clock: FakeClock) -> dict[str, object]:
    """``tune()`` arguments for a run that measures a simulated surface on a fake clock, in
    milliseconds: for tests of what the user passes in and gets back, not of measuring."""
    return {"probe": SurfaceProbe(clock), "clock": clock, "timeout": 20}


class PipelineProbe(Probe):
    """A simulated loading pipeline with known costs, measured with noise on a fake clock.

    The true rate is not the tuner's own model: bounds combine as a hard minimum, the workers
    stretch by the cores they share, ``prefetch_factor=1`` loses a tenth (unless the workers ask
    for every batch of an epoch at its start either way), and every epoch starts with one
    worker-batch of bubble plus a round trip per worker (an epoch that one round of the workers
    makes is that start and one step per batch, as in the model, since that is what real
    loaders measured); above a ``cliff`` batch size the step costs three times as much, and
    without workers ``solo_step`` times as much at a batch of 64, in proportion to the batch
    (beside fetches that sleep, a step can run several times slower, the more so the longer
    they sleep). Measurements report the costs a real probe would, so the planner's model has
    something to learn from.
    """

    def __init__(self, clock: FakeClock, *, n: int = 4096, cpu: float = 0.0,
                 wait: float = 0.0, step_fixed: float = 2e-4, step_per_sample: float = 5e-6,
                 handoff: float = 3e-4, worker_fixed: float = 2e-4, cores: int = 2,
                 noise: float = 0.01, seed: int = 0, overhead: float = 0.2,
                 cliff: int | None = None, solo_step: float = 0.0) -> None:
        self.clock, self.n, self.cpu, self.wait, self.cliff = clock, n, cpu, wait, cliff
        self.solo_step = solo_step
        self.step_fixed, self.step_per_sample = step_fixed, step_per_sample
        self.handoff, self.worker_fixed, self.cores = handoff, worker_fixed, cores
        self.noise, self.overhead = noise, overhead
        self.rng = np.random.default_rng(seed)
        self.calls: list[LoaderConfig] = []

    def parts(self, config: LoaderConfig) -> dict[str, float]:
        bs, w = config.batch_size, config.num_workers
        step = self.step_fixed + self.step_per_sample * bs
        if self.cliff is not None and bs > self.cliff:  # the batch outgrows a cache
            step *= 3
        if w == 0:
            step *= max(1.0, self.solo_step * bs / 64)
        fetch_cpu, fetch_wait = bs * self.cpu + 5e-5, bs * self.wait
        epoch = math.ceil(self.n / bs)
        if w == 0:
            per_batch, start = fetch_cpu + fetch_wait + step, 1e-4
            worker_cpu, receive = 0.0, fetch_cpu
        else:
            active = min(w, epoch)
            worker_cpu = fetch_cpu + self.worker_fixed
            demand = worker_cpu + step + self.handoff
            x = min(active / (fetch_wait + worker_cpu), 1 / (step + self.handoff))
            if x * demand > self.cores:
                x = self.cores / demand
            if config.prefetch_factor == 1 and w < epoch:  # else every batch is asked at once
                x *= 0.9
            per_batch = 1 / x
            start = fetch_wait + worker_cpu * max(1.0, active / self.cores) + 2e-3 * w
            receive = self.handoff
        return {"per_batch": per_batch, "start": start, "epoch": epoch, "step": step,
                "fetch_cpu": fetch_cpu, "fetch": fetch_cpu + fetch_wait if w == 0 else receive,
                "worker_cpu": worker_cpu, "receive": receive}

    def rate(self, config: LoaderConfig) -> float:
        p = self.parts(config)
        seconds = p["epoch"] * p["per_batch"] + p["start"]
        if p["epoch"] <= config.num_workers:
            seconds = max(p["epoch"] * p["per_batch"],
                          p["start"] + p["epoch"] * (p["step"] + p["receive"]))
        return self.n / seconds

    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        from autoload import Costs

        self.calls.append(config)
        p = self.parts(config)
        self.clock.now += window.seconds + self.overhead + 0.05 * config.num_workers + p["start"]
        rate = self.rate(config) * (1 + self.rng.normal(0, self.noise))
        costs = Costs(
            batch_seconds=p["per_batch"], fetch_seconds=p["fetch"],
            fetch_cpu_seconds=p["fetch_cpu"] if config.num_workers == 0 else p["receive"],
            step_seconds=p["step"],
            main_cpu_seconds=(p["fetch_cpu"] if config.num_workers == 0 else p["receive"])
            + p["step"],
            worker_cpu_seconds=p["worker_cpu"] if config.num_workers else None,
            boundary_seconds=p["start"], batch_bytes=64 * config.batch_size,
        )
        return Measurement(samples_per_second=rate, seconds=window.seconds,
                           samples=int(rate * window.seconds), batches=10,
                           data_wait_fraction=0.3, peak_host_bytes=100 << 20,
                           rate_cv=self.noise / 3, costs=costs)


DEFAULTS = LoaderConfig(64)
RECIPE = LoaderConfig(64, num_workers=2, prefetch_factor=2)
MEMORY_REASON = "host memory 9.0 GiB crossed the cap 8.0 GiB"


def build_result(winner: LoaderConfig, *, infeasible: int = 1, **changes):
    """A TuneResult with ``winner`` at 3,000/s, the defaults at 1,000/s and the recipe at
    1,500/s; ``infeasible`` trials over the memory cap, one failed and one repeated trial."""
    from dataclasses import replace

    from autoload import FinalistRecord, TrialRecord, TuneResult

    def ok(number, config, rate, startup, wait, memory):
        return TrialRecord(number=number, config=config, state="ok", samples_per_second=rate,
                           startup_seconds=startup, data_wait_fraction=wait,
                           peak_host_bytes=memory)

    trials = [ok(0, DEFAULTS, 1000.0, 0.01, 0.5, 100 << 20), ok(1, RECIPE, 1500.0, 0.4, 0.1,
                                                                 300 << 20),
              ok(2, winner, 3000.0, 0.3, 0.05, 250 << 20)]
    for k in range(infeasible):
        trials.append(TrialRecord(number=len(trials), state="infeasible", reason=MEMORY_REASON,
                                  config=LoaderConfig(1024 - 64 * k, num_workers=2,
                                                      prefetch_factor=8)))
    trials.append(TrialRecord(number=len(trials), config=LoaderConfig(8, num_workers=1,
                                                                      prefetch_factor=1),
                              state="failed", reason="ValueError: bad sample"))
    trials.append(TrialRecord(number=len(trials), config=DEFAULTS, state="repeat",
                              samples_per_second=1000.0))

    def finalist(config, rates, role, startup, memory, wait):
        return FinalistRecord(config=config, rates=rates, role=role, startup_seconds=startup,
                              peak_host_bytes=memory, data_wait_fraction=wait)

    finalists = (
        finalist(winner, (2900.0, 3000.0, 3100.0), "candidate", 0.3, 250 << 20, 0.05),
        finalist(RECIPE, (1450.0, 1500.0, 1550.0), "recipe", 0.4, 300 << 20, 0.1),
        finalist(DEFAULTS, (990.0, 1000.0, 1010.0), "defaults", 0.01, 100 << 20, 0.5),
    )
    result = TuneResult(
        config=winner, loader_kwargs=winner.loader_kwargs(), amp=winner.amp,
        samples_per_second=3000.0, baselines={"defaults": 1000.0, "recipe": 1500.0},
        finalists=finalists, trials=tuple(trials), device="cpu", samples_per_epoch=240,
        elapsed_seconds=12.5, space_size=104,
        notes=("pin_memory stays False: it only helps copies to a CUDA device.",),
    )
    return replace(result, **changes)
