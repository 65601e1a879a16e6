"""Frozen records: a probe's measurement, trials, finalists, progress and the tune result;
JSON in and out."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from autoload.config import AmpDtype, LoaderConfig
from autoload.errors import ResultFileError, summary
from autoload.timing import Costs

__all__ = [
    "FinalistRecord", "Measurement", "ProgressCallback", "ProgressEvent", "TrialRecord",
    "TuneResult",
]

TrialState = Literal["ok", "infeasible", "failed", "repeat"]
Role = Literal["candidate", "defaults", "recipe", "loader-only"]
Framework = Literal["transformers"]  # training frameworks whose settings the report shows
# 3 renamed "limit" to "predicted_bottleneck"; 2 added loader_options; 1 is read as without them
FORMAT_VERSION = 3


def costs_to_dict(costs: Costs | None) -> dict[str, Any] | None:
    return None if costs is None else asdict(costs)


def costs_from_dict(data: dict[str, Any] | None) -> Costs | None:
    return None if data is None else Costs(**data)


def write_atomically(path: Path, text: str, *,
                     unwritable: Callable[[OSError], Exception] | None = None) -> None:
    """Write ``text`` to ``path`` so that no reader ever sees half of it: into a temporary file
    of its own in the same folder (a unique name, so writers on several processes or machines
    sharing the folder never write into each other's), then renamed over ``path``. The last
    rename wins; a failed write leaves no temporary file behind.

    Raises:
        OSError: The folder is missing or not writable (or what ``unwritable`` makes of that
            error), or the write or the rename failed.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if unwritable is None:
            raise
        raise unwritable(exc) from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it owner-only; match a plain open()
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """What one probe saw.

    Attributes:
        samples_per_second: What a training run gets: samples over whole epochs (measured, or
            projected from the window for an epoch longer than it), start-up excluded.
        startup_seconds: From building the loader to the first batch (worker start-up).
        warmup_seconds: From building the loader to the end of warm-up.
        seconds: Length of the measured span.
        samples: Samples in the measured span.
        batches: Batches in the measured span.
        epochs: Whole epochs in the measured span (0: the epoch was projected).
        data_wait_fraction: Share of the measured span spent waiting for the next batch.
        peak_host_bytes: Peak memory of the main process plus all workers (PSS).
        peak_gpu_bytes: Peak GPU memory allocated, or ``None`` off CUDA.
        cut_short: The window ended early (a time limit, or a rate clearly too low); such a
            rate errs low.
        rate_cv: How much the rate of a window like this one varies (its coefficient of
            variation), from the spread of the rate over consecutive blocks of its batches;
            ``None`` for a window cut short or of fewer than 4 batches.
        costs: Per-batch costs for the pipeline model, when the probe measured them.
        others_cpu: The share of the CPUs (0 to 1) that processes outside the tuner's own
            took during the window (see :mod:`autoload.cpuload`); ``None`` when unknown.
    """

    samples_per_second: float
    startup_seconds: float = 0.0
    warmup_seconds: float = 0.0
    seconds: float = 0.0
    samples: int = 0
    batches: int = 0
    epochs: int = 0
    data_wait_fraction: float = 0.0
    peak_host_bytes: int = 0
    peak_gpu_bytes: int | None = None
    cut_short: bool = False
    rate_cv: float | None = None
    costs: Costs | None = None
    others_cpu: float | None = None


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """One trial of the search.

    ``state`` is ``ok`` (measured), ``infeasible`` (crossed a memory cap or ran out of GPU
    memory), ``failed`` (a worker died, hung, or the user's code raised) or ``repeat`` (a
    configuration already measured, not run again). ``predicted`` is the pipeline model's rate
    for it before it was measured, when the model had one.
    """

    number: int
    config: LoaderConfig
    state: TrialState
    samples_per_second: float = 0.0
    startup_seconds: float | None = None
    data_wait_fraction: float | None = None
    peak_host_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    reason: str | None = None
    cut_short: bool = False
    predicted: float | None = None
    costs: Costs | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["costs"] = costs_to_dict(self.costs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**{**data, "config": LoaderConfig.from_dict(data["config"]),
                      "costs": costs_from_dict(data.get("costs"))})


@dataclass(frozen=True, kw_only=True)
class FinalistRecord:
    """A configuration re-measured side by side with the others at the end of the search;
    ``predicted`` is the pipeline model's rate for it, when it had one. ``role``: one of the
    best few (``candidate``), a baseline (``defaults``, ``recipe``), or the best that changes
    nothing in training (``loader-only``: the defaults' batch size, no autocast)."""

    config: LoaderConfig
    rates: tuple[float, ...]
    role: Role = "candidate"
    startup_seconds: float | None = None
    peak_host_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    data_wait_fraction: float | None = None
    predicted: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["rates"] = list(self.rates)
        data["median"] = self.median
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinalistRecord:
        data = {k: v for k, v in data.items() if k != "median"}
        return cls(**{**data, "config": LoaderConfig.from_dict(data["config"]),
                      "rates": tuple(data["rates"])})


@dataclass(frozen=True, kw_only=True)
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


_ADAM_FAMILY = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adafactor",
                "Adagrad", "RMSprop", "Lamb", "LAMB")


