"""Small module-level data sets (picklable, so worker processes can load them)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

_HOARD: list[np.ndarray] = []


class Indexed(Dataset):
    """Item i is (i as a float feature vector, i % 3)."""

    def __init__(self, n: int, features: int = 4) -> None:
        self.n, self.features = n, features

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((self.features,), float(i)), i % 3


class WorkerHog(Indexed):
    """Each worker process holds ``mb`` MiB of touched memory once it starts fetching."""

    def __init__(self, n: int, mb: int) -> None:
        super().__init__(n)
        self.mb = mb

    def __getitem__(self, i: int):
        if get_worker_info() is not None and not _HOARD:
            _HOARD.append(np.ones(self.mb << 20, dtype=np.uint8))
        return super().__getitem__(i)


class Raises(Indexed):
    def __getitem__(self, i: int):
        raise ValueError(f"cannot read item {i}")


class Hangs(Indexed):
    def __getitem__(self, i: int):
        time.sleep(3600)


class HangsFrom(Indexed):
    """Items up to ``first`` come at once; from it on ``__getitem__`` never returns."""

    def __init__(self, n: int, first: int) -> None:
        super().__init__(n)
        self.first = first

    def __getitem__(self, i: int):
        if i >= self.first:
            time.sleep(3600)
        return super().__getitem__(i)


class DiesInWorker(Indexed):
    def __getitem__(self, i: int):
        if get_worker_info() is not None:
            os._exit(3)
        return super().__getitem__(i)


class Ragged(Indexed):
    def __getitem__(self, i: int):
        return torch.zeros(1 + i % 5)


class InterruptsAfter(Indexed):
    """Raises KeyboardInterrupt (as Ctrl-C would) at item ``after`` once ``armed``."""

    def __init__(self, n: int, after: int, armed: bool = True) -> None:
        super().__init__(n)
        self.after, self.calls, self.armed = after, 0, armed

    def __getitem__(self, i: int):
        if self.armed:
            self.calls += 1
            if self.calls == self.after:
                raise KeyboardInterrupt
        return super().__getitem__(i)


class Unpicklable(Indexed):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.transform = lambda x: x  # a lambda cannot be pickled for `spawn` workers

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return self.transform(x), y


class Stream(torch.utils.data.IterableDataset):
    """An iterable data set of ``n`` items that does not shard itself."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield torch.full((4,), float(i)), i % 3


class Slow(Indexed):
    """Each item takes ``seconds`` to fetch (it waits, like disk or network); ``calls`` counts
    the items fetched in this process."""

    def __init__(self, n: int, seconds: float) -> None:
        super().__init__(n)
        self.seconds, self.calls = seconds, 0

    def __getitem__(self, i: int):
        self.calls += 1
        time.sleep(self.seconds)
        return super().__getitem__(i)


class SegfaultsInWorker(Indexed):
    def __getitem__(self, i: int):
        if get_worker_info() is not None:
            import ctypes

            ctypes.string_at(0)  # a native crash, as a broken decoder would cause
        return super().__getitem__(i)


class Uneven(Indexed):
    """Items wait ``seconds``, except every 16th block of 16 items waits 8x as long: a rate
    that varies over a window."""

    def __init__(self, n: int, seconds: float) -> None:
        super().__init__(n)
        self.seconds = seconds

    def __getitem__(self, i: int):
        time.sleep(self.seconds * (8 if (i // 16) % 4 == 0 else 1))
        return super().__getitem__(i)


def init_that_raises(worker_id: int) -> None:
    """A user's worker_init_fn: proves it ran, in the worker, by failing there."""
    raise RuntimeError(f"the user's init ran in worker {worker_id}")


def collate_pairs(items):
    """A user's collate_fn: stacks inputs, keeps labels a tensor."""
    xs, ys = zip(*items, strict=True)
    return torch.stack(xs), torch.tensor(ys)


def seed_worker(worker_id: int) -> None:
    """A user's worker_init_fn."""
    np.random.seed(worker_id)


class FreezeCount(Dataset):
    """Each item: how many objects the garbage collector keeps frozen in the process that
    made it (a worker's tells whether it was forked with the heap frozen)."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        import gc
        return torch.tensor(float(gc.get_freeze_count()))


class EveryOther(torch.utils.data.Sampler):
    """A user's sampler: the even indices, then the odd ones."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([*range(0, self.n, 2), *range(1, self.n, 2)])


SMALL = Indexed(96)  # for the CLI: `autoload tune toydata:SMALL`
