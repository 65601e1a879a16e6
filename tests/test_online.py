"""autoload.DataLoader(num_workers="auto"): tuning while the loop trains, serving exactly the
batches torch's loader serves, in its order, across every switch of workers."""

from __future__ import annotations

import gc
import io
import os
import time

import numpy as np
import pytest
import torch
from rich.console import Console
from torch.utils.data import (
    BatchSampler,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
)

import autoload
import autoload.online
from autoload.cli import main
from autoload.memory import ProcessTreeMemory
from autoload.settle import Climb, Measured, Schedule, Setting, Space
from autoload.tuning import OnlineOptions, Tuner
from autoload.world import World

from conftest import FakeClock, worker_processes

W0, W2, W8 = Setting(0), Setting(2, 2), Setting(8, 2)
# Windows of exactly four batches: a schedule of five settings switches within a few dozen.
FAST = dict(min_batches=4, max_batches=4, min_seconds=0.0)
TWO = dict(FAST, cpus=2)


def schedule(*settings: Setting, **knobs) -> OnlineOptions:
    return OnlineOptions(planner=Schedule(settings), **{**TWO, **knobs})


def auto_loader(data, options: OnlineOptions, **kwargs) -> autoload.DataLoader:
    kwargs.setdefault("cache", False)
    return autoload.DataLoader(data, num_workers="auto", online=options, **kwargs)


def epoch(loader) -> tuple[list[list[int]], set[str]]:
    """The batches of one epoch (as lists of indices) and the settings that served them."""
    batches, served = [], set()
    for batch in loader:
        batches.append(batch[0].tolist())
        served.add(loader.tuning.serving.label())
    return batches, served


class Indexed(Dataset):
    """Item i is i; a worker ends its process (``die``) or hangs (``hang``) on one index."""

    def __init__(self, n: int, die: int | None = None, hang: int | None = None) -> None:
        self.n, self.die, self.hang = n, die, hang

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker and i == self.die:
            os._exit(3)
        if in_worker and i == self.hang:
            time.sleep(600)
        return torch.tensor(i), torch.tensor(in_worker)


# -- exactly once, in torch's order --------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
def test_every_epoch_serves_torchs_batches_in_torchs_order_across_switches(shuffle):
    data = TensorDataset(torch.arange(120))
    # 0 -> 2 -> 8 workers and back: windows of 4 batches (and warm-ups) spread the switches
    # over the first epochs of 30 batches, some of them across an epoch's end.
    options = schedule(W0, W2, W8, W2, W0)
    ours = auto_loader(data, options, batch_size=4, shuffle=shuffle,
                       generator=torch.Generator().manual_seed(5))
    torchs = torch.utils.data.DataLoader(data, batch_size=4, shuffle=shuffle, num_workers=2,
                                         generator=torch.Generator().manual_seed(5))
    assert len(ours) == len(torchs) == 30
    served = set()
    for _ in range(3):
        batches, by = epoch(ours)
        served |= by
        assert batches == [b[0].tolist() for b in torchs]
        assert sorted(i for b in batches for i in b) == list(range(120))
    assert served == {"w=0", "w=2 pf=2", "w=8 pf=2"}  # the switches did happen
    assert [w.setting for w in ours.tuning.windows] == [W0, W2, W8, W2, W0]
    assert ours.tuning.state == "settled"


def test_a_setting_the_tuning_comes_back_to_gets_its_idle_workers_back():
    ours = auto_loader(TensorDataset(torch.arange(200)), schedule(W2, W0, W2), batch_size=2)
    workers = {}
    for _ in ours:
        workers.setdefault(ours.tuning.serving, set()).update(
            p.pid for p in worker_processes())
    assert len(workers[W2]) == 2  # the same two processes, before and after w=0's window
    assert workers[W0] <= workers[W2]  # ... parked, idle, while w=0 served


