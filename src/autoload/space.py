"""The search space: which configurations a study may try, and the one place that asks Optuna.

Batch sizes are the divisors of the samples per epoch (so every sample is served once per epoch
with no partial batch), searched as an ordered index so TPE can learn a trend. Worker counts are
ordered too. ``prefetch_factor`` exists only with workers, ``pin_memory`` only on CUDA and AMP only
with a model, so no trial is spent on settings that cannot differ.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autoload.config import AmpDtype, LoaderConfig
from autoload.errors import ConfigError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "AmpChoice", "SearchSpace", "SpaceOptions", "build_space", "cpu_has_native_bf16", "divisors",
    "usable_cpus",
]

AmpChoice = Literal["auto", "off", "bfloat16", "float16"]

DEFAULT_PREFETCH = (1, 2, 4, 8)
_REFERENCE_BATCH = 64


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n``, ascending.

    Example:
        >>> divisors(12)
        [1, 2, 3, 4, 6, 12]
    """
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, bounded by a cgroup CPU quota if one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it, bf16
    autocast on the CPU is emulated and usually several times slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        import torch

        return "AMX" in torch.backends.cpu.get_cpu_capability()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _log_spaced(low: int, high: int, per_octave: int = 4) -> list[int]:
    values = {low, high}
    k = math.ceil(per_octave * math.log2(low))
    while (v := round(2 ** (k / per_octave))) <= high:
        if v >= low:
            values.add(v)
        k += 1
    return sorted(values)


