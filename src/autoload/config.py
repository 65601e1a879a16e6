"""A frozen DataLoader configuration and the kwargs it stands for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, asdict, dataclass
from typing import Any, Literal

__all__ = ["AmpDtype", "LoaderConfig", "batches_per_epoch", "check_workers"]

# DataLoader arguments torch accepts only with worker processes.
WORKER_ONLY = ("multiprocessing_context", "prefetch_factor", "persistent_workers", "timeout")

AmpDtype = Literal["bfloat16", "float16"]


def check_workers(num_workers: int, prefetch_factor: int | None) -> None:
    """torch's rules for the two: no negative worker count, and a prefetch factor of at least
    1 exactly when there are workers (torch rejects one without them).

    Raises:
        ValueError: A rule is broken; the message names it and the values.
    """
    if num_workers < 0:
        raise ValueError(f"`num_workers >= 0` must hold, but got self.{num_workers=}.")
    if (num_workers == 0) != (prefetch_factor is None):
        raise ValueError(
            "`prefetch_factor` must be set exactly when `num_workers > 0`, but got "
            f"(self.{num_workers=}, self.{prefetch_factor=})."
        )
    if prefetch_factor is not None and prefetch_factor < 1:
        raise ValueError(f"`prefetch_factor >= 1` must hold, but got self.{prefetch_factor=}.")


def batches_per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches a DataLoader makes of ``samples`` in one epoch (the last one partial, unless
    dropped).

    Example:
        >>> batches_per_epoch(10, 4, drop_last=False), batches_per_epoch(10, 4, drop_last=True)
        (3, 2)
    """
    return samples // batch_size if drop_last else -(-samples // batch_size)


@dataclass(frozen=True, order=True)
class LoaderConfig:
    """One point of the search space.

    Attributes:
        batch_size: Samples per batch.
        num_workers: Loader worker processes; 0 loads in the main process.
        prefetch_factor: Batches each worker loads ahead; ``None`` exactly when ``num_workers``
            is 0.
        pin_memory: Page-locked host batches (useful only with a CUDA device).
        amp: Autocast dtype of the training step, or ``None`` for full precision.
        drop_last: Drop the last, incomplete batch of each epoch.
    """

    batch_size: int
    _: KW_ONLY
    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool = False
    amp: AmpDtype | None = None
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"`batch_size >= 1` must hold, but got {self.batch_size=}.")
        check_workers(self.num_workers, self.prefetch_factor)

    def loader_kwargs(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The DataLoader keyword arguments, obeying torch's rules.

        ``prefetch_factor``, ``persistent_workers`` and ``timeout`` appear only with workers:
        torch rejects them otherwise. Workers persist, since a training run iterates the loader
        once per epoch and should not pay the workers' start-up each time.

        Example:
            >>> LoaderConfig(64, num_workers=2, prefetch_factor=4).loader_kwargs()
            {'batch_size': 64, 'num_workers': 2, 'pin_memory': False, 'drop_last': False, \
'prefetch_factor': 4, 'persistent_workers': True}
        """
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "drop_last": self.drop_last,
        }
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
            kwargs["persistent_workers"] = True
            if timeout is not None:
                kwargs["timeout"] = timeout
        return kwargs

    def dataloader_arguments(self, loader_options: Mapping[str, Any], *,
                             timeout: float | None = None) -> dict[str, Any]:
        """The user's fixed options merged with :meth:`loader_kwargs`, minus any worker-only
        option (such as ``multiprocessing_context``) torch rejects when ``num_workers`` is 0."""
        options = dict(loader_options)
        if self.num_workers == 0:
            for key in WORKER_ONLY:
                options.pop(key, None)
        return {**options, **self.loader_kwargs(timeout=timeout)}

    def label(self) -> str:
        """A short human-readable label, e.g. ``bs=64 w=2 pf=4 pin amp=bfloat16``."""
        parts = [f"bs={self.batch_size}", f"w={self.num_workers}"]
        if self.prefetch_factor is not None:
            parts.append(f"pf={self.prefetch_factor}")
        if self.pin_memory:
            parts.append("pin")
        if self.amp is not None:
            parts.append(f"amp={self.amp}")
        if self.drop_last:
            parts.append("drop_last")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderConfig:
        return cls(**data)