@pytest.mark.parametrize("persistent", [None, True, False])
def test_two_epochs_with_the_global_seed_draw_what_torch_draws(persistent):
    # torch draws a base seed every epoch, or (persistent workers) only the first.
    data = TensorDataset(torch.arange(90))
    kept = {} if persistent is None else {"persistent_workers": persistent}
    ours = auto_loader(data, schedule(W2, W0, W2), batch_size=3, shuffle=True, drop_last=True,
                       **kept)
    torchs = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True, drop_last=True,
                                         num_workers=0 if persistent is None else 2, **kept)
    torch.manual_seed(11)
    mine = []
    for _ in range(2):
        mine.append(epoch(ours)[0])
        if persistent is False:
            assert not worker_processes()  # fresh workers every epoch, as asked
    after_mine = torch.rand(3)
    torch.manual_seed(11)
    theirs = [[b[0].tolist() for b in torchs] for _ in range(2)]
    assert mine == theirs and mine[0] != mine[1]
    assert torch.equal(after_mine, torch.rand(3))  # the global generator drew the same


def test_a_distributed_samplers_shard_with_set_epoch():
    data = TensorDataset(torch.arange(101))
    shard = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    same = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    ours = auto_loader(data, schedule(W0, W2, W0), batch_size=2, sampler=shard)
    torchs = torch.utils.data.DataLoader(data, batch_size=2, sampler=same)
    seen = []
    for e in range(3):
        shard.set_epoch(e)
        same.set_epoch(e)
        batches = epoch(ours)[0]
        assert batches == [b[0].tolist() for b in torchs]
        seen.append(batches)
    assert seen[0] != seen[1]  # set_epoch reshuffled


_MARK = -1  # what __getitem__ of Marked returns: set in each worker by its init function


