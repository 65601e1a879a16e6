"""The DataLoader autoload measures and hands out: torch's own, whose workers start with the
training process's objects out of the garbage collector's reach.

A forked worker inherits every object of the training process (torch, the model, the data
set's Python objects: hundreds of thousands of them). Python's cyclic garbage collector, run in
the worker every so many allocations, walks every one it tracks: each full collection then
costs the worker time in proportion to the training process's heap, and the first one makes
the kernel copy each page it touches (0.2 s to most of a second per worker on two cores). On
cheap in-memory items with short epochs those walks steal enough of the cores to slow the whole
pipeline: the same plain loop ran 1.15x (2 workers) and 1.19x (8 workers) as fast over this
loader as over torch's on two cores (``benchmarks/loaders.py``).

Objects frozen (``gc.freeze``) before the fork stay out of the worker's collections for good,
the way the CPython documentation advises for pre-fork servers; the training process thaws
them at once, so its own collections run as before. A process that froze objects itself keeps
them frozen, and nothing is frozen or thawed here. Workers started by ``spawn`` or
``forkserver`` do not inherit the heap; freezing is then harmless and changes nothing.

With ``num_workers="auto"`` (or ``prefetch_factor="auto"``, ``pin_memory="auto"``) the loader
tunes those settings during the user's own epochs: :mod:`autoload.online` runs it. With fixed
values it is torch's loader exactly, with the freeze above.
"""

from __future__ import annotations

import gc
import inspect
import os
from typing import Any, TypeVar

import torch.utils.data
from torch.utils.data import Dataset
from torch.utils.data.dataloader import _BaseDataLoaderIter

from autoload.errors import ConfigError
from autoload.online import OnlineLoader, UserOptions
from autoload.tuning import OnlineOptions, Tuning

__all__ = ["DataLoader"]

T_co = TypeVar("T_co", covariant=True)
AUTO = "auto"
# Arguments torch rejects without workers: the online mode keeps them for its pools.
_POOL_ONLY = ("num_workers", "prefetch_factor", "persistent_workers", "multiprocessing_context",
              "pin_memory")
_TORCH_INIT = inspect.signature(torch.utils.data.DataLoader.__init__)


