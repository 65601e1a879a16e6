"""The window's timing logic, fed synthetic timelines: no loader, no worker, no sleep."""

import pytest

from autoload.timing import Recorder, Shape, Window, window_cv


class Timeline:
    """Drives a recorder: batches arrive at given times, each step takes ``step`` seconds."""

    def __init__(self, shape, window, step=0.001):
        self.rec, self.step, self.t = Recorder(shape, window), step, 0.0
        self.rec.start(0.0)
        self.verdicts = []

    def batch(self, arrives, samples=None):
        begin = self.t
        got = max(begin, arrives)
        self.t = got + self.step
        verdict = self.rec.batch(begin=begin, got=got, done=self.t,
                                 samples=samples or self.rec.shape.batch_size)
        self.verdicts.append(verdict)
        return verdict

    def epoch_end(self):
        verdict = self.rec.epoch_end(self.t)
        self.verdicts.append(verdict)
        return verdict


def _warm_up(line, batches=2):
    for _ in range(batches):
        line.batch(line.t + 0.01)
    return line.epoch_end()


def test_whole_epochs_give_the_exact_rate():
    # 4 batches of 10 an epoch, 0.1 s each: 100 samples/s, whatever the warm-up did.
    line = Timeline(Shape(batch_size=10, epoch_batches=4, warmup_batches=2),
                    Window(seconds=0.7), step=0.0)
    _warm_up(line)
    verdict = "go"
    while verdict == "go":
        for _ in range(4):
            line.batch(line.t + 0.1)
        verdict = line.epoch_end()
    timing = line.rec.timing()
    assert verdict == "done" and timing.epochs == 2  # 0.8 s: the first end past 0.7 s
    assert timing.samples_per_second == pytest.approx(100.0)
    assert not timing.cut_short


def test_an_epoch_longer_than_the_window_is_projected_with_its_bubble():
    # 1000 batches an epoch; the first batch after the boundary waits 0.5 s (the bubble), then
    # a batch every 0.01 s. A training run's epoch: 0.5 + 1000 x 0.01 = 10.5 s.
    line = Timeline(Shape(batch_size=10, epoch_batches=1000, warmup_batches=2),
                    Window(seconds=1.0), step=0.0)
    _warm_up(line)
    line.batch(line.t + 0.5)
    while line.batch(line.t + 0.01) == "go":
        pass
    timing = line.rec.timing()
    assert timing.epochs == 0 and line.verdicts[-1] == "done"
    assert timing.samples_per_second == pytest.approx(10_000 / 10.5, rel=0.01)
    assert timing.costs.batch_seconds == pytest.approx(0.01, rel=0.01)
    assert timing.costs.boundary_seconds == pytest.approx(0.5, rel=0.05)


def _burst(line, workers, seconds):
    """One round of ``workers`` batches that arrive together ``seconds`` after the last."""
    arrive = line.t + seconds
    for _ in range(workers):
        line.batch(arrive)


def test_a_window_ending_inside_a_round_of_bursts_is_not_biased():
    # 4 workers deliver bursts of 4 batches every 0.4 s: 10 samples/s a worker, 100/s in all.
    # A window ending one batch into a burst holds that burst's whole wait for one batch.
    window = Window(seconds=100.0)  # never done: the test stops the feed itself
    for extra in range(4):
        line = Timeline(Shape(batch_size=10, workers=4, in_flight=8, epoch_batches=10_000,
                              warmup_batches=4), window, step=0.0)
        _warm_up(line, 4)
        for _ in range(12):
            _burst(line, 4, 0.4)
        arrive = line.t + 0.4
        for _ in range(extra):
            line.batch(arrive)
        assert line.rec.timing().samples_per_second == pytest.approx(100.0, rel=0.02)


def test_a_pause_that_recurs_counts_in_the_pace():
    # Steady 0.01 s batches, and every 80th pauses 0.15 s (the main process's full garbage
    # collection does that with torch loaded): a training run pays every one of them.
    line = Timeline(Shape(batch_size=10, epoch_batches=10_000, warmup_batches=2),
                    Window(seconds=100.0), step=0.0)
    _warm_up(line)
    for i in range(320):
        line.batch(line.t + (0.16 if i % 80 == 79 else 0.01))
    timing = line.rec.timing()
    assert timing.costs.batch_seconds == pytest.approx(0.01 + 0.15 / 80, rel=0.05)


