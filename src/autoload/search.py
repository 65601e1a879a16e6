"""The search's state: trials measured one at a time, faults recorded, windows sized from the
noise, the budget kept. The planner (:mod:`autoload.plan`) decides what to measure; this module
measures it and keeps the books."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

import optuna

from autoload.budget import FINAL_SHARE_MAX, MARGIN, Budget
from autoload.config import LoaderConfig
from autoload.cpuload import BUSY
from autoload.errors import (
    AutoloadError,
    MemoryCapExceeded,
    TrialFault,
    TuningFailedError,
    summary,
)
from autoload.memory import is_oom
from autoload.noise import Noise
from autoload.probe import Measurement, Probe, Window
from autoload.result import (
    ProgressCallback,
    ProgressEvent,
    TrialRecord,
    costs_from_dict,
    costs_to_dict,
)
from autoload.space import SearchSpace, SpaceOptions

__all__ = ["SearchState", "WorkerReach", "fault_reason", "no_feasible_error"]

FINAL_WINDOW = 1.5  # final windows are this much longer than the search's
_OVERHEAD_GUESS = 0.3  # seconds a probe spends outside its window, until one is measured
_SAME_FAILURES_TO_STOP = 3
_NEGLIGIBLE_FETCH_SHARE = 0.1  # of the time spent fetching at num_workers=0
_NEGLIGIBLE_IDLE_SHARE = 0.1  # of the CPUs' time left idle at num_workers=0
WORKERS_PER_CPU = 4
TRIAL_WINDOWS = 4  # a search trial's soft time limit, in windows
_ABANDON_BELOW = 0.5  # of the best rate so far: a trial clearly under it stops early
_REPEATS_TO_STOP = 25
# A search window should be long enough that its rate varies by about SEARCH_CV from run to run,
# within a factor 2 of the budget's default either way, and short enough for 20 trials.
SEARCH_CV = 0.03
MIN_SEARCH_TRIALS = 20
PILOT_RUNS = 3  # windows of PyTorch's defaults measured before the study


def fault_reason(exc: BaseException) -> str:
    """Why a measurement faulted, in one line: a crossed cap, a GPU out of memory, a deadline
    (the probe says what hung), or the error itself."""
    if isinstance(exc, TrialFault):
        return str(exc)
    if is_oom(exc):
        return "CUDA out of memory"
    return summary(exc)


@dataclass(frozen=True, kw_only=True)
class WorkerReach:
    """How far the search takes ``num_workers``, and what PyTorch's defaults said about it.

    Attributes:
        cpus: The CPUs the workers share.
        fetch_share: The share of the time the defaults spent fetching (``num_workers=0``).
        idle_share: The share of the CPUs' time the defaults left idle.
        top: The bound past the CPUs the search was widened to; ``None``: kept to the CPUs.
        by_fetching: Whether fetching (rather than idle cores) was the reason to widen.
    """

    cpus: int
    fetch_share: float | None
    idle_share: float | None
    top: int | None
    by_fetching: bool


class SearchState:
    """The state of one tuning run; :func:`autoload.tune` builds it, the planner reads it."""

    def __init__(self, space: SearchSpace, probe: Probe, *, window: Window, budget: Budget,
                 n_trials: int | None, progress: ProgressCallback | None,
                 n_finalists: int, final_rounds: int) -> None:
        self.space, self.probe, self.window, self.budget = space, probe, window, budget
        self.clock = budget.clock
        self.n_trials, self.progress = n_trials, progress
        self.records: list[TrialRecord] = []
        self.measured: dict[LoaderConfig, TrialRecord] = {}
        self.failures: list[tuple[str, BaseException]] = []
        self.repeats = 0
        # Seconds each probe spent outside its window (start-up, warm-up, clean-up), by config.
        self.overheads: dict[LoaderConfig, float] = {}
        self.pilots: set[LoaderConfig] = set()  # measured before the study, not yet a trial
        self.n_finalists, self.final_rounds = n_finalists, final_rounds
        # PyTorch's defaults and the recipe: the pilot measures the first, the study starts
        # with both, the final re-measures both.
        self.baselines: tuple[LoaderConfig, ...] = space.baselines()
        self.base_seconds = window.seconds  # the budget's window, before any noise is known
        self.noise = Noise()
        self.predicted: dict[LoaderConfig, float] = {}  # the model's rate before measuring
        self.exhausted = False  # the planner has nothing left worth measuring
        self.widening: WorkerReach | None = None  # what the pilot said of workers past the CPUs
        self.others: list[float] = []  # each window's share of the CPUs other processes took

    # -- measuring -------------------------------------------------------------------------

    def ok(self) -> list[TrialRecord]:
        """Measured configurations, fastest first."""
        return sorted((r for r in self.measured.values() if r.state == "ok"),
                      key=lambda r: r.samples_per_second, reverse=True)

    def best(self) -> TrialRecord | None:
        ok = self.ok()
        return ok[0] if ok else None

    def measure(self, config: LoaderConfig, number: int) -> TrialRecord:
        """Probe ``config`` once; a fault becomes a record with its reason, not an exception."""
        began = self.clock()
        best = self.best()
        window = dataclasses.replace(
            self.window,
            abandon_below=None if best is None else _ABANDON_BELOW * best.samples_per_second,
            time_limit=self._trial_time_limit(),
            deadline=self.budget.deadline(self.window.deadline, at_least=self.min_deadline()),
        )
        try:
            m = self.probe.measure(config, window)
        except Exception as exc:
            if isinstance(exc, AutoloadError) and not isinstance(exc, TrialFault):
                raise
            record = self._fault(config, number, exc)
        else:
            record = self._record(number, config, m)
            self.note_load(m)
            self.overheads[config] = self.clock() - began - m.seconds
            if m.rate_cv is not None:
                self.noise.add_window(rate_cv=m.rate_cv, seconds=m.seconds)
                self.size_window()
        self.measured[config] = record
        return record

    def note_load(self, m: Measurement) -> None:
        """Keep what other processes took of the CPUs during a window."""
        if m.others_cpu is not None:
            self.others.append(m.others_cpu)

    def planned(self, config: LoaderConfig | None, *, predicted: float | None = None,
                exhausted: bool = False) -> None:
        """The planner's proposal for the next trial: ``config`` and the rate the model
        predicted for it (kept for its record), or that nothing is left worth measuring."""
        if config is not None and predicted is not None:
            self.predicted.setdefault(config, predicted)
        self.exhausted = self.exhausted or exhausted

    def others_cpu(self) -> float | None:
        """The median share of the CPUs other processes took during the windows so far."""
        return statistics.median(self.others) if self.others else None

    def busy(self) -> bool:
        """Whether other processes kept a large share of the CPUs busy while measuring."""
        share = self.others_cpu()
        return share is not None and share >= BUSY

    def _fault(self, config: LoaderConfig, number: int, exc: Exception) -> TrialRecord:
        reason = fault_reason(exc)
        if isinstance(exc, MemoryCapExceeded) or is_oom(exc):
            return TrialRecord(number=number, config=config, state="infeasible", reason=reason)
        self.failures.append((reason, exc))
        return TrialRecord(number=number, config=config, state="failed", reason=reason)

    def _record(self, number: int, config: LoaderConfig, m: Measurement) -> TrialRecord:
        return TrialRecord(
            number=number, config=config, state="ok", samples_per_second=m.samples_per_second,
            startup_seconds=m.startup_seconds, data_wait_fraction=m.data_wait_fraction,
            peak_host_bytes=m.peak_host_bytes, peak_gpu_bytes=m.peak_gpu_bytes,
            cut_short=m.cut_short, predicted=self.predicted.get(config), costs=m.costs,
        )

    def size_window(self) -> None:
        """Windows long enough for a rate within ``SEARCH_CV``: from half the budget's default
        up to twice it, as long as the search keeps room for ``MIN_SEARCH_TRIALS`` trials."""
        lo, hi = self.base_seconds / 2, 2 * self.base_seconds
        if self.budget.seconds is not None:
            search = (1 - FINAL_SHARE_MAX - MARGIN) * self.budget.seconds
            hi = max(lo, min(hi, search / MIN_SEARCH_TRIALS - self.overhead()))
        self.window = dataclasses.replace(self.window,
                                          seconds=self.noise.window_for(SEARCH_CV, lo, hi))

    def _trial_time_limit(self) -> float:
        """A trial may take a few windows past its first batch, but never the re-measure's
        reserve."""
        limit = TRIAL_WINDOWS * self.window.seconds
        if self.budget.limited:
            limit = min(limit, max(self.window.seconds, self.budget.search_left()))
        return limit

    def min_deadline(self, seconds: float | None = None) -> float:
        """The least hard deadline a measurement of ``seconds`` (a search window's by default)
        gets near the budget's end: its window and the start-up a probe has taken (on a 60 s
        budget about 3% of it: the most a hang there can add to the run)."""
        return (seconds or self.window.seconds) + max(self.overhead(), _OVERHEAD_GUESS)

    def overhead(self, config: LoaderConfig | None = None) -> float:
        """Seconds a probe of ``config`` spends outside its window (the median, if unknown)."""
        if config in self.overheads:
            return self.overheads[config]
        return statistics.median(self.overheads.values()) if self.overheads else _OVERHEAD_GUESS

    # -- before the study ------------------------------------------------------------------

    def measure_pilot(self) -> TrialRecord:
        """Measure PyTorch's defaults (trial 0 anyway) a few times, back to back, before the
        study.

        Their spread tells how much one configuration's rate varies from run to run, which
        sizes the search's windows; their mean is the trial's record.
        """
        defaults = self.baselines[0]
        known = self.measured.get(defaults)
        if known is not None:  # a resumed study measured it before
            return known
        window, records = self.window, []
        for _ in range(PILOT_RUNS):
            self.window = window  # one window length for all: a rate's spread depends on it
            record = self.measure(defaults, -1)
            self.pilots.add(defaults)
            if record.state != "ok":
                return record
            records.append(record)
        rates = [r.samples_per_second for r in records]
        self.noise.add_pilot(rates, window.seconds)
        self.size_window()
        record = dataclasses.replace(records[-1], samples_per_second=statistics.fmean(rates))
        self.measured[defaults] = record
        return record

    def widen(self, pilot: TrialRecord, options: SpaceOptions) -> WorkerReach:
        """Search up to 4x the CPUs for workers when PyTorch's defaults (``pilot``) spent more
        than a negligible share of the time fetching items, or left the cores idle for a share
        of it; the space is rebuilt from ``options`` with the wider bound.

        Items that wait (disk, network) gain most from extra workers, but CPU-heavy items gain
        too while the model competes for the cores, and so do cheap items beside a heavy step
        that leaves cores idle between and inside its batches (a ResNet-18 on two cores
        fetched for 7% of the time, and 4 workers beat 2 by 4-7%: the more workers share the
        cores, the more of the step's idle moments they fill). Cheap in-memory items keep
        ``num_workers=0`` in the space either way.
        """
        cpus = self.space.cpus
        share, idle = pilot.data_wait_fraction, _idle_share(pilot, cpus)
        slow = share is not None and share > _NEGLIGIBLE_FETCH_SHARE
        idling = idle is not None and idle > _NEGLIGIBLE_IDLE_SHARE
        top = WORKERS_PER_CPU * cpus if slow or idling else None
        if top is not None:
            self.space = dataclasses.replace(options, max_workers=top, cpus=cpus).build(
                self.space.samples_per_epoch)
        self.widening = WorkerReach(cpus=cpus, fetch_share=share, idle_share=idle, top=top,
                                    by_fetching=slow)
        return self.widening

    def load_previous(self, study: optuna.Study) -> None:
        """Take a resumed study's measured trials as known, so they are not run again."""
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            data, kind = t.user_attrs.get("config"), t.user_attrs.get("state")
            if data is None or kind not in ("ok", "infeasible", "failed"):
                continue
            config = LoaderConfig.from_dict(data)
            if self.space.contains(config):
                self.measured[config] = TrialRecord(
                    number=t.number, config=config, state=kind,
                    samples_per_second=t.value or 0.0,
                    startup_seconds=t.user_attrs.get("startup_seconds"),
                    data_wait_fraction=t.user_attrs.get("data_wait_fraction"),
                    peak_host_bytes=t.user_attrs.get("peak_host_bytes"),
                    reason=t.user_attrs.get("reason"),
                    costs=costs_from_dict(t.user_attrs.get("costs")),
                )

    # -- the study -------------------------------------------------------------------------

    def objective(self, trial: optuna.Trial) -> float:
        config = self.space.suggest(trial)
        trial.set_user_attr("config", config.to_dict())
        known = self.measured.get(config)
        if known is not None and config in self.pilots:
            self.pilots.discard(config)  # measured before the study: this trial is its record
            record = dataclasses.replace(known, number=trial.number)
        elif known is not None:
            self.repeats += 1
            record = TrialRecord(number=trial.number, config=config, state="repeat",
                                 samples_per_second=known.samples_per_second,
                                 reason=known.reason)
        else:
            self.repeats = 0
            record = self.measure(config, trial.number)
        return self._finish(trial, record, known)

    def _finish(self, trial: optuna.Trial, record: TrialRecord,
                known: TrialRecord | None) -> float:
        # Optuna's samplers read constraints: a positive value marks the trial infeasible.
        outcome = known or record
        trial.set_constraint("feasible", 0.0 if outcome.state == "ok" else 1.0)
        trial.set_user_attr("state", record.state)
        for name in ("reason", "startup_seconds", "data_wait_fraction", "peak_host_bytes"):
            if getattr(record, name) is not None:
                trial.set_user_attr(name, getattr(record, name))
        if record.costs is not None:
            trial.set_user_attr("costs", costs_to_dict(record.costs))
        self.records.append(record)
        if self.progress is not None:
            best = self.best()
            self.progress(ProgressEvent(
                phase="search", done=len(self.records), total=self.n_trials,
                elapsed=self.budget.elapsed(), budget=self.budget.seconds,
                best=None if best is None else best.samples_per_second,
                best_config=None if best is None else best.config, last=record,
            ))
        return record.samples_per_second

    def finalists(self) -> dict[LoaderConfig, set[str]]:
        """The best few measured configurations and the baselines that did not fault.

        All of the best few, however far below the best they measured: one short window can
        flatter a configuration by more than the noise estimate says, and only the
        side-by-side re-measure can tell.
        """
        chosen = {r.config: {"candidate"} for r in self.ok()[: self.n_finalists]}
        for role, config in zip(("defaults", "recipe"), self.baselines, strict=False):
            known = self.measured.get(config)
            if known is None or known.state == "ok":  # a baseline that faulted stays out
                chosen.setdefault(config, set()).add(role)
        loader_only = self._loader_only()
        if loader_only is not None:
            chosen.setdefault(loader_only, set()).add("loader-only")
        return chosen

    def _loader_only(self) -> LoaderConfig | None:
        """The best measured configuration that changes nothing in training (the defaults'
        batch size, no autocast): what the loader's settings alone give, for the report."""
        if not self.baselines:
            return None
        reference = self.baselines[0]
        return next((r.config for r in self.ok() if r.config.amp is None
                     and r.config.batch_size == reference.batch_size
                     and r.config.drop_last == reference.drop_last), None)

    def plan_final_reserve(self) -> None:
        """Keep back what the final re-measure needs, from each likely finalist's own start-up
        cost (workers and warm-up differ a lot between configurations)."""
        likely: list[LoaderConfig | None] = list(self.finalists())
        likely += [None] * max(0, self.n_finalists + len(self.baselines) - len(likely))
        per_round = sum(FINAL_WINDOW * self.window.seconds + self.overhead(c) for c in likely)
        self.budget.keep_for_final(self.final_rounds * per_round + self.window.seconds)

    def should_stop(self) -> bool:
        """Whether the search is over: the budget less the final's reserve would not fit
        another trial, the planner has nothing left, or every trial fails the same way."""
        if self.budget.limited and self.budget.search_left() <= (
                self.window.seconds + self.overhead()):
            return True
        if (self.exhausted or self.repeats >= _REPEATS_TO_STOP
                or len(self.measured) >= self.space.size):
            return True
        recent = self.failures[-_SAME_FAILURES_TO_STOP:]
        return (self.best() is None and len(recent) == _SAME_FAILURES_TO_STOP
                and len({reason for reason, _ in recent}) == 1)

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.plan_final_reserve()
        if self.should_stop():
            study.stop()


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
    faults = [r for r in (*state.measured.values(), *state.records)
              if r.state in ("infeasible", "failed")]
    seen = sorted({r.reason or r.state for r in faults})
    if not seen:
        return TuningFailedError("no configuration could be measured in the time given; raise "
                                 "the timeout (--timeout).")
    listed = "; ".join(seen[:3]) + (f"; and {len(seen) - 3} more" if len(seen) > 3 else "")
    memory = ("raise the memory cap (--memory-cap) or lower max_batch_size "
              "(--max-batch-size)")
    way = (memory if all(r.state == "infeasible" for r in faults) else
           f"fix what these reasons name, or where they are about memory, {memory}")
    return TuningFailedError(f"no configuration could be measured ({listed}); {way}.")


def _idle_share(record: TrialRecord, cpus: int) -> float | None:
    """The share of the CPUs' time the training process left idle at ``num_workers=0``: its
    CPU time (every thread) per batch against the batch's wall time on every core."""
    costs = record.costs
    if costs is None or costs.batch_seconds <= 0 or cpus < 1:
        return None
    return max(0.0, 1 - costs.main_cpu_seconds / (costs.batch_seconds * cpus))
