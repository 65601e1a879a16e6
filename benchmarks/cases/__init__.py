"""Benchmark cases: the fixed ones (one module each, with a known, different bottleneck) and
those drawn at random (``benchmarks/workloads.py``), both as :class:`Case` records.

Every case module exposes ``DESCRIPTION`` (one line), ``BOTTLENECK`` (a few words for the table),
``N`` and ``QUICK_N`` (data set sizes of the full and the ``--quick`` run), ``make_dataset(n)``,
``make_model()`` (``None`` for a data-only case) and ``LOSS`` (a callable, or ``None``); optionally
``MAX_BATCH``, the grid's largest batch size (default 1024). Data set classes live at module top
level so that worker processes can unpickle them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

NAMES = ("a_inmemory", "b_cpu_items", "c_io_wait", "d_large_samples", "e_heavy_model",
         "f_h2d_copy")
# What `benchmarks/run.py` runs without --cases. On CPU, f (the host-to-device copy) is there
# only when asked. On CUDA, the three cases that fit the 5-minute budget (see the README's
# "GPU variant"): CPU work per item, a data-only copy, and the copy with a tiny model.
DEFAULT_CPU = NAMES[:5]
DEFAULT_CUDA = ("b_cpu_items", "d_large_samples", "f_h2d_copy")


@dataclass(frozen=True, kw_only=True)
class Case:
    """One workload of the benchmark."""

    name: str
    description: str
    bottleneck: str
    n: int
    make_dataset: Callable[[], Any]
    make_model: Callable[[], Any]
    loss: Any
    max_batch: int = 1024
    spec: dict[str, Any] = field(default_factory=dict)  # a random workload's draw


def load(name: str) -> ModuleType:
    """Import the case module ``name`` (one of :data:`NAMES`)."""
    return importlib.import_module(f"{__name__}.{name}")


def fixed(name: str, quick: bool = False) -> Case:
    """The fixed case ``name`` as a :class:`Case`."""
    module = load(name)
    n = module.QUICK_N if quick else module.N
    return Case(name=name, description=module.DESCRIPTION, bottleneck=module.BOTTLENECK, n=n,
                make_dataset=lambda: module.make_dataset(n), make_model=module.make_model,
                loss=module.LOSS, max_batch=getattr(module, "MAX_BATCH", 1024))


def select(spec: str | None) -> list[str]:
    """Case names from ``"a,c"`` or ``"a_inmemory,c_io_wait"``; all of them for ``None``."""
    if not spec:
        return list(NAMES)
    chosen: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        matches = [n for n in NAMES if n == token or n.split("_", 1)[0] == token]
        if not matches:
            raise ValueError(f"unknown case {token!r}; choose from {', '.join(NAMES)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen
