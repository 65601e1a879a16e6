"""The benchmark's grid helpers, its case modules, and one quick run of `benchmarks/run.py`."""

import dataclasses
import itertools
import json
import math
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:  # the benchmark's modules import each other by name
    sys.path.insert(0, str(BENCH))

import compare  # noqa: E402
import grid  # noqa: E402
import online  # noqa: E402
import oracle  # noqa: E402
import settings  # noqa: E402
import workloads  # noqa: E402


def _cost(picked, candidates):
    logs = [math.log(c) for c in candidates]
    k = len(picked)
    targets = [logs[0] + (logs[-1] - logs[0]) * i / (k - 1) for i in range(k)]
    return sum(abs(math.log(p) - t) for p, t in zip(picked, targets, strict=True))


def test_powers_of_two_give_every_power_in_range():
    powers = [8, 16, 32, 64, 128, 256, 512, 1024]
    assert grid.log_spaced_divisors(16384) == powers
    assert grid.log_spaced_divisors(2048) == powers
    assert grid.log_spaced_divisors(1024) == powers  # N itself is in [8, 1024]


def test_an_exact_geometric_sequence_is_found():
    assert grid.log_spaced_divisors(1000, 4) == [8, 40, 200, 1000]


def test_three_sizes_for_quick_runs_take_the_smaller_on_a_tie():
    assert grid.log_spaced_divisors(2048, 3) == [8, 64, 1024]  # 64 and 128 tie around 90.5


@pytest.mark.parametrize("n, k", [(720720, 8), (720720, 5), (360, 4), (5040, 8), (1000, 2)])
def test_the_pick_is_the_best_in_order_match_to_the_geometric_targets(n, k):
    candidates = grid.divisors_in(n)
    picked = grid.log_spaced_divisors(n, k)
    assert len(picked) == k == len(set(picked)) and picked == sorted(picked)
    assert set(picked) <= set(candidates)
    assert picked[0] == candidates[0] and picked[-1] == candidates[-1]
    if math.comb(len(candidates), k) <= 200_000:  # brute force where it is cheap
        best = min(_cost(c, candidates) for c in itertools.combinations(candidates, k))
        assert _cost(picked, candidates) == pytest.approx(best)


def test_few_divisors_are_all_returned():
    assert grid.log_spaced_divisors(97) == [97]  # a prime in range
    assert grid.log_spaced_divisors(7) == []  # nothing in [8, 1024]
    assert grid.log_spaced_divisors(96) == [8, 12, 16, 24, 32, 48, 96]
    assert grid.log_spaced_divisors(720720, 1) == [90]  # nearest the geometric middle, ~89.8
    assert grid.log_spaced_divisors(2048, 1) == [64]  # 64 and 128 tie around 90.5


def test_nearest_divisor_and_worker_counts():
    assert grid.nearest_divisor(2048) == 64
    assert grid.nearest_divisor(1000) == 50
    assert grid.nearest_divisor(96) == 48
    with pytest.raises(ValueError):
        grid.nearest_divisor(7)
    assert grid.worker_counts(2) == [0, 1, 2, 4, 8]
    assert grid.worker_counts(4) == [0, 1, 2, 3, 4, 8, 16]
    assert grid.worker_counts(1) == [0, 1, 2, 4]
    assert grid.worker_counts(16, quick=True) == [0, 1]


def test_grid_size_and_order():
    with_model = grid.build_grid([8, 64], [0, 1, 2], has_model=True)
    assert len(with_model) == 2 * (1 + 2 * 2) * 2
    assert len(set(with_model)) == len(with_model)
    assert [c.amp for c in with_model] == [None] * 10 + ["bfloat16"] * 10  # full precision first
    data_only = grid.build_grid([8, 64], [0, 1, 2], has_model=False)
    assert len(data_only) == 10 and all(c.amp is None for c in data_only)
    assert all((c.num_workers == 0) == (c.prefetch_factor is None) for c in with_model)


@pytest.fixture
def cases():
    import cases

    return cases


def test_case_modules_follow_the_contract(cases):
    assert cases.select("a,c_io_wait") == ["a_inmemory", "c_io_wait"]
    assert cases.select(None) == list(cases.NAMES)
    with pytest.raises(ValueError, match="unknown case"):
        cases.select("z")
    for name in cases.NAMES:
        case = cases.load(name)
        assert case.DESCRIPTION and "\n" not in case.DESCRIPTION and case.BOTTLENECK
        dataset = case.make_dataset(case.QUICK_N)
        assert len(dataset) == case.QUICK_N
        x, y = pickle.loads(pickle.dumps(dataset))[3]  # worker processes unpickle it
        assert x.shape == dataset[3][0].shape
        model = case.make_model()
        assert (model is None) == (case.LOSS is None)


