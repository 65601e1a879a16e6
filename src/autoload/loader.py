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
"""

from __future__ import annotations

import gc
from typing import Any, TypeVar

import torch.utils.data
from torch.utils.data.dataloader import _BaseDataLoaderIter

__all__ = ["DataLoader"]

T_co = TypeVar("T_co", covariant=True)


class DataLoader(torch.utils.data.DataLoader[T_co]):
    """torch's ``DataLoader``, same arguments, same batches: only the start of its workers
    differs (see the module's doc). ``autoload.best_loader`` returns one, and the tuner
    measures with it, so the rates it reports are this loader's.

    Example:
        >>> import torch, autoload
        >>> from torch.utils.data import TensorDataset
        >>> loader = autoload.DataLoader(TensorDataset(torch.arange(6)), batch_size=4)
        >>> [batch[0].tolist() for batch in loader]
        [[0, 1, 2, 3], [4, 5]]
    """

    def __iter__(self) -> _BaseDataLoaderIter:
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