def test_nothing_before_the_first_epoch_end_counts():
    # The warm-up epoch is fast (a full queue), the measured ones slow: only they count.
    line = Timeline(Shape(batch_size=10, epoch_batches=4, warmup_batches=2),
                    Window(seconds=1.0), step=0.0)
    for _ in range(2):
        line.batch(line.t)
    line.epoch_end()
    while True:
        for _ in range(4):
            line.batch(line.t + 0.1)
        if line.epoch_end() != "go":
            break
    assert line.rec.timing().samples_per_second == pytest.approx(100.0)


def _until_done(line, epoch):
    """Batches every 0.01 s, the epoch ending after ``epoch`` of them; how many were fed."""
    fed = 0
    while True:
        fed += 1
        if line.batch(line.t + 0.01) != "go":
            return fed
        if fed == epoch and line.epoch_end() != "go":
            return fed


def test_the_window_goes_on_to_an_epoch_end_that_is_near_but_not_to_one_far_away():
    # The window's second passes at batch 100; an end 0.1 s later is worth the wait (the rate
    # is then exact), one 9 s later is not.
    near = Timeline(Shape(batch_size=1, epoch_batches=110, warmup_batches=2),
                    Window(seconds=1.0), step=0.0)
    _warm_up(near)
    assert _until_done(near, 110) == 110 and near.rec.timing().epochs == 1
    far = Timeline(Shape(batch_size=1, epoch_batches=1000, warmup_batches=2),
                   Window(seconds=1.0), step=0.0)
    _warm_up(far)
    assert _until_done(far, 1000) == 100 and far.rec.timing().epochs == 0


def test_past_the_time_limit_the_window_is_cut_short():
    line = Timeline(Shape(batch_size=10, epoch_batches=1000, warmup_batches=2),
                    Window(seconds=10.0, time_limit=1.0), step=0.0)
    _warm_up(line)
    while line.batch(line.t + 0.05) == "go":
        pass
    timing = line.rec.timing()
    assert line.verdicts[-1] == "cut" and timing.cut_short
    assert timing.samples_per_second == pytest.approx(200.0, rel=0.02)


def test_a_hopeless_rate_is_abandoned_after_a_third_of_the_window():
    line = Timeline(Shape(batch_size=10, epoch_batches=1000, warmup_batches=2),
                    Window(seconds=3.0, abandon_below=1000.0), step=0.0)
    _warm_up(line)
    while line.batch(line.t + 0.05) == "go":
        pass
    assert line.verdicts[-1] == "cut" and 1.0 <= line.t - 0.02 < 1.2


def test_cut_in_warm_up_with_workers_counts_from_the_loader_s_start():
    # Two workers started side by side deliver their first batches together after 0.4 s:
    # timed from the first arrival, the second would read as instantaneous.
    line = Timeline(Shape(batch_size=8, workers=2, in_flight=4, epoch_batches=2),
                    Window(seconds=1.0, time_limit=0.0001), step=0.0)
    line.batch(0.4)
    line.batch(0.4)
    timing = line.rec.timing()
    assert timing.cut_short and timing.samples_per_second == pytest.approx(16 / 0.4)


def test_an_interrupted_window_keeps_what_was_through_its_step():
    line = Timeline(Shape(batch_size=10, epoch_batches=1000, warmup_batches=2),
                    Window(seconds=10.0), step=0.0)
    _warm_up(line)
    for _ in range(20):
        line.batch(line.t + 0.1)
    timing = line.rec.timing(interrupted=True)
    assert timing.cut_short and timing.samples_per_second == pytest.approx(100.0, rel=0.02)


def test_a_stream_without_epochs_is_measured_at_its_steady_pace():
    line = Timeline(Shape(batch_size=10, warmup_batches=3), Window(seconds=0.5), step=0.0)
    while line.batch(line.t + 0.01) == "go":
        pass
    timing = line.rec.timing()
    assert timing.samples_per_second == pytest.approx(1000.0, rel=0.01)


def test_window_cv_from_block_rates():
    steady = [(0.1 * i, 10 * i) for i in range(1, 17)]  # 100 samples/s throughout
    assert window_cv(0.0, steady) == pytest.approx(0.0, abs=1e-9)
    # 8 blocks of 2 batches: their rates alternate 100/s and 50/s.
    times, t = [], 0.0
    for block in range(8):
        for _ in range(2):
            t += 0.1 if block % 2 == 0 else 0.2
            times.append(t)
    marks = [(t, 10 * (i + 1)) for i, t in enumerate(times)]
    rates = [100.0, 50.0] * 4
    mean = sum(rates) / 8
    sd = (sum((r - mean) ** 2 for r in rates) / 7) ** 0.5
    assert window_cv(0.0, marks) == pytest.approx(sd / mean / 8 ** 0.5)
    assert window_cv(0.0, steady[:3]) is None  # too few batches to tell


