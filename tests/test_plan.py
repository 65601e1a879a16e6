"""The planner's stages on hand-made search states: what it proposes next, and why.

The calibration sweep runs on the real pipeline model (not ready without costs, so it has no
say); the model's picks run on a table of predictions, so that every choice can be worked out
by hand.
"""

from __future__ import annotations

import pytest

from autoload import LoaderConfig, Measurement, Probe, Window, build_space
from autoload.budget import Budget
from autoload.pipeline import PipelineModel, Prediction
from autoload.plan import Planner, Proposal
from autoload.result import TrialRecord
from autoload.search import SearchState


class _NeverMeasures(Probe):
    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        raise AssertionError("the planner only proposes; it never measures")


class _Table:
    """A ready model that predicts ``rates[config]`` (else ``default``), with epochs that start
    in ``starts[config]`` seconds (else none), and no place more novel than another."""

    ready = True

    def __init__(self, rates: dict[LoaderConfig, float], *, default: float = 100.0,
                 starts: dict[LoaderConfig, float] | None = None) -> None:
        self.rates, self.default, self.starts = rates, default, starts or {}

    def fit(self, observations: object) -> None:
        pass

    def predict(self, config: LoaderConfig) -> Prediction:
        rate = self.rates.get(config, self.default)
        return Prediction(rate=rate, fitted=rate, bound="the training step",
                          start_seconds=self.starts.get(config, 0.0))

    def novelty(self, config: LoaderConfig) -> float:
        return 0.0


def _state(n: int = 4096, **space: object) -> SearchState:
    options = {"device_type": "cpu", "has_model": True, "cpus": 2, "amp": "off", **space}
    search = build_space(n, **options)  # type: ignore[arg-type]
    state = SearchState(search, _NeverMeasures(), window=Window(seconds=1.0),
                        budget=Budget(60.0, start=0.0, clock=lambda: 0.0), n_trials=None,
                        progress=None, n_finalists=3, final_rounds=3)
    return state


def _measured(state: SearchState, config: LoaderConfig, rate: float = 0.0,
              kind: str = "ok") -> None:
    state.measured[config] = TrialRecord(number=len(state.measured), config=config,
                                         state=kind,  # type: ignore[arg-type]
                                         samples_per_second=rate)


def _sweep_planner(rates: dict[int, float]) -> tuple[Planner, SearchState]:
    """The defaults (64, no workers) and the batch sizes of ``rates`` measured without
    workers; no costs, so the model is not ready."""
    state = _state()
    for bs, rate in rates.items():
        _measured(state, LoaderConfig(bs), rate)
    return Planner(state, PipelineModel(cores=2, samples_per_epoch=4096)), state


# -- the calibration sweep ------------------------------------------------------------------

def test_the_sweep_measures_4x_either_side_of_the_defaults_first():
    planner, state = _sweep_planner({64: 200.0})
    assert planner.next().config == LoaderConfig(16)
    _measured(state, LoaderConfig(16), 100.0)
    assert planner.next().config == LoaderConfig(256)


def test_the_sweep_goes_on_by_4x_where_the_rate_rises_until_the_best_is_bracketed():
    planner, _ = _sweep_planner({16: 100.0, 64: 200.0, 256: 400.0})
    assert planner.next().config == LoaderConfig(1024)  # 256 is the best and the largest tried
    planner, _ = _sweep_planner({16: 300.0, 64: 200.0, 256: 100.0})
    assert planner.next().config == LoaderConfig(8)  # 16/4 = 4 is outside the space: the nearest


def test_a_bracketed_best_is_halved_towards_the_faster_neighbour_first():
    # 256 beats 64 (200/s) and 1024 (300/s), each 4x away: halfway in log to 1024 first
    # (sqrt(256 x 1024) = 512), then to 64 (128); then nothing: a cliff between them is found.
    planner, state = _sweep_planner({16: 100.0, 64: 200.0, 256: 400.0, 1024: 300.0})
    assert planner.next().config == LoaderConfig(512)
    _measured(state, LoaderConfig(512), 350.0)
    assert planner.next().config == LoaderConfig(128)
    _measured(state, LoaderConfig(128), 390.0)
    # and with no model, Optuna's own sampler decides
    assert planner.next() == Proposal(config=None, exhausted=False)


