"""The search's state: one trial at a time, faults recorded, the budget kept."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna

from autoload.config import LoaderConfig
from autoload.errors import AutoloadError, TuningFailedError
from autoload.memory import MemoryCapExceeded, is_oom
from autoload.probe import Measurement, Probe, TrialTimeout, Window
from autoload.result import TrialRecord
from autoload.space import SearchSpace, build_space

__all__ = ["ProgressCallback", "ProgressEvent", "SearchState"]

FINAL_WINDOW = 1.5  # final windows are this much longer than the search's
FINAL_SHARE_MAX = 0.4  # of the budget, at most, kept for the re-measure
MARGIN = 0.05  # of the budget, left unplanned: a measurement can overrun by a step
_OVERHEAD_GUESS = 0.3  # seconds a probe spends outside its window, until one is measured
_SAME_FAILURES_TO_STOP = 3
_NEGLIGIBLE_FETCH_SHARE = 0.1  # of the time spent fetching at num_workers=0
WORKERS_PER_CPU = 4
TRIAL_WINDOWS = 4  # a search trial's soft time limit, in windows
_ABANDON_BELOW = 0.5  # of the best rate so far: a trial clearly under it stops early
_REPEATS_TO_STOP = 25
# Noise. A search window should be long enough that its rate varies by about SEARCH_CV from run to
# run, within a factor 2 of the budget's default either way, and short enough for 20 trials;
# until something is measured, one second of measuring is taken to vary by _NOISE_GUESS.
SEARCH_CV = 0.03
MIN_SEARCH_TRIALS = 20
_NOISE_GUESS = 0.03
PILOT_RUNS = 3  # windows of PyTorch's defaults measured before the study


@dataclass(frozen=True)
class ProgressEvent:
    """Sent to the ``progress`` callback after each trial and each final measurement.

    Attributes:
        phase: ``"search"`` while the study runs, ``"final"`` during the re-measure.
        done: Trials (or final measurements) done so far in this phase.
        total: Trials (or measurements) planned, when known.
        elapsed: Seconds since tuning started.
        budget: The whole run's budget in seconds, if any.
        best: Best rate seen so far, in samples per second.
        best_config: The configuration that reached it.
        last: The trial just finished (search phase only).
    """

    phase: Literal["search", "final"]
    done: int
    total: int | None
    elapsed: float
    budget: float | None
    best: float | None
    best_config: LoaderConfig | None
    last: TrialRecord | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def _describe(exc: BaseException) -> str:
    """One line naming the exception; for a worker's error, its original last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    if "DataLoader worker" in lines[0] and ("exited unexpectedly" in lines[0]
                                            or "killed by signal" in lines[0]):
        return f"worker died: {lines[0]}"
    last = lines[-1]
    if "in DataLoader worker process" in lines[0]:  # torch's re-raise: the original is last
        return last
    return last if last.startswith(name) else f"{name}: {last}"


