"""Where this process stands in a ``torchrun`` job: its rank, the job's size, and how many
ranks share this node (and so its CPUs)."""

from __future__ import annotations

import dataclasses
import os

import torch.distributed as dist

__all__ = ["World", "current_world"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class World:
    """Where this process stands in the job."""

    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, int]:
        return {"size": self.size, "per_node": self.local_size}


def current_world() -> World | None:
    """The job this process is part of: an initialized process group of more than one rank
    (torchrun's ``LOCAL_WORLD_SIZE`` and ``LOCAL_RANK`` say how many share this node);
    ``None`` without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    size, rank = dist.get_world_size(), dist.get_rank()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_size))
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size)
