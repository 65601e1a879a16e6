"""A small image-classification workload for `autoload tune`.

Each item is drawn and augmented on the fly with numpy (a random shape on a noisy background, a
random crop and flip, normalisation), so fetching an item costs real CPU work, like decoding and
augmenting a JPEG does. The model is a small CNN.

    autoload tune examples/synthetic_images.py:make_dataset \
        --model examples/synthetic_images.py:make_model --loss cross_entropy
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

N_CLASSES = 10
SIZE = 32


class SyntheticImages(Dataset):
    """``n`` labelled 3x32x32 images, generated deterministically from their index."""

    def __init__(self, n: int = 4096, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng(self.seed * 1_000_003 + index)
        label = index % N_CLASSES
        pad = SIZE + 8
        image = rng.normal(0.5, 0.15, size=(3, pad, pad)).astype(np.float32)
        yy, xx = np.mgrid[0:pad, 0:pad]
        cy, cx = rng.integers(10, pad - 10, size=2)
        radius = 4 + label
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        colour = np.array([label / N_CLASSES, 1 - label / N_CLASSES, 0.5], dtype=np.float32)
        image[:, mask] = colour[:, None]
        top, left = rng.integers(0, 9, size=2)  # random crop back to 32x32
        image = image[:, top:top + SIZE, left:left + SIZE]
        if rng.random() < 0.5:  # random horizontal flip
            image = image[:, :, ::-1]
        image = (image - image.mean(axis=(1, 2), keepdims=True)) / (
            image.std(axis=(1, 2), keepdims=True) + 1e-6)
        return torch.from_numpy(np.ascontiguousarray(image)), label


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 8 * 8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_dataset() -> SyntheticImages:
    return SyntheticImages()


def make_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()
