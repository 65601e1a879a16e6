"""Cheap in-memory items and a heavy training step: 3x64x64 images held in one tensor (an item
is a slice), a CNN of six conv layers whose step at batch size 64 takes ~50-100 ms on one CPU
core. Loading costs next to nothing; workers only take cores from the model. Used by
``benchmarks/fidelity.py`` (it is not one of the fixed cases of ``run.py``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

DESCRIPTION = "in-memory 3x64x64 images, six-conv CNN of ~1-1.5 ms per sample on one core"
BOTTLENECK = "model compute"
N = 1024
QUICK_N = 512
CLASSES = 10


def make_dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 64, 64, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


def make_model() -> nn.Module:
    """Six conv layers: a strided one (64 px in, 32 out), one more at 32 px, two at each of 16
    and 8 px (about 9 M multiply-adds forward, ~50 MFLOP per sample for the step), then a
    linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        *_block(3, 8, stride=2),
        *_block(8, 16), nn.MaxPool2d(2),
        *_block(16, 32), *_block(32, 32), nn.MaxPool2d(2),
        *_block(32, 64), *_block(64, 64), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, CLASSES),
    )


LOSS = nn.functional.cross_entropy
