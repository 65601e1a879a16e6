"""The pipeline model on hand-made observations: what it learns from each kind of window."""

import pytest

from autoload import LoaderConfig
from autoload.pipeline import Observation, PipelineModel
from autoload.timing import Costs

N = 4096


def _in_process(bs: int, step_per_sample: float, amp=None, fetch_per_sample=1e-4):
    """A window without workers: fetch and step each cost a fixed time per sample."""
    fetch, step = fetch_per_sample * bs, step_per_sample * bs
    costs = Costs(batch_seconds=fetch + step, fetch_seconds=fetch, fetch_cpu_seconds=fetch,
                  step_seconds=step, main_cpu_seconds=fetch + step, batch_bytes=bs * 1024)
    return Observation(config=LoaderConfig(bs, amp=amp), rate=bs / (fetch + step), costs=costs)


def _step(model: PipelineModel, config: LoaderConfig) -> float:
    """The step time per batch the model implies for ``config`` (without workers)."""
    rate = model.predict(config).fitted
    return config.batch_size / rate - 1e-4 * config.batch_size


def test_autocast_saves_what_it_was_measured_to_save_at_each_batch_size():
    # Autocast halves the step at bs=1024 but saves only 10% at bs=64: one factor for all
    # sizes would get both wrong. Between them (bs=256, midway in log) it interpolates.
    plain = [_in_process(bs, 1e-3) for bs in (64, 256, 1024)]
    amp = [_in_process(64, 0.9e-3, "bfloat16"), _in_process(1024, 0.5e-3, "bfloat16")]
    model = PipelineModel(cores=2, samples_per_epoch=N)
    model.fit(plain + amp)
    for bs, factor in ((64, 0.9), (1024, 0.5), (256, 0.7)):
        assert _step(model, LoaderConfig(bs, amp="bfloat16")) == pytest.approx(
            factor * 1e-3 * bs, rel=1e-3)
    assert _step(model, LoaderConfig(256)) == pytest.approx(1e-3 * 256, rel=1e-3)


def test_a_trial_cut_short_makes_its_neighbourhood_known_but_corrects_nothing():
    plain = [_in_process(bs, 1e-3) for bs in (64, 256, 1024)]
    cut = LoaderConfig(64, num_workers=4, prefetch_factor=8)
    far = LoaderConfig(1024, num_workers=4, prefetch_factor=8)
    model = PipelineModel(cores=2, samples_per_epoch=N)
    model.fit(plain)
    before = model.predict(cut)
    assert model.novelty(cut) == pytest.approx(model.novelty(far), abs=0.2)
    model.fit([*plain, Observation(config=cut, rate=before.rate / 5, cut_short=True)])
    assert model.novelty(cut) < 0.6 < model.novelty(far)  # measured there: no more optimism
    assert model.predict(cut).rate == pytest.approx(before.rate)  # a low read, not the truth


def test_an_unmeasured_prefetch_factor_is_no_reason_for_hope():
    # The model predicts every prefetch factor alike; were prefetch part of novelty, the
    # search's optimism would send it to the largest prefetch first, the costliest in memory.
    plain = [_in_process(bs, 1e-3) for bs in (64, 256, 1024)]
    measured = LoaderConfig(256, num_workers=4, prefetch_factor=2)
    model = PipelineModel(cores=2, samples_per_epoch=N)
    model.fit([*plain, Observation(config=measured, rate=2000.0)])
    deep = LoaderConfig(256, num_workers=4, prefetch_factor=8)
    assert model.novelty(deep) == pytest.approx(model.novelty(measured))
    assert model.novelty(deep) < model.novelty(LoaderConfig(256, num_workers=8,
                                                            prefetch_factor=2))


# -- the bounds, from hand-computed costs -----------------------------------------------------
#
# Every fit below sees windows without workers at two batch sizes whose costs are exactly a
# cost per sample: fetching ``fetch`` seconds a sample (``fetch_cpu`` of them on the CPU, the
# rest waiting), stepping ``step``. With no window with workers the model keeps its priors:
# the cores it was given, the bubble as modelled (1x) and a 1 ms round trip per worker; a
# worker's CPU per batch is what fetching costs in-process, and receiving a batch is free.


def _softmin(*seconds: float) -> float:
    return sum(s ** 4 for s in seconds) ** 0.25


def _model(*, fetch: float, step: float, fetch_cpu: float | None = None, cores: int = 8,
           n: int | None = N, boundary: float | None = None, ranks: int = 1) -> PipelineModel:
    cpu = fetch if fetch_cpu is None else fetch_cpu
    observations = []
    for bs in (64, 256):
        costs = Costs(batch_seconds=(fetch + step) * bs, fetch_seconds=fetch * bs,
                      fetch_cpu_seconds=cpu * bs, step_seconds=step * bs,
                      main_cpu_seconds=(cpu + step) * bs, boundary_seconds=boundary,
                      batch_bytes=bs * 1024)
        observations.append(Observation(config=LoaderConfig(bs), rate=1 / (fetch + step),
                                        costs=costs))
    model = PipelineModel(cores=cores, samples_per_epoch=n, ranks=ranks)
    model.fit(observations)
    return model


def test_without_workers_a_batch_costs_its_fetch_and_its_step_in_turn():
    model = _model(fetch=1e-3, step=1e-4)
    p = model.predict(LoaderConfig(64))
    assert p.fitted == pytest.approx(N / (64 * 64 * 1.1e-3))  # 64 batches of 70.4 ms
    assert p.bound == "fetching items" and p.start_seconds == 0.0
    assert model.predict(LoaderConfig(64)).rate == pytest.approx(p.fitted)  # measured: exact
    # Fetching that mostly waits (0.2 of its 1 ms on the CPU) binds as waiting.
    assert _model(fetch=1e-3, fetch_cpu=2e-4, step=1e-4).predict(
        LoaderConfig(64)).bound == "waiting for items"
    assert _model(fetch=1e-4, step=1e-3).predict(LoaderConfig(64)).bound == "the training step"


