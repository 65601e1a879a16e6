"""The finalists re-measured side by side, and the result built from them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from autoload.config import LoaderConfig
from autoload.errors import AutoloadError, TuningFailedError
from autoload.probe import Measurement, Window
from autoload.result import FinalistRecord, TuneResult
from autoload.study import FINAL_WINDOW, MARGIN, ProgressEvent, SearchState

__all__ = ["finish"]

# A simpler finalist this close to the best wins (the gap is noise): one standard deviation of
# the difference of two medians, but at least _TIE_MIN and at most _TIE_MAX.
_TIE_MIN, _TIE_MAX = 0.01, 0.03
_MAX_FINAL_WINDOWS = 5  # final windows at most this many search windows long
_FINAL_MIN_BATCHES = 4  # a final rate rests on a few batches at least, even slow ones


def _final_round_order(configs: list[LoaderConfig], round_index: int) -> list[LoaderConfig]:
    shift = round_index % len(configs)
    order = configs[shift:] + configs[:shift]
    return order if round_index % 2 == 0 else order[::-1]


def _simplicity(config: LoaderConfig) -> tuple[int, int, bool, bool]:
    return (config.num_workers, config.prefetch_factor or 0, config.pin_memory,
            config.amp is not None)


def _remeasure(state: SearchState, finalists: dict[LoaderConfig, set[str]], rounds: int,
               seconds: float) -> dict[LoaderConfig, list[Measurement]]:
    """Measure the finalists side by side: interleaved rounds, each in a rotated order."""
    results: dict[LoaderConfig, list[Measurement]] = {c: [] for c in finalists}
    dropped: set[LoaderConfig] = set()
    done, total = 0, rounds * len(finalists)
    for r in range(rounds):
        for config in _final_round_order(list(finalists), r):
            if config in dropped:
                continue
            # The soft limit (after the first batch) covers the warm-up and the window, and
            # never reaches past the budget, whatever the plan thought.
            limit = seconds + 2 * state.overhead(config) + 0.5
            if state.budget is not None:
                left = (_final_deadline(state) + MARGIN * state.budget - state.clock()
                        - state.overhead(config))
                if results[config] and left < seconds:
                    continue  # out of time: keep the rates measured so far
                limit = min(limit, max(seconds / 2, left))
            window = Window(seconds=seconds, deadline=state.window.deadline,
                            max_warmup=state.window.max_warmup, min_batches=_FINAL_MIN_BATCHES,
                            time_limit=limit)
            try:
                results[config].append(state.probe.measure(config, window))
            except AutoloadError:
                raise
            except Exception:  # a finalist that faults now is out, whatever it did before
                dropped.add(config)
            done += 1
            if state.progress is not None:
                best = max(((_median(v), c) for c, v in results.items() if v),
                           default=(None, None), key=lambda t: t[0] or 0.0)
                state.progress(ProgressEvent("final", done, total, state.clock() - state.start,
                                             state.budget, best[0], best[1]))
    return {c: v for c, v in results.items() if v and c not in dropped}

def _tie_margin(state: SearchState, measured: dict[LoaderConfig, list[Measurement]],
                seconds: float) -> float:
    """How close two finalists' medians must be to count as a tie, from the spread of the
    finalists' repeated rates (or, after a single round, from the search's noise estimate)."""
    spreads = [statistics.stdev(rates) / statistics.fmean(rates)
               for rates in ([m.samples_per_second for m in ms] for ms in measured.values())
               if len(rates) >= 2 and statistics.fmean(rates) > 0]
    rounds = max(len(ms) for ms in measured.values())
    cv = statistics.median(spreads) if spreads else state.window_cv(seconds)
    # The median of R rates varies about 1.25 / sqrt(R) as much as one; a difference sqrt(2).
    sigma = math.sqrt(2) * 1.25 * cv / math.sqrt(rounds)
    return min(max(sigma, _TIE_MIN), _TIE_MAX)


def _plan(state: SearchState, finalists: list[LoaderConfig]) -> tuple[int, float]:
    """Rounds and window length that fit what is left of the budget.

    Fewer rounds only before windows shorter than half the budget's default window: repeated,
    interleaved windows beat longer ones against a machine whose speed drifts.
    """
    seconds = FINAL_WINDOW * state.window.seconds
    if state.budget is None:
        return state.final_rounds, seconds
    shortest = state.base_seconds / 2
    left = _final_deadline(state) - state.clock()
    overhead = sum(state.overhead(c) for c in finalists)
    for rounds in range(state.final_rounds, 0, -1):
        seconds = (left / rounds - overhead) / len(finalists)
        if seconds >= shortest:
            break
    return rounds, min(max(seconds, shortest), _MAX_FINAL_WINDOWS * state.window.seconds)


def _final_deadline(state: SearchState) -> float:
    """When the re-measure must be over: before the margin (a measurement can overrun its plan
    by a step, and clean-up takes time) and the step-alone bound."""
    assert state.budget is not None
    return state.start + (1 - MARGIN) * state.budget - state.window.seconds


def finish(state: SearchState, *, device: str, samples_per_epoch: int | None,
           notes: list[str]) -> TuneResult:
    """Re-measure the finalists side by side and build the result."""
    finalists = state.finalists()
    rounds, seconds = _plan(state, list(finalists))
    measured = _remeasure(state, finalists, rounds, seconds)
    if not measured:
        raise TuningFailedError("every finalist faulted when re-measured; the machine may be "
                                "under memory pressure: raise --memory-cap or rerun.")

    records = {
        config: FinalistRecord(
            config, tuple(m.samples_per_second for m in ms),
            "defaults" if "defaults" in finalists[config] else
            "recipe" if "recipe" in finalists[config] else "candidate",
            startup_seconds=_median(ms, "startup_seconds"),
            peak_host_bytes=max(m.peak_host_bytes for m in ms),
            peak_gpu_bytes=max((m.peak_gpu_bytes or 0 for m in ms), default=0) or None,
            data_wait_fraction=_median(ms, "data_wait_fraction"),
        )
        for config, ms in measured.items()
    }
    top = max(f.median for f in records.values())
    tie = _tie_margin(state, measured, seconds)
    winner = min((f for f in records.values() if f.median >= top * (1 - tie)),
                 key=lambda f: _simplicity(f.config)).config
    notes.append(
        f"noise: one second of measuring a configuration varied by about {state.noise():.1%} "
        f"from run to run, so search windows lasted {state.window.seconds:.2f} s and the "
        f"finalists ran up to {max(len(ms) for ms in measured.values())} x {seconds:.2f} s; "
        f"those within {tie:.1%} of the best counted as tied, and the simplest of them won."
    )
    # An upper bound: the training step alone, on a batch already on the device. It takes two
    # warm-up steps and one at least; a batch at the winner's rate bounds a step's time.
    step_window = state.window.seconds
    if state.budget is not None:
        step_seconds = winner.batch_size / max(records[winner].median, 1e-9)
        step_window = min(step_window,
                          state.start + state.budget - state.clock() - 3 * step_seconds)
    step_rate = None
    if step_window > 0:
        try:
            step_rate = state.probe.step_rate(winner, Window(seconds=step_window, min_batches=1))
        except Exception:  # the bound is a nicety; a fault here must not lose the result
            step_rate = None
    pilot = state.measured.get(state.baselines[0])
    fetch_rate = None
    if pilot is not None and pilot.state == "ok" and pilot.data_wait_fraction:
        # At num_workers=0 every wait is the main process fetching and collating.
        fetch_rate = pilot.samples_per_second / pilot.data_wait_fraction
    baselines = {role: f.median for f in records.values() for role in finalists[f.config]
                 if role != "candidate"}
    return TuneResult(
        config=winner,
        loader_kwargs=winner.loader_kwargs(),
        amp=winner.amp,
        samples_per_second=records[winner].median,
        baselines=baselines,
        finalists=tuple(sorted(records.values(), key=lambda f: -f.median)),
        trials=tuple(state.records),
        device=device,
        samples_per_epoch=samples_per_epoch,
        elapsed_seconds=state.clock() - state.start,
        space_size=state.space.size,
        notes=tuple(notes),
        step_rate=step_rate,
        fetch_rate=fetch_rate,
        noise_cv=state.noise(),
    )


def _median(ms: Sequence[Measurement], name: str = "samples_per_second") -> float:
    return float(statistics.median(getattr(m, name) for m in ms))