@pytest.mark.slow
def test_quick_run_writes_the_json(tmp_path):
    # A 3 s tune: beside two busy processes, 1 s measured nothing and the tuner had no pick.
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--cases", "a", "--json", str(out),
         "--tune-timeout", "3", "--grid-window", "0.05", "--final-window", "0.1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tuner/oracle" in proc.stdout and "a_inmemory" in proc.stdout
    assert "[a_inmemory] grid 1/" in proc.stderr
    data = json.loads(out.read_text())
    assert {"machine", "settings", "cases", "elapsed_seconds"} <= data.keys()
    assert {"usable_cpus", "torch", "platform"} <= data["machine"].keys()
    case = data["cases"]["a_inmemory"]
    assert {"grid", "oracle", "tuner", "roles", "remeasure", "summary"} <= case.keys()
    assert case["grid"]["batch_sizes"] == [8, 64, 1024]
    assert len(case["grid"]["points"]) == case["grid"]["size"] == 18
    assert set(case["roles"]) == {"tuner", "oracle", "defaults", "recipe"}
    assert case["roles"]["defaults"]["batch_size"] == 64
    assert case["tuner"]["trials"] >= 1 and case["tuner"]["error"] is None
    summary = case["summary"]
    assert {"tuner_over_oracle", "speedup_vs_defaults", "speedup_vs_recipe", "tune_over_grid",
            "targets", "verdict", "spreads"} <= summary.keys()
    assert set(summary["spreads"]) == {"tuner", "oracle", "defaults", "recipe"}
    assert summary["verdict"].startswith(("PASS", "FAIL"))


def _rows(config, rates):
    return [{"config": config.to_dict(), "samples_per_second": r} for r in rates]


def test_extra_rounds_only_while_the_oracle_target_is_within_noise():
    from autoload import LoaderConfig

    tuner, best = LoaderConfig(16), LoaderConfig(64, num_workers=2, prefetch_factor=2)
    roles = {"tuner": tuner, "oracle": best, "defaults": best, "recipe": best}
    wide = _rows(tuner, [960, 900, 1000]) + _rows(best, [1000, 950, 1050])  # 0.96 +- 5%
    assert compare.oracle_undecided(roles, wide)
    narrow = _rows(tuner, [960, 955, 965]) + _rows(best, [1000, 995, 1005])  # 0.96 +- 0.5%
    assert not compare.oracle_undecided(roles, narrow)
    far = _rows(tuner, [700, 650, 750]) + _rows(best, [1000, 950, 1050])  # 0.7 +- 7%
    assert not compare.oracle_undecided(roles, far)
    assert not compare.oracle_undecided({**roles, "tuner": best}, wide)


QUICK = settings.Settings(quick=True, tune_timeout=1, grid_window=0.1, final_window=0.1,
                          rounds=1, point_deadline=10, exhaustive=False, batch_sizes=3, cpus=2,
                          point_limit=4.0)


class CutShortFirst:
    """Rates from a table; the first window of a ``slow`` configuration is cut short and reads
    low."""

    def __init__(self, rates, slow, factor=0.75):
        self.rates, self.slow, self.factor, self.calls = rates, slow, factor, []

    def measure(self, config, window):
        from autoload import Measurement

        first = config not in self.calls
        self.calls.append(config)
        cut = first and window.time_limit is not None and config in self.slow
        rate = self.rates[config] * (self.factor if cut else 1.0)
        return Measurement(samples_per_second=rate, seconds=1.0, samples=int(rate), batches=4,
                           data_wait_fraction=0.5, cut_short=cut)


def test_a_grid_point_cut_short_near_the_best_is_measured_again_whole():
    from autoload import LoaderConfig

    slow, near = LoaderConfig(1024, num_workers=1, prefetch_factor=2), LoaderConfig(8)
    far = LoaderConfig(1024)
    probe = CutShortFirst({slow: 1000.0, near: 900.0, far: 300.0}, slow={slow, far})
    points, _ = oracle.run_grid("t", probe, [slow, near, far], QUICK)
    # Cut short, slow read 750/s, under near's 900 but within 0.8 x: measured again whole it is
    # the best; far (225/s cut short, under 0.8 x the best either way) is left as it was.
    assert probe.calls == [slow, near, far, slow]
    assert [p["samples_per_second"] for p in points] == [1000.0, 900.0, 225.0]
    assert points[0]["cut_short_first"]["samples_per_second"] == 750.0
    assert not points[0]["cut_short"] and points[2]["cut_short"]


def test_a_cut_short_rate_that_reads_high_prunes_nothing():
    from autoload import LoaderConfig

    slow, other = LoaderConfig(512, num_workers=2, prefetch_factor=4), LoaderConfig(64)
    # Cut short, slow reads 2x its 900/s; other's step alone bounds it at 1000/s, which only
    # that flattered reading would put under 0.8 x the best.
    probe = CutShortFirst({slow: 900.0, other: 950.0}, slow={slow}, factor=2.0)
    points, _ = oracle.run_grid("t", probe, [slow, other], QUICK,
                             bound=lambda config: 1000.0)
    assert not points[1]["skipped"] and points[1]["samples_per_second"] == 950.0
    assert points[0]["samples_per_second"] == 900.0  # measured again whole: within 0.8 x