class Marked(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return i, _MARK


def _mark_worker(worker_id: int) -> None:
    global _MARK
    _MARK = 1000 + worker_id


def _collate(items):
    return {"i": [i for i, _ in items], "mark": {m for _, m in items}}


def test_collate_fn_worker_init_fn_and_a_batch_sampler_of_ones_own_are_honoured():
    data = Marked()
    sampler = BatchSampler(SequentialSampler(data), batch_size=3, drop_last=True)
    ours = auto_loader(data, schedule(W0, W2), batch_sampler=sampler, collate_fn=_collate,
                       worker_init_fn=_mark_worker)
    assert len(ours) == 13
    batches, marks = [], set()
    for _ in range(2):
        for batch in ours:
            batches.append(batch["i"])
            in_worker = ours.tuning.serving.num_workers > 0
            assert batch["mark"] <= ({1000, 1001} if in_worker else {-1})
            marks |= batch["mark"]
    assert batches == 2 * [list(range(i, i + 3)) for i in range(0, 39, 3)]
    assert marks == {-1, 1000, 1001}  # both settings served, each worker initialised


class Faulty(Dataset):
    """Index 25 raises, wherever it is loaded."""

    def __len__(self) -> int:
        return 80

    def __getitem__(self, i: int):
        if i == 25:
            raise ValueError("bad item 25")
        return torch.tensor(i)


def _served_around_errors(loader) -> tuple[list[list[int]], int]:
    served, errors, it = [], 0, iter(loader)
    while True:
        try:
            served.append(next(it).tolist())
        except ValueError:
            errors += 1
        except StopIteration:
            return served, errors


def test_the_users_error_in_a_worker_mid_switch_surfaces_as_torchs_does_and_the_epoch_goes_on():
    # w=2 serves batches 0-7 and drains 8-11 (index 25 is in batch 8) while 8 workers start.
    ours = auto_loader(Faulty(), schedule(W2, W8), batch_size=3)
    torchs = torch.utils.data.DataLoader(Faulty(), batch_size=3, num_workers=2)
    mine = _served_around_errors(ours)
    assert mine == _served_around_errors(torchs)
    assert mine[1] == 1 and [24, 25, 26] not in mine[0] and len(mine[0]) == 26
    # The error, caught, sits in a reference cycle (torch's reraise frame holds it) with the
    # frames that hold the loader: as with torch's persistent workers, they go at a collection.
    del ours
    gc.collect()
    assert not worker_processes()


# -- what is tuned, and when it settles ---------------------------------------------------------

@pytest.mark.parametrize("edge, picked", [(0.0, W0), (0.01, W0), (0.10, W2)])
def test_ties_go_to_fewer_workers_on_a_fake_clock(edge, picked):
    clock = FakeClock()
    ours = auto_loader(TensorDataset(torch.arange(64)), schedule(W2, Setting(1, 2), W0,
                                                                  clock=clock), batch_size=1)
    for _ in range(3):
        for _ in ours:
            # Each batch's step, the same whatever serves it; two workers `edge` faster.
            clock.now += 0.01 / (1 + edge) if ours.tuning.serving == W2 else 0.01
    assert [w.setting for w in ours.tuning.windows] == [W2, Setting(1, 2), W0]
    assert ours.tuning.state == "settled" and ours.tuning.settled == picked


def test_a_loop_that_never_waits_on_loading_never_starts_a_worker():
    clock = FakeClock()
    ours = auto_loader(TensorDataset(torch.arange(64)), OnlineOptions(clock=clock, **TWO),
                       batch_size=1)
    served = set()
    for _ in range(2):
        for _ in ours:
            clock.now += 0.01  # the step; loading takes no time on this clock
            served.add(ours.tuning.serving)
    tuning = ours.tuning
    assert served == {W0}
    assert tuning.settled == W0 and [w.setting for w in tuning.windows] == [W0]
    assert tuning.batches_to_settle <= tuning.bound


def test_loading_that_computes_jumps_to_the_cpus_and_loading_that_waits_past_them():
    space = Space.build(cpus=2, num_workers="auto", prefetch_factor="auto", pin_memory=False,
                        cuda=False)
    plan = Climb(space, cpus=2)

    def alone(waited_cpu: float) -> Measured:
        # 8 ms loading and 2 ms of step a batch: four workers would keep up, five with room.
        return Measured(setting=W0, batches=10, seconds=0.1, waited=0.08,
                        waited_cpu=waited_cpu, noise=0.01)

    assert plan.propose(W0, [alone(0.075)]) == W2  # computing: no more workers than CPUs
    assert plan.propose(W0, [alone(0.001)]) == W8  # waiting: up to 4x the CPUs
    cheap = Measured(setting=W0, batches=10, seconds=0.1, waited=0.004, noise=0.01)
    assert plan.propose(W0, [cheap]) is None  # 0.4 ms of loading: no worker can pay


def _feed(tuner: Tuner, rates: dict[int, tuple[float, float]], batches: int) -> None:
    """Batches served by whatever the tuner targets: (seconds per batch, waited share)."""
    for _ in range(batches):
        setting = tuner.target
        cycle, share = rates[setting.num_workers]
        tuner.served(setting, wait=cycle * share, cycle=cycle)


def test_a_gain_beyond_the_noise_buys_more_workers_and_a_tie_does_not():
    space = Space.build(cpus=2, num_workers="auto", prefetch_factor=2, pin_memory=False,
                        cuda=False)
    options = OnlineOptions(**TWO)
    tuner = Tuner(start=space.recipe(2), planner=Climb(space, cpus=2), space=space,
                  options=options)
    # Waiting on data at 2 workers; 4 is 30% faster; 8 no faster than 4.
    rates = {0: (0.05, 0.9), 1: (0.04, 0.6), 2: (0.02, 0.5), 4: (0.0154, 0.1), 8: (0.0153, 0.1)}
    _feed(tuner, rates, 200)
    assert tuner.state == "settled" and tuner.settled == Setting(4, 2)
    assert [m.setting.num_workers for m in tuner.history] == [2, 4, 8]


def test_a_settled_loader_tunes_again_after_epochs_that_slow_down_waiting_on_data():
    space = Space.build(cpus=2, num_workers="auto", prefetch_factor=2, pin_memory=False,
                        cuda=False)
    tuner = Tuner(start=W2, planner=Schedule([W2]), space=space, options=OnlineOptions(**TWO))
    steady = {2: (0.02, 0.0)}
    for rates in (steady, steady, steady, {2: (0.03, 0.4)}):
        tuner.epoch_begin()
        _feed(tuner, rates, 50)
        tuner.epoch_end()
    assert tuner.state == "settled" and tuner.retunes == 0  # one slow epoch is not enough
    tuner.epoch_begin()
    _feed(tuner, {2: (0.03, 0.4)}, 50)
    tuner.epoch_end()
    assert tuner.retunes == 1 and tuner.state == "tuning"


# -- faults --------------------------------------------------------------------------------------

def test_a_worker_that_dies_mid_switch_raises_one_line_and_leaves_no_worker():
    # Windows of 4 after a warm-up of 2 at w=0: batch 7 (indices 24-26) is the new pool's first.
    ours = auto_loader(Indexed(90, die=25), schedule(W0, W2), batch_size=4)
    with pytest.raises(autoload.WorkerError) as caught:
        for _ in ours:
            pass
    message = str(caught.value)
    assert "\n" not in message
    assert "died" in message and "exit code 3" in message
    assert "switched from w=0 to w=2 pf=2" in message and "num_workers=0" in message
    assert isinstance(caught.value, autoload.AutoloadError)
    assert not worker_processes()


def test_a_worker_that_hangs_mid_switch_raises_and_leaves_no_worker():
    ours = auto_loader(Indexed(90, hang=33), schedule(W2, W8, hang_seconds=1.0), batch_size=4)
    with pytest.raises(autoload.WorkerError, match="hung"):
        for _ in ours:
            pass
    assert not worker_processes()


def test_ctrl_c_in_the_loop_mid_switch_propagates_and_leaves_no_worker():
    ours = auto_loader(TensorDataset(torch.arange(200)), schedule(W2, W8), batch_size=2)
    switched = False
    with pytest.raises(KeyboardInterrupt) as caught:
        for _ in ours:
            tuning = ours.tuning
            if tuning.serving != tuning.setting:  # the old pool drains, the new one starts
                switched = True
                raise KeyboardInterrupt
    assert switched
    assert not worker_processes()
    assert caught.traceback  # ... while the traceback (and its frames) still live


class _InterruptAt(BatchSampler):
    """A batch sampler that is interrupted (Ctrl-C) when it is asked for batch ``at``."""

    def __init__(self, data, at: int) -> None:
        super().__init__(SequentialSampler(data), batch_size=2, drop_last=False)
        self.at = at

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == self.at:
                raise KeyboardInterrupt
            yield batch


def test_ctrl_c_inside_next_while_the_new_pool_starts_leaves_no_worker():
    data = TensorDataset(torch.arange(200))
    # w=2 serves its warm-up (4) and window (4): the 8-worker pool's prefetch reaches batch 12.
    ours = auto_loader(data, schedule(W2, W8), batch_sampler=_InterruptAt(data, at=12))
    with pytest.raises(KeyboardInterrupt) as caught:
        for _ in ours:
            pass
    assert ours.tuning.setting == W8
    assert not worker_processes()
    assert caught.traceback  # ... while the traceback (and its frames) still live


def test_an_epoch_left_early_stops_its_workers():
    ours = auto_loader(TensorDataset(torch.arange(100)), schedule(W2), batch_size=2)
    for i, _ in enumerate(ours):
        if i == 3:
            break
    assert not worker_processes()
    assert len(epoch(ours)[0]) == 50  # the next epoch starts them again, whole


_held: list[np.ndarray] = []


def _greedy_worker(worker_id: int) -> None:
    """A worker that holds 150 MB, then takes a second to start: the watchdog (four looks a
    second) sees it before its first batch."""
    _held.append(np.ones(150 << 20, dtype=np.uint8))
    time.sleep(1.0)


class Slow(Dataset):
    """Items that wait 2 ms (a read): loading four workers would hide."""

    def __len__(self) -> int:
        return 120

    def __getitem__(self, i: int):
        time.sleep(0.002)
        return torch.tensor(i)


def test_a_setting_that_crosses_the_memory_cap_is_dropped_and_the_epoch_goes_on():
    cap = ProcessTreeMemory().sample() + (100 << 20)
    # One CPU: the climb jumps to 4 workers, and walks down the ladder as each crosses the cap.
    ours = autoload.DataLoader(Slow(), batch_size=2, num_workers="auto",
                               worker_init_fn=_greedy_worker, memory_cap=cap, cache=False,
                               online=OnlineOptions(**FAST, cpus=1))
    served = [b.tolist() for b in ours]
    assert served == [[i, i + 1] for i in range(0, 120, 2)]  # nothing lost, nothing twice
    tuning = ours.tuning
    assert tuning.dropped == (Setting(4, 2), W2, Setting(1, 2))
    assert tuning.state == "settled" and tuning.settled == W0
    assert not worker_processes()


# -- the cache and the rules ---------------------------------------------------------------------

def test_the_settled_answer_is_remembered_and_the_next_run_starts_there(tmp_path):
    data = TensorDataset(torch.arange(64))
    first = autoload.DataLoader(data, batch_size=4, num_workers="auto", prefetch_factor="auto",
                                cache_dir=tmp_path, online=schedule(Setting(1, 4)))
    epoch(first)
    assert first.tuning.settled == Setting(1, 4)
    assert first.tuning.stored is not None and os.path.isfile(first.tuning.stored)
    again = autoload.DataLoader(data, batch_size=4, num_workers="auto", prefetch_factor="auto",
                                cache_dir=tmp_path, online=OnlineOptions(**TWO))
    assert again.tuning.cached == first.tuning.stored
    assert again.tuning.setting == Setting(1, 4)  # it starts there, and checks
    other = autoload.DataLoader(data, batch_size=8, num_workers="auto", prefetch_factor="auto",
                                cache_dir=tmp_path, online=OnlineOptions(**TWO))
    assert other.tuning.cached is None and other.tuning.setting == W0
    off = autoload.DataLoader(data, batch_size=4, num_workers="auto", cache=False,
                              online=OnlineOptions(**TWO))
    assert off.tuning.cached is None and off.tuning.setting == W0
    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    assert main(["cache", "list", "--cache-dir", str(tmp_path)], console=console) == 0
    assert "w=1 pf=4 (online)" in out.getvalue()
    entry = os.path.basename(first.tuning.stored)[:12]
    assert main(["show", entry, "--cache-dir", str(tmp_path)], console=console) == 2
    assert "settled on while training" in out.getvalue()


def test_under_torchrun_each_rank_takes_its_share_of_the_cpus(monkeypatch):
    four_ranks = World(rank=1, size=8, local_rank=1, local_size=4)
    monkeypatch.setattr(autoload.online, "current_world", lambda: four_ranks)
    monkeypatch.setattr(autoload.online, "usable_cpus", lambda: 8)
    ours = autoload.DataLoader(TensorDataset(torch.arange(8)), num_workers="auto", cache=False)
    assert ours.tuning.workers == (0, 1, 2, 4, 8)  # 2 CPUs of the node's 8: up to 4x 2


def test_fixed_settings_are_torchs_loader_as_before():
    data = TensorDataset(torch.arange(10))
    fixed = autoload.DataLoader(data, 4, False, None, None, 0)
    assert fixed.tuning is None and fixed.num_workers == 0
    assert type(iter(fixed)).__name__ == "_SingleProcessDataLoaderIter"
    with pytest.raises(autoload.ConfigError, match="nothing is tuned"):
        autoload.DataLoader(data, num_workers=2, memory_cap="1GiB")


def test_what_auto_cannot_keep_is_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(autoload.ConfigError, match="IterableDataset"):
        autoload.DataLoader(Stream(), num_workers="auto")
    with pytest.raises(autoload.ConfigError, match="in_order"):
        autoload.DataLoader(TensorDataset(torch.arange(4)), num_workers="auto", in_order=False)
    with pytest.raises(autoload.ConfigError, match="prefetch_factor"):
        autoload.DataLoader(TensorDataset(torch.arange(4)), num_workers="auto",
                            prefetch_factor=0)
    with pytest.raises(autoload.ConfigError, match="min_batches <= max_batches"):
        OnlineOptions(min_batches=9, max_batches=8)
