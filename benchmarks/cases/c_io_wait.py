"""Items that wait ~2 ms (like a network or disk read) and return a small tensor: the CPU idles
while it waits, so more workers than cores pay off. Data only."""

from __future__ import annotations

import time

import torch
from torch.utils.data import Dataset

DESCRIPTION = "each item sleeps 2 ms (I/O wait) and returns 16 floats; data only"
BOTTLENECK = "I/O wait"
N = 2048
QUICK_N = 256
WAIT_SECONDS = 0.002


class WaitingItems(Dataset):
    def __init__(self, n: int, wait: float = WAIT_SECONDS) -> None:
        self.n, self.wait = n, wait

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.wait)
        return torch.full((16,), float(index)), index % 10


def make_dataset(n: int = N) -> WaitingItems:
    return WaitingItems(n)


def make_model() -> None:
    return None


LOSS = None
