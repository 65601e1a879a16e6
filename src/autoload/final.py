"""The finalists re-measured side by side, and the result built from them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, TypeVar

from autoload.config import LoaderConfig
from autoload.errors import AutoloadError, TrialFault, TrialTimeout, TuningFailedError
from autoload.pipeline import PipelineModel
from autoload.probe import Measurement, Window
from autoload.result import FinalistRecord, ProgressEvent, Role, TuneResult
from autoload.search import FINAL_WINDOW, SearchState, fault_reason

__all__ = ["finish", "interleaved"]

T = TypeVar("T")

# A simpler finalist this close to the best wins (the gap is noise): one standard deviation of
# the difference of two medians, but at least _TIE_MIN and at most _TIE_MAX.
_TIE_MIN, _TIE_MAX = 0.005, 0.03
_MAX_FINAL_WINDOWS = 5  # final windows at most this many search windows long
_FINAL_MIN_BATCHES = 4  # a final rate rests on a few batches at least, even slow ones
_EXTRA_ROUNDS = 2  # close finalists get up to this many times the planned rounds, time allowing
_DROP_MIN = 0.05  # a finalist is clearly behind only when at least this far under the best
_DUEL_GAP = 0.01  # a tie that gives more speed away than this is re-measured first
_DUEL_WINDOWS = 2  # held back in the plan for one more round of the two a tie separates


def interleaved(items: Sequence[T], round_index: int) -> list[T]:
    """The order to measure ``items`` in round ``round_index`` of a side-by-side comparison:
    rotated by one each round and reversed every other round, so no item always runs first
    or always follows the same one (a machine's speed drifts, and each run warms caches).

    Example:
        >>> [interleaved("abc", r) for r in range(3)]
        [['a', 'b', 'c'], ['a', 'c', 'b'], ['c', 'a', 'b']]
    """
    items = list(items)
    shift = round_index % len(items)
    order = items[shift:] + items[:shift]
    return order if round_index % 2 == 0 else order[::-1]


def _simplicity(config: LoaderConfig) -> tuple[int, int, bool, bool]:
    return (config.num_workers, config.prefetch_factor or 0, config.pin_memory,
            config.amp is not None)


def _preference_of(config: LoaderConfig, median: float, reference: int) -> tuple[Any, ...]:
    """How tied finalists are ranked: the simplest loader first; between equally simple ones,
    the batch size nearest the reference (the user's, or the defaults'), which changes their
    training least; then the faster."""
    distance = abs(math.log(config.batch_size / reference))
    return (*_simplicity(config), round(distance, 6), -median)


def _median(ms: Sequence[Measurement], name: str = "samples_per_second") -> float:
    return float(statistics.median(getattr(m, name) for m in ms))


class _Remeasure:
    """Interleaved rounds of the finalists, each in a rotated order.

    After two rounds a finalist clearly below the best (even its best rate is more than
    ``_drop_gap`` under the best median) is measured no more. With a budget, the time that
    frees pays for extra rounds of the rest, up to ``_EXTRA_ROUNDS`` x ``rounds`` in all: close
    finalists are what a noisy machine confuses, and more rounds of them settle it.
    """

    def __init__(self, state: SearchState, finalists: Sequence[LoaderConfig], rounds: int,
                 seconds: float, deadline: float) -> None:
        self.state, self.finalists, self.rounds, self.seconds = state, finalists, rounds, seconds
        self.deadline = deadline
        self.results: dict[LoaderConfig, list[Measurement]] = {c: [] for c in finalists}
        self.faulted: dict[LoaderConfig, str] = {}  # why each finalist that faulted did
        self.behind: set[LoaderConfig] = set()
        self.late_fault = False  # a window faulted after the deadline
        self.done = 0
        self.total = rounds * len(finalists)  # measurements planned, revised as it goes

    def left(self) -> float:
        return self.deadline - self.state.clock()

    def active(self) -> list[LoaderConfig]:
        return [c for c in self.finalists if c not in self.faulted and c not in self.behind]

    def measured(self) -> dict[LoaderConfig, list[Measurement]]:
        return {c: v for c, v in self.results.items() if v and c not in self.faulted}

    def run(self) -> dict[LoaderConfig, list[Measurement]]:
        """The planned rounds."""
        for r in range(self.rounds):
            active = self.active()
            if not active:
                break
            for config in interleaved(active, r):
                self._measure(config, r)
            if r >= 1:
                self._drop_behind(active, r + 1)
        return self.measured()

    def more(self, only: Sequence[LoaderConfig] | None = None) -> int:
        """Extra rounds, each only if it fits the budget (none without one): of ``only``, or
        of every finalist still close (those clearly behind drop out as they go). Returns the
        rounds run."""
        done = 0
        if not self.state.budget.limited:
            return done
        for r in range(self.rounds, _EXTRA_ROUNDS * self.rounds):
            active = [c for c in self.active() if only is None or c in only]
            cost = sum(self.seconds + self.state.overhead(c) for c in active)
            if len(active) < 2 or self.left() < cost:
                break
            self.total += len(active)
            for config in interleaved(active, r):
                self._measure(config, r)
            if only is None:
                self._drop_behind(active, r + 1)
            done += 1
        return done

    def _measure(self, config: LoaderConfig, r: int) -> None:
        # The soft limit (after the first batch) covers the warm-up and the window, and never
        # reaches past the budget, whatever the plan thought.
        state = self.state
        limit = self.seconds + 2 * state.overhead(config) + 0.5
        if state.budget.limited:
            left = self.left() - state.overhead(config)
            if (self.results[config] and left < self.seconds) or self._out_of_time():
                self.total -= 1
                return  # out of time: keep the rates measured so far
            limit = min(limit, max(self.seconds / 2, left))
        deadline = state.budget.deadline(state.window.deadline,
                                         at_least=state.min_deadline(self.seconds))
        window = Window(seconds=self.seconds, deadline=deadline,
                        min_batches=_FINAL_MIN_BATCHES, time_limit=limit)
        try:
            measurement = state.probe.measure(config, window)
            self.results[config].append(measurement)
            state.note_load(measurement)
        except Exception as exc:
            if isinstance(exc, AutoloadError) and not isinstance(exc, TrialFault):
                raise
            self.late_fault = self.late_fault or self.left() <= 0
            # A finalist that faults now is out, whatever it did before; one the budget's end
            # cut keeps what it measured (its later rounds find no time and are skipped).
            if not _out_of_budget(exc, deadline, state.window.deadline):
                self.faulted[config] = fault_reason(exc)
                self.total -= max(0, self.rounds - r - 1)
        self.done += 1
        if state.progress is not None:
            best = max(((_median(v), c) for c, v in self.results.items() if v),
                       default=(None, None), key=lambda t: t[0] or 0.0)
            state.progress(ProgressEvent(
                phase="final", done=self.done, total=self.total,
                elapsed=state.budget.elapsed(), budget=state.budget.seconds,
                best=best[0], best_config=best[1]))

    def _out_of_time(self) -> bool:
        """Past the deadline only a first rate is still worth a window (a result needs one),
        and only until a window has faulted there (a hang must not take one per finalist)."""
        return self.left() <= 0 and (any(self.results.values()) or self.late_fault)

    def _drop_behind(self, active: list[LoaderConfig], rounds_done: int) -> None:
        measured = {c: self.results[c] for c in active
                    if c not in self.faulted and self.results[c]}
        if len(measured) < 2:
            return
        top = max(_median(ms) for ms in measured.values())
        floor = top * (1 - _drop_gap(_window_cv(self.state, measured, self.seconds)))
        out = {c for c, ms in measured.items() if max(m.samples_per_second for m in ms) < floor}
        self.total -= len(out - self.behind) * max(0, self.rounds - rounds_done)
        self.behind |= out


def _decide(state: SearchState, measured: dict[LoaderConfig, list[Measurement]],
            seconds: float, reference: int,
            pair: tuple[LoaderConfig, LoaderConfig] | None = None,
            ) -> tuple[LoaderConfig, LoaderConfig, float]:
    """The winner, the fastest, and the tie margin: the simplest finalist within the margin
    of the fastest median. After a duel the margin is the noise of the two dueled (their
    rounds, their spread), since they alone are being told apart."""
    medians = {c: _median(ms) for c, ms in measured.items()}
    fastest = max(medians, key=lambda c: medians[c])
    basis = measured if pair is None else {c: measured[c] for c in pair if c in measured}
    tie = _tie_margin(state, basis, seconds)
    tied = [c for c, rate in medians.items() if rate >= medians[fastest] * (1 - tie)]
    winner = min(tied, key=lambda c: _preference_of(c, medians[c], reference))
    return winner, fastest, tie


def _count_rounds(n: int) -> str:
    return f"{n} round" if n == 1 else f"{n} rounds"


def _window_cv(state: SearchState, measured: dict[LoaderConfig, list[Measurement]],
               seconds: float) -> float:
    """One final window's coefficient of variation: the median spread of the finalists'
    repeated rates, or before a second round the search's noise estimate."""
    spreads = [statistics.stdev(rates) / statistics.fmean(rates)
               for rates in ([m.samples_per_second for m in ms] for ms in measured.values())
               if len(rates) >= 2 and statistics.fmean(rates) > 0]
    return statistics.median(spreads) if spreads else state.noise.window_cv(seconds)


def _drop_gap(cv: float) -> float:
    """How far under the best median a finalist's best rate must be to be clearly behind:
    4 standard deviations of the difference of two windows, and at least ``_DROP_MIN``."""
    return max(_DROP_MIN, 4 * math.sqrt(2) * cv)


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
    # On a busy machine a rate swings with the other processes' load: twice the rounds,
    # interleaved, spread each configuration's windows over more of those swings.
    wanted = state.final_rounds * (2 if state.busy() else 1)
    if not state.budget.limited:
        return wanted, seconds
    shortest = state.base_seconds / 2
    left = state.budget.left() - state.window.seconds
    mean_overhead = statistics.fmean(state.overhead(c) for c in finalists)
    # Two windows are held back for a duel (see finish), once there are finalists enough for
    # a tie to give speed away; unused, they go to extra rounds or the step-alone bound.
    duel = _DUEL_WINDOWS if len(finalists) >= 3 else 0
    for rounds in range(wanted, 0, -1):
        windows = len(finalists) + duel / rounds  # a round's share of the duel included
        seconds = left / rounds / windows - mean_overhead
        if seconds >= shortest:
            break
    return rounds, min(max(seconds, shortest), _MAX_FINAL_WINDOWS * state.window.seconds)


def _out_of_budget(exc: Exception, deadline: float, usual: float) -> bool:
    """A deadline that the budget's end brought forward, passed while the loader still
    delivered (a start-up or a step too slow for the time left): the budget ended the window,
    not a fault of the configuration. Items that stopped arriving are a fault either way."""
    return (isinstance(exc, TrialTimeout) and deadline < usual
            and not str(exc).startswith("items stopped arriving"))


def _no_finalist_error(faulted: dict[LoaderConfig, str],
                       search_faults: list[str]) -> TuningFailedError:
    """Why no finalist could be re-measured: the one reason they share, or the budget (and
    the search's last fault, which is often what used it up: a data set that hung)."""
    reasons = sorted(set(faulted.values()))
    if not reasons:
        last = f" (the search's last fault: {search_faults[-1]})" if search_faults else ""
        return TuningFailedError("the budget ran out before any finalist could be re-measured"
                                 f"{last}; raise --timeout.")
    if len(reasons) == 1:
        return TuningFailedError(f"every finalist faulted when re-measured: {reasons[0]}")
    return TuningFailedError("every finalist faulted when re-measured (" + "; ".join(reasons[:3])
                             + "); the machine may be under memory pressure: raise --memory-cap "
                             "or rerun.")


def _records(finalists: dict[LoaderConfig, set[str]],
             measured: dict[LoaderConfig, list[Measurement]],
             model: PipelineModel | None, state: SearchState,
             ) -> dict[LoaderConfig, FinalistRecord]:
    records = {}
    for config, ms in measured.items():
        roles = finalists[config]
        role: Role = ("defaults" if "defaults" in roles else
                      "recipe" if "recipe" in roles else
                      "loader-only" if "loader-only" in roles else "candidate")
        prediction = None if model is None else model.predict(config)
        records[config] = FinalistRecord(
            config=config, rates=tuple(m.samples_per_second for m in ms), role=role,
            startup_seconds=_median(ms, "startup_seconds"),
            peak_host_bytes=max(m.peak_host_bytes for m in ms),
            peak_gpu_bytes=max((m.peak_gpu_bytes or 0 for m in ms), default=0) or None,
            data_wait_fraction=_wait(ms),
            predicted=state.predicted.get(config,
                                          None if prediction is None else prediction.fitted),
        )
    return records


def _wait(ms: Sequence[Measurement]) -> float | None:
    """The median share of time spent waiting for data, over the windows that measured it: a
    window cut short is left out (one cut in its warm-up measured no span and reads 0, which
    made every row of the report read 0% on a busy machine); ``None`` when all were cut."""
    read = [m.data_wait_fraction for m in ms if not m.cut_short]
    return float(statistics.median(read)) if read else None


def _step_rate(state: SearchState, winner: FinalistRecord) -> float | None:
    """An upper bound: the training step alone, on a batch already on the device. It takes two
    warm-up steps and one at least; a batch at the winner's rate bounds a step's time."""
    step_window = state.window.seconds
    if state.budget.limited:
        step_seconds = winner.config.batch_size / max(winner.median, 1e-9)
        step_window = min(step_window, state.budget.hard_left(hold=3 * step_seconds))
    if step_window <= 0:
        return None
    try:
        return state.probe.step_rate(winner.config, Window(seconds=step_window, min_batches=1))
    except Exception:  # the bound is a nicety; a fault here must not lose the result
        return None


def finish(state: SearchState, *, model: PipelineModel | None, device: str,
           samples_per_epoch: int | None, notes: list[str]) -> TuneResult:
    """Re-measure the finalists side by side and build the result."""
    finalists = state.finalists()
    rounds, seconds = _plan(state, list(finalists))
    remeasure = _Remeasure(state, list(finalists), rounds, seconds,
                           state.budget.final_deadline(hold=state.window.seconds))
    measured = remeasure.run()
    if not measured:
        raise _no_finalist_error(remeasure.faulted, [reason for reason, _ in state.failures])
    reference = (state.baselines[0].batch_size if state.baselines else
                 max(measured, key=lambda c: _median(measured[c])).batch_size)
    winner, fastest, tie = _decide(state, measured, seconds, reference)
    duel = 0
    if fastest != winner and _median(measured[fastest]) > (1 + _DUEL_GAP) * _median(
            measured[winner]):
        # A tie that gives speed away is settled by more rounds of the two, not by the margin.
        duel = remeasure.more([fastest, winner])
    else:
        remeasure.more()
    measured = remeasure.measured()
    winner, fastest, tie = _decide(state, measured, seconds, reference,
                                   pair=(fastest, winner) if duel else None)
    records = _records(finalists, measured, model, state)
    most = max(len(ms) for ms in measured.values())
    behind = sum(1 for ms in measured.values() if len(ms) < most)
    dropped = (f" ({behind} clearly behind after fewer rounds)" if behind else "")
    dueled = (f" (the fastest and a simpler one near it, {_count_rounds(duel)} more side by "
              "side)" if duel else "")
    notes.append(
        f"noise: one second of measuring a configuration varied by about "
        f"{state.noise.per_second:.1%} from run to run, so search windows lasted "
        f"{state.window.seconds:.2f} s and the finalists ran up to {most} x {seconds:.2f} s"
        f"{dropped}; those within {tie:.1%} of the best counted as tied{dueled}, and the "
        f"simplest of them won (between equally simple ones, the batch size nearest "
        f"{reference})."
    )
    winner_record = records[winner]
    step_rate = _step_rate(state, winner_record)
    pilot = state.measured.get(state.baselines[0])
    fetch_rate = None
    if pilot is not None and pilot.state == "ok" and pilot.data_wait_fraction:
        # At num_workers=0 every wait is the main process fetching and collating.
        fetch_rate = pilot.samples_per_second / pilot.data_wait_fraction
    baselines = {role: f.median for f in records.values() for role in finalists[f.config]
                 if role in ("defaults", "recipe")}
    prediction = None if model is None else model.predict(winner)
    return TuneResult(
        config=winner, loader_kwargs=winner.loader_kwargs(), amp=winner.amp,
        samples_per_second=winner_record.median, baselines=baselines,
        finalists=tuple(sorted(records.values(), key=lambda f: -f.median)),
        trials=tuple(state.records), device=device, samples_per_epoch=samples_per_epoch,
        elapsed_seconds=state.budget.elapsed(), space_size=state.space.size, notes=tuple(notes),
        step_rate=step_rate, fetch_rate=fetch_rate, noise_cv=state.noise.per_second,
        predicted_bottleneck=None if prediction is None else prediction.bound,
        others_cpu=state.others_cpu(), busy=state.busy(),
        faults=tuple(sorted(set(remeasure.faulted.values()))),
    )