def _worker_ladder(max_workers: int) -> list[int]:
    # Every count up to 8, then about two steps per doubling: the gain from one more worker
    # shrinks as the count grows, and the search should not spend trials on 37 vs 38.
    ladder = set(range(min(max_workers, 8) + 1))
    v = 8
    while v < max_workers:
        ladder.update({v, v + v // 2})
        v *= 2
    ladder.add(max_workers)
    return sorted(w for w in ladder if w <= max_workers)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The values each tuned parameter may take; a single value means the parameter is fixed."""

    batch_sizes: tuple[int, ...]
    worker_counts: tuple[int, ...]
    prefetch_factors: tuple[int, ...]
    pin_memory: tuple[bool, ...]
    amp: tuple[AmpDtype | None, ...]
    drop_last: bool
    cpus: int
    samples_per_epoch: int | None

    def suggest(self, trial: optuna.Trial) -> LoaderConfig:
        """Ask the trial for one configuration (the only place autoload calls ``suggest_*``)."""
        batch_size = self.batch_sizes[self._index(trial, "batch_size_index", self.batch_sizes)]
        workers = self.worker_counts[self._index(trial, "num_workers_index", self.worker_counts)]
        prefetch = None
        if workers > 0:
            prefetch = self.prefetch_factors[
                self._index(trial, "prefetch_factor_index", self.prefetch_factors)
            ]
        pin = self.pin_memory[0]
        if len(self.pin_memory) > 1:
            pin = bool(trial.suggest_categorical("pin_memory", list(self.pin_memory)))
        amp = self.amp[0]
        if len(self.amp) > 1:
            choice = trial.suggest_categorical("amp", [a or "off" for a in self.amp])
            amp = None if choice == "off" else choice  # type: ignore[assignment]
        return LoaderConfig(batch_size, num_workers=workers, prefetch_factor=prefetch,
                            pin_memory=pin, amp=amp, drop_last=self.drop_last)

    @staticmethod
    def _index(trial: optuna.Trial, name: str, values: tuple[Any, ...]) -> int:
        return 0 if len(values) == 1 else trial.suggest_int(name, 0, len(values) - 1)

    def params(self, config: LoaderConfig) -> dict[str, Any]:
        """The Optuna params that make :meth:`suggest` return ``config`` (for enqueueing)."""
        params: dict[str, Any] = {}
        for name, values, value in (
            ("batch_size_index", self.batch_sizes, config.batch_size),
            ("num_workers_index", self.worker_counts, config.num_workers),
        ):
            if len(values) > 1:
                params[name] = values.index(value)
        if config.num_workers > 0 and len(self.prefetch_factors) > 1:
            params["prefetch_factor_index"] = self.prefetch_factors.index(config.prefetch_factor)
        if len(self.pin_memory) > 1:
            params["pin_memory"] = config.pin_memory
        if len(self.amp) > 1:
            params["amp"] = config.amp or "off"
        return params

    def configs(self) -> Iterator[LoaderConfig]:
        """Every configuration of the space."""
        for batch, workers, pin, amp in itertools.product(
                self.batch_sizes, self.worker_counts, self.pin_memory, self.amp):
            for prefetch in (self.prefetch_factors if workers else (None,)):
                yield LoaderConfig(batch, num_workers=workers, prefetch_factor=prefetch,
                                   pin_memory=pin, amp=amp, drop_last=self.drop_last)

    def contains(self, config: LoaderConfig) -> bool:
        return (
            config.batch_size in self.batch_sizes
            and config.num_workers in self.worker_counts
            and (config.num_workers == 0 or config.prefetch_factor in self.prefetch_factors)
            and config.pin_memory in self.pin_memory
            and config.amp in self.amp
        )

    @property
    def size(self) -> int:
        """How many distinct configurations the space holds."""
        per_batch = sum(len(self.prefetch_factors) if w else 1 for w in self.worker_counts)
        return len(self.batch_sizes) * per_batch * len(self.pin_memory) * len(self.amp)

    def baselines(self) -> tuple[LoaderConfig, LoaderConfig]:
        """PyTorch's defaults and the common hand-tuned recipe, at the reference batch size.

        The reference batch size is the user's (when fixed) or the candidate nearest 64. The recipe
        is ``num_workers`` = CPU count, ``pin_memory`` on CUDA, ``prefetch_factor=2``, clipped to
        the space when the user pinned values that exclude it.
        """
        batch = min(self.batch_sizes, key=lambda b: (abs(b - _REFERENCE_BATCH), b))
        w0 = self.worker_counts[0]
        defaults = LoaderConfig(
            batch, num_workers=w0, prefetch_factor=self._prefetch_near(w0, 2),
            pin_memory=min(self.pin_memory), amp=self._amp_off(), drop_last=self.drop_last,
        )
        workers = min(self.worker_counts, key=lambda w: (abs(w - self.cpus), -w))
        recipe = LoaderConfig(
            batch, num_workers=workers, prefetch_factor=self._prefetch_near(workers, 2),
            pin_memory=max(self.pin_memory), amp=self._amp_off(), drop_last=self.drop_last,
        )
        return defaults, recipe

    def _prefetch_near(self, workers: int, target: int) -> int | None:
        if workers == 0:
            return None
        return min(self.prefetch_factors, key=lambda p: (abs(p - target), p))

    def _amp_off(self) -> AmpDtype | None:
        return None if None in self.amp else self.amp[0]


def _as_tuple(value: int | Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, int) else tuple(value)
    if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise ConfigError(
            f"`{name}` must be an int or a non-empty list of ints, but got {value!r}."
        )
    return tuple(sorted(set(values)))


@dataclass(frozen=True, kw_only=True)
class SpaceOptions:
    """What the caller pins and bounds of the search space: the arguments of :func:`tune` that
    shape it, in one record that builds the space, is widened by the search and keys the cache.

    Attributes:
        device_type: ``"cpu"`` or ``"cuda"``: ``pin_memory`` and fp16 exist only on CUDA.
        has_model: Whether a model trains: autocast exists only then.
        batch_size: Pinned batch size(s); else the divisors of the epoch in range.
        min_batch_size: Smallest batch size searched.
        max_batch_size: Largest batch size searched.
        drop_last: Any batch size in range, the last partial batch dropped.
        num_workers: Pinned worker count(s).
        max_workers: Most workers searched; default the usable CPUs.
        prefetch_factor: Pinned prefetch factor(s).
        pin_memory: Pinned ``pin_memory``.
        amp: ``"auto"`` (off and every native dtype), ``"off"`` or one dtype.
        bf16_supported: Whether the device computes bf16 natively.
        cpus: The CPUs the workers share; default the usable CPUs.
        partial_last_batch: A pinned batch size may leave the last batch short (the user's
            own loader's, kept).
    """

    device_type: str
    has_model: bool
    batch_size: int | Sequence[int] | None = None
    min_batch_size: int = 8
    max_batch_size: int = 1024
    drop_last: bool = False
    num_workers: int | Sequence[int] | None = None
    max_workers: int | None = None
    prefetch_factor: int | Sequence[int] | None = None
    pin_memory: bool | None = None
    amp: AmpChoice = "auto"
    bf16_supported: bool = True
    cpus: int | None = None
    partial_last_batch: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def build(self, samples_per_epoch: int | None) -> SearchSpace:
        """The space over an epoch of ``samples_per_epoch`` (``None``: a data set without a
        length: then any batch size in range is allowed, as with ``drop_last``).

        Raises:
            ConfigError: A pinned value or a bound breaks a rule, or no batch size fits.
        """
        return _build(samples_per_epoch, self)


def build_space(samples_per_epoch: int | None, **options: Any) -> SearchSpace:
    """Build the search space from the data set's size and :class:`SpaceOptions`' fields.

    Raises:
        ConfigError: A pinned value or a bound breaks a rule, or no batch size fits.
    """
    return SpaceOptions(**options).build(samples_per_epoch)


def _build(n: int | None, o: SpaceOptions) -> SearchSpace:
    cpus = o.cpus or usable_cpus()
    batches = _batch_sizes(n, o.batch_size, o.min_batch_size, o.max_batch_size,
                           o.drop_last or o.partial_last_batch)
    pinned_workers = _as_tuple(o.num_workers, "num_workers")
    if o.max_workers is not None and o.max_workers < 0:
        raise ConfigError(f"`max_workers >= 0` must hold, but got max_workers={o.max_workers}.")
    if pinned_workers is not None:
        if pinned_workers[0] < 0:
            raise ConfigError(f"`num_workers >= 0` must hold, but got {o.num_workers!r}.")
        workers = pinned_workers
    else:
        workers = tuple(_worker_ladder(cpus if o.max_workers is None else o.max_workers))
    prefetch = _as_tuple(o.prefetch_factor, "prefetch_factor") or DEFAULT_PREFETCH
    if prefetch[0] < 1:
        raise ConfigError(f"`prefetch_factor >= 1` must hold, but got {o.prefetch_factor!r}.")
    cuda = o.device_type == "cuda"
    if o.pin_memory and not cuda:
        raise ConfigError(
            "pin_memory=True only helps copies to a CUDA device, but the device is "
            f"{o.device_type!r}; leave pin_memory unset."
        )
    pins: tuple[bool, ...] = (o.pin_memory,) if o.pin_memory is not None else (
        (False, True) if cuda else (False,)
    )
    amps = _amps(o.amp, has_model=o.has_model, cuda=cuda, bf16_supported=o.bf16_supported)
    return SearchSpace(batch_sizes=batches, worker_counts=workers, prefetch_factors=prefetch,
                       pin_memory=pins, amp=amps, drop_last=o.drop_last, cpus=cpus,
                       samples_per_epoch=n)


def _batch_sizes(n: int | None, batch_size: int | Sequence[int] | None, low: int, high: int,
                 drop_last: bool) -> tuple[int, ...]:
    """The pinned batch sizes, checked; else the divisors of the epoch in range, or (with
    ``drop_last`` or without a length) log-spaced sizes."""
    if low < 1 or high < low:
        raise ConfigError(
            "`1 <= min_batch_size <= max_batch_size` must hold, but got "
            f"(min_batch_size={low}, max_batch_size={high})."
        )
    pinned = _as_tuple(batch_size, "batch_size")
    if pinned is not None:
        if pinned[0] < 1:
            raise ConfigError(f"batch sizes must be >= 1, but got {batch_size!r}.")
        bad = [b for b in pinned if n is not None and not drop_last and n % b]
        if bad:
            raise ConfigError(
                f"batch size {bad[0]} does not divide the {n} samples per epoch, so one batch "
                "would be short; pick a divisor or pass drop_last=True (--drop-last)."
            )
        if n is not None and pinned[-1] > n:
            raise ConfigError(f"batch size {pinned[-1]} is larger than the {n} samples per epoch.")
        return pinned
    if n is not None and not drop_last:
        sizes = tuple(d for d in divisors(n) if low <= d <= high and d < n)
        if not sizes:
            raise ConfigError(
                f"no batch size in [{low}, {high}] divides the {n} samples per epoch; pass "
                "drop_last=True (--drop-last) to allow any batch size in range (the report says "
                "how many samples each epoch drops), or widen the range."
            )
        return sizes
    top = high if n is None else min(high, n)
    if top < low:
        raise ConfigError(f"the data set has {n} samples, fewer than min_batch_size={low}; "
                          "lower min_batch_size (--min-batch-size).")
    return tuple(_log_spaced(low, top))


def _amps(amp: AmpChoice, *, has_model: bool, cuda: bool,
          bf16_supported: bool) -> tuple[AmpDtype | None, ...]:
    """The autocast choices: only with a model; bf16 only where it is native."""
    if amp not in ("auto", "off", "bfloat16", "float16"):
        raise ConfigError(
            f"amp must be one of 'auto', 'off', 'bfloat16', 'float16', but got {amp!r}."
        )
    if not has_model:
        if amp in ("bfloat16", "float16"):
            raise ConfigError(f"amp={amp!r} needs a model to train; pass a model or drop amp.")
        return (None,)
    if amp == "off":
        return (None,)
    if amp == "float16" and not cuda:
        raise ConfigError("amp='float16' needs a CUDA device; on the CPU use amp='bfloat16'.")
    if amp in ("bfloat16", "float16"):
        return (amp,)
    if cuda:
        return (None, "float16", "bfloat16") if bf16_supported else (None, "float16")
    return (None, "bfloat16") if bf16_supported else (None,)
