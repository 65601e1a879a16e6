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
_EXTRA_ROUNDS = 2  # close finalists get up to this many times the planned rounds, time allowing
_DROP_MIN = 0.05  # a finalist is clearly behind only when at least this far under the best


def _final_round_order(configs: list[LoaderConfig], round_index: int) -> list[LoaderConfig]:
    shift = round_index % len(configs)
    order = configs[shift:] + configs[:shift]
    return order if round_index % 2 == 0 else order[::-1]


def _simplicity(config: LoaderConfig) -> tuple[int, int, bool, bool]:
    return (config.num_workers, config.prefetch_factor or 0, config.pin_memory,
            config.amp is not None)


def _remeasure(state: SearchState, finalists: dict[LoaderConfig, set[str]], rounds: int,
               seconds: float) -> dict[LoaderConfig, list[Measurement]]:
    """Measure the finalists side by side: interleaved rounds, each in a rotated order.

    After two rounds a finalist clearly below the best (even its best rate is more than
    ``_drop_gap`` under the best median) is measured no more. With a budget, the time that
    frees pays for extra rounds of the rest, up to ``_EXTRA_ROUNDS`` x ``rounds`` in all: close
    finalists are what a noisy machine confuses, and more rounds of them settle it.
    """
    results: dict[LoaderConfig, list[Measurement]] = {c: [] for c in finalists}
    faulted: set[LoaderConfig] = set()
    behind: set[LoaderConfig] = set()
    most = rounds if state.budget is None else _EXTRA_ROUNDS * rounds
    done, r = 0, 0
    total = rounds * len(finalists)  # measurements planned, for progress; revised as it goes
    while r < most:
        active = [c for c in finalists if c not in faulted and c not in behind]
        if not active:
            break
        if r >= rounds:  # an extra round: only for close finalists, and only if it fits
            cost = sum(seconds + state.overhead(c) for c in active)
            if len(active) < 2 or _time_left(state) < cost:
                break
            total += len(active)
        for config in _final_round_order(active, r):
            # The soft limit (after the first batch) covers the warm-up and the window, and
            # never reaches past the budget, whatever the plan thought.
            limit = seconds + 2 * state.overhead(config) + 0.5
            if state.budget is not None:
                left = _time_left(state) - state.overhead(config)
                if results[config] and left < seconds:
                    total -= 1
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
                faulted.add(config)
                total -= max(0, rounds - r - 1)
            done += 1
            if state.progress is not None:
                best = max(((_median(v), c) for c, v in results.items() if v),
                           default=(None, None), key=lambda t: t[0] or 0.0)
                state.progress(ProgressEvent("final", done, total,
                                             state.clock() - state.start, state.budget,
                                             best[0], best[1]))
        r += 1
        if r >= 2:
            out = _clearly_behind(state, {c: results[c] for c in active
                                          if c not in faulted and results[c]}, seconds)
            total -= len(out - behind) * max(0, rounds - r)
            behind |= out
    return {c: v for c, v in results.items() if v and c not in faulted}


def _time_left(state: SearchState) -> float:
    assert state.budget is not None
    return _final_deadline(state) + MARGIN * state.budget - state.clock()


def _window_cv(state: SearchState, measured: dict[LoaderConfig, list[Measurement]],
               seconds: float) -> float:
    """One final window's coefficient of variation: the median spread of the finalists'
    repeated rates, or before a second round the search's noise estimate."""
    spreads = [statistics.stdev(rates) / statistics.fmean(rates)
               for rates in ([m.samples_per_second for m in ms] for ms in measured.values())
               if len(rates) >= 2 and statistics.fmean(rates) > 0]
    return statistics.median(spreads) if spreads else state.window_cv(seconds)


def _drop_gap(cv: float) -> float:
    """How far under the best median a finalist's best rate must be to be clearly behind:
    4 standard deviations of the difference of two windows, and at least ``_DROP_MIN``."""
    return max(_DROP_MIN, 4 * math.sqrt(2) * cv)


def _clearly_behind(state: SearchState, measured: dict[LoaderConfig, list[Measurement]],
                    seconds: float) -> set[LoaderConfig]:
    if len(measured) < 2:
        return set()
    top = max(_median(ms) for ms in measured.values())
    floor = top * (1 - _drop_gap(_window_cv(state, measured, seconds)))
    return {c for c, ms in measured.items() if max(m.samples_per_second for m in ms) < floor}


def _tie_margin(state: SearchState, measured: dict[LoaderConfig, list[Measurement]],
                seconds: float) -> float:
    """How close two finalists' medians must be to count as a tie, from the spread of the
    finalists' repeated rates (or, after a single round, from the search's noise estimate)."""
    close = {c: ms for c, ms in measured.items() if len(ms) >= 2} or measured
    rounds = statistics.median(len(ms) for ms in close.values())
    cv = _window_cv(state, close, seconds)
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
    most = max(len(ms) for ms in measured.values())
    behind = sum(1 for ms in measured.values() if len(ms) < most)
    dropped = (f" ({behind} clearly behind after fewer rounds)" if behind else "")
    notes.append(
        f"noise: one second of measuring a configuration varied by about {state.noise():.1%} "
        f"from run to run, so search windows lasted {state.window.seconds:.2f} s and the "
        f"finalists ran up to {most} x {seconds:.2f} s{dropped}; "
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
