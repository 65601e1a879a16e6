"""In-memory 3x64x64 images and a CNN whose training step costs ~2-4 ms per sample on two cores:
loading is not the bottleneck, so the loader settings matter little and workers only compete
with the model for the cores."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

DESCRIPTION = "in-memory 3x64x64 images, CNN of ~2-4 ms per sample: the model is the bottleneck"
BOTTLENECK = "model compute"
N = 1024
QUICK_N = 128
CLASSES = 10


def make_dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 64, 64, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, CLASSES),
    )


LOSS = nn.functional.cross_entropy