def test_a_sweep_target_over_the_memory_cap_is_skipped_for_the_next():
    planner, state = _sweep_planner({16: 100.0, 64: 200.0, 256: 400.0})
    _measured(state, LoaderConfig(1024), kind="infeasible")
    # 256 is the best and the largest measured, but 1024 crossed the cap: the sweep halves
    # towards the one neighbour it measured, 64 (sqrt(256 x 64) = 128).
    assert planner.next().config == LoaderConfig(128)


def test_without_a_model_autocast_is_tried_on_the_best_once_the_sweep_is_done():
    state = _state(amp="auto", bf16_supported=True)
    for bs, rate in {16: 100.0, 64: 200.0, 256: 400.0, 1024: 300.0, 512: 350.0,
                     128: 390.0}.items():
        _measured(state, LoaderConfig(bs), rate)
    planner = Planner(state, PipelineModel(cores=2, samples_per_epoch=4096))
    assert planner.next().config == LoaderConfig(256, amp="bfloat16")
    _measured(state, LoaderConfig(256, amp="bfloat16"), 500.0)
    assert planner.next().config is None  # CPU: pin_memory stays False, nothing else to toggle


# -- the model's picks -----------------------------------------------------------------------

def _picking_state(**space: object) -> SearchState:
    """Workers pinned to 1 or 2: the defaults have workers, so there is no sweep."""
    state = _state(num_workers=[1, 2], **space)
    _measured(state, state.baselines[0], 100.0)
    return state


def test_the_first_pick_is_the_fastest_prediction_and_its_rate_is_kept():
    state = _picking_state()
    best = LoaderConfig(512, num_workers=2, prefetch_factor=4)
    planner = Planner(state, _Table({best: 900.0, LoaderConfig(8, num_workers=1,
                                                               prefetch_factor=2): 800.0}))
    assert planner.next() == Proposal(config=best, predicted=900.0)


def test_the_second_pick_steps_next_to_the_best_measured_when_the_model_gives_it_90_percent():
    state = _picking_state()
    best = LoaderConfig(512, num_workers=2, prefetch_factor=4)
    near = LoaderConfig(256, num_workers=2, prefetch_factor=4)  # one step down in batch size
    far = LoaderConfig(8, num_workers=1, prefetch_factor=1)
    rates = {best: 1000.0, near: 950.0, far: 990.0}
    planner = Planner(state, _Table(rates))
    assert planner.next().config == best
    _measured(state, best, 1000.0)
    # 950 >= 0.9 x 1000: the step, though far is predicted faster
    assert planner.next().config == near
    _measured(state, near, 900.0)
    assert planner.next().config == far  # the third pick follows the model anywhere again


def test_without_a_neighbour_worth_it_the_second_pick_climbs_in_batch_size():
    state = _picking_state()
    best = LoaderConfig(512, num_workers=2, prefetch_factor=4)
    far = LoaderConfig(8, num_workers=1, prefetch_factor=1)
    planner = Planner(state, _Table({best: 1000.0, far: 990.0}, default=100.0))
    assert planner.next().config == best
    _measured(state, best, 1000.0)
    # Every neighbour is predicted at 100/s (< 0.9 x 1000): twice the batch size all the same.
    assert planner.next().config == LoaderConfig(1024, num_workers=2, prefetch_factor=4)


def test_the_search_is_exhausted_when_nothing_open_is_predicted_near_the_best():
    state = _picking_state()
    best = LoaderConfig(256, num_workers=2, prefetch_factor=2)
    _measured(state, best, 1000.0)
    for bs in (128, 512):  # the climb is measured too
        _measured(state, LoaderConfig(bs, num_workers=2, prefetch_factor=2), 800.0)
    planner = Planner(state, _Table({}, default=840.0))  # < 0.85 x 1000 anywhere
    planner.picks = 8
    assert planner.next() == Proposal(config=None, exhausted=True)
    hopeful = Planner(state, _Table({}, default=860.0))  # one is within 0.85 x
    hopeful.picks = 8
    proposal = hopeful.next()
    assert proposal.config is not None and not proposal.exhausted


