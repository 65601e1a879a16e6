"""Noise: windows sized from the measured variation, finalists and ties judged against it."""

import math
import statistics

import pytest
import torch
from torch.utils.data import TensorDataset

import autoload
from autoload import LoaderConfig, Measurement, Probe, Window, build_space
from autoload.budget import FINAL_SHARE_MAX, MARGIN, Budget
from autoload.search import (
    MIN_SEARCH_TRIALS,
    PILOT_RUNS,
    SEARCH_CV,
    SearchState,
)

from conftest import SurfaceProbe

DATA = TensorDataset(torch.zeros(1024, 2))
SMALL, SMALL_W = LoaderConfig(64), LoaderConfig(64, num_workers=2, prefetch_factor=4)
LARGE, LARGE_W = LoaderConfig(256), LoaderConfig(256, num_workers=2, prefetch_factor=4)


# The longest window for a 60 s budget: 2x the default (1 s), unless the search would then hold
# under 20 trials (the probe's 0.1 s overhead each).
LONGEST = min(2.0, (1 - FINAL_SHARE_MAX - MARGIN) * 60 / MIN_SEARCH_TRIALS - 0.1)


def _tune(clock, probe, **kwargs):
    kwargs.setdefault("timeout", 60)
    kwargs.setdefault("max_workers", 4)
    return autoload.tune(DATA, probe=probe, clock=clock, **kwargs)


def _search_windows(probe, result):
    """The windows of the search's measurements after the pilot's (nothing known before)."""
    final = sum(len(f.rates) for f in result.finalists)
    return probe.windows[PILOT_RUNS:len(probe.windows) - final]


def test_noisy_rates_get_longer_search_windows_than_steady_ones(clock):
    base = 60 / 60  # tune()'s window for a 60 s budget
    quiet = SurfaceProbe(clock, noise=0.003)
    quiet_result = _tune(clock, quiet)
    clock.now = 0.0
    noisy = SurfaceProbe(clock, noise=0.2)
    noisy_result = _tune(clock, noisy)
    assert quiet.windows[:PILOT_RUNS] == noisy.windows[:PILOT_RUNS] == [base] * PILOT_RUNS
    assert set(_search_windows(quiet, quiet_result)) == {base / 2}  # the shortest allowed
    assert _search_windows(noisy, noisy_result) == pytest.approx(
        [LONGEST] * len(_search_windows(noisy, noisy_result)))
    # So the quiet run measures more configurations in the same budget.
    assert len(set(quiet.calls)) > len(set(noisy.calls))


def test_windows_aim_at_the_target_variation_in_between(clock):
    estimates, windows = [], []
    for seed in range(5):
        clock.now = 0.0
        probe = SurfaceProbe(clock, noise=0.04, seed=seed)
        result = _tune(clock, probe)
        estimates.append(result.noise_cv)
        windows += _search_windows(probe, result)
    # The estimate is the larger of two, so it errs high rather than low, and never by 2x.
    assert all(0.8 * 0.04 < e < 2 * 0.04 for e in estimates)
    assert statistics.median(estimates) == pytest.approx(0.04, rel=0.25)
    want = min((0.04 / SEARCH_CV) ** 2, LONGEST)  # 1.78 s, cut to 1.55 s
    assert statistics.median(windows) == pytest.approx(want, rel=0.25)


class GivenRates(Probe):
    """The pilot's windows measure 100, 110 and 105 samples/s."""

    def __init__(self) -> None:
        self.rates = iter([100.0, 110.0, 105.0])

    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        rate = next(self.rates)
        return Measurement(samples_per_second=rate, seconds=window.seconds, samples=int(rate),
                           batches=10, data_wait_fraction=0.5)


def _state(probe, seconds=0.5, budget=30.0, n_finalists=3):
    space = build_space(1024, device_type="cpu", has_model=False, cpus=2)
    return SearchState(space, probe, window=Window(seconds=seconds),
                       budget=Budget(budget, start=0.0, clock=lambda: 0.0), n_trials=None,
                       progress=None, n_finalists=n_finalists, final_rounds=3)


def test_pilot_measured_three_times_estimates_run_to_run_noise():
    state = _state(GivenRates())
    record = state.measure_pilot()
    assert PILOT_RUNS == 3
    assert record.samples_per_second == 105.0  # the windows' mean is the trial's record
    # stdev(100, 110, 105) = 5: 4.8% a 0.5 s window, so 3.4% for one second of measuring.
    assert state.noise.pilot == pytest.approx(5 / 105 * math.sqrt(0.5))
    # No window showed its own spread: the pilot's is the estimate, and it sizes the windows.
    assert state.noise.per_second == state.noise.pilot
    # It asks for (3.4% / 3%)^2 = 1.3 s windows; a 30 s budget allows up to 2 x 0.5 s.
    assert state.window.seconds == 1.0


def test_drift_no_window_shows_is_caught_by_the_pilot(clock):
    # Windows look steady inside (0.2% a second), but runs differ by 10%.
    estimates = []
    for seed in range(5):
        clock.now = 0.0
        result = _tune(clock, SurfaceProbe(clock, noise=0.002, drift=0.1, seed=seed))
        estimates.append(result.noise_cv)
    assert sorted(estimates)[2] > 0.03  # the median run sees the drift


