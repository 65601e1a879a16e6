"""In-memory features and a small MLP: each item costs microseconds, so moving batches between
processes (pickling, shared memory, queues) is the main cost a worker adds."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

DESCRIPTION = "in-memory 64-float features, small MLP: tiny per-item cost, process hand-off"
BOTTLENECK = "hand-off"
N = 16384
QUICK_N = 2048
FEATURES = 64
CLASSES = 10


def make_dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, CLASSES))


LOSS = nn.functional.cross_entropy
