"""The result cache: a second run on the same machine, data, model and options is answered at
once, and says so; anything that changes the answer misses; a bad file never crashes."""

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

import autoload
from autoload import cache
from autoload.cli import main
from autoload.report import render_report

from toydata import Indexed

FAST = dict(timeout=2, max_workers=1, final_rounds=1)


def test_a_second_run_is_answered_from_the_cache_at_once_and_says_so(monkeypatch):
    first = autoload.tune(Indexed(96), **FAST)
    assert first.cached is None and len(cache.entries()) == 1

    def measured(*args, **kwargs):
        raise AssertionError("a remembered result measures nothing")

    monkeypatch.setattr(autoload.TrainingProbe, "measure", measured)
    monkeypatch.setattr(autoload.TrainingProbe, "step_rate", measured)
    again = autoload.tune(Indexed(96), **FAST)
    assert again.cached and again.config == first.config
    text = io.StringIO()
    Console(file=text, width=80).print(render_report(again))
    assert "from the cache" in text.getvalue()


def test_what_changes_the_answer_misses_and_cache_false_measures_again():
    autoload.tune(Indexed(96), **FAST)
    assert autoload.tune(Indexed(120), **FAST).cached is None  # another data set
    assert autoload.tune(Indexed(96), **{**FAST, "max_workers": 0}).cached is None  # bounds
    net = nn.Linear(4, 3)
    assert autoload.tune(Indexed(96), model=net, loss_fn=nn.functional.cross_entropy,
                         **FAST).cached is None  # a model
    assert autoload.tune(Indexed(96), cache=False, **FAST).cached is None
    assert autoload.tune(Indexed(96), **FAST).cached  # the first one is still there


def test_the_key_reads_a_few_items_without_touching_the_random_generators():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    parts = cache.fingerprint(dataset=Indexed(96), model=None, step=None, loss_fn=None,
                              optimizer=None, device="cpu", loader_options={}, bounds={})
    assert torch.equal(torch.rand(1), expected)
    assert parts["data"]["length"] == 96 and len(parts["data"]["items"]) == 3


def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_warning():
    autoload.tune(Indexed(96), **FAST)
    (path, _), = cache.entries()
    path.write_text("{not json")
    with pytest.warns(cache.CacheWarning, match="ignored the cache file"):
        fresh = autoload.tune(Indexed(96), **FAST)
    assert fresh.cached is None
    data = json.loads(path.read_text())  # rewritten by the fresh run
    data["cache"]["key"] = "someone else's"
    path.write_text(json.dumps(data))
    with pytest.warns(cache.CacheWarning, match="another key"):
        assert autoload.tune(Indexed(96), **FAST).cached is None


def test_cli_lists_shows_and_clears_the_cache():
    autoload.tune(Indexed(96), **FAST)
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