class DataLoader(torch.utils.data.DataLoader[T_co]):
    """torch's ``DataLoader``, same arguments, same batches: only the start of its workers
    differs (see the module's doc). ``autoload.best_loader`` returns one, and the tuner
    measures with it, so the rates it reports are this loader's.

    ``num_workers="auto"`` tunes ``num_workers`` and, toward a CUDA device, ``pin_memory``
    (``prefetch_factor="auto"`` the prefetch too; left out, it is torch's 2) while the loop
    trains on the batches: each epoch still serves exactly the batches its sampler gives, in
    its order (see :mod:`autoload.online`). ``pin_memory`` left out is tuned, and
    ``persistent_workers`` left out keeps the workers across epochs; given, both are honoured.
    ``loader.tuning`` says where it stands, and ``loader.num_workers`` (``prefetch_factor``,
    ``pin_memory``) what runs now.

    Args:
        dataset: A map-style data set; the other positional and keyword arguments are torch's.
        memory_cap: With "auto": bytes (or ``"8GiB"``) the process tree may use; a setting
            whose workers cross it is dropped, the loop goes on. Default: what the tree uses
            plus 80% of the memory available (a rank's share under torchrun).
        cache: With "auto": start from the answer remembered for this machine, data set, batch
            size and sampler (it is still checked), and remember the settled one.
        cache_dir: The folder answers are remembered in (as ``tune(cache_dir=)``).
        online: With "auto": the tuning's knobs (:class:`~autoload.tuning.OnlineOptions`).

    Raises:
        ConfigError: "auto" with an ``IterableDataset`` or ``in_order=False``, or an online
            option with fixed settings.

    Example:
        >>> import torch, autoload
        >>> from torch.utils.data import TensorDataset
        >>> loader = autoload.DataLoader(TensorDataset(torch.arange(6)), batch_size=4)
        >>> [batch[0].tolist() for batch in loader]
        [[0, 1, 2, 3], [4, 5]]
    """

    def __init__(self, dataset: Dataset[T_co], *args: Any, memory_cap: int | str | None = None,
                 cache: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                 online: OnlineOptions | None = None, **kwargs: Any) -> None:
        self._online: OnlineLoader | None = None
        given = _TORCH_INIT.bind(self, dataset, *args, **kwargs).arguments
        given.pop("self")
        if not any(given.get(name) == AUTO
                   for name in ("num_workers", "prefetch_factor", "pin_memory")):
            if memory_cap is not None or online is not None:
                raise ConfigError(
                    "memory_cap= and online= bound and steer the tuning of num_workers='auto'; "
                    f"with num_workers={given.get('num_workers', 0)!r} nothing is tuned: drop "
                    "them, or pass num_workers='auto'."
                )
            super().__init__(dataset, *args, **kwargs)
            return
        user = _user_options(given)
        for name in _POOL_ONLY:
            given.pop(name, None)
        super().__init__(**given)
        self._online = OnlineLoader(self, user=user, make_loader=DataLoader,
                                    memory_cap=memory_cap, cache=cache, cache_dir=cache_dir,
                                    options=online or OnlineOptions())

    @property
    def tuning(self) -> Tuning | None:
        """Where the online tuning stands (``None`` with fixed settings)."""
        return None if self._online is None else self._online.tuning

    def __iter__(self) -> _BaseDataLoaderIter:
        if self._online is not None:
            # An iterator of the same batches, not torch's iterator class.
            return self._online.epoch()  # type: ignore[return-value]
        if not self._forks_workers() or gc.get_freeze_count():
            return super().__iter__()
        gc.freeze()
        try:
            return super().__iter__()
        finally:
            gc.unfreeze()

    def _forks_workers(self) -> bool:
        """Whether this ``iter()`` starts worker processes: with workers, unless persistent
        ones are up already (then every object is left where the collector keeps it)."""
        started: Any = getattr(self, "_iterator", None)
        return self.num_workers > 0 and not (self.persistent_workers and started is not None)


def _user_options(given: dict[str, Any]) -> UserOptions:
    """The online mode's arguments, checked (torch checks the rest)."""
    workers = given.get("num_workers", 0)
    prefetch = given.get("prefetch_factor")
    pin = given.get("pin_memory", AUTO)
    if workers != AUTO and not (isinstance(workers, int) and workers >= 0):
        raise ConfigError(f"num_workers must be 'auto' or an int >= 0, but got {workers!r}.")
    if prefetch not in (AUTO, None) and not (isinstance(prefetch, int) and prefetch >= 1):
        raise ConfigError(
            f"prefetch_factor must be 'auto', None or an int >= 1, but got {prefetch!r}.")
    if pin != AUTO and not isinstance(pin, bool):
        raise ConfigError(f"pin_memory must be 'auto' or a bool, but got {pin!r}.")
    if pin is True and not torch.cuda.is_available():
        raise ConfigError("pin_memory=True only helps copies to a CUDA device, and none is "
                          "available; leave pin_memory out.")
    if given.get("in_order", True) is not True:
        raise ConfigError(
            "num_workers='auto' serves each epoch in its sampler's order across switches of "
            "workers, which in_order=False gives up; pass a fixed num_workers with it."
        )
    return UserOptions(
        num_workers=workers, prefetch_factor=prefetch, pin_memory=pin,
        persistent_workers=given.get("persistent_workers"),
        timeout=float(given.get("timeout", 0) or 0),
        worker_init_fn=given.get("worker_init_fn"),
        multiprocessing_context=given.get("multiprocessing_context"),
        pin_memory_device=given.get("pin_memory_device"),
    )