class Fixed(Probe):
    """Every window of a configuration measures its given rate, with a given spread by round."""

    def __init__(self, clock, rates, spread=0.0):
        self.clock, self.rates, self.spread, self.n = clock, rates, spread, 0

    def measure(self, config, window):
        self.clock.now += window.seconds + 0.1
        self.n += 1
        rate = self.rates(config) * (1 + self.spread * (-1) ** self.n)
        return Measurement(samples_per_second=rate, seconds=window.seconds, samples=int(rate),
                           batches=10, data_wait_fraction=0.5, rate_cv=0.001)


def _fixed_surface(winner, edge):
    """bs=256 at 0 workers is best; ``winner`` (more complex) is ``edge`` faster than it."""
    def rate(config):
        if config == winner:
            return 1000.0 * (1 + edge)
        return 1000.0 if config == LARGE else 500.0
    return rate


@pytest.mark.parametrize(("edge", "simple_wins"), [(0.005, True), (0.04, False)])
def test_a_simpler_finalist_within_noise_wins_but_not_beyond(clock, edge, simple_wins):
    complex_ = LARGE_W
    probe = Fixed(clock, _fixed_surface(complex_, edge))
    result = _tune(clock, probe, batch_size=[64, 256], num_workers=[0, 2], prefetch_factor=4)
    assert {f.config for f in result.finalists} >= {complex_, LARGE}
    assert result.config == (LARGE if simple_wins else complex_)
    assert any("counted as tied" in note for note in result.notes)


def _close_and_far(config):
    """Two close leaders (bs=256: 1000/s at 0 workers, 980/s at 2), everything else 500/s."""
    return {LARGE: 1000.0, LARGE_W: 980.0}.get(config, 500.0)


class Alternating(Fixed):
    """Each configuration's windows alternate ``spread`` above and below its rate."""

    def __init__(self, clock, rates, spread):
        super().__init__(clock, rates)
        self.spread, self.seen = spread, {}

    def measure(self, config, window):
        self.clock.now += window.seconds + 0.1
        k = self.seen[config] = self.seen.get(config, 0) + 1
        rate = self.rates(config) * (1 + self.spread * (-1) ** k)
        return Measurement(samples_per_second=rate, seconds=window.seconds, samples=int(rate),
                           batches=10, data_wait_fraction=0.5, rate_cv=0.001)


def test_finalists_clearly_behind_drop_out_and_close_ones_get_extra_rounds(clock):
    probe = Alternating(clock, _close_and_far, spread=0.02)
    result = _tune(clock, probe, batch_size=[64, 256], num_workers=[0, 2], prefetch_factor=4)
    rates = {f.config: len(f.rates) for f in result.finalists}
    # The 500/s ones (defaults, recipe) stop after two rounds; the two leaders go on past the
    # three planned rounds with the time that frees, within the budget.
    assert rates[SMALL] == 2 and rates[SMALL_W] == 2
    assert rates[LARGE] > 3 and rates[LARGE_W] > 3
    assert result.elapsed_seconds <= 60
    assert any("clearly behind" in note for note in result.notes)


def test_without_a_budget_the_final_keeps_its_planned_rounds(clock):
    probe = Alternating(clock, _close_and_far, spread=0.02)
    result = _tune(clock, probe, batch_size=[64, 256], num_workers=[0, 2], prefetch_factor=4,
                   timeout=None, n_trials=8)
    rates = {f.config: len(f.rates) for f in result.finalists}
    assert rates[LARGE] == 3 and rates[SMALL] == 2


def test_noise_keeps_a_finalist_it_could_explain_in_the_race(clock):
    # Windows alternate +-10% (a CV of 0.14): even 800/s against 1000/s is within 4 sigma of
    # the difference, so neither leader is dropped.
    rates = {LARGE: 1000.0, LARGE_W: 800.0}
    probe = Alternating(clock, lambda c: rates.get(c, 300.0), spread=0.1)
    result = _tune(clock, probe, batch_size=[64, 256], num_workers=[0, 2], prefetch_factor=4)
    counts = {f.config: len(f.rates) for f in result.finalists}
    assert counts[LARGE_W] == counts[LARGE] >= 3


@pytest.mark.parametrize(("edge", "near_wins"), [(0.005, True), (0.04, False)])
def test_between_equally_simple_ties_the_batch_size_nearest_the_users_wins(clock, edge, near_wins):
    # The defaults (the user's batch size here, 64) are slow; bs=32 and bs=256 lead, 256 by edge.
    rates = {LoaderConfig(32): 1000.0, LARGE: 1000.0 * (1 + edge)}
    probe = Fixed(clock, lambda config: rates.get(config, 500.0))
    result = _tune(clock, probe, batch_size=[32, 64, 256], num_workers=0)
    assert {f.config for f in result.finalists} >= set(rates)
    assert result.config == (LoaderConfig(32) if near_wins else LARGE)
    assert any("the batch size nearest 64" in note for note in result.notes)
