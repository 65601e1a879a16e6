"""One real training window on tiny data sets."""

import time

import pytest
import torch

from autoload import (
    DatasetError,
    LoaderConfig,
    MemoryCapExceeded,
    TrainingProbe,
    TrialTimeout,
    Window,
)
from autoload.alarm import OutOfTime
from autoload.probe import move_to_device

from conftest import FakeClock, worker_processes
from toydata import FreezeCount, Hangs, Indexed, Ragged, Raises, Slow, WorkerHog

CPU = torch.device("cpu")
SHORT = Window(seconds=0.2, deadline=20)


@pytest.mark.parametrize("config", [LoaderConfig(16),
                                    LoaderConfig(16, num_workers=1, prefetch_factor=2)])
def test_data_only_probe_measures_a_rate(config):
    m = TrainingProbe(Indexed(64), device=CPU).measure(config, SHORT)
    assert m.samples_per_second > 0 and m.samples >= 3 * 16 and m.batches >= 3
    # With workers the span may end at the last wait for a batch: at least half the window.
    assert m.seconds >= 0.1 and 0 <= m.data_wait_fraction <= 1
    assert m.peak_host_bytes > 0 and m.peak_gpu_bytes is None
    assert not worker_processes()


def test_epochs_run_back_to_back_when_the_window_is_longer():
    m = TrainingProbe(Indexed(32), device=CPU).measure(LoaderConfig(16), SHORT)
    assert m.batches > 2  # 2 batches an epoch, many epochs in the window


@pytest.mark.parametrize("amp", [None, "bfloat16"])
def test_the_step_runs_under_the_configuration_s_autocast(amp):
    seen = set()

    def loss_fn(out, y):
        seen.add(out.dtype)  # the model's output: bf16 where autocast ran
        return torch.nn.functional.cross_entropy(out.float(), y)

    probe = TrainingProbe(Indexed(64), device=CPU, model=torch.nn.Linear(4, 3), loss_fn=loss_fn)
    m = probe.measure(LoaderConfig(16, amp=amp), SHORT)
    assert seen == {torch.bfloat16 if amp else torch.float32}
    assert m.samples_per_second > 0 and not torch.is_autocast_enabled("cpu")


def test_worker_memory_is_counted():
    main_only = TrainingProbe(WorkerHog(64, 200), device=CPU).measure(LoaderConfig(16), SHORT)
    with_worker = TrainingProbe(WorkerHog(64, 200), device=CPU).measure(
        LoaderConfig(16, num_workers=1, prefetch_factor=2), SHORT)
    assert with_worker.peak_host_bytes - main_only.peak_host_bytes > 150 << 20


def test_worker_crossing_the_cap_is_stopped():
    base = TrainingProbe(Indexed(64), device=CPU).measure(LoaderConfig(16), SHORT).peak_host_bytes
    probe = TrainingProbe(WorkerHog(64, 400), device=CPU, memory_cap=base + (150 << 20))
    with pytest.raises(MemoryCapExceeded, match="crossed the cap"):
        probe.measure(LoaderConfig(16, num_workers=1, prefetch_factor=2),
                      Window(seconds=2, deadline=20))
    assert not worker_processes()


def test_user_error_in_worker_and_main_propagates_and_workers_are_gone():
    for config in (LoaderConfig(16), LoaderConfig(16, num_workers=1, prefetch_factor=2)):
        with pytest.raises(ValueError, match="cannot read item"):
            TrainingProbe(Raises(64), device=CPU).measure(config, SHORT)
        assert not worker_processes()


def test_hang_in_the_main_process_hits_the_deadline():
    with pytest.raises(TrialTimeout):
        TrainingProbe(Hangs(64), device=CPU).measure(LoaderConfig(16),
                                                     Window(seconds=0.2, deadline=1))


def test_ragged_items_point_to_collate_fn():
    with pytest.raises(DatasetError, match="collate_fn"):
        TrainingProbe(Ragged(64), device=CPU).measure(LoaderConfig(16), SHORT)


def test_move_to_device_keeps_structure():
    batch = {"x": torch.zeros(2), "pair": (torch.ones(1), [torch.ones(1)]), "tag": "a"}
    moved = move_to_device(batch, CPU)
    assert moved["tag"] == "a" and isinstance(moved["pair"], tuple)
    assert isinstance(moved["pair"][1], list)


def test_step_rate_bounds_the_training_step_and_restores_the_model():
    net = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in net.parameters()]
    probe = TrainingProbe(Indexed(64), device=CPU, model=net,
                          loss_fn=torch.nn.functional.cross_entropy)
    rate = probe.step_rate(LoaderConfig(16, num_workers=1, prefetch_factor=2), Window(seconds=0.2))
    assert rate is not None and rate > 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert TrainingProbe(Indexed(64), device=CPU).step_rate(LoaderConfig(16), SHORT) is None


