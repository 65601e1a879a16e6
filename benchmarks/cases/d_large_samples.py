"""Large samples (3x128x128 float32, 192 KiB each) that cost almost nothing to make: copying
them into a batch and between processes dominates. Data only."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

DESCRIPTION = "3x128x128 float32 samples (192 KiB), cheap to make: copy and collate; data only"
BOTTLENECK = "copy / collate"
N = 1024
QUICK_N = 128
SHAPE = (3, 128, 128)


class LargeSamples(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base + index, index  # a fresh 192 KiB tensor per item


def make_dataset(n: int = N) -> LargeSamples:
    return LargeSamples(n)


def make_model() -> None:
    return None


LOSS = None
