"""``tune()`` and ``best_loader()``: the user's arguments checked and resolved, then wired up.

The search space, the cache, the probe (alone, or as one rank of a torchrun job) and the Optuna
study: its sampler is the planner (:mod:`autoload.plan`), its state the search's
(:mod:`autoload.search`), and its end the final re-measure (:mod:`autoload.final`).
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from autoload.budget import Budget
from autoload.cache import fingerprint
from autoload.cache import load as load_cached
from autoload.cache import store as store_cached
from autoload.distributed import (
    Channel,
    DistributedProbe,
    World,
    current_world,
    follow,
    shard,
    terminate_as_interrupt,
    world_note,
)
from autoload.errors import ConfigError, DatasetError, format_size, summary
from autoload.final import finish
from autoload.loader import DataLoader
from autoload.memory import ProcessTreeMemory, default_memory_cap, parse_size
from autoload.pipeline import PipelineModel
from autoload.plan import PlannedSampler, Planner
from autoload.probe import LossFn, Probe, StepFn, TrainingProbe, Window
from autoload.result import Framework, ProgressCallback, TuneResult
from autoload.search import SearchState, WorkerReach, no_feasible_error
from autoload.sources import (
    Source,
    is_transformers_model,
    lightning_optimizer,
    lightning_step,
    resolve,
)
from autoload.space import (
    AmpChoice,
    SearchSpace,
    SpaceOptions,
    cpu_has_native_bf16,
    usable_cpus,
)

__all__ = ["best_loader", "tune"]

_TUNED_KEYS = ("batch_size", "num_workers", "pin_memory", "prefetch_factor",
               "persistent_workers", "drop_last")
_STARTUP_TRIALS = 6  # random trials before the fallback TPE models the surface


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


def tune(
    dataset: Any,
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
    keep_batch_size: bool = False,
    cache: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
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

    An Optuna study probes short training windows; PyTorch's defaults and the common hand-tuned
    recipe run first. A model of the loading pipeline, calibrated from the first windows' costs,
    predicts every configuration and the study measures the promising ones (see
    ``docs/search.md``). At the end the best few configurations and both baselines are
    re-measured side by side, interleaved, and the best median wins, so the answer is never worse
    than either baseline. The model, its optimizer and the RNG states are restored bit for bit.

    Args:
        dataset: What the training script has: a Dataset (map-style or iterable), a DataLoader
            (its data set and every argument autoload does not tune are kept), a Lightning
            ``LightningDataModule`` (its ``train_dataloader()`` after ``setup("fit")``), or a
            zero-argument callable returning one.
        model: Trained during each window; ``None`` measures data loading (and the copy to the
            device) alone.
        loss_fn: ``loss_fn(model(x), y)``. Not needed with a ``step``, with a LightningModule
            (its ``training_step`` is the step), or with dict batches fed to a model that
            returns ``.loss`` (the Hugging Face convention, ``model(**batch).loss``).
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
        keep_batch_size: Tune everything else at the batch size of the user's DataLoader.
        cache: Return a remembered result for the same machine, data, model and options at
            once (``result.cached`` says where from), and remember this one; see
            :mod:`autoload.cache`. ``None``: on, unless a ``probe`` of the caller's measures
            (its rates are not this machine's loader's); ``True``: on even then.
        cache_dir: The folder results are remembered in; default ``$AUTOLOAD_CACHE_DIR``, else
            the platform's cache folder. A folder the nodes of a cluster share lets the nodes
            of one kind tune once.
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
        >>> loader = autoload.DataLoader(data, **result.loader_kwargs)
    """
    start = clock()
    world = current_world()
    given = _resolve(dataset, world, model=model, loss_fn=loss_fn, optimizer=optimizer,
                     step=step, device=device, loader_options=loader_options, timeout=timeout,
                     n_trials=n_trials, n_finalists=n_finalists, final_rounds=final_rounds)
    _check_storage(storage)
    notes: list[str] = []
    if given.n is None and not sharded and num_workers is None:
        num_workers = 0
        notes.append("IterableDataset: kept num_workers=0, since each worker would replay the "
                     "whole stream; pass sharded=True (--sharded) if it shards itself.")
    cuda = given.device.type == "cuda"
    options = SpaceOptions(
        device_type=given.device.type, has_model=model is not None,
        batch_size=_kept_batch_size(given.source, batch_size, keep_batch_size),
        min_batch_size=min_batch_size, max_batch_size=max_batch_size,
        drop_last=drop_last or bool(given.source.drop_last), num_workers=num_workers,
        max_workers=max_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
        amp=amp, partial_last_batch=keep_batch_size,
        bf16_supported=torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16(),
        # the node's CPUs are shared among its ranks
        cpus=None if world is None else max(1, usable_cpus() // world.local_size),
    )
    if world is not None:
        notes.append(world_note(world, options.cpus or 1))
    space = options.build(given.n)
    notes += _space_notes(space, cuda=cuda, has_model=model is not None, amp=amp)
    channel = None if world is None else Channel(world)
    parts = None
    if cache or (cache is None and probe is None):  # a caller's probe measures another thing
        parts = _fingerprint(given, model=model, loss_fn=loss_fn, world=world, bounds={
            **options.to_dict(), "sharded": sharded, "keep_batch_size": keep_batch_size,
            "memory_cap": memory_cap, "gpu_memory_cap": gpu_memory_cap})
        remembered = _remembered(parts, channel, cache_dir)
        if remembered is not None:
            return replace(remembered, framework=_framework(model))
    if probe is None:
        probe = _default_probe(given.source.dataset, given.device, model=model, loss_fn=loss_fn,
                               optimizer=given.optimizer, step=given.step,
                               loader_options=given.loader_options, memory_cap=memory_cap,
                               gpu_memory_cap=gpu_memory_cap, clock=clock,
                               share=1 if world is None else world.local_size,
                               sync=None if channel is None else channel.vote,
                               cpu_root=None if world is None else os.getppid())
    if world is not None and channel is not None and not world.leader:
        with terminate_as_interrupt():
            return TuneResult.from_json(follow(probe, channel))
    if world is not None and channel is not None:
        probe = DistributedProbe(probe, world, channel)
    result = _lead(space, probe, options=options, n=given.n, notes=notes,
                   budget=Budget(timeout, start=start, clock=clock), n_trials=n_trials,
                   progress=progress, n_finalists=n_finalists, final_rounds=final_rounds,
                   seed=seed, storage=storage, study_name=study_name, device=str(given.device),
                   widen=num_workers is None and max_workers is None,
                   ranks=1 if world is None else world.size)
    result = replace(result, loader_options=given.kept, framework=_framework(model),
                     reference_batch_size=given.source.batch_size or (
                         batch_size if isinstance(batch_size, int) else None),
                     optimizer=None if model is None else type(probe_optimizer(
                         probe, given.optimizer)).__name__)
    if isinstance(probe, DistributedProbe):
        probe.finish(result.to_json())
    if parts is not None:
        store_cached(parts, result, cache_dir)
    return result


@dataclass(frozen=True, kw_only=True)
class _Given:
    """The user's arguments resolved: the data set and loader options they stand for, the step
    and optimizer (a LightningModule's own when it brings them), the epoch, the device."""

    source: Source
    loader_options: dict[str, Any]
    step: StepFn | None
    optimizer: torch.optim.Optimizer | None
    n: int | None
    device: torch.device
    kept: dict[str, Any]  # what the user's own DataLoader set that loader_kwargs must carry


def _resolve(dataset: Any, world: World | None, *, model: nn.Module | None,
             loss_fn: LossFn | None, optimizer: torch.optim.Optimizer | None,
             step: StepFn | None, device: str | torch.device,
             loader_options: Mapping[str, Any] | None, **limits: Any) -> _Given:
    unsharded = resolve(dataset)
    source = shard(unsharded, world)
    _check_arguments(dict(loader_options or {}), model=model, optimizer=optimizer,
                     loss_fn=loss_fn, step=step, **limits)
    options = {**source.loader_options, **dict(loader_options or {})}
    if model is not None and step is None and loss_fn is None:
        step = lightning_step(model)
        if step is not None and optimizer is None:
            optimizer = lightning_optimizer(model)
    # The user's loader shuffled: result.dataloader_kwargs says so too, so that
    # DataLoader(dataset, **result.dataloader_kwargs) shuffles as best_loader's loader does.
    # Only the loader's own: options passed as loader_options the caller passes again.
    kept = {"shuffle": True} if unsharded.loader_options.get("shuffle") else {}
    return _Given(source=source, loader_options=options, step=step,
                  optimizer=optimizer, n=_samples_per_epoch(source.dataset, options),
                  device=_resolve_device(device, model), kept=kept)


def _framework(model: nn.Module | None) -> Framework | None:
    return "transformers" if is_transformers_model(model) else None


def _fingerprint(given: _Given, *, model: nn.Module | None, loss_fn: LossFn | None,
                 world: World | None, bounds: dict[str, Any]) -> dict[str, Any]:
    return fingerprint(dataset=given.source.dataset, model=model, step=given.step, loss_fn=loss_fn,
                       optimizer=given.optimizer, device=str(given.device),
                       loader_options=given.loader_options, bounds=bounds,
                       world=None if world is None else world.to_dict())


def _lead(space: SearchSpace, probe: Probe, **search: Any) -> TuneResult:
    """The study, alone or as a job's rank 0 (a ``DistributedProbe``: every measurement taken
    on every rank); a job whose study fails tells the other ranks why before it raises.
    SIGTERM (torchrun's, or a scheduler's preemption) ends it as Ctrl-C does."""
    with terminate_as_interrupt():
        try:
            return _search(space, probe, **search)
        except BaseException as exc:
            if isinstance(probe, DistributedProbe):
                probe.finish(None, summary(exc))
            raise


def _search(space: SearchSpace, probe: Probe, *, options: SpaceOptions, n: int | None,
            notes: list[str], budget: Budget, n_trials: int | None,
            progress: ProgressCallback | None, n_finalists: int, final_rounds: int, seed: int,
            storage: str | None, study_name: str | None, device: str,
            widen: bool, ranks: int = 1) -> TuneResult:
    """The study: the pilot, the baselines, the planner's trials, then the final re-measure."""
    seconds = 1.0 if budget.seconds is None else min(5.0, max(0.25, budget.seconds / 60))
    state = SearchState(space, probe, window=Window(seconds=seconds,
                                                     deadline=max(20.0, 10 * seconds)),
                        budget=budget, n_trials=n_trials, progress=progress,
                        n_finalists=n_finalists, final_rounds=final_rounds)
    model = PipelineModel(cores=space.cpus, samples_per_epoch=n,
                          drop_last=options.drop_last, ranks=ranks)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = _study(state, model, seed=seed, storage=storage, study_name=study_name)
        state.load_previous(study)
        pilot = state.measure_pilot()
        if widen:
            note = _reach_note(state.widen(pilot, options))
            notes += [note] if note else []
        _enqueue_baselines(study, state)
        # The first trial is the pilot's, already measured: it costs nothing, and the callback
        # stops the study after it if the budget is spent.
        study.optimize(state.objective, n_trials=n_trials, callbacks=[state.callback])
        if state.best() is None:
            raise no_feasible_error(state)
        return finish(state, model=model if model.ready else None, device=device,
                      samples_per_epoch=n, notes=notes)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _check_arguments(loader_options: Mapping[str, Any], *, timeout: float | None,
                     n_trials: int | None, model: nn.Module | None,
                     optimizer: torch.optim.Optimizer | None, loss_fn: LossFn | None,
                     step: StepFn | None, n_finalists: int, final_rounds: int) -> None:
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
    if n_finalists < 1 or final_rounds < 1:
        raise ConfigError(f"`n_finalists >= 1` and `final_rounds >= 1` must hold, but got "
                          f"({n_finalists=}, {final_rounds=}).")


def _check_storage(storage: Any) -> None:
    """Refuse a storage URL Optuna could not open before any trial runs (Optuna would fail only
    when it creates the study, with the database library's own error)."""
    if not isinstance(storage, str):
        return  # None, or a storage object of the caller's own
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", storage)
    try:
        url = make_url(storage)
        shown = url.render_as_string(hide_password=True)
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:  # (a subclass of ArgumentError)
        reason = f"SQLAlchemy knows no database {storage.split(':', 1)[0]!r}; give"
    except ArgumentError:
        reason = "it is not a database URL; give"
    except ImportError as exc:
        reason = f"its database driver is not installed ({exc}): install it, or give"
    else:
        return
    raise ConfigError(f"storage {shown!r} (--storage) cannot hold the study: {reason} a "
                      "database URL such as 'sqlite:///autoload.db'.")


def _kept_batch_size(source: Source, batch_size: int | Sequence[int] | None,
                     keep: bool) -> int | Sequence[int] | None:
    """The batch size to search: the user's own with ``keep_batch_size``."""
    if not keep:
        return batch_size
    if batch_size is not None:
        raise ConfigError("keep_batch_size=True keeps your loader's batch size, so batch_size= "
                          "cannot also be given; drop one of them.")
    if source.batch_size is None:
        raise ConfigError("keep_batch_size=True needs the batch size you train at: pass your "
                          "DataLoader (or a factory of it), or pin batch_size=N instead.")
    return source.batch_size


def probe_optimizer(probe: Probe, optimizer: torch.optim.Optimizer | None) -> Any:
    """The optimizer the training steps used (the probe's default SGD when none was given)."""
    return optimizer if optimizer is not None else getattr(probe, "optimizer", None)


def _space_notes(space: SearchSpace, *, cuda: bool, has_model: bool,
                 amp: AmpChoice) -> list[str]:
    notes = []
    if has_model and amp == "auto" and not cuda and space.amp == (None,):
        notes.append("bf16 autocast left out: this CPU has no native bf16 (avx512_bf16 or "
                     "amx_bf16), so it would be emulated; pass amp='bfloat16' to measure it.")
    if not cuda:
        notes.append("pin_memory stays False: it only helps copies to a CUDA device.")
    return notes


def _default_probe(dataset: Dataset[Any], device: torch.device, *, model: nn.Module | None,
                   loss_fn: LossFn | None, optimizer: torch.optim.Optimizer | None,
                   step: StepFn | None, loader_options: Mapping[str, Any],
                   memory_cap: int | str | None, gpu_memory_cap: int | str | None,
                   clock: Callable[[], float], share: int = 1,
                   sync: Callable[[int], int] | None = None,
                   cpu_root: int | None = None) -> TrainingProbe:
    """The probe; with ``share`` ranks on the node, each holds its share of the node's cap."""
    host_cap = (default_memory_cap(share=share) if memory_cap is None
                else parse_size(memory_cap) // share)
    if memory_cap is not None:
        _check_memory_cap(host_cap, share=share)
    gpu_cap = None
    if device.type == "cuda":
        gpu_cap = (int(0.9 * torch.cuda.get_device_properties(device).total_memory)
                   if gpu_memory_cap is None else parse_size(gpu_memory_cap))
    return TrainingProbe(dataset, device=device, model=model, loss_fn=loss_fn,
                         optimizer=optimizer, step=step, loader_options=loader_options,
                         memory_cap=host_cap, gpu_memory_cap=gpu_cap, clock=clock, sync=sync,
                         cpu_root=cpu_root)


def _check_memory_cap(cap: int, *, share: int) -> None:
    """A host cap this process tree already uses up would make every trial infeasible: refuse
    it before the first one."""
    used = ProcessTreeMemory().sample()
    if used < cap:
        return
    mine = "" if share == 1 else f" (this rank's share of it, one of {share} on the node)"
    enough = (math.ceil(used * share / 2**30) + 1) << 30
    raise ConfigError(
        f"the memory cap {format_size(cap)}{mine} (memory_cap=, --memory-cap) is below what this "
        f"process already uses before any trial ({format_size(used)}), so every trial would "
        f"cross it; raise it well above that, e.g. --memory-cap {enough >> 30}GiB, to leave "
        "room for the workers and batches, or leave it out for the default (what is used now "
        "plus 80% of the available memory)."
    )


def _study(state: SearchState, model: PipelineModel, *, seed: int, storage: str | None,
           study_name: str | None) -> optuna.Study:
    """The Optuna study, sampled by the planner (TPE where the model cannot help: a probe
    that reports no costs)."""
    with warnings.catch_warnings():  # `group` is marked experimental; we pin optuna>=5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fallback = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              n_startup_trials=_STARTUP_TRIALS)
    return optuna.create_study(
        direction="maximize", sampler=PlannedSampler(Planner(state, model), fallback),
        storage=storage, study_name=study_name, load_if_exists=storage is not None,
    )


def _remembered(parts: dict[str, Any], channel: Channel | None,
                folder: str | os.PathLike[str] | None) -> TuneResult | None:
    """The cached result, if any; in a job rank 0 decides for all (their caches can differ).

    A result measured on a busy machine is never handed back: its rates were the loader's
    share of a machine it did not have to itself. The run measures again, and its result
    replaces the busy one."""
    found = load_cached(parts, folder) if channel is None or channel.world.leader else None
    if found is not None and found.busy:
        found = None
    if channel is None:
        return found
    payload = channel.broadcast(None if found is None else found.to_json())
    return None if payload is None else TuneResult.from_json(payload)


def _enqueue_baselines(study: optuna.Study, state: SearchState) -> None:
    """PyTorch's defaults (measured by the pilot) and the recipe are the first two trials."""
    for baseline in state.baselines:
        study.enqueue_trial(state.space.params(baseline), skip_if_exists=True)


def _reach_note(reach: WorkerReach) -> str:
    """Why the search took ``num_workers`` as far as it did."""
    share, idle = reach.fetch_share, reach.idle_share
    if reach.top is None:
        if share is None:
            return ""
        return (f"num_workers searched up to the {reach.cpus} CPUs: with num_workers=0 "
                f"fetching took only {share:.0%} of the time"
                + ("." if idle is None else f" and the cores were idle {idle:.0%} of it."))
    why = (f"fetching took {share:.0%} of the time" if reach.by_fetching and share is not None
           else f"the cores were idle {idle or 0:.0%} of the time")
    return (f"num_workers searched up to {reach.top} ({reach.top // reach.cpus}x the "
            f"{reach.cpus} CPUs): with num_workers=0 {why}.")


def best_loader(dataset: Any, *, result: TuneResult | None = None,
                **kwargs: Any) -> DataLoader[Any]:
    """Tune (unless ``result`` is given) and return a DataLoader built with the winner: an
    :class:`autoload.DataLoader`, the loader the tuner measured.

    Takes what :func:`tune` takes: a Dataset, a DataLoader (the new one keeps every argument of
    it autoload does not tune: its sampler, collate_fn, worker_init_fn...), a
    LightningDataModule or a factory of one, and the same keyword arguments.

    Example:
        >>> import torch, autoload
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(256, 4))
        >>> loader = autoload.best_loader(data, timeout=4, max_workers=1)
    """
    source = shard(resolve(dataset), current_world())
    loader_options = {**source.loader_options, **dict(kwargs.get("loader_options") or {})}
    if result is None:
        result = tune(source, **kwargs)
    return DataLoader(source.dataset, **result.config.dataloader_arguments(loader_options))
