"""autoload.DataLoader: torch's loader whose workers fork with the training process's heap
frozen out of the garbage collector's reach."""

import gc

import torch
from torch.utils.data import TensorDataset

import autoload

from toydata import FreezeCount


def _frozen_in_workers(loader_class, **kwargs):
    loader = loader_class(FreezeCount(), batch_size=1, num_workers=1,
                          multiprocessing_context="fork", **kwargs)
    counts = [int(x) for x in loader]
    assert gc.get_freeze_count() == 0  # the main process got its objects back at once
    return counts, loader


def test_workers_fork_with_the_heap_frozen_and_the_main_process_gets_it_back():
    counts, _ = _frozen_in_workers(autoload.DataLoader)
    assert min(counts) > 1000  # torch's own objects, frozen before the fork
    plain, _ = _frozen_in_workers(torch.utils.data.DataLoader)
    assert plain == [0, 0, 0, 0]


def test_persistent_workers_keep_their_freeze_and_later_epochs_freeze_nothing():
    counts, loader = _frozen_in_workers(autoload.DataLoader, persistent_workers=True)
    assert min(counts) > 1000
    assert min(int(x) for x in loader) > 1000  # the same workers, a second epoch
    assert gc.get_freeze_count() == 0


def test_a_freeze_of_the_users_own_is_left_in_place():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        it = iter(autoload.DataLoader(FreezeCount(), batch_size=1, num_workers=1))
        assert gc.get_freeze_count() > frozen // 2  # thawed, it would be 0
        del it
    finally:
        gc.unfreeze()


def test_every_sample_once_an_epoch_like_torchs_loader():
    data = TensorDataset(torch.arange(103))
    for workers in (0, 2):
        loader = autoload.DataLoader(data, batch_size=10, shuffle=True, num_workers=workers,
                                     persistent_workers=workers > 0)
        for _ in range(2):
            served = torch.cat([b[0] for b in loader]).tolist()
            assert sorted(served) == list(range(103))
