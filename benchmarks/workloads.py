"""Workloads drawn at random from a seed, so the tuner is judged on pipelines nobody tuned it to.

Each draw first picks its class, then fixes a data set's size (a multiple of 100 so that batch
sizes dividing it exist), what an item costs (CPU work; a wait such as a disk or network read),
what it weighs (float32) and the model's cost per sample (or no model: loading alone):

- **general** (60%): 500 to 50,000 items; CPU work 0 to 2 ms (none a quarter of the time); a
  wait of 0 to 5 ms (none 40% of the time); 1 KB to 1 MB items; an MLP of 0.05 to 20 MFLOP a
  sample (none a quarter of the time);
- **one-round epochs** (20%): 1,000 to 3,000 items with CPU work per item (0.1 to 1 ms; a wait
  of 0.05 to 1 ms a third of the time), 1 to 64 KB items, the general class's model: the grid's
  largest batch sizes (up to 1,024) make epochs of 1 to ~8 batches, no more than
  ``num_workers x prefetch_factor`` batches of the grid's loaders, so the workers' first round
  of prefetches is the whole epoch;
- **heavy step, cheap items** (20%): 500 to 20,000 items with no per-item work (or 0.01 to
  0.05 ms, half the time) and no wait, 1 to 256 KB items, an MLP of 20 to 80 MFLOP a sample.

Some of each draw's costs are zero on purpose, since many real pipelines have no wait or trivial
items. Items are real work, not stand-ins: the CPU cost is numpy arithmetic whose size is
calibrated to this machine once per process, the wait is a sleep, and every item is a fresh
tensor, copied as decoding would make one.

    >>> [spec.name for spec in draw(3, seed=1)]
    ['r0', 'r1', 'r2']
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["GENERAL", "HEAVY_STEP", "ONE_ROUND", "RandomItems", "Spec", "draw", "make_model"]

_POOL = 8  # distinct item payloads held in memory; item i copies payload i % _POOL
_FEATURES = 256  # what the model pools an item down to
_CLASSES = 10
_work_per_second: float | None = None

GENERAL, ONE_ROUND, HEAVY_STEP = "general", "one-round epochs", "heavy step"
# The classes' shares of the draws (the rest are general).
_ONE_ROUND_SHARE, _HEAVY_STEP_SHARE = 0.2, 0.2


def _calibrate() -> float:
    """Elements of the item's arithmetic this machine does per second (once per process)."""
    global _work_per_second
    if _work_per_second is None:
        x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
        _busy(x, 64)  # warm
        best = math.inf
        for _ in range(5):
            began = time.perf_counter()
            _busy(x, 256)
            best = min(best, time.perf_counter() - began)
        _work_per_second = 256 * x.size / best
    return _work_per_second


def _busy(x: np.ndarray, repeats: int) -> float:
    acc = 0.0
    for _ in range(repeats):
        acc += float(np.tanh(x * 1.0001).sum())
    return acc


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One drawn workload.

    Attributes:
        name: A short label, e.g. ``r3``.
        n: Items in the data set.
        cpu_ms: CPU time per item, in milliseconds.
        wait_ms: Waiting time per item (a sleep), in milliseconds.
        item_bytes: Bytes of one item's tensor (float32).
        model_mflops: Training-step work per sample in MFLOP (forward and backward), or 0 for
            no model (loading and the copy alone).
        kind: The class it was drawn from: ``general``, ``one-round epochs`` or
            ``heavy step`` (results written before the classes existed read as ``general``).
    """

    name: str
    n: int
    cpu_ms: float
    wait_ms: float
    item_bytes: int
    model_mflops: float
    kind: str = GENERAL

    def describe(self) -> str:
        model = f"model {self.model_mflops:.2g} MFLOP/sample" if self.model_mflops else "no model"
        size = (f"{self.item_bytes / 1024:.0f} KB" if self.item_bytes < 1 << 20
                else f"{self.item_bytes / (1 << 20):.1f} MB")
        tag = "" if self.kind == GENERAL else f" [{self.kind}]"
        return (f"n={self.n}, cpu {self.cpu_ms:.2f} ms, wait {self.wait_ms:.2f} ms, "
                f"{size} items, {model}{tag}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw(count: int, seed: int) -> list[Spec]:
    """``count`` workloads from ``seed`` (the same seed gives the same workloads anywhere)."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(count):
        u = rng.random()
        kind = (ONE_ROUND if u < _ONE_ROUND_SHARE else
                HEAVY_STEP if u < _ONE_ROUND_SHARE + _HEAVY_STEP_SHARE else GENERAL)
        # A multiple of 100, so that batch sizes that divide it exist in [8, 1024].
        if kind == ONE_ROUND:
            # Divisors up to 1,024 of 1,000-3,000 give epochs of 1 to ~8 batches.
            n = int(rng.integers(10, 31)) * 100
            cpu = _log_uniform(rng, 0.1, 1.0)
            wait = _log_uniform(rng, 0.05, 1.0) if rng.random() < 1 / 3 else 0.0
            size = int(_log_uniform(rng, 1 << 10, 1 << 16)) // 4 * 4
            mflops = 0.0 if rng.random() < 0.25 else _log_uniform(rng, 0.05, 20.0)
        elif kind == HEAVY_STEP:
            n = max(500, int(round(_log_uniform(rng, 500, 20_000) / 100)) * 100)
            cpu = 0.0 if rng.random() < 0.5 else _log_uniform(rng, 0.01, 0.05)
            wait = 0.0
            size = int(_log_uniform(rng, 1 << 10, 1 << 18)) // 4 * 4
            mflops = _log_uniform(rng, 20.0, 80.0)
        else:
            n = max(500, int(round(_log_uniform(rng, 500, 50_000) / 100)) * 100)
            cpu = 0.0 if rng.random() < 0.25 else _log_uniform(rng, 0.01, 2.0)
            wait = 0.0 if rng.random() < 0.4 else _log_uniform(rng, 0.05, 5.0)
            size = int(_log_uniform(rng, 1 << 10, 1 << 20)) // 4 * 4
            mflops = 0.0 if rng.random() < 0.25 else _log_uniform(rng, 0.05, 20.0)
        specs.append(Spec(name=f"r{i}", n=n, cpu_ms=round(cpu, 3), wait_ms=round(wait, 3),
                          item_bytes=size, model_mflops=round(mflops, 3), kind=kind))
    return specs