class SearchState:
    """The state of one tuning run; :func:`tune` is its only user."""

    def __init__(self, space: SearchSpace, probe: Probe, *, window: Window,
                 clock: Callable[[], float], start: float, budget: float | None,
                 n_trials: int | None, progress: ProgressCallback | None,
                 n_finalists: int, final_rounds: int) -> None:
        self.space, self.probe, self.window, self.clock = space, probe, window, clock
        self.start, self.budget, self.n_trials, self.progress = start, budget, n_trials, progress
        self.records: list[TrialRecord] = []
        self.measured: dict[LoaderConfig, TrialRecord] = {}
        self.failures: list[tuple[str, BaseException]] = []
        self.repeats = 0
        # Seconds each probe spent outside its window (start-up, warm-up, clean-up), by config.
        self.overheads: dict[LoaderConfig, float] = {}
        self.pilots: set[LoaderConfig] = set()  # measured before the study, not yet a trial
        self.n_finalists, self.final_rounds = n_finalists, final_rounds
        self.baselines: tuple[LoaderConfig, ...] = ()
        self.stage = 0  # the next of _STAGES to enqueue
        self.base_seconds = window.seconds  # the budget's window, before any noise is known
        # Run-to-run coefficients of variation of the rate, scaled to one second of measuring:
        # from each window's own blocks (which miss noise slower than a window), and from the
        # spread of the pilot's repeated windows.
        self.block_noise: list[float] = []
        self.pilot_noise: float | None = None

    def best(self) -> TrialRecord | None:
        ok = [r for r in self.measured.values() if r.state == "ok"]
        return max(ok, key=lambda r: r.samples_per_second, default=None)

    def measure(self, config: LoaderConfig, number: int) -> TrialRecord:
        """Probe ``config`` once; a fault becomes a record with its reason, not an exception."""
        began = self.clock()
        best = self.best()
        window = dataclasses.replace(
            self.window,
            abandon_below=None if best is None else _ABANDON_BELOW * best.samples_per_second,
            time_limit=self._trial_time_limit(),
        )
        try:
            m = self.probe.measure(config, window)
        except AutoloadError:
            raise
        except Exception as exc:
            if isinstance(exc, MemoryCapExceeded):
                record = TrialRecord(number, config, "infeasible", reason=str(exc))
            elif is_oom(exc):
                record = TrialRecord(number, config, "infeasible", reason="CUDA out of memory")
            else:
                reason = str(exc) if isinstance(exc, TrialTimeout) else _describe(exc)
                record = TrialRecord(number, config, "failed", reason=reason)
                self.failures.append((reason, exc))
        else:
            record = _record(number, config, m)
            self.overheads[config] = self.clock() - began - m.seconds
            if m.rate_cv is not None:
                self.block_noise.append(m.rate_cv * math.sqrt(m.seconds))
                self._size_window()
        self.measured[config] = record
        return record

    def noise(self) -> float:
        """How much one second of measuring one configuration varies from run to run (its
        coefficient of variation): the larger of what windows show inside and what the pilot's
        repeated windows showed."""
        estimates = [statistics.median(self.block_noise)] if self.block_noise else []
        if self.pilot_noise is not None:
            estimates.append(self.pilot_noise)
        return max(estimates, default=_NOISE_GUESS)

    def window_cv(self, seconds: float | None = None) -> float:
        """The expected coefficient of variation of one window's rate."""
        return self.noise() / math.sqrt(seconds or self.window.seconds)

    def gap(self, sigmas: float) -> float:
        """A relative difference between two windows' rates that is ``sigmas`` standard
        deviations of the noise."""
        return sigmas * math.sqrt(2) * self.window_cv()

    def _size_window(self) -> None:
        """Windows long enough for a rate within ``SEARCH_CV``: from half the budget's default
        up to twice it, as long as the search keeps room for ``MIN_SEARCH_TRIALS`` trials."""
        wanted = (self.noise() / SEARCH_CV) ** 2
        lo, hi = self.base_seconds / 2, 2 * self.base_seconds
        if self.budget is not None:
            search = (1 - FINAL_SHARE_MAX - MARGIN) * self.budget
            hi = max(lo, min(hi, search / MIN_SEARCH_TRIALS - self.overhead()))
        self.window = dataclasses.replace(self.window, seconds=min(max(wanted, lo), hi))

    def objective(self, trial: optuna.Trial) -> float:
        config = self.space.suggest(trial)
        trial.set_user_attr("config", config.to_dict())
        known = self.measured.get(config)
        if known is not None and config in self.pilots:
            self.pilots.discard(config)  # measured before the study: this trial is its record
            record = dataclasses.replace(known, number=trial.number)
        elif known is not None:
            self.repeats += 1
            record = TrialRecord(trial.number, config, "repeat", known.samples_per_second,
                                 reason=known.reason)
        else:
            self.repeats = 0
            record = self.measure(config, trial.number)
        return self._finish(trial, record, known)

    def _finish(self, trial: optuna.Trial, record: TrialRecord,
                known: TrialRecord | None) -> float:
        # Optuna's TPE reads constraints: a positive value marks the trial infeasible, so the
        # sampler learns to avoid a region that faults instead of sampling it again and again.
        outcome = known or record
        trial.set_constraint("feasible", 0.0 if outcome.state == "ok" else 1.0)
        trial.set_user_attr("state", record.state)
        for name in ("reason", "startup_seconds", "data_wait_fraction", "peak_host_bytes"):
            if getattr(record, name) is not None:
                trial.set_user_attr(name, getattr(record, name))
        self.records.append(record)
        if self.progress is not None:
            best = self.best()
            self.progress(ProgressEvent(
                "search", len(self.records), self.n_trials, self.clock() - self.start,
                self.budget, None if best is None else best.samples_per_second,
                None if best is None else best.config, record,
            ))
        return record.samples_per_second

    def _trial_time_limit(self) -> float:
        """A trial may take a few windows past its first batch, but never the re-measure's
        reserve."""
        limit = TRIAL_WINDOWS * self.window.seconds
        if self.budget is not None:
            left = (self.start + (1 - MARGIN) * self.budget - self.final_reserve()
                    - self.clock())
            limit = min(limit, max(self.window.seconds, left))
        return limit

    def overhead(self, config: LoaderConfig | None = None) -> float:
        """Seconds a probe of ``config`` spends outside its window (the median, if unknown)."""
        if config in self.overheads:
            return self.overheads[config]
        return statistics.median(self.overheads.values()) if self.overheads else _OVERHEAD_GUESS

    def finalists(self) -> dict[LoaderConfig, set[str]]:
        """The best few measured configurations and the baselines that did not fault.

        All of the best few, however far below the best they measured: one short window can
        flatter a configuration by more than the noise estimate says (it was seen on
        memory-bound items), and only the side-by-side re-measure can tell.
        """
        chosen = {r.config: {"candidate"} for r in self._ok()[: self.n_finalists]}
        for role, config in zip(("defaults", "recipe"), self.baselines, strict=False):
            known = self.measured.get(config)
            if known is None or known.state == "ok":  # a baseline that faulted stays out
                chosen.setdefault(config, set()).add(role)
        return chosen

    def final_reserve(self) -> float:
        """Seconds to keep for the side-by-side re-measure, from each likely finalist's own
        start-up cost (workers and warm-up differ a lot between configurations)."""
        likely: list[LoaderConfig | None] = list(self.finalists())
        likely += [None] * max(0, self.n_finalists + len(self.baselines) - len(likely))
        per_round = sum(FINAL_WINDOW * self.window.seconds + self.overhead(c) for c in likely)
        reserve = self.final_rounds * per_round + self.window.seconds  # + the step-alone bound
        # On a short budget the final windows shrink rather than the search vanishing.
        return min(reserve, FINAL_SHARE_MAX * (self.budget or 0.0))

    def should_stop(self) -> bool:
        next_trial = self.window.seconds + self.overhead()
        if self.budget is not None and (
            self.clock() + next_trial + self.final_reserve()
            >= self.start + (1 - MARGIN) * self.budget
        ):
            return True
        if self.repeats >= _REPEATS_TO_STOP or len(self.measured) >= self.space.size:
            return True
        recent = self.failures[-_SAME_FAILURES_TO_STOP:]
        return (self.best() is None and len(recent) == _SAME_FAILURES_TO_STOP
                and len({reason for reason, _ in recent}) == 1)

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.should_stop():
            study.stop()
            return
        waiting = bool(study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.WAITING,)))
        # A stage is asked again once its seeds are measured, and is done when it proposes
        # nothing new.
        while not waiting and self.stage < len(_STAGES):
            seeds = [c for c in _STAGES[self.stage](self) if c not in self.measured]
            if not seeds:
                self.stage += 1
            for config in dict.fromkeys(seeds):
                study.enqueue_trial(self.space.params(config))
            waiting = bool(seeds)

    def _ok(self) -> list[TrialRecord]:
        return sorted((r for r in self.measured.values() if r.state == "ok"),
                      key=lambda r: r.samples_per_second, reverse=True)