def _lr_rule(factor: float, optimizer: str | None) -> str:
    """The learning rate's scaling for a batch ``factor`` times larger: linear for SGD (Goyal
    et al. 2017), the square root for Adam-family optimizers (Malladi et al. 2022)."""
    linear = (f"multiply the learning rate by {factor:.3g} for SGD (the linear rule, "
              "Goyal et al. 2017)")
    root = (f"by {math.sqrt(factor):.3g} for Adam-family optimizers (the square-root rule, "
            "Malladi et al. 2022)")
    if optimizer in _ADAM_FAMILY:
        return (f"multiply {optimizer}'s learning rate by {math.sqrt(factor):.3g} (the "
                "square-root rule for Adam-family optimizers, Malladi et al. 2022)")
    if optimizer == "SGD":
        return (f"multiply SGD's learning rate by {factor:.3g} (the linear rule, Goyal et al. "
                "2017)")
    return f"{linear}, {root}"


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """The outcome of :func:`autoload.tune`.

    Attributes:
        config: The winning configuration.
        loader_kwargs: The winner's DataLoader kwargs, JSON-able, ready for
            ``autoload.DataLoader(dataset, **loader_options, **loader_kwargs)`` (the loader
            measured; torch's own takes them too): the tuned keys only.
        loader_options: The JSON-able options of the user's own DataLoader that the tuned
            loader keeps (``{"shuffle": True}`` when it shuffled); see
            :attr:`dataloader_kwargs`.
        amp: Autocast dtype for the training step (``None``, ``"bfloat16"`` or ``"float16"``).
        samples_per_second: The winner's median rate in the final side-by-side re-measure.
        baselines: Median rates of PyTorch's defaults and the hand-tuned recipe, by name
            (``"defaults"``, ``"recipe"``), measured side by side with the winner.
        finalists: Every configuration of the final re-measure, with all its rates.
        trials: Every trial of the search, in order.
        device: The device tuned for, e.g. ``"cpu"`` or ``"cuda:0"``.
        samples_per_epoch: Samples one epoch serves (``None`` for an iterable data set).
        elapsed_seconds: Wall time of the whole run.
        notes: What the tuner chose to leave out or fix, in plain words.
        step_rate: Samples/s of the training step alone at the winner's settings, with the
            batch already on the device: what no loader can beat (``None`` without a model).
        fetch_rate: Samples/s of fetching and collating in one process (from PyTorch's
            defaults, ``num_workers=0``), when measured.
        noise_cv: How much one second of measuring one configuration varied from run to run
            (coefficient of variation), as estimated during the search.
        predicted_bottleneck: What the pipeline model says bounds the winner (e.g. ``"the
            training step"``, ``"the CPU cores"``, ``"each epoch's start"``), when it had costs
            to model; :attr:`measured_bottleneck` is what the measurement says.
        reference_batch_size: The batch size the user trains at (their DataLoader's, or the one
            they pinned), if known; the batch-size advice is given against it (else against
            the defaults', and says so).
        optimizer: The optimizer's class name, when a model was trained.
        others_cpu: The median share of the CPUs (0 to 1) that other processes took while
            autoload measured, when it could be read.
        busy: That share was :data:`autoload.cpuload.BUSY` or more: the rates are the
            loader's share of a machine it did not have to itself, and the cache never hands
            this result back.
        faults: Why finalists that faulted in the side-by-side re-measure were left out
            (one line each, the same reason once).
        cached: Where this result was read from, when it came from the cache (not saved).
        framework: ``"transformers"`` when the model is a Hugging Face ``PreTrainedModel``: the
            report then shows the winner as ``TrainingArguments`` too.
    """

    config: LoaderConfig
    loader_kwargs: dict[str, Any]
    amp: AmpDtype | None
    samples_per_second: float
    baselines: dict[str, float]
    finalists: tuple[FinalistRecord, ...]
    trials: tuple[TrialRecord, ...]
    device: str
    samples_per_epoch: int | None
    elapsed_seconds: float
    space_size: int
    notes: tuple[str, ...] = field(default=())
    step_rate: float | None = None
    fetch_rate: float | None = None
    noise_cv: float | None = None
    predicted_bottleneck: str | None = None
    reference_batch_size: int | None = None
    optimizer: str | None = None
    others_cpu: float | None = None
    busy: bool = False
    faults: tuple[str, ...] = ()
    loader_options: dict[str, Any] = field(default_factory=dict)
    cached: str | None = None
    framework: Framework | None = None

    @property
    def dataloader_kwargs(self) -> dict[str, Any]:
        """What rebuilds the loader :func:`best_loader` builds:
        ``autoload.DataLoader(dataset, **result.dataloader_kwargs)`` (your loader's
        ``shuffle`` with the tuned keys; a sampler, collate_fn or worker_init_fn of yours is
        not JSON: pass it beside them)."""
        return {**self.loader_options, **self.loader_kwargs}

    @property
    def measured_bottleneck(self) -> Literal["data loading", "training step"]:
        """What limits the winner as measured: the training loop waited for data more than
        half of the time, or else the step itself."""
        wait = self.winner.data_wait_fraction
        return "data loading" if wait is not None and wait > 0.5 else "training step"

    @property
    def winner(self) -> FinalistRecord:
        return next(f for f in self.finalists if f.config == self.config)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples each epoch drops (only with ``drop_last``)."""
        n = self.samples_per_epoch
        return n % self.config.batch_size if n is not None and self.config.drop_last else 0

    def loader_only(self) -> FinalistRecord | None:
        """The fastest finalist that changes nothing in training: at the defaults' batch size,
        without autocast (the defaults themselves at least); ``None`` without the defaults."""
        defaults = next((f for f in self.finalists if f.role == "defaults"), None)
        if defaults is None:
            return None
        same = [f for f in self.finalists if f.config.amp is None
                and f.config.batch_size == defaults.config.batch_size
                and f.config.drop_last == defaults.config.drop_last]
        return max(same, key=lambda f: f.median)

    def batch_size_advice(self) -> list[str]:
        """How to keep training equivalent when the tuned batch size is not the one trained at
        (the learning rate's scaling, or gradient accumulation), and what autocast asks of the
        training loop when it won; plain sentences, empty when there is nothing to say. Without
        the batch size the user trains at, the defaults' stands in for it, said as such."""
        lines = []
        ref, tuned, n = self.reference_batch_size, self.config.batch_size, self.samples_per_epoch
        assumed = ""
        if ref is None:
            defaults = next((f for f in self.finalists if f.role == "defaults"), None)
            ref = None if defaults is None else defaults.config.batch_size
            assumed = ("the batch size you train at is unknown (pass your DataLoader, or "
                       "batch_size=), so this compares with the defaults' batch size: ")
        if ref and ref != tuned:
            steps = (f" ({-(-n // ref):,} steps an epoch become {-(-n // tuned):,})"
                     if n else "")
            lines.append(f"{assumed}batch size {ref} -> {tuned}{steps}: "
                         + _lr_rule(tuned / ref, self.optimizer))
            if tuned < ref and ref % tuned == 0:
                k = ref // tuned
                lines.append(f"or keep an effective batch of {ref}: accumulate gradients over "
                             f"{k} batches of {tuned} (divide each loss by {k}, step the "
                             f"optimizer every {k} batches)")
            elif tuned > ref:
                lines.append(f"or keep batch size {ref}: keep_batch_size=True "
                             "(--keep-batch-size) tunes everything else at it")
        if self.amp is not None:
            device = self.device.split(":")[0]
            line = (f"autocast won: run each training step under torch.autocast({device!r}, "
                    f"dtype=torch.{self.amp})")
            if self.amp == "float16" and device == "cuda":
                line += (', and scale the loss with scaler = torch.amp.GradScaler("cuda"): '
                         "scaler.scale(loss).backward(); scaler.step(optimizer); "
                         "scaler.update()")
            lines.append(line)
        return lines

    def training_arguments(self) -> dict[str, Any]:
        """The winner as Hugging Face ``TrainingArguments`` fields, for the ``Trainer``.

        ``dataloader_prefetch_factor`` is ``None`` without workers (``TrainingArguments``
        refuses it then); autocast becomes ``bf16`` or ``fp16`` (the ``Trainer`` scales an fp16
        loss itself); ``use_cpu=True`` when the result was tuned on the CPU, since these are
        the CPU's settings (and ``TrainingArguments`` wants it for ``bf16`` there).

        Example:
            >>> from autoload.config import LoaderConfig
            >>> result = TuneResult(config=LoaderConfig(32), loader_kwargs={}, amp=None,
            ...     samples_per_second=1.0, baselines={}, finalists=(), trials=(),
            ...     device="cuda:0", samples_per_epoch=64, elapsed_seconds=1.0, space_size=1)
            >>> result.training_arguments()["per_device_train_batch_size"]
            32
        """
        config = self.config
        workers = config.num_workers
        arguments: dict[str, Any] = {
            "per_device_train_batch_size": config.batch_size,
            "dataloader_num_workers": workers,
            "dataloader_prefetch_factor": config.prefetch_factor if workers else None,
            "dataloader_pin_memory": config.pin_memory,
            "dataloader_persistent_workers": workers > 0,
            "dataloader_drop_last": config.drop_last,
            "bf16": self.amp == "bfloat16",
            "fp16": self.amp == "float16",
        }
        if self.device.split(":")[0] == "cpu":
            arguments["use_cpu"] = True
        return arguments

    def speedup(self, baseline: str) -> float | None:
        rate = self.baselines.get(baseline)
        return self.samples_per_second / rate if rate else None

    def epoch_seconds(self) -> float | None:
        """Projected time of one full epoch at the winner's rate (workers persist)."""
        if self.samples_per_epoch is None or self.samples_per_second <= 0:
            return None
        return self.samples_per_epoch / self.samples_per_second

    def to_json(self, indent: int | None = 2) -> str:
        data = {
            "loader_kwargs": self.loader_kwargs,
            "amp": self.amp,
            "samples_per_second": self.samples_per_second,
            "baselines": self.baselines,
            "trials": [t.to_dict() for t in self.trials],
            "finalists": [f.to_dict() for f in self.finalists],
            "config": self.config.to_dict(),
            "device": self.device,
            "samples_per_epoch": self.samples_per_epoch,
            "elapsed_seconds": self.elapsed_seconds,
            "space_size": self.space_size,
            "notes": list(self.notes),
            "step_rate": self.step_rate,
            "fetch_rate": self.fetch_rate,
            "noise_cv": self.noise_cv,
            "predicted_bottleneck": self.predicted_bottleneck,
            "reference_batch_size": self.reference_batch_size,
            "optimizer": self.optimizer,
            "others_cpu": self.others_cpu,
            "busy": self.busy,
            "faults": list(self.faults),
            "loader_options": self.loader_options,
            "framework": self.framework,
            "format_version": FORMAT_VERSION,
        }
        return json.dumps(data, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> TuneResult:
        """Parse :meth:`to_json` output.

        Raises:
            ResultFileError: The text is not JSON, or lacks a field autoload wrote.
        """
        try:
            data = json.loads(text)
            if data.get("format_version") not in (1, 2, FORMAT_VERSION):
                raise ValueError(f"format_version {data.get('format_version')!r} is unknown")
            return cls(
                config=LoaderConfig.from_dict(data["config"]),
                loader_kwargs=dict(data["loader_kwargs"]),
                amp=data["amp"],
                samples_per_second=float(data["samples_per_second"]),
                baselines={k: float(v) for k, v in data["baselines"].items()},
                finalists=tuple(FinalistRecord.from_dict(f) for f in data["finalists"]),
                trials=tuple(TrialRecord.from_dict(t) for t in data["trials"]),
                device=data["device"],
                samples_per_epoch=data["samples_per_epoch"],
                elapsed_seconds=float(data["elapsed_seconds"]),
                space_size=int(data["space_size"]),
                notes=tuple(data["notes"]),
                step_rate=data.get("step_rate"),
                fetch_rate=data.get("fetch_rate"),
                noise_cv=data.get("noise_cv"),
                predicted_bottleneck=data.get("predicted_bottleneck", data.get("limit")),
                reference_batch_size=data.get("reference_batch_size"),
                optimizer=data.get("optimizer"),
                others_cpu=data.get("others_cpu"),
                busy=bool(data.get("busy", False)),
                faults=tuple(data.get("faults", ())),
                loader_options=dict(data.get("loader_options") or {}),
                framework=_framework(data.get("framework")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ResultFileError(
                f"not an autoload result ({summary(exc)}); write one with "
                "`autoload tune ... --json PATH` or TuneResult.save()."
            ) from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON atomically: a crash never leaves a half-written file."""
        path = Path(path)
        write_atomically(path, self.to_json(), unwritable=lambda exc: ResultFileError(
            f"cannot write {str(path)!r}: {exc.strerror}; check that its folder exists and is "
            "writable."))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TuneResult:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ResultFileError(f"cannot read result file {str(path)!r}: {exc.strerror}.") \
                from exc
        return cls.from_json(text)


def _framework(value: Any) -> Framework | None:
    """A stored framework name, ``None`` for one this version does not know (or none)."""
    if value == "transformers":
        return "transformers"
    return None
