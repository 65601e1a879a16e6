"""Tuning under ``torchrun``: every rank of a node at once, one answer for all.

Global rank 0 runs the study; every measurement is collective. Rank 0 broadcasts the
configuration and window, every rank measures its own shard at the same moment (with the model as
the user wrapped it, so DDP's all-reduce is part of the step), and rank 0 gathers the outcomes.
The job's rate is the world size times the slowest rank's rate (DDP steps in lockstep); a fault on
any rank fails the trial on all. At the end rank 0 broadcasts the result, so every rank returns
the same one. The control messages travel in a gloo group of autoload's own with a timeout: a
rank that dies or stops answering ends the tuning on every rank with one line, never a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, IterableDataset

from autoload import errors
from autoload.config import LoaderConfig
from autoload.errors import (
    AutoloadError,
    MemoryCapExceeded,
    TrialTimeout,
    TuningFailedError,
    summary,
)
from autoload.memory import is_oom
from autoload.probe import Probe
from autoload.result import Measurement, costs_from_dict, costs_to_dict
from autoload.sources import Source
from autoload.timing import Window
from autoload.world import World, current_world

__all__ = ["Channel", "DistributedProbe", "Terminated", "World", "current_world", "follow",
           "shard", "terminate_as_interrupt", "world_note"]

CONTROL_TIMEOUT = 180.0  # seconds a rank waits on the others before it gives up


class Channel:
    """autoload's control messages between ranks: a gloo group of its own, with a timeout, so
    that a rank that died or hangs is noticed within ``timeout`` seconds on every other rank."""

    def __init__(self, world: World, *, timeout: float = CONTROL_TIMEOUT) -> None:
        self.world, self.timeout = world, timeout
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.waited = 0.0  # seconds this rank spent in collectives, waiting on the others

    def broadcast(self, message: Any) -> Any:
        """Rank 0's ``message`` on every rank."""
        box = [message]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]

    def gather(self, message: Any) -> list[Any]:
        """Every rank's ``message``, by rank, on every rank."""
        found: list[Any] = [None] * self.world.size
        self._collective(lambda: dist.all_gather_object(found, message, group=self.group))
        return found

    def vote(self, code: int) -> int:
        """The largest ``code`` of all ranks (one small all-reduce)."""
        box = torch.tensor([code], dtype=torch.int64)
        self._collective(lambda: dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group))
        return int(box.item())

    def _collective(self, call: Callable[[], Any]) -> None:
        began = time.monotonic()
        try:
            call()
        except (RuntimeError, ValueError) as exc:  # gloo's timeouts and broken connections
            raise TuningFailedError(
                f"rank {self.world.rank}: another rank stopped answering while tuning "
                f"({summary(exc)}); "
                "look at that rank's own error, fix it, and run the job again."
            ) from exc
        finally:
            self.waited += time.monotonic() - began


def shard(source: Source, world: World | None) -> Source:
    """Each rank's own part of the data: a ``DistributedSampler`` (shuffled when the user's
    loader shuffled) unless the user's loader has a sampler of its own, which is kept."""
    options = dict(source.loader_options)
    if world is None or "sampler" in options or isinstance(source.dataset, IterableDataset):
        return source
    options["sampler"] = DistributedSampler(
        source.dataset, num_replicas=world.size, rank=world.rank,
        shuffle=bool(options.pop("shuffle", False)), seed=0)
    return dataclasses.replace(source, loader_options=options)