def _record(number: int, config: LoaderConfig, m: Measurement) -> TrialRecord:
    return TrialRecord(number, config, "ok", m.samples_per_second, m.startup_seconds,
                       m.data_wait_fraction, m.peak_host_bytes, m.peak_gpu_bytes)


def no_feasible_error(state: SearchState) -> TuningFailedError:
    if state.failures:
        reasons = {reason for reason, _ in state.failures}
        reason, exc = state.failures[-1]
        if len(reasons) == 1 and not all(r.state == "infeasible" for r in state.records):
            error = TuningFailedError(
                f"every trial failed with the same error from your code: {reason}; fix it, "
                "then tune again."
            )
            error.__cause__ = exc
            return error
    seen = sorted({r.reason or r.state for r in state.records if r.state != "ok"})
    return TuningFailedError(
        "no configuration could be measured (" + "; ".join(seen[:3]) + "); raise the memory "
        "cap (--memory-cap), lower max_batch_size, or fix the errors above."
    )


def measure_pilot(state: SearchState, defaults: LoaderConfig) -> TrialRecord:
    """Measure PyTorch's defaults (trial 0 anyway) a few times, back to back, before the study.

    Their spread tells how much one configuration's rate varies from run to run, which sizes the
    search's windows; their mean is the trial's record.
    """
    known = state.measured.get(defaults)
    if known is not None:  # a resumed study measured it before
        return known
    window, records = state.window, []
    for _ in range(PILOT_RUNS):
        state.window = window  # one window length for all: a rate's spread depends on it
        record = state.measure(defaults, -1)
        state.pilots.add(defaults)
        if record.state != "ok":
            return record
        records.append(record)
    rates = [r.samples_per_second for r in records]
    mean = statistics.fmean(rates)
    state.pilot_noise = statistics.stdev(rates) / mean * math.sqrt(window.seconds)
    state._size_window()
    record = dataclasses.replace(records[-1], samples_per_second=mean)
    state.measured[defaults] = record
    return record