def test_without_workers_each_epoch_adds_the_start_measured_at_its_boundary():
    model = _model(fetch=1e-3, step=1e-4, boundary=0.5)
    p = model.predict(LoaderConfig(64))
    assert p.start_seconds == 0.5
    assert p.fitted == pytest.approx(N / (64 * 64 * 1.1e-3 + 0.5))
    stream = _model(fetch=1e-3, step=1e-4, n=None).predict(LoaderConfig(64))
    assert stream.fitted == pytest.approx(1 / 1.1e-3)  # a stream has no epochs


def test_with_enough_workers_the_step_binds():
    # 4 workers at 64 a batch: workers 64 ms / 4 = 16 ms a batch, the cores (64 + 64 ms) / 8
    # = 16 ms, the step 64 ms: the step's bound, softened by the two others.
    model = _model(fetch=1e-3, step=1e-3, cores=8)
    p = model.predict(LoaderConfig(64, num_workers=4, prefetch_factor=2))
    seconds = _softmin(0.016, 0.016, 0.064)
    start = 0.064 * 1 + 1e-3 * 4  # one worker-batch (4 workers on 8 cores), 4 round trips
    assert p.bound == "the training step"
    assert p.start_seconds == pytest.approx(start)
    assert p.fitted == pytest.approx(N / (64 * seconds + start))


def test_too_few_workers_bind_and_more_of_them_lift_the_rate_to_the_step():
    # Fetching costs 4x the step: one worker makes a batch in 256 ms against a 64 ms step.
    model = _model(fetch=4e-3, step=1e-3, cores=8)

    def predict(w):
        return model.predict(LoaderConfig(64, num_workers=w, prefetch_factor=2))

    assert predict(1).bound == predict(2).bound == "fetching items"
    workers, cores, step = 0.256, (0.256 + 0.064) / 8, 0.064
    assert predict(1).fitted == pytest.approx(
        N / (64 * _softmin(workers, cores, step) + 0.256 + 1e-3))
    assert predict(1).fitted < predict(2).fitted < predict(8).fitted
    assert predict(8).bound == "the training step"
    mostly_waiting = _model(fetch=4e-3, fetch_cpu=1e-3, step=1e-3, cores=8)
    assert mostly_waiting.predict(LoaderConfig(64, num_workers=1,
                                               prefetch_factor=2)).bound == "waiting for items"


def test_workers_that_outnumber_the_cores_are_bound_by_them():
    # 8 workers on 1 core: the workers' and the step's CPU, 128 ms a batch, on one core.
    model = _model(fetch=1e-3, step=1e-3, cores=1)
    p = model.predict(LoaderConfig(64, num_workers=8, prefetch_factor=2))
    assert p.bound == "the CPU cores"
    start = 0.064 * 8 + 1e-3 * 8  # a worker-batch with 8 workers sharing the core
    assert p.fitted == pytest.approx(N / (64 * _softmin(0.008, 0.128, 0.064) + start))


def test_an_epoch_of_few_batches_against_many_workers_is_bound_by_its_start():
    # 512 samples: 8 batches of 64, made by 6 workers that mostly wait (98 of 100 ms). The
    # pace is a batch per 100 / 6 ms, but every epoch first waits for a whole worker-batch
    # (100 ms) and 6 round trips: more than half again as long as its steady part.
    model = _model(fetch=0.1 / 64, fetch_cpu=0.002 / 64, step=0.001 / 64, cores=8, n=512)
    p = model.predict(LoaderConfig(64, num_workers=6, prefetch_factor=2))
    seconds = _softmin(0.1 / 6, (0.002 + 0.001) / 8, 0.001)
    start = 0.098 + 0.002 + 1e-3 * 6
    assert p.start_seconds == pytest.approx(start)
    assert p.bound == "each epoch's start"
    assert p.fitted == pytest.approx(512 / (8 * seconds + start))


def test_an_epoch_that_one_round_of_the_workers_makes_is_its_start_and_its_steps():
    # 256 samples: 4 batches for 8 workers (4 of them busy). The round makes every batch at
    # once after the start; then the step takes them one by one.
    model = _model(fetch=1e-3, step=1e-4, cores=8, n=256)
    p = model.predict(LoaderConfig(64, num_workers=8, prefetch_factor=2))
    workers, cores, step = 0.064 / 4, (0.064 + 0.0064) / 8, 0.0064
    start = 0.064 + 1e-3 * 8
    epoch = max(4 * _softmin(workers, cores, step), start + 4 * step)
    assert p.fitted == pytest.approx(256 / epoch)


def test_a_job_s_rate_is_its_ranks_times_one_rank_s():
    one = _model(fetch=1e-3, step=1e-3).predict(LoaderConfig(64, num_workers=2,
                                                             prefetch_factor=2))
    two = _model(fetch=1e-3, step=1e-3, ranks=2).predict(LoaderConfig(64, num_workers=2,
                                                                      prefetch_factor=2))
    assert two.fitted == pytest.approx(2 * one.fitted)


def test_the_model_is_not_ready_before_a_window_without_workers_reports_costs():
    model = PipelineModel(cores=2, samples_per_epoch=N)
    model.fit([Observation(config=LoaderConfig(64), rate=1000.0)])  # a rate, no costs
    assert not model.ready and model.predict(LoaderConfig(64)) is None
