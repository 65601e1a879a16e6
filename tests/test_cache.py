"""The result cache: a second run on the same machine, data, model and options is answered at
once, and says so; anything that changes the answer misses; a bad file never crashes."""

import io
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import torch
from rich.console import Console
from torch import nn

import autoload
from autoload import cache
from autoload.cli import main
from autoload.report import render_report

from conftest import SurfaceProbe
from toydata import Indexed


@pytest.fixture
def tune(clock):
    """``autoload.tune`` measuring a simulated surface on a fake clock, with the cache on as a
    run without a probe of its own has it; the probe of each run is ``tune.probes[-1]``."""

    def run(dataset, **kwargs):
        probe = SurfaceProbe(clock)
        run.probes.append(probe)
        options = {"cache": True, "timeout": 20, "max_workers": 1, "final_rounds": 1, **kwargs}
        return autoload.tune(dataset, probe=probe, clock=clock, **options)

    run.probes = []
    return run


def test_a_second_run_is_answered_from_the_cache_at_once_and_says_so(tune, clock):
    first = tune(Indexed(96))
    assert first.cached is None and len(cache.entries()) == 1
    assert tune.probes[0].calls  # measured
    now = clock.now
    again = tune(Indexed(96))
    assert not tune.probes[1].calls and clock.now == now  # a remembered result measures nothing
    assert again.cached and again.config == first.config
    text = io.StringIO()
    Console(file=text, width=80).print(render_report(again))
    assert "from the cache" in text.getvalue()


def test_the_cache_is_on_by_default_and_off_for_a_probe_of_the_caller_s_unless_asked(clock):
    first = autoload.tune(Indexed(96), timeout=1, max_workers=0, final_rounds=1)  # measured
    assert first.cached is None and len(cache.entries()) == 1
    assert autoload.tune(Indexed(96), timeout=1, max_workers=0, final_rounds=1).cached
    options = dict(probe=SurfaceProbe(clock), clock=clock, timeout=20, max_workers=1,
                   final_rounds=1)
    autoload.tune(Indexed(120), **options)
    assert len(cache.entries()) == 1  # its rates are not this machine's loader's
    autoload.tune(Indexed(120), cache=True, **options)
    assert len(cache.entries()) == 2


def test_what_changes_the_answer_misses_and_cache_false_measures_again(tune):
    tune(Indexed(96))
    assert tune(Indexed(120)).cached is None  # another data set
    assert tune(Indexed(96), max_workers=0).cached is None  # bounds
    net = nn.Linear(4, 3)
    assert tune(Indexed(96), model=net, loss_fn=nn.functional.cross_entropy,
                         ).cached is None  # a model
    assert tune(Indexed(96), cache=False).cached is None
    assert tune(Indexed(96)).cached  # the first one is still there


def test_the_key_reads_a_few_items_without_touching_the_random_generators():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    parts = cache.fingerprint(dataset=Indexed(96), model=None, step=None, loss_fn=None,
                              optimizer=None, device="cpu", loader_options={}, bounds={})
    assert torch.equal(torch.rand(1), expected)
    assert parts["data"]["length"] == 96 and len(parts["data"]["items"]) == 3


def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_warning(tune):
    tune(Indexed(96))
    (path, _), = cache.entries()
    path.write_text("{not json")
    with pytest.warns(cache.CacheWarning, match="ignored the cache file"):
        fresh = tune(Indexed(96))
    assert fresh.cached is None
    data = json.loads(path.read_text())  # rewritten by the fresh run
    data["cache"]["key"] = "someone else's"
    path.write_text(json.dumps(data))
    with pytest.warns(cache.CacheWarning, match="another key"):
        assert tune(Indexed(96)).cached is None


def test_cli_lists_shows_and_clears_the_cache(tune):
    tune(Indexed(96))
    out = io.StringIO()
    assert main(["cache", "list"], console=Console(file=out, width=120)) == 0
    assert "Indexed" in out.getvalue() and "bs=" in out.getvalue()
    (path, _), = cache.entries()
    out = io.StringIO()
    assert main(["show", str(path)], console=Console(file=out, width=100)) == 0
    assert "Winning settings" in out.getvalue()
    out = io.StringIO()
    assert main(["cache", "clear"], console=Console(file=out, width=120)) == 0
    assert "removed 1 cached result" in out.getvalue() and not cache.entries()


def _listing(*args, width=80):
    out = io.StringIO()
    assert main(["cache", "list", *args], console=Console(file=out, width=width)) == 0
    return out.getvalue()


def _ids(listing):
    return [line.split()[0] for line in listing.splitlines()
            if line.strip() and all(c in "0123456789abcdef" for c in line.split()[0])]


def test_show_takes_the_id_cache_list_prints_or_a_shorter_prefix_of_it(tune):
    tune(Indexed(96))
    listing = _listing()
    (entry, _), = cache.entries()
    assert _ids(listing) == [entry.stem[:12]]
    stored = datetime.fromtimestamp(entry.stat().st_mtime).strftime("%Y-%m-%d")
    assert stored in listing and "Indexed" in listing
    for ref in (entry.stem[:12], entry.stem[:5], json.loads(entry.read_text())["cache"]["key"]):
        out = io.StringIO()
        assert main(["show", ref], console=Console(file=out, width=100)) == 0, out.getvalue()
        assert "Winning settings" in out.getvalue()