def widen_for_slow_fetches(state: SearchState, space: SearchSpace, record: TrialRecord,
                           n: int | None, space_args: dict[str, Any],
                           notes: list[str]) -> SearchSpace:
    """When fetching items took more than a negligible share of the time under PyTorch's
    defaults (``record``), search up to 4x the CPUs for workers.

    Items that wait (disk, network) gain most from extra workers, but CPU-heavy items can gain too
    while the model competes for the cores; cheap in-memory items keep ``num_workers=0`` in the
    space either way.
    """
    share = record.data_wait_fraction
    if share is None or share <= _NEGLIGIBLE_FETCH_SHARE:
        if share is not None:
            notes.append(f"num_workers searched up to the {space.cpus} CPUs: with "
                         f"num_workers=0 fetching took only {share:.0%} of the time.")
        return space
    top = WORKERS_PER_CPU * space.cpus
    notes.append(f"num_workers searched up to {top} ({WORKERS_PER_CPU}x the {space.cpus} CPUs): "
                 f"with num_workers=0 fetching took {share:.0%} of the time.")
    state.space = build_space(n, **{**space_args, "max_workers": top, "cpus": space.cpus})
    return state.space


def load_previous(study: optuna.Study, state: SearchState) -> None:
    """Take a resumed study's measured trials as known, so they are not run again."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        data, kind = t.user_attrs.get("config"), t.user_attrs.get("state")
        if data is None or kind not in ("ok", "infeasible", "failed"):
            continue
        config = LoaderConfig.from_dict(data)
        if state.space.contains(config):
            state.measured[config] = TrialRecord(
                t.number, config, kind, t.value or 0.0,
                startup_seconds=t.user_attrs.get("startup_seconds"),
                data_wait_fraction=t.user_attrs.get("data_wait_fraction"),
                peak_host_bytes=t.user_attrs.get("peak_host_bytes"),
                reason=t.user_attrs.get("reason"),
            )


# The first trials sweep one lever at a time, biggest first, so TPE starts from an informative
# sample instead of random points: batch size at num_workers=0 (cheap: no worker start-up), then
# worker counts at the best batch size, then AMP and pin_memory on the best so far. Each stage
# is planned from the measurements of the ones before it.
_BATCH_STEP = 4  # the batch sweep steps by this factor


def _batch_sweep(state: SearchState) -> list[LoaderConfig]:
    """Batch sizes 4x either side of the defaults', then on by 4x in the direction that won
    until the best is bracketed: a big batch costs a long step, so only go there when the trend
    says so."""
    space, ref = state.space, state.baselines[0]
    sizes = space.batch_sizes
    rates = {r.config.batch_size: r.samples_per_second for r in state._ok()
             if r.config == dataclasses.replace(ref, batch_size=r.config.batch_size)}
    if ref.batch_size not in rates:
        return []
    tried = sorted(rates)
    if tried == [ref.batch_size]:
        targets = [ref.batch_size / _BATCH_STEP, ref.batch_size * _BATCH_STEP]
    else:
        best = max(tried, key=rates.__getitem__)
        if best == tried[-1]:
            targets = [best * _BATCH_STEP]
        elif best == tried[0]:
            targets = [best / _BATCH_STEP]
        else:
            return []  # bracketed
    # The nearest size on a log scale, the ends of the range when a target lies beyond them.
    picks = {_nearest(sizes, t) for t in targets}
    return [dataclasses.replace(ref, batch_size=b) for b in sorted(picks)]


def _nearest(sizes: Sequence[int], target: float) -> int:
    return min(sizes, key=lambda b: abs(math.log(b / target)))


def _worker_sweep(state: SearchState) -> list[LoaderConfig]:
    """Worker counts at the batch size the batch sweep found best; among batch sizes within one
    standard deviation of that, the largest: workers hand batches over one at a time, so a
    larger batch pays that hand-off less often per sample."""
    space, ref = state.space, state.baselines[0]
    ok = [r for r in state._ok() if r.config.num_workers == ref.num_workers]
    base = ref
    if ok:
        floor = (1 - state.gap(1)) * ok[0].samples_per_second
        tied = [r for r in ok if r.samples_per_second >= floor]
        base = max(tied, key=lambda r: r.config.batch_size).config
    prefetch = min(space.prefetch_factors, key=lambda p: (abs(p - 2), p))
    counts = {1, space.cpus, 2 * space.cpus, WORKERS_PER_CPU * space.cpus}
    return [dataclasses.replace(base, num_workers=w, prefetch_factor=prefetch)
            for w in sorted(counts & set(space.worker_counts)) if w > 0]


def _option_sweep(state: SearchState) -> list[LoaderConfig]:
    ok = state._ok()
    if not ok:
        return []
    best = ok[0].config
    seeds = [dataclasses.replace(best, amp=a) for a in state.space.amp if a != best.amp]
    seeds += [dataclasses.replace(best, pin_memory=p) for p in state.space.pin_memory
              if p != best.pin_memory]
    return seeds


_STAGES: tuple[Callable[[SearchState], list[LoaderConfig]], ...] = (
    _batch_sweep, _worker_sweep, _option_sweep,
)