class RandomItems(Dataset[tuple[torch.Tensor, int]]):
    """The data set of a :class:`Spec`: each item does its CPU work, waits, then returns a
    fresh float32 tensor of ``item_bytes`` and a label."""

    def __init__(self, spec: Spec) -> None:
        self.n, self.cpu_ms, self.wait_ms = spec.n, spec.cpu_ms, spec.wait_ms
        rng = np.random.default_rng(spec.n)
        length = max(1, spec.item_bytes // 4)
        self.pool = rng.standard_normal((_POOL, length)).astype(np.float32)
        self.work = rng.standard_normal(4096).astype(np.float32)
        self.repeats = 0
        if spec.cpu_ms > 0:
            per_repeat = self.work.size / _calibrate()
            self.repeats = max(1, round(spec.cpu_ms / 1000 / per_repeat))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.repeats:
            _busy(self.work, self.repeats)
        if self.wait_ms:
            time.sleep(self.wait_ms / 1000)
        return torch.from_numpy(self.pool[index % _POOL].copy()), index % _CLASSES


class _Net(nn.Module):
    """Pools an item to 256 features, then an MLP of the drawn width."""

    def __init__(self, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(_FEATURES, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.pool = nn.AdaptiveAvgPool1d(_FEATURES)
        self.body = nn.Sequential(*layers, nn.Linear(hidden, _CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pool(x.unsqueeze(1)).squeeze(1))


def make_model(spec: Spec) -> nn.Module | None:
    """The spec's model: ``None`` for loading alone, else an MLP whose step does about
    ``model_mflops`` per sample (6 FLOP per weight: forward, and twice that backward)."""
    if not spec.model_mflops:
        return None
    torch.manual_seed(spec.n)
    weights = spec.model_mflops * 1e6 / 6
    depth = 2 if weights < 2e5 else 3
    # weights ~ 256 h + (depth - 1) h^2 + 10 h: the positive root
    a, b = depth - 1, _FEATURES + _CLASSES
    hidden = max(8, int((-b + math.sqrt(b * b + 4 * a * weights)) / (2 * a)))
    return _Net(hidden, depth)


LOSS = nn.functional.cross_entropy


def case(spec: Spec, quick: bool = False) -> Any:
    """The benchmark :class:`~cases.Case` of a drawn workload (``quick``: a tenth of its
    items, at least 200)."""
    from cases import Case

    if quick:
        spec = Spec(**{**spec.to_dict(), "n": max(200, spec.n // 10)})
    model = make_model(spec)
    bottleneck = ("wait" if spec.wait_ms > max(spec.cpu_ms, 0.05) else
                  "CPU items" if spec.cpu_ms > 0.05 else "copy / hand-off")
    if spec.kind == HEAVY_STEP:
        bottleneck = "model compute"
    elif spec.kind == ONE_ROUND:
        bottleneck = f"one-round epochs, {bottleneck}"
    return Case(name=spec.name, description=spec.describe(), bottleneck=f"random: {bottleneck}",
                n=spec.n, make_dataset=lambda: RandomItems(spec),
                make_model=lambda: make_model(spec), loss=None if model is None else LOSS,
                spec=spec.to_dict())