def world_note(world: World, cpus: int) -> str:
    return (f"tuned for {world.size} ranks, {world.local_size} on this node: each rank's "
            f"loader searched up to its share of the CPUs ({cpus}) and of the memory cap, "
            "and the rate is the job's (its slowest rank's times the ranks).")


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun stops the other ranks that way when one fails; a scheduler preempts a
    job that way), handled like Ctrl-C: the model is restored and no worker is left."""


@contextlib.contextmanager
def terminate_as_interrupt(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere, or
    with ``enabled`` false, nothing changes); the previous handler is back after it."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("terminated")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- one measurement, everywhere -------------------------------------------------------------

def _attempt(measure: Callable[[], Any]) -> dict[str, Any]:
    """Run ``measure``; its outcome as a message (a fault is a message too, not an
    exception, so that every rank still takes part in the gather)."""
    try:
        value = measure()
    except MemoryCapExceeded as exc:  # (trial faults before the AutoloadError they are)
        return {"fault": "cap", "kind": exc.kind, "peak": exc.peak, "cap": exc.cap}
    except TrialTimeout as exc:
        return {"fault": "timeout", "reason": str(exc)}
    except AutoloadError as exc:
        return {"fault": "autoload", "error": type(exc).__name__, "reason": str(exc)}
    except Exception as exc:
        kind = "oom" if is_oom(exc) else "failed"
        return {"fault": kind, "error": type(exc).__name__, "reason": str(exc)}
    if isinstance(value, Measurement):
        data = dataclasses.asdict(value)
        data["costs"] = costs_to_dict(value.costs)
        return {"measurement": data}
    return {"value": value}


def _raise(outcome: dict[str, Any], rank: int) -> None:
    """Raise on rank 0 what the fault of ``rank`` was, as the search records it."""
    fault = outcome["fault"]
    if fault == "autoload":
        kind = getattr(errors, outcome["error"], AutoloadError)
        raise kind(f"rank {rank}: {outcome['reason']}")
    if fault == "cap":
        raise MemoryCapExceeded(f"rank {rank} {outcome['kind']}", outcome["peak"], outcome["cap"])
    if fault == "timeout":
        raise TrialTimeout(f"rank {rank}: {outcome['reason']}")
    reason = f"rank {rank}: {outcome['error']}: {outcome['reason']}"
    raise RuntimeError(("CUDA out of memory: " if fault == "oom" else "") + reason)


def _attempt_timed(measure: Callable[[], Any], channel: Channel) -> dict[str, Any]:
    """:func:`_attempt`, with the seconds this rank spent waiting on the others meanwhile."""
    before = channel.waited
    outcome = _attempt(measure)
    outcome["waited"] = channel.waited - before
    return outcome


def _silent_rank(outcomes: list[dict[str, Any]], deadline: float) -> int | None:
    """The rank that stopped answering during a measurement, if one did.

    A rank stuck in its own main process (a ``__getitem__`` or step that never returns) runs
    into its deadline without waiting on anyone, while the others spend that time waiting on it
    in the vote before each step and time out as they get its answer: the trial did not fail,
    that rank fell silent. Ranks that all time out in their own code name no one.
    """
    stuck = [(o.get("waited", 0.0), rank) for rank, o in enumerate(outcomes)
             if o.get("fault") == "timeout"]
    if not stuck or max(o.get("waited", 0.0) for o in outcomes) < deadline / 2:
        return None
    waited, rank = min(stuck)
    return rank if waited < deadline / 2 else None


def _combine(outcomes: list[dict[str, Any]], world: World,
             deadline: float | None = None) -> Measurement:
    """The job's measurement: rank 0's, at the world size times the slowest rank's rate. A
    fault on any rank is the trial's (a rank's own reason before the others' "another rank
    failed"), except a rank that stopped answering, which ends the tuning."""
    silent = None if deadline is None else _silent_rank(outcomes, deadline)
    if silent is not None:
        raise TuningFailedError(
            f"rank {silent} stopped answering while tuning: its main process did not come back "
            f"from the data set's __getitem__ or the step within the trial's {deadline:.0f} s "
            "deadline while the other ranks waited on it; look at what that rank was doing, "
            "fix it, and run the job again."
        )
    faults = [(o.get("error") == "PeerFault", rank, o) for rank, o in enumerate(outcomes)
              if "fault" in o]
    if faults:
        _, rank, outcome = min(faults, key=lambda f: (f[0], f[1]))
        _raise(outcome, rank)
    measured = [o["measurement"] for o in outcomes]
    mine = dict(measured[0])
    mine["costs"] = costs_from_dict(mine.get("costs"))
    slowest = min(m["samples_per_second"] for m in measured)
    mine["samples_per_second"] = world.size * slowest
    mine["cut_short"] = any(m["cut_short"] for m in measured)
    mine["peak_host_bytes"] = sum(m["peak_host_bytes"] for m in measured
                                  ) // max(1, world.size // world.local_size)
    return Measurement(**mine)


class DistributedProbe(Probe):
    """Rank 0's probe: each measurement runs on every rank at once (see the module's doc)."""

    def __init__(self, inner: Probe, world: World, channel: Channel) -> None:
        self.inner, self.world, self.channel = inner, world, channel

    def __getattr__(self, name: str) -> Any:  # the default optimizer and such, for tune()
        return getattr(self.inner, name)

    def measure(self, config: LoaderConfig, window: Window) -> Measurement:
        self.channel.broadcast(("measure", config.to_dict(), dataclasses.asdict(window)))
        outcome = _attempt_timed(lambda: self.inner.measure(config, window), self.channel)
        return _combine(self.channel.gather(outcome), self.world, window.deadline)

    def step_rate(self, config: LoaderConfig, window: Window) -> float | None:
        self.channel.broadcast(("step", config.to_dict(), dataclasses.asdict(window)))
        outcome = _attempt(lambda: self.inner.step_rate(config, window))
        outcomes = self.channel.gather(outcome)
        rates = [o.get("value") for o in outcomes]
        if any(r is None for r in rates):
            return None
        return float(self.world.size * min(rates))

    def finish(self, payload: str | None, error: str | None = None) -> None:
        """Release the other ranks: with the result's JSON, or an error to raise."""
        self.channel.broadcast(("done", payload, error))


def follow(probe: Probe, channel: Channel) -> str:
    """A rank other than 0: measure what rank 0 asks, until it sends the result's JSON."""
    while True:
        message = channel.broadcast(None)
        kind = message[0]
        if kind == "done":
            _, payload, error = message
            if error is not None:
                raise TuningFailedError(f"rank 0 stopped the tuning: {error}")
            return str(payload)
        config, window = LoaderConfig.from_dict(message[1]), Window(**message[2])
        run = probe.measure if kind == "measure" else probe.step_rate
        channel.gather(_attempt_timed(functools.partial(run, config, window), channel))