def test_options_are_tried_on_the_best_after_the_model_s_first_two_picks():
    state = _picking_state(amp="auto", bf16_supported=True)
    best = LoaderConfig(512, num_workers=2, prefetch_factor=4)
    second = LoaderConfig(256, num_workers=2, prefetch_factor=4)
    planner = Planner(state, _Table({best: 1000.0, second: 950.0}))
    assert planner.next().config == best
    _measured(state, best, 1000.0)
    assert planner.next().config == second
    _measured(state, second, 900.0)
    assert planner.next().config == LoaderConfig(512, num_workers=2, prefetch_factor=4,
                                                 amp="bfloat16")


def test_a_configuration_whose_epochs_start_late_is_proposed_only_at_the_smallest_batch():
    state = _picking_state()
    slow_start = LoaderConfig(1024, num_workers=2, prefetch_factor=2)
    smallest = LoaderConfig(8, num_workers=2, prefetch_factor=2)
    runner_up = LoaderConfig(128, num_workers=1, prefetch_factor=2)
    late = {slow_start: 2.5, smallest: 2.5}  # more than 2 search windows of 1 s
    planner = Planner(state, _Table({slow_start: 3000.0, smallest: 2000.0, runner_up: 1000.0},
                                    starts=late))
    assert planner.next().config == smallest
    _measured(state, smallest, 2000.0)
    planner.picks = 0  # another pick anywhere
    assert planner.next().config == runner_up


def test_a_region_over_the_memory_cap_is_never_proposed_and_its_edge_is_a_last_resort():
    state = _picking_state()
    over = LoaderConfig(256, num_workers=2, prefetch_factor=4)
    _measured(state, over, kind="infeasible")
    bigger = LoaderConfig(512, num_workers=2, prefetch_factor=8)  # dominates it: ruled out
    less_prefetch = LoaderConfig(512, num_workers=2, prefetch_factor=2)  # a risk: halved
    safe = LoaderConfig(128, num_workers=2, prefetch_factor=2)
    planner = Planner(state, _Table({bigger: 4000.0, less_prefetch: 3000.0, safe: 1600.0}))
    assert planner.next().config == safe  # 1600 > 3000 / 2
    _measured(state, safe, 1600.0)
    planner.picks = 0
    assert planner.next().config == less_prefetch  # what is left; `bigger` never


def test_workers_that_keep_dying_are_not_proposed_again():
    state = _state(num_workers=[0, 1, 2])
    _measured(state, LoaderConfig(64), 100.0)
    for w in (1, 2):
        _measured(state, LoaderConfig(64, num_workers=w, prefetch_factor=2), kind="failed")
    planner = Planner(state, _Table({LoaderConfig(256, num_workers=2, prefetch_factor=2): 900.0,
                                     LoaderConfig(256): 300.0}))
    # The sweep is done with (the defaults had workers, as when the user pins them) and the
    # options wait for two picks: the model's pick, fastest among what is still open.
    state.baselines = (LoaderConfig(64, num_workers=1, prefetch_factor=2),)
    assert planner.next().config == LoaderConfig(256)


@pytest.mark.parametrize(("prefetch", "twin"), [(4, True), (1, False)])
def test_a_prefetch_that_changes_nothing_is_not_measured_twice(prefetch, twin):
    # 512 samples at 64 a batch: 8 batches an epoch. 2 workers x a prefetch of 4 ask for all 8
    # at the epoch's start, as 2 x 8 does: the same loader. 2 x 1 asks for 2: another one.
    state = _state(n=512, num_workers=[1, 2])
    measured = LoaderConfig(64, num_workers=2, prefetch_factor=prefetch)
    _measured(state, state.baselines[0], 100.0)
    _measured(state, measured, 1000.0)
    other = LoaderConfig(64, num_workers=2, prefetch_factor=8)
    planner = Planner(state, _Table({other: 2000.0, LoaderConfig(32, num_workers=1,
                                                                 prefetch_factor=1): 1500.0}))
    assert (planner.next().config == other) is not twin
