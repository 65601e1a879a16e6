"""tune() and best_loader() end to end with real training windows on tiny data sets."""

import copy

import pytest
import torch
from torch import nn

import autoload
from autoload.space import cpu_has_native_bf16

from conftest import worker_processes
from toydata import DiesInWorker, Indexed, WorkerHog

FAST = dict(timeout=5, max_workers=1, final_rounds=2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(),
                                  nn.Linear(8, 3))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x):
        self.scratch += 1  # a non-persistent buffer the step changes
        return self.body(x)


def _state(net, opt):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            net.scratch.clone(),
            [None if p.grad is None else p.grad.clone() for p in net.parameters()],
            [m.training for m in net.modules()],
            copy.deepcopy(opt.state_dict()),
            torch.get_rng_state())


def _same(a, b):
    (sd_a, s_a, g_a, m_a, o_a, r_a), (sd_b, s_b, g_b, m_b, o_b, r_b) = a, b
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(s_a, s_b)
    for x, y in zip(g_a, g_b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    assert m_a == m_b
    assert o_a["param_groups"] == o_b["param_groups"]
    assert o_a["state"].keys() == o_b["state"].keys()
    for k in o_a["state"]:
        for name, value in o_a["state"][k].items():
            assert torch.equal(value, o_b["state"][k][name])
    assert torch.equal(r_a, r_b)


def _trained_net():
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()  # optimizer state and grads exist before tune
    net.eval()
    return net, opt


def test_model_and_optimizer_are_bit_identical_after_tune():
    net, opt = _trained_net()
    before = _state(net, opt)
    result = autoload.tune(Indexed(96), model=net, loss_fn=nn.functional.cross_entropy,
                           optimizer=opt, **FAST)
    _same(before, _state(net, opt))
    assert result.samples_per_second > 0
    # bf16 autocast is searched where the CPU runs it natively (the space doubles), and left
    # out, and said, where it would be emulated.
    space = dict(device_type="cpu", has_model=True, max_workers=1)
    with_bf16 = autoload.build_space(96, **space, bf16_supported=True).size
    without = autoload.build_space(96, **space, amp="off").size
    left_out = any("bf16 autocast left out" in note for note in result.notes)
    if cpu_has_native_bf16():
        assert result.space_size == with_bf16 == 2 * without and not left_out
    else:
        assert result.space_size == without and left_out and result.amp is None
        assert all(t.config.amp is None for t in result.trials)
    assert not worker_processes()


def test_model_is_restored_when_trials_fail():
    # Only worker counts whose workers die: every trial fails, whatever the machine's speed
    # lets the budget hold (a search that also had num_workers=0 reached a failing trial only
    # when the budget left room for the recipe after the pilot).
    net, opt = _trained_net()
    before = _state(net, opt)
    with pytest.raises(autoload.TuningFailedError, match="worker died: DataLoader worker"):
        autoload.tune(DiesInWorker(96), model=net, loss_fn=nn.functional.cross_entropy,
                      optimizer=opt, num_workers=1, **FAST)
    _same(before, _state(net, opt))
    assert not worker_processes()


def test_workers_past_the_memory_cap_make_trials_infeasible_and_the_study_returns():
    from autoload.memory import ProcessTreeMemory

    cap = ProcessTreeMemory().sample() + (250 << 20)
    result = autoload.tune(WorkerHog(96, 500), memory_cap=cap, num_workers=[0, 1], **FAST)
    assert result.config.num_workers == 0
    bad = [t for t in result.trials if t.state == "infeasible"]
    assert bad and all(t.config.num_workers == 1 for t in bad)
    assert not worker_processes()


def test_best_loader_serves_every_sample_exactly_once_per_epoch(simulated):
    data = Indexed(120)
    loader = autoload.best_loader(data, loader_options={"shuffle": True}, max_workers=1,
                                  **simulated)
    assert isinstance(loader, autoload.DataLoader)  # the loader the tuner measured
    assert 120 % loader.batch_size == 0
    for _ in range(2):
        seen = torch.cat([x[:, 0] for x, _ in loader]).long().tolist()
        assert sorted(seen) == list(range(120))


def test_best_loader_with_drop_last_reports_dropped_samples(simulated):
    data = Indexed(101)
    result = autoload.tune(data, drop_last=True, min_batch_size=8, max_batch_size=32,
                           num_workers=0, **simulated)
    assert result.dropped_per_epoch == 101 % result.config.batch_size
    loader = autoload.best_loader(data, result=result)
    served = sum(len(x) for x, _ in loader)
    assert served == 101 - result.dropped_per_epoch


def test_a_model_without_a_loss_on_pairs_is_a_one_line_error_naming_both_ways_out():
    with pytest.raises(autoload.DatasetError, match=r"loss_fn=, --loss\) or a step"):
        autoload.tune(Indexed(64), model=nn.Linear(4, 3), **FAST)


def test_dataloader_kwargs_from_a_shuffling_loader_build_a_loader_that_shuffles_as_best_loader(
        simulated):
    data = Indexed(96)
    source = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    result = autoload.tune(source, max_workers=0, **simulated)
    assert result.dataloader_kwargs["shuffle"] is True
    assert "shuffle" not in result.loader_kwargs  # DataLoader(..., shuffle=False, **it) works
    mine = autoload.DataLoader(data, **result.dataloader_kwargs)
    built = autoload.best_loader(source, result=result)
    assert type(mine.sampler) is type(built.sampler) is torch.utils.data.RandomSampler
    torch.manual_seed(0)
    order = [int(x[0]) for batch, _ in mine for x in batch]
    assert sorted(order) == list(range(96)) and order != list(range(96))
    again = autoload.TuneResult.from_json(result.to_json())
    assert again.dataloader_kwargs == result.dataloader_kwargs
    plain = autoload.tune(torch.utils.data.DataLoader(data, batch_size=8), max_workers=0,
                          **simulated)
    assert "shuffle" not in plain.dataloader_kwargs


def test_a_memory_cap_below_what_the_process_uses_is_refused_before_any_trial():
    from autoload.memory import ProcessTreeMemory

    events = []
    with pytest.raises(autoload.ConfigError) as info:
        autoload.tune(Indexed(64), memory_cap="1MiB", progress=events.append, cache=False,
                      **FAST)
    message = str(info.value)
    assert message.startswith("the memory cap 1.0 MiB (memory_cap=, --memory-cap) is below what "
                              "this process already uses before any trial (")
    assert "e.g. --memory-cap " in message and "leave it out for the default" in message
    assert ProcessTreeMemory().sample() > 1 << 20  # the rule it states holds
    assert not events and not worker_processes()
