"""The Optuna study: baselines first, the objective, constraints, finalists re-measured."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from autoload.config import LoaderConfig
from autoload.errors import AutoloadError, ConfigError, DatasetError, TuningFailedError
from autoload.memory import MemoryCapExceeded, default_memory_cap, is_oom, parse_size
from autoload.probe import LossFn, Measurement, Probe, StepFn, TrainingProbe, TrialTimeout, Window
from autoload.result import FinalistRecord, TrialRecord, TuneResult
from autoload.space import AmpChoice, SearchSpace, build_space

__all__ = ["ProgressEvent", "best_loader", "tune"]

_TUNED_KEYS = ("batch_size", "num_workers", "pin_memory", "prefetch_factor",
               "persistent_workers", "drop_last")
_FINAL_WINDOW = 1.5  # final windows are this much longer than the search's
_FINAL_SHARE_MAX = 0.4  # of the budget, at most, kept for the re-measure
_OVERHEAD_GUESS = 0.3  # seconds a probe spends outside its window, until one is measured
_SIMPLER_WITHIN = 0.01  # a simpler finalist this close to the best wins: the gap is noise
_SAME_FAILURES_TO_STOP = 3
_STARTUP_TRIALS = 6  # random trials (after the baselines) before TPE models the surface
_NEGLIGIBLE_FETCH_SHARE = 0.1  # of the time spent fetching at num_workers=0
_WORKERS_PER_CPU = 4
_TRIAL_WINDOWS = 4  # a search trial's soft time limit, in windows
_ABANDON_BELOW = 0.5  # of the best rate so far: a trial clearly under it stops early
_REPEATS_TO_STOP = 25


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


def _samples_per_epoch(dataset: Any, loader_options: Mapping[str, Any]) -> int | None:
    if "batch_sampler" in loader_options:
        raise ConfigError(
            "loader_options['batch_sampler'] fixes the batches, so there is no batch size to tune; "
            "pass the sampler it wraps as loader_options['sampler'] instead."
        )
    if loader_options.get("sampler") is not None and loader_options.get("shuffle"):
        raise ConfigError(
            "loader_options sets both `sampler` and `shuffle=True`; torch allows one: drop shuffle."
        )
    if isinstance(dataset, IterableDataset):
        return None
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DatasetError(
            f"a {type(dataset).__name__} is not a map-style Dataset: it needs __len__ and "
            "__getitem__ (or subclass torch.utils.data.IterableDataset)."
        )
    sampler = loader_options.get("sampler")
    n = len(sampler) if sampler is not None else len(dataset)
    if n == 0:
        what = "sampler" if sampler is not None else "data set"
        raise DatasetError(f"the {what} has length 0; there is nothing to load.")
    return n


def _resolve_device(device: str | torch.device, model: nn.Module | None) -> torch.device:
    if str(device) == "auto":
        if model is not None:
            first = next(model.parameters(), None)
            if first is not None:
                return first.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', but got {device!r}.") \
            from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asks for CUDA, but torch sees no GPU here; use device='cpu' "
            "(--device cpu) or 'auto'."
        )
    if model is not None:
        first = next(model.parameters(), None)
        if first is not None and first.device.type != resolved.type:
            raise ConfigError(
                f"the model's parameters are on {first.device}, but device is {resolved}; "
                f"move the model first (model.to({str(resolved)!r})) or pass device='auto'."
            )
    return resolved


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


class _Study:
    """The state of one tuning run; :func:`tune` is its only user."""

    def __init__(self, space: SearchSpace, probe: Probe, *, window: Window,
                 clock: Callable[[], float], start: float, budget: float | None,
                 n_trials: int | None, progress: ProgressCallback | None,
                 final_measurements: int) -> None:
        self.space, self.probe, self.window, self.clock = space, probe, window, clock
        self.start, self.budget, self.n_trials, self.progress = start, budget, n_trials, progress
        self.records: list[TrialRecord] = []
        self.measured: dict[LoaderConfig, TrialRecord] = {}
        self.failures: list[tuple[str, BaseException]] = []
        self.repeats = 0
        self.overheads: list[float] = []  # seconds each probe spends outside its window
        self.pilots: set[LoaderConfig] = set()  # measured before the study, not yet a trial
        self.final_measurements = final_measurements

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
            self.overheads.append(self.clock() - began - m.seconds)
        self.measured[config] = record
        return record

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
        """A trial may take a few windows, but never the re-measure's reserve."""
        limit = _TRIAL_WINDOWS * self.window.seconds + self.overhead()
        if self.budget is not None:
            left = self.start + self.budget - self.final_reserve() - self.clock()
            limit = min(limit, max(self.window.seconds, left))
        return limit

    def overhead(self) -> float:
        return statistics.median(self.overheads) if self.overheads else _OVERHEAD_GUESS

    def final_reserve(self) -> float:
        """Seconds to keep for the side-by-side re-measure, from the overhead seen so far."""
        per = _FINAL_WINDOW * self.window.seconds + self.overhead()
        per += self.window.seconds / self.final_measurements  # the step-alone bound
        # On a short budget the final windows shrink rather than the search vanishing.
        return min(self.final_measurements * per, _FINAL_SHARE_MAX * (self.budget or 0.0))

    def should_stop(self) -> bool:
        next_trial = self.window.seconds + self.overhead()
        if self.budget is not None and (
            self.clock() + next_trial + self.final_reserve() >= self.start + self.budget
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


def _record(number: int, config: LoaderConfig, m: Measurement) -> TrialRecord:
    return TrialRecord(number, config, "ok", m.samples_per_second, m.startup_seconds,
                       m.data_wait_fraction, m.peak_host_bytes, m.peak_gpu_bytes)


def _no_feasible_error(state: _Study) -> TuningFailedError:
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


def _final_round_order(configs: list[LoaderConfig], round_index: int) -> list[LoaderConfig]:
    shift = round_index % len(configs)
    order = configs[shift:] + configs[:shift]
    return order if round_index % 2 == 0 else order[::-1]


def _simplicity(config: LoaderConfig) -> tuple[int, int, bool, bool]:
    return (config.num_workers, config.prefetch_factor or 0, config.pin_memory,
            config.amp is not None)


def _remeasure(state: _Study, finalists: dict[LoaderConfig, set[str]], rounds: int,
               window: Window) -> dict[LoaderConfig, list[Measurement]]:
    """Measure the finalists side by side: interleaved rounds, each in a rotated order."""
    results: dict[LoaderConfig, list[Measurement]] = {c: [] for c in finalists}
    dropped: set[LoaderConfig] = set()
    done, total = 0, rounds * len(finalists)
    for r in range(rounds):
        for config in _final_round_order(list(finalists), r):
            if config in dropped:
                continue
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


def tune(
    dataset: Dataset[Any],
    *,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: StepFn | None = None,
    device: str | torch.device = "auto",
    n_trials: int | None = None,
    timeout: float | None = 60.0,
    memory_cap: int | str | None = None,
    gpu_memory_cap: int | str | None = None,
    loader_options: Mapping[str, Any] | None = None,
    batch_size: int | Sequence[int] | None = None,
    min_batch_size: int = 8,
    max_batch_size: int = 1024,
    drop_last: bool = False,
    num_workers: int | Sequence[int] | None = None,
    max_workers: int | None = None,
    prefetch_factor: int | Sequence[int] | None = None,
    pin_memory: bool | None = None,
    amp: AmpChoice = "auto",
    sharded: bool = False,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    n_finalists: int = 3,
    final_rounds: int = 3,
    progress: ProgressCallback | None = None,
    probe: Probe | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TuneResult:
    """Find the fastest DataLoader settings for ``dataset`` (and ``model``) on this machine.

    An Optuna study (TPE, seeded) probes short training windows; PyTorch's defaults and the common
    hand-tuned recipe run first. At the end the best few configurations and both baselines are
    re-measured side by side, interleaved, and the best median wins, so the answer is never worse
    than either baseline. The model, its optimizer and the RNG states are restored bit for bit.

    Args:
        dataset: A map-style Dataset (or an IterableDataset).
        model: Trained during each window; ``None`` measures data loading (and the copy to the
            device) alone.
        loss_fn: ``loss_fn(model(x), y)``; required with a model unless ``step`` is given.
        optimizer: The optimizer to step (restored afterwards); SGD(lr=0.01) when ``None``.
        step: A custom step ``step(model, batch) -> loss`` for batches that are not (x, y).
        device: ``"auto"`` (the model's device, else CUDA if present, else CPU), ``"cpu"``, ...
        n_trials: Cap on trials, the two baselines included.
        timeout: The whole run's budget in seconds, final re-measure included.
        memory_cap: Host memory (bytes or e.g. ``"8GiB"``) the main process plus its workers
            may use; default: what they use now plus 80% of what is available.
        gpu_memory_cap: GPU memory a trial may allocate; default 90% of the card.
        loader_options: Fixed DataLoader arguments (``collate_fn``, ``sampler``, ``shuffle``,
            ``worker_init_fn``, ``generator``, ...), passed untouched to every trial.
        batch_size: Pin the batch size (an int) or restrict it to a list.
        min_batch_size: Smallest batch size searched.
        max_batch_size: Largest batch size searched.
        drop_last: Allow batch sizes that do not divide the epoch; the remainder is dropped.
        num_workers: Pin the worker count (an int) or restrict it to a list.
        max_workers: Largest worker count searched (default: the usable CPUs).
        prefetch_factor: Pin or restrict ``prefetch_factor`` (default choices 1, 2, 4, 8).
        pin_memory: Pin ``pin_memory`` (CUDA only); ``None`` searches it on CUDA.
        amp: ``"auto"`` searches autocast (bf16 on CPU, fp16/bf16 on CUDA), or ``"off"``,
            ``"bfloat16"``, ``"float16"``.
        sharded: For an IterableDataset that shards itself across workers (via
            ``get_worker_info``): allows worker counts above 0.
        storage: An Optuna storage URL (e.g. ``"sqlite:///autoload.db"``) to keep the study.
        study_name: The study's name in ``storage`` (resumed when it exists).
        seed: Seed of the TPE sampler.
        n_finalists: Best configurations re-measured at the end (besides the baselines).
        final_rounds: Interleaved rounds of the final re-measure.
        progress: Called with a :class:`ProgressEvent` after each trial.
        probe: Measures configurations; default a :class:`~autoload.probe.TrainingProbe`.
        clock: Monotonic clock in seconds, for the budget.

    Returns:
        The :class:`~autoload.result.TuneResult`.

    Raises:
        ConfigError: An argument breaks a rule.
        DatasetError: The data set cannot be sized or batched.
        TuningFailedError: No configuration could be measured.

    Example:
        >>> import torch, autoload
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(512, 8), torch.randint(0, 2, (512,)))
        >>> result = autoload.tune(data, timeout=5, max_workers=1)
        >>> loader = torch.utils.data.DataLoader(data, **result.loader_kwargs)
    """
    start = clock()
    loader_options = dict(loader_options or {})
    clash = [k for k in _TUNED_KEYS if k in loader_options]
    if clash:
        raise ConfigError(
            f"loader_options sets {clash[0]!r}, which autoload tunes; pin it with "
            f"tune({clash[0]}=...) instead."
        )
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError(f"`timeout > 0` must hold, but got {timeout=}.")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"`n_trials >= 1` must hold, but got {n_trials=}.")
    if timeout is None and n_trials is None:
        raise ConfigError("give a timeout or n_trials (or both), or the study never ends.")
    if model is None and (optimizer is not None or loss_fn is not None or step is not None):
        raise ConfigError("loss_fn, optimizer and step need a model; pass model=... too.")
    if model is not None and loss_fn is None and step is None:
        raise ConfigError("a model needs a loss_fn (e.g. torch.nn.functional.cross_entropy) "
                          "or a step function to train.")
    if n_finalists < 1 or final_rounds < 1:
        raise ConfigError(f"`n_finalists >= 1` and `final_rounds >= 1` must hold, but got "
                          f"({n_finalists=}, {final_rounds=}).")

    n = _samples_per_epoch(dataset, loader_options)
    resolved = _resolve_device(device, model)
    notes: list[str] = []
    if n is None and not sharded and num_workers is None:
        num_workers = 0
        notes.append("IterableDataset: kept num_workers=0, since each worker would replay the "
                     "whole stream; pass sharded=True (--sharded) if it shards itself.")
    cuda = resolved.type == "cuda"
    space_args: dict[str, Any] = dict(
        device_type=resolved.type, has_model=model is not None, batch_size=batch_size,
        min_batch_size=min_batch_size, max_batch_size=max_batch_size, drop_last=drop_last,
        num_workers=num_workers, max_workers=max_workers, prefetch_factor=prefetch_factor,
        pin_memory=pin_memory, amp=amp,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
    )
    space = build_space(n, **space_args)
    if not cuda:
        notes.append("pin_memory stays False: it only helps copies to a CUDA device.")

    if probe is None:
        host_cap = default_memory_cap() if memory_cap is None else parse_size(memory_cap)
        gpu_cap = None
        if cuda:
            gpu_cap = (int(0.9 * torch.cuda.get_device_properties(resolved).total_memory)
                       if gpu_memory_cap is None else parse_size(gpu_memory_cap))
        probe = TrainingProbe(dataset, device=resolved, model=model, loss_fn=loss_fn,
                              optimizer=optimizer, step=step, loader_options=loader_options,
                              memory_cap=host_cap, gpu_memory_cap=gpu_cap, clock=clock)

    seconds = 1.0 if timeout is None else min(5.0, max(0.25, timeout / 60))
    window = Window(seconds=seconds, deadline=max(20.0, 10 * seconds), max_warmup=2 * seconds)
    state = _Study(space, probe, window=window, clock=clock, start=start, budget=timeout,
                   n_trials=n_trials, progress=progress,
                   final_measurements=final_rounds * (n_finalists + 2))

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        # Multivariate TPE models batch size and workers jointly (their effects interact);
        # group=True lets it do so although prefetch_factor exists only with workers.
        with warnings.catch_warnings():  # `group` is marked experimental; we pin optuna>=5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                 n_startup_trials=_STARTUP_TRIALS)
        study = optuna.create_study(
            direction="maximize", sampler=sampler, storage=storage, study_name=study_name,
            load_if_exists=storage is not None,
        )
        _load_previous(study, state)
        defaults, recipe = space.baselines()
        if num_workers is None and max_workers is None:
            space = _widen_for_slow_fetches(state, space, defaults, n, space_args, notes)
            defaults, recipe = space.baselines()
        for baseline in (defaults, recipe):
            study.enqueue_trial(space.params(baseline), skip_if_exists=True)
        study.optimize(state.objective, n_trials=n_trials, callbacks=[state.callback])
        if state.best() is None:
            raise _no_feasible_error(state)
        return _finish(state, defaults, recipe, n_finalists=n_finalists, rounds=final_rounds,
                       device=str(resolved), samples_per_epoch=n, notes=notes)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _widen_for_slow_fetches(state: _Study, space: SearchSpace, defaults: LoaderConfig,
                            n: int | None, space_args: dict[str, Any],
                            notes: list[str]) -> SearchSpace:
    """Measure PyTorch's defaults first (they are trial 0 anyway) and, when fetching items takes
    more than a negligible share of the time there, search up to 4x the CPUs for workers.

    Items that wait (disk, network) gain most from extra workers, but CPU-heavy items can gain too
    while the model competes for the cores; cheap in-memory items keep ``num_workers=0`` in the
    space either way.
    """
    record = state.measured.get(defaults)
    if record is None:
        record = state.measure(defaults, -1)
        state.pilots.add(defaults)
    share = record.data_wait_fraction
    if share is None or share <= _NEGLIGIBLE_FETCH_SHARE:
        if share is not None:
            notes.append(f"num_workers searched up to the {space.cpus} CPUs: with "
                         f"num_workers=0 fetching took only {share:.0%} of the time.")
        return space
    top = _WORKERS_PER_CPU * space.cpus
    notes.append(f"num_workers searched up to {top} ({_WORKERS_PER_CPU}x the {space.cpus} CPUs): "
                 f"with num_workers=0 fetching took {share:.0%} of the time.")
    state.space = build_space(n, **{**space_args, "max_workers": top, "cpus": space.cpus})
    return state.space


def _load_previous(study: optuna.Study, state: _Study) -> None:
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


def _finish(state: _Study, defaults: LoaderConfig, recipe: LoaderConfig, *, n_finalists: int,
            rounds: int, device: str, samples_per_epoch: int | None,
            notes: list[str]) -> TuneResult:
    ok = sorted((r for r in state.measured.values() if r.state == "ok"),
                key=lambda r: r.samples_per_second, reverse=True)
    finalists: dict[LoaderConfig, set[str]] = {r.config: {"candidate"} for r in ok[:n_finalists]}
    for role, config in (("defaults", defaults), ("recipe", recipe)):
        known = state.measured.get(config)
        if known is None or known.state == "ok":  # a baseline that faulted stays out
            finalists.setdefault(config, set()).add(role)

    # Size the final windows from what is left of the budget.
    seconds = _FINAL_WINDOW * state.window.seconds
    if state.budget is not None:
        left = state.start + state.budget - state.clock()
        seconds = max(state.window.seconds / 2,
                      left / (rounds * len(finalists)) - state.overhead())
    window = Window(seconds=seconds, deadline=state.window.deadline,
                    max_warmup=state.window.max_warmup,
                    time_limit=_TRIAL_WINDOWS * seconds + state.overhead())
    measured = _remeasure(state, finalists, rounds, window)
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
    winner = min((f for f in records.values() if f.median >= top * (1 - _SIMPLER_WITHIN)),
                 key=lambda f: _simplicity(f.config)).config
    try:  # an upper bound: the training step alone, on a batch already on the device
        step_rate = state.probe.step_rate(winner, Window(seconds=state.window.seconds))
    except Exception:  # the bound is a nicety; a fault here must not lose the result
        step_rate = None
    pilot = state.measured.get(defaults)
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
    )


def _median(ms: Sequence[Measurement], name: str = "samples_per_second") -> float:
    return float(statistics.median(getattr(m, name) for m in ms))


def best_loader(dataset: Dataset[Any], *, result: TuneResult | None = None,
                **kwargs: Any) -> DataLoader[Any]:
    """Tune (unless ``result`` is given) and return a DataLoader built with the winner.

    Takes the same keyword arguments as :func:`tune`; ``loader_options`` are passed to the
    DataLoader untouched.

    Example:
        >>> import torch, autoload
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(256, 4))
        >>> loader = autoload.best_loader(data, timeout=4, max_workers=1)
    """
    loader_options = dict(kwargs.get("loader_options") or {})
    if result is None:
        result = tune(dataset, **kwargs)
    return DataLoader(dataset, **result.config.dataloader_arguments(loader_options))