class Ticks(FakeClock):
    """A clock each reading of which moves on by ``tick`` seconds."""

    def __init__(self, tick: float) -> None:
        super().__init__()
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class Takes(Indexed):
    """Each item takes ``seconds`` of ``clock``'s time (in the main process: ``num_workers=0``);
    with ``uneven``, every 4th block of 16 items 8x as long. From the ``cut_at``-th item on,
    the time limit's alarm goes off while the item is fetched."""

    def __init__(self, n, clock, seconds, *, uneven=False, cut_at=None):
        super().__init__(n)
        self.clock, self.seconds, self.uneven, self.cut_at = clock, seconds, uneven, cut_at
        self.calls = 0

    def __getitem__(self, i):
        self.calls += 1
        self.clock.now += self.seconds * (8 if self.uneven and (i // 16) % 4 == 0 else 1)
        if self.cut_at is not None and self.calls >= self.cut_at:
            raise OutOfTime
        return super().__getitem__(i)


def test_a_hopeless_configuration_is_cut_short():
    # Clock time only: the window of 3 s ends once a third of it shows the rate stays under
    # the bar, long before its end.
    probe = TrainingProbe(Indexed(64), device=CPU, clock=Ticks(0.001))
    m = probe.measure(LoaderConfig(16), Window(seconds=3, abandon_below=1e12))
    assert m.cut_short and 1 <= m.seconds < 3 and m.samples_per_second > 0


def test_slow_batches_stop_at_the_time_limit():
    probe = TrainingProbe(Slow(64, 0.02), device=CPU)  # 0.32 s a batch of 16, or more
    m = probe.measure(LoaderConfig(16), Window(seconds=5, time_limit=1.0))
    # Cut (nothing but the limit cuts here) with fewer batches than the 5 s window holds.
    assert m.cut_short and 1 <= m.batches < 5 / (16 * 0.02) and m.samples_per_second > 0


def test_a_window_cut_short_counts_neither_the_batch_in_progress_nor_its_time():
    # 10 items of 20 ms: 0.2 s a batch, 50/s. Cut three quarters into the measured epoch's
    # third batch (after a warm-up epoch of 2 batches): timing up to the cut but counting only
    # whole batches would say 36/s.
    clock = FakeClock()
    data = Takes(40, clock, 0.02, cut_at=20 + 2 * 10 + 8)
    m = TrainingProbe(data, device=CPU, clock=clock).measure(LoaderConfig(10), Window(seconds=5))
    assert m.cut_short and m.batches == 2 and m.samples == 20
    assert m.samples_per_second == pytest.approx(50, rel=1e-6)


def test_a_step_slower_than_the_time_limit_is_interrupted():
    data = Slow(64, 0.05)  # 0.8 s a batch of 16, or more
    probe = TrainingProbe(data, device=CPU)
    m = probe.measure(LoaderConfig(16), Window(seconds=5, time_limit=0.5))
    # Interrupted inside the second batch (0.5 s after the first), not after it: the rate is
    # the first batch's, timed from the loader's start, and the fetches stopped within a batch.
    assert m.cut_short and m.samples == 16 and m.seconds >= 16 * 0.05
    assert 16 < data.calls < 32


def test_probe_reports_how_much_its_rate_varies():
    config, window = LoaderConfig(4), Window(seconds=0.5, deadline=20)
    clock = FakeClock()
    steady = TrainingProbe(Takes(4096, clock, 0.002), device=CPU, clock=clock)
    uneven = TrainingProbe(Takes(4096, clock, 0.002, uneven=True), device=CPU, clock=clock)
    steady_cv, uneven_cv = (p.measure(config, window).rate_cv for p in (steady, uneven))
    assert steady_cv == pytest.approx(0, abs=1e-6) and uneven_cv > 0.05


# A spawned worker can abort while its interpreter exits, its work done (about 1 run in 9 here);
# torch reports that from the iterator's destructor, after the measurement is complete.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(("context", "repeats"), [(None, 3), ("spawn", 1)])
def test_when_the_workers_make_whole_epochs_the_probe_measures_whole_epochs(context, repeats):
    # 8 batches an epoch, and the loader asks 4 workers for 16 at once: the workers make an
    # epoch in bursts and idle until the next, so only whole epochs give the real rate (a
    # window inside one could count batches made before it began).
    options = {} if context is None else {"multiprocessing_context": context}
    probe = TrainingProbe(Slow(256, 0.0005), device=CPU, loader_options=options)
    window = Window(seconds=0.05, deadline=30)
    for _ in range(repeats):
        m = probe.measure(LoaderConfig(32, num_workers=4, prefetch_factor=4), window)
        assert m.samples % 256 == 0 and m.samples >= 256
        assert 0 < m.samples_per_second < 1.1 * 4 / 0.0005  # 4 workers, 0.5 ms an item
    assert not worker_processes()


class _SlowStep(torch.nn.Module):
    """A model whose forward pass takes ``seconds``, of real time and of ``clock``'s: the step,
    not the data, binds."""

    def __init__(self, seconds: float, clock: FakeClock) -> None:
        super().__init__()
        self.seconds, self.clock, self.linear = seconds, clock, torch.nn.Linear(4, 3)

    def forward(self, x):
        time.sleep(self.seconds)  # the workers, in real time, run ahead of the step
        self.clock.now += self.seconds
        return self.linear(x)


def test_workers_done_with_the_epoch_do_not_count_as_falling_behind():
    # 12 batches of 4 at 20 ms a step; 2 workers x 4 prefetch make the epoch long before the
    # step is through it, and then idle for want of work while the step drains their queue.
    # The probe's clock moves with the step only: the window reads what the step allows.
    clock = FakeClock()
    probe = TrainingProbe(Indexed(48), device=CPU, model=_SlowStep(0.02, clock),
                          loss_fn=torch.nn.functional.cross_entropy, clock=clock)
    config = LoaderConfig(4, num_workers=2, prefetch_factor=4)
    assert probe.step_rate(config, Window(seconds=0.1)) == pytest.approx(4 / 0.02)
    m = probe.measure(config, Window(seconds=0.3, deadline=20))
    assert m.samples_per_second == pytest.approx(4 / 0.02)
    # The window (15 steps) outlasts the 4 or more batches left of the first epoch after the
    # warm-up, and by its end the workers have made it all. Then the rest of an epoch is their
    # stock and the next starts empty: the window spans whole epochs, one's end to another's.
    assert m.batches % 12 == 0 and not m.cut_short


def test_a_cut_short_burst_of_whole_epochs_is_not_read_as_a_rate():
    # 2 batches an epoch, made side by side by 2 workers in 0.4 s: at most 16 / 0.4 = 40/s.
    # Cut short before an epoch's end, the two arrive together; timing the second from the
    # first read thousands of samples/s. Only the time since the loader was built is safe.
    probe = TrainingProbe(Slow(16, 0.05), device=CPU)
    for _ in range(3):
        m = probe.measure(LoaderConfig(8, num_workers=2, prefetch_factor=2),
                          Window(seconds=0.1, deadline=20, time_limit=0.2, abandon_below=1e6))
        assert m.cut_short and 0 < m.samples_per_second <= 45


def test_the_user_s_worker_init_fn_still_runs():
    from toydata import init_that_raises

    probe = TrainingProbe(Indexed(64), device=CPU,
                          loader_options={"worker_init_fn": init_that_raises})
    with pytest.raises(RuntimeError, match="the user's init ran in worker"):
        probe.measure(LoaderConfig(16, num_workers=1, prefetch_factor=2), SHORT)
    assert not worker_processes()


def test_the_probe_forks_its_workers_with_the_heap_frozen():
    # The loader measured is autoload.DataLoader, the one best_loader returns.
    import gc

    seen: list[float] = []

    def step(model, batch):
        seen.extend(batch.tolist())
        return (model.weight * 0).sum()

    probe = TrainingProbe(FreezeCount(64), device=CPU, model=torch.nn.Linear(1, 1), step=step,
                          loader_options={"multiprocessing_context": "fork"})
    probe.measure(LoaderConfig(8, num_workers=1, prefetch_factor=2), SHORT)
    assert seen and min(seen) > 1000  # torch's own objects, frozen before the fork
    assert gc.get_freeze_count() == 0


class _LeavesAutogradOff(torch.nn.Module):
    """On its first forward pass, turns autograd off for the thread, as a time limit's signal
    raised inside the ``finally`` that turns it back on after the optimizer's step does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.calls = torch.nn.Linear(4, 3), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            torch.set_grad_enabled(False)
        return self.linear(x)


def test_a_trial_that_leaves_autograd_off_leaves_it_on_for_the_next():
    probe = TrainingProbe(Indexed(64), device=CPU, model=_LeavesAutogradOff(),
                          loss_fn=torch.nn.functional.cross_entropy)
    config, window = LoaderConfig(8), Window(seconds=0.1, deadline=20)
    with pytest.raises(RuntimeError, match="does not require grad"):
        probe.measure(config, window)
    assert torch.is_grad_enabled()
    assert probe.measure(config, window).samples_per_second > 0


def test_a_hang_in_the_main_process_names_the_index_it_hung_on():
    from toydata import HangsFrom

    # Warm-up serves indices 0-19; the measured epoch starts again at 0 and hangs at 20.
    probe = TrainingProbe(HangsFrom(64, first=20), device=CPU)
    with pytest.raises(TrialTimeout) as info:
        probe.measure(LoaderConfig(10), Window(seconds=5, deadline=1.0))
    message = str(info.value)
    assert message.startswith("items stopped arriving: the data set's __getitem__ did not "
                              "return index 20 before the trial's deadline")
    assert "a hang in the data set" in message
