"""The benchmark under torchrun (``--nproc N``): N ranks on this machine, every measurement
collective.

``python benchmarks/run.py --nproc 2 ...`` starts itself again under ``torchrun --standalone
--nproc_per_node=2``. Inside the job each rank wraps the case's model in DDP and reads its own
shard; rank 0 measures the grid and the re-measure through autoload's ``DistributedProbe`` (so
each point is every rank at once, scored by the slowest), while the other ranks follow it; all
ranks call ``autoload.tune`` together. Only rank 0 prints and writes the JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autoload.distributed import Channel, DistributedProbe, World, current_world, shard
from autoload.sources import Source

MARKER = "AUTOLOAD_BENCHMARK_JOB"


@dataclass(frozen=True, kw_only=True)
class Job:
    world: World
    channel: Channel

    @property
    def leader(self) -> bool:
        return self.world.leader


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run this benchmark again as an ``nproc``-rank torchrun job; its exit status."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, *_without_nproc(argv)]
    return subprocess.call(command, env={**os.environ, MARKER: "1"})


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N``: torchrun's own parser takes ``--nproc`` for an
    abbreviation of its ``--nproc-per-node``, and the job knows its size from torchrun."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def start() -> Job | None:
    """Join the job when inside one (the marker set by :func:`launch`)."""
    if os.environ.get(MARKER) != "1":
        return None
    dist.init_process_group("gloo")
    world = current_world()
    if world is None:
        return None
    return Job(world=world, channel=Channel(world))


def wrap(model: torch.nn.Module | None, job: Job | None) -> torch.nn.Module | None:
    if model is None or job is None:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def shard_options(dataset: Any, job: Job | None) -> dict[str, Any]:
    return {} if job is None else shard(Source(dataset=dataset), job.world).loader_options


def measuring_probe(probe: Any, job: Job | None) -> Any:
    """Rank 0's probe for the grid and the re-measure: every rank at once."""
    return probe if job is None else DistributedProbe(probe, job.world, job.channel)