def test_show_an_unknown_or_ambiguous_id_says_so_in_one_line(tune, tmp_path):
    tune(Indexed(96), cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    entry.rename(tmp_path / f"abc1{entry.stem[4:]}.json")
    (tmp_path / f"abc2{entry.stem[4:]}.json").write_text((tmp_path / f"abc1{entry.stem[4:]}.json")
                                                         .read_text())
    for ref, said in (("abc", "2 cached results' ids start with 'abc'"),
                      ("abd", "no cached result's id starts with 'abd'"),
                      ("no-such-file", "neither a result file nor a cache id")):
        out = io.StringIO()
        assert main(["show", ref, "--cache-dir", str(tmp_path)],
                    console=Console(file=out, width=300)) == 2
        assert said in out.getvalue() and len(out.getvalue().strip().splitlines()) == 1
    out = io.StringIO()
    assert main(["show", "abc2", "--cache-dir", str(tmp_path)],
                console=Console(file=out, width=100)) == 0


class ImageFolderWithHeavyAugmentationsAndCaching(Indexed):
    pass


def test_cache_list_fits_80_columns_without_wrapping_a_long_data_set_name(tune):
    tune(ImageFolderWithHeavyAugmentationsAndCaching(96))
    tune(Indexed(96))
    listing = _listing()
    assert all(len(line) <= 80 for line in listing.splitlines())
    rows = [line for line in listing.splitlines() if "bs=" in line]
    assert len(rows) == 2 and len(_ids(listing)) == 2  # one line each, nothing wrapped
    assert any("ImageFolder" in row and "…" in row for row in rows)
    assert any(" Indexed " in row for row in rows)
    wide = _listing(width=160)
    assert "ImageFolderWithHeavyAugmentationsAndCaching" in wide and "…" not in wide


def test_the_cache_folder_is_the_one_given_else_autoload_cache_dir(tune, tmp_path, monkeypatch):
    given, env = tmp_path / "given", tmp_path / "env"
    tune(Indexed(96), cache_dir=given)
    assert len(list(given.glob("*.json"))) == 1 and not cache.entries()
    assert tune(Indexed(96), cache_dir=given).cached
    monkeypatch.setenv(cache.ENV, str(env))
    assert tune(Indexed(96)).cached is None
    assert len(list(env.glob("*.json"))) == 1
    assert tune(Indexed(96)).cached  # found in $AUTOLOAD_CACHE_DIR
    monkeypatch.delenv(cache.ENV)
    (entry,) = given.glob("*.json")
    assert _ids(_listing("--cache-dir", str(given))) == [entry.stem[:12]]
    assert "no cached results" in _listing()
    out = io.StringIO()
    assert main(["show", entry.stem[:12], "--cache-dir", str(given)],
                console=Console(file=out, width=100)) == 0, out.getvalue()
    out = io.StringIO()
    assert main(["cache", "clear", "--cache-dir", str(given)],
                console=Console(file=out, width=200)) == 0
    assert "removed 1 cached result" in out.getvalue() and not list(given.glob("*"))


def test_cli_tune_remembers_in_the_cache_dir_given(tmp_path):
    folder = tmp_path / "shared"
    out = io.StringIO()
    code = main(["tune", "toydata:SMALL", "--timeout", "2", "--max-workers", "1", "--quiet",
                 "--cache-dir", str(folder)], console=Console(file=out, width=100))
    assert code == 0, out.getvalue()
    assert len(list(folder.glob("*.json"))) == 1 and not cache.entries()


def test_two_stores_of_one_key_that_finish_together_leave_one_whole_file(tune, tmp_path,
                                                                         monkeypatch):
    """Two processes (or two nodes sharing the folder, where process ids can be equal) write
    the same entry at once: the second finishes while the first is between its write and its
    rename."""
    parts = cache.fingerprint(dataset=Indexed(8), model=None, step=None, loss_fn=None,
                              optimizer=None, device="cpu", loader_options={}, bounds={})
    result = tune(Indexed(96), cache=False)
    renamed = []
    real_replace = os.replace

    def replace_after_the_other(src, dst):
        if not renamed:
            renamed.append(dst)
            assert cache.store(parts, result, tmp_path) is not None  # the other writer
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_the_other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.store(parts, result, tmp_path) is not None
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [renamed[0].name]
    assert cache.load(parts, tmp_path).config == result.config


def test_concurrent_stores_in_threads_leave_one_whole_file_and_no_temporary_ones(tune, tmp_path):
    parts = cache.fingerprint(dataset=Indexed(8), model=None, step=None, loss_fn=None,
                              optimizer=None, device="cpu", loader_options={}, bounds={})
    result = tune(Indexed(96), cache=False)
    start = threading.Barrier(8)

    def store():
        start.wait()
        return cache.store(parts, result, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ThreadPoolExecutor(8) as pool:
            stored = list(pool.map(lambda _: store(), range(8)))
    assert all(stored) and len(list(tmp_path.iterdir())) == 1
    assert cache.load(parts, tmp_path).config == result.config


def test_a_result_measured_on_a_busy_machine_is_measured_again_and_replaced(tune):
    tune(Indexed(96))
    [(path, data)] = cache.entries()
    data["others_cpu"], data["busy"] = 0.7, True  # as a run beside two busy processes stores it
    path.write_text(json.dumps(data))
    again = tune(Indexed(96))
    assert again.cached is None and not again.busy  # measured again (on a quiet machine)
    assert tune(Indexed(96)).cached  # which replaced the busy one
    [(_, data)] = cache.entries()
    assert data["others_cpu"] is None and data["busy"] is False