def test_the_first_round_of_the_workers_is_not_judged_before_it_is_in():
    # Four workers start side by side after the boundary and deliver their first round
    # together, 1.1-1.25 s in (a third of the window is 1 s); then a batch every 0.3 s: about
    # 33 samples/s. Two batches in, the rate so far is 17/s, under the bar of 25; the round
    # as it will be is not.
    line = Timeline(Shape(batch_size=10, workers=4, in_flight=8, epoch_batches=1000,
                          warmup_batches=4), Window(seconds=3.0, abandon_below=25.0), step=0.0)
    _warm_up(line, batches=4)
    t0 = line.t
    for k in range(4):
        line.batch(t0 + 1.1 + 0.05 * k)
    while line.batch(line.t + 0.3) == "go":
        pass
    assert "cut" not in line.verdicts
    assert line.rec.timing().samples_per_second == pytest.approx(33.0, rel=0.1)


def test_a_first_round_of_the_workers_still_out_after_a_whole_window_is_abandoned():
    line = Timeline(Shape(batch_size=10, workers=4, in_flight=8, epoch_batches=1000,
                          warmup_batches=4), Window(seconds=3.0, abandon_below=25.0), step=0.0)
    _warm_up(line, batches=4)
    t0 = line.t
    line.batch(t0 + 1.8)
    # Two batches in at 1.85 s, under a whole window: the epoch's start alone says little.
    assert line.batch(t0 + 1.85) == "go"
    # A third at 3.1 s, past a whole window: even if the last came now, the round would read
    # 13/s, under the bar of 25.
    assert line.batch(t0 + 3.1) == "cut"


def test_a_late_first_round_is_not_judged_while_the_rounds_after_it_are_fast():
    # Three workers, an epoch of 60 batches of 365: the first round after the boundary comes
    # in together at 0.3 s (the bubble), then a batch every 0.045 s. The rate so far reads
    # 3.6k/s when the round is in, under the bar of 6k; the epoch runs about 8k/s.
    line = Timeline(Shape(batch_size=365, workers=3, in_flight=24, epoch_batches=60,
                          warmup_batches=3), Window(seconds=0.5, abandon_below=6000.0),
                    step=0.0)
    _warm_up(line, batches=3)
    t0 = line.t
    for _ in range(3):
        line.batch(t0 + 0.3)
    while line.batch(line.t + 0.045) == "go":
        pass
    assert "cut" not in line.verdicts
    epoch = 60 * 365 / (0.3 + 57 * 0.045)
    assert line.rec.timing().samples_per_second == pytest.approx(epoch, rel=0.03)


def test_a_fetch_that_stalls_until_the_cut_counts_its_wait():
    # 100 samples/s for 8 batches, then the data set stops answering: the soft limit cuts the
    # window 4 s later, inside that fetch. A rate over the batches before it said 100/s (a hang
    # read as fast); the wait counts: 80 samples in 4.8 s.
    line = Timeline(Shape(batch_size=10, epoch_batches=100, warmup_batches=2),
                    Window(seconds=10), step=0.0)
    _warm_up(line)
    origin = line.t
    for _ in range(8):
        line.batch(line.t + 0.1)
    t = line.rec.timing(interrupted=True, stopped_at=line.t + 4.0)
    assert t.cut_short
    assert t.samples_per_second == pytest.approx(80 / (line.t + 4.0 - origin))


def test_a_batch_in_progress_at_the_cut_counts_neither_samples_nor_time_unless_it_stalled():
    line = Timeline(Shape(batch_size=10, epoch_batches=100, warmup_batches=2),
                    Window(seconds=10), step=0.0)
    _warm_up(line)
    for _ in range(8):
        line.batch(line.t + 0.1)
    # cut three quarters into the next 0.1 s batch: the same 100/s as the batches before
    assert line.rec.timing(interrupted=True, stopped_at=line.t + 0.075).samples_per_second \
        == pytest.approx(100, rel=0.02)


def test_a_stall_in_warm_up_counts_from_the_loader_s_start_to_the_cut():
    line = Timeline(Shape(batch_size=10, workers=2, in_flight=4, epoch_batches=100,
                          warmup_batches=4), Window(seconds=10), step=0.0)
    line.batch(0.1)
    line.batch(0.1)  # then nothing more arrives
    t = line.rec.timing(interrupted=True, stopped_at=5.0)
    assert t.cut_short and t.samples_per_second == pytest.approx(20 / 5.0)
