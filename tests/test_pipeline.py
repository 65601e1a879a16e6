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
