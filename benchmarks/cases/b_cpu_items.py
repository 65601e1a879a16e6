"""Items drawn and augmented with numpy on the fly (examples/synthetic_images.py), a small CNN:
loading and training compete for the same cores."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

_EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

import synthetic_images  # noqa: E402  (the examples folder is not a package)

DESCRIPTION = "3x32x32 images made with numpy per item (~0.4 ms), small CNN: CPU work per item"
BOTTLENECK = "CPU per item"
N = 2048
QUICK_N = 256


class CpuItems(synthetic_images.SyntheticImages):
    """The example's data set under this module's name, so a spawned worker that unpickles it
    imports this module, which puts the examples folder on ``sys.path`` first."""


def make_dataset(n: int = N) -> CpuItems:
    return CpuItems(n, seed=0)


def make_model() -> nn.Module:
    return synthetic_images.make_model()  # seeds torch itself


LOSS = nn.functional.cross_entropy