class StepAlone(CutShortFirst):
    """Rates from a table, and a step-alone rate for each batch size."""

    def __init__(self, rates, steps):
        super().__init__(rates, slow=set())
        self.steps, self.asked = steps, []

    def step_rate(self, config, window):
        self.asked.append((config.batch_size, config.amp))
        return self.steps[config.batch_size]


def test_the_grid_skips_a_point_whose_step_alone_the_probe_measures_under_the_best():
    from cases import Case

    from autoload import LoaderConfig

    case = Case(name="t", description="d", bottleneck="b", n=64, make_dataset=lambda: None,
                make_model=lambda: None, loss=None, max_batch=64)
    quick = dataclasses.replace(QUICK, batch_sizes=2, amps=(None,))
    configs = grid.build_grid([8, 64], quick.workers, has_model=True, amps=(None,),
                              prefetch_factors=quick.prefetch_factors,
                              pin_memory=quick.pin_memory)
    # Batches of 8 run 1000/s at best, and come first; 64's step alone (500/s) is under
    # 0.8 x that: its points are skipped. 8's step alone (5000/s) never prunes.
    rates = {c: (1000.0 if c.batch_size == 8 else 400.0) for c in configs}
    probe = StepAlone(rates, steps={8: 5000.0, 64: 500.0})
    block, best, rate = oracle.measure_grid(case, object(), probe, quick)
    assert probe.asked == [(8, None), (64, None)]  # once a batch size each
    assert [b["samples_per_second"] for b in block["step_bounds"]] == [5000.0, 500.0]
    assert best.batch_size == 8 and rate == 1000.0
    skipped = [LoaderConfig.from_dict(p["config"]) for p in block["points"] if p["skipped"]]
    assert [c.batch_size for c in skipped] == [64] * (len(configs) // 2)
    assert all(p["step_bound"] == 5000.0 and not p["skipped"] for p in block["points"]
               if p["config"]["batch_size"] == 8)


def test_random_workloads_are_drawn_from_the_seed_and_are_real_work():
    first, again = workloads.draw(6, seed=3), workloads.draw(6, seed=3)
    assert first == again and first != workloads.draw(6, seed=4)
    for spec in first:
        assert 500 <= spec.n <= 50_000 and spec.n % 100 == 0  # divisors exist in [8, 1024]
        assert 0 <= spec.cpu_ms <= 2 and 0 <= spec.wait_ms <= 5
        assert 1 << 10 <= spec.item_bytes <= 1 << 20
    spec = workloads.Spec(name="t", n=500, cpu_ms=1.0, wait_ms=0.0, item_bytes=4096,
                          model_mflops=2.0)
    data = workloads.RandomItems(spec)
    began = time.thread_time()
    for i in range(20):
        x, y = data[i]
    per_item = (time.thread_time() - began) / 20
    assert 0.4e-3 < per_item < 3e-3  # about the 1 ms of CPU drawn
    assert x.shape == (1024,) and x.dtype.is_floating_point
    model = workloads.make_model(spec)
    assert model(torch.stack([data[0][0], data[1][0]])).shape == (2, 10)
    x2, _ = pickle.loads(pickle.dumps(data))[3]  # worker processes unpickle it
    assert x2.shape == x.shape


def test_the_random_verdict_needs_the_median_and_every_workload():
    def case(ratio):
        return {"spec": {"n": 500}, "summary": {"tuner_over_oracle": ratio,
                                                "targets": {"defaults": True, "recipe": True}}}

    good = compare.distribution({f"r{i}": case(r) for i, r in enumerate([0.95, 0.98, 1.0])})
    assert good["verdict"] == "PASS" and good["median"] == 0.98
    low = compare.distribution({f"r{i}": case(r) for i, r in enumerate([0.89, 0.98, 1.0])})
    assert low["verdict"] == "FAIL"
    assert compare.distribution({"a_inmemory": {"summary": {}}}) is None


def test_the_online_benchmark_sizes_epochs_and_scores_auto_against_the_best_fixed_side():
    assert [online.batch_size(n) for n in (16384, 2048, 256, 150)] == [128, 16, 2, 1]
    assert ("w=0", "w=2 pf=2") == (online.label((0, None)), online.label((2, 2)))

    def side(*ends):
        return [{"ends": list(ends)}]

    sides = {"auto": side(1.2, 2.1, 3.0, 3.9), "w=0": side(2.0, 4.0, 6.0, 8.0),
             "w=2 pf=2": side(1.0, 2.0, 3.0, 4.0), "w=4 pf=2": side(1.5, 2.4, 3.3, 4.2)}
    sides["auto"][0]["tuning"] = {"batches_to_settle": 90, "settled": {"num_workers": 2}}
    s = online.summarize(sides, samples=100, epochs=4, recipe="w=2 pf=2")
    assert s["best_first3"] == "w=2 pf=2" and s["first3_ratio"] == pytest.approx(1.0)
    assert s["best_rate"] == "w=4 pf=2"  # 200 samples in 1.8 s, against 2.0 s
    assert s["rate_ratio"] == pytest.approx(1.0)
    assert s["vs_w0"]["rate"] == pytest.approx(2.2222, 1e-3)
    assert s["pass"] and s["batches_to_settle"] == 90
