"""The benchmark's grid helpers, its case modules, and one quick run of `benchmarks/run.py`."""

import importlib.util
import itertools
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grid = _load("benchmark_grid", BENCH / "grid.py")


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
def cases(monkeypatch):
    """The `cases` package, imported with `benchmarks/` on sys.path; sys.path and the modules it
    imported (`cases.*`, the example it reuses) are restored afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    before = set(sys.modules)
    try:
        yield importlib.import_module("cases")
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("cases", "synthetic_images"):
                del sys.modules[name]


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
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--cases", "a", "--json", str(out),
         "--tune-timeout", "1", "--grid-window", "0.05", "--final-window", "0.1"],
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
