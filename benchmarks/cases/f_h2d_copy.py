"""Large in-memory samples (3x224x224 float32, 588 KiB each) that cost nothing to make, and a
tiny model (global average pool + Linear) on the device: moving the batch to the device binds, so
``pin_memory`` and the batch size dominate. Meant for ``--device cuda``; on CPU there is no copy
to the device and it is a collate-bound case with a tiny model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

DESCRIPTION = ("3x224x224 float32 samples (588 KiB) from memory, tiny model on the device: "
               "the host-to-device copy")
BOTTLENECK = "host-to-device copy"
N = 2048
QUICK_N = 256
MAX_BATCH = 256  # 147 MiB a batch; 8 workers x prefetch 2 keep ~2.4 GiB of batches in flight
SHAPE = (3, 224, 224)
POOL = 16  # distinct samples held in memory (9.2 MiB); item i is pool[i % POOL]
CLASSES = 10


class H2DSamples(Dataset):
    """``n`` items, each a view of one of ``POOL`` preallocated samples: making an item is free,
    the collate's copy and the copy to the device are the work."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = torch.randn((POOL, *SHAPE), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pool[index % POOL], index % CLASSES


def make_dataset(n: int = N) -> H2DSamples:
    return H2DSamples(n)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(SHAPE[0], CLASSES))


LOSS = nn.functional.cross_entropy
