import pytest

from autoload import ConfigError, LoaderConfig, build_space
from autoload.space import divisors


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]


def test_batch_sizes_are_divisors_in_range_and_below_n():
    space = build_space(1000, device_type="cpu", has_model=False, cpus=2)
    assert space.batch_sizes == (8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500)
    assert all(1000 % b == 0 for b in space.batch_sizes)
    small = build_space(64, device_type="cpu", has_model=False, cpus=2)
    assert 64 not in small.batch_sizes  # d < N: at least two batches an epoch


def test_prime_length_names_drop_last():
    with pytest.raises(ConfigError, match="drop_last"):
        build_space(1009, device_type="cpu", has_model=False, cpus=2)
    space = build_space(1009, device_type="cpu", has_model=False, drop_last=True, cpus=2)
    assert space.batch_sizes[0] == 8 and space.batch_sizes[-1] == 1009
    assert 64 in space.batch_sizes and len(space.batch_sizes) > 20  # log-spaced, 4 per octave
    assert space.drop_last


def test_worker_counts_up_to_cpus_and_override():
    assert build_space(100, device_type="cpu", has_model=False, cpus=4).worker_counts == (
        0, 1, 2, 3, 4)
    assert build_space(100, device_type="cpu", has_model=False, cpus=4,
                       max_workers=16).worker_counts == (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
    assert build_space(100, device_type="cpu", has_model=False, cpus=4,
                       num_workers=[0, 2]).worker_counts == (0, 2)


def test_cpu_space_has_no_pin_memory_and_amp_only_with_model():
    data_only = build_space(100, device_type="cpu", has_model=False, cpus=2)
    assert data_only.pin_memory == (False,) and data_only.amp == (None,)
    with_model = build_space(100, device_type="cpu", has_model=True, cpus=2)
    assert with_model.amp == (None, "bfloat16")
    cuda = build_space(100, device_type="cuda", has_model=True, cpus=2, bf16_supported=True)
    assert cuda.pin_memory == (False, True)
    assert cuda.amp == (None, "float16", "bfloat16")


@pytest.mark.parametrize("kwargs, match", [
    (dict(pin_memory=True), "pin_memory"),
    (dict(amp="float16", has_model=True), "float16"),
    (dict(amp="bfloat16"), "needs a model"),
    (dict(batch_size=7), "does not divide"),
    (dict(batch_size=[]), "non-empty"),
    (dict(min_batch_size=10, max_batch_size=5), "min_batch_size"),
    (dict(num_workers=-1), "num_workers"),
    (dict(amp="fp8"), "amp must be"),
])
def test_bad_pins_name_the_rule(kwargs, match):
    base = dict(device_type="cpu", has_model=False, cpus=2)
    with pytest.raises(ConfigError, match=match):
        build_space(100, **{**base, **kwargs})


def test_baselines_are_defaults_and_recipe_near_64():
    space = build_space(1000, device_type="cuda", has_model=True, cpus=4, bf16_supported=False)
    defaults, recipe = space.baselines()
    assert defaults == LoaderConfig(50, num_workers=0, prefetch_factor=None, pin_memory=False)
    assert recipe == LoaderConfig(50, num_workers=4, prefetch_factor=2, pin_memory=True, amp=None)
    pinned = build_space(1000, device_type="cpu", has_model=False, cpus=2, batch_size=200)
    assert pinned.baselines()[0].batch_size == 200


def test_params_round_trip_through_suggest():
    import optuna

    space = build_space(1000, device_type="cuda", has_model=True, cpus=4, bf16_supported=True)
    study = optuna.create_study(direction="maximize")
    seen = []
    configs = [LoaderConfig(50), LoaderConfig(250, num_workers=3, prefetch_factor=8,
                                              pin_memory=True, amp="float16")]
    for config in configs:
        study.enqueue_trial(space.params(config))
    study.optimize(lambda t: seen.append(space.suggest(t)) or 0.0, n_trials=2)
    assert seen == configs


def test_loader_kwargs_obey_torch_rules():
    assert LoaderConfig(32).loader_kwargs(timeout=5) == {
        "batch_size": 32, "num_workers": 0, "pin_memory": False, "drop_last": False}
    kwargs = LoaderConfig(32, num_workers=2, prefetch_factor=4).loader_kwargs(timeout=5)
    assert kwargs["prefetch_factor"] == 4 and kwargs["persistent_workers"] is True
    assert kwargs["timeout"] == 5
    with pytest.raises(ValueError, match="prefetch_factor"):
        LoaderConfig(32, num_workers=0, prefetch_factor=2)


def test_space_size_counts_prefetch_only_with_workers():
    space = build_space(1000, device_type="cpu", has_model=False, cpus=2, batch_size=[50, 100])
    assert space.size == 2 * (1 + 2 * 4)


def test_cpu_without_native_bf16_leaves_autocast_out():
    space = build_space(100, device_type="cpu", has_model=True, cpus=2, bf16_supported=False)
    assert space.amp == (None,)
    pinned = build_space(100, device_type="cpu", has_model=True, cpus=2, bf16_supported=False,
                         amp="bfloat16")
    assert pinned.amp == ("bfloat16",)
