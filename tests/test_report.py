"""``render_report`` and ``snippet``: what the report shows, and that its snippet runs."""

from __future__ import annotations

import ast
import io
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch.utils.data import TensorDataset

import autoload
from autoload import FinalistRecord, LoaderConfig, ProgressEvent, TuneResult
from autoload.report import LiveProgress, render_report, snippet

from conftest import DEFAULTS, MEMORY_REASON, RECIPE, build_result

WINNER = LoaderConfig(batch_size=48, num_workers=2, prefetch_factor=4)


def make_result(**changes) -> TuneResult:
    return build_result(WINNER, infeasible=2, **changes)


def render(result: TuneResult) -> str:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(render_report(result))
    text = console.file.getvalue()
    assert "\x1b[" not in text  # plain text, no colour codes
    assert "…" not in text  # rich cut no header, configuration or number short
    return text


def test_report_names_the_winner_and_both_baselines():
    text = render(make_result())
    assert WINNER.label() in text
    assert "winner" in text
    assert "3,000 samples/s" in text
    assert "3.00x faster than PyTorch defaults (1,000 samples/s)" in text
    assert "2.00x faster than hand-tuned recipe (1,500 samples/s)" in text
    assert "Winning settings" in text


def test_report_winner_row_with_amp():
    config = replace(WINNER, amp="bfloat16")
    finalists = (FinalistRecord(config=config, rates=(3000.0,)),) + make_result().finalists[1:]
    text = render(make_result(config=config, loader_kwargs=config.loader_kwargs(),
                              amp="bfloat16", finalists=finalists))
    # the finalists table never folds a configuration: the whole label is on the winner's row
    (row,) = [line for line in text.splitlines() if line.rstrip().endswith("winner")]
    assert config.label() in row
    assert "torch.autocast('cpu', dtype=torch.bfloat16)" in text


def test_report_lists_every_finalist_with_its_role():
    text = render(make_result())
    for label in (WINNER.label(), RECIPE.label(), DEFAULTS.label()):
        assert label in text
    assert "defaults" in text and "recipe" in text


def test_report_counts_infeasible_and_failed_trials_by_reason():
    text = render(make_result())
    assert "3 trials infeasible or failed:" in text
    assert f"2 x infeasible: {MEMORY_REASON}" in text
    assert "1 x failed: ValueError: bad sample" in text
    assert "1 trial repeated a measured configuration and was not run again" in text


def test_report_without_bad_trials_has_no_failure_section():
    good = tuple(t for t in make_result().trials if t.state == "ok")
    text = render(make_result(trials=good))
    assert "infeasible or failed" not in text
    assert "repeated a measured configuration" not in text


def test_report_without_a_baseline_omits_its_line():
    text = render(make_result(baselines={"recipe": 1500.0}))
    assert "PyTorch defaults" not in text
    assert "faster than hand-tuned recipe" in text


def test_report_drop_last_line():
    config = LoaderConfig(batch_size=64, drop_last=True)
    finalists = (FinalistRecord(config=config, rates=(1000.0, 1000.0), role="defaults"),)
    result = make_result(config=config, loader_kwargs=config.loader_kwargs(), amp=None,
                         samples_per_epoch=1009, finalists=finalists)
    text = render(result)
    assert "drop_last: each epoch drops 49 of 1009 samples" in text
    assert "one epoch of 1,009 samples" in text


def test_report_without_drop_last_has_no_drop_line():
    assert "drop_last:" not in render(make_result())


def test_report_of_an_iterable_data_set_has_no_epoch_line():
    text = render(make_result(samples_per_epoch=None))
    assert "one epoch" not in text


def test_report_shows_the_notes():
    assert "pin_memory stays False" in render(make_result())


@pytest.mark.parametrize(
    "config",
    [
        WINNER,
        replace(WINNER, amp="bfloat16"),
        DEFAULTS,
        LoaderConfig(batch_size=10, num_workers=1, prefetch_factor=1, drop_last=True),
    ],
)
def test_snippet_is_python_that_builds_the_loader(config):
    result = make_result(config=config, loader_kwargs=config.loader_kwargs(), amp=config.amp)
    code = snippet(result)
    ast.parse(code)
    built: list[dict] = []

    def fake_loader(dataset, **kwargs):
        built.append(kwargs)
        return autoload.DataLoader(dataset, **kwargs)

    dataset = TensorDataset(torch.arange(240.0))
    namespace = {"autoload": SimpleNamespace(DataLoader=fake_loader), "dataset": dataset}
    exec(code, namespace)
    assert built == [result.loader_kwargs]
    loader = namespace["loader"]
    assert isinstance(loader, autoload.DataLoader)
    assert loader.dataset is dataset
    assert loader.batch_size == config.batch_size
    assert loader.num_workers == config.num_workers
    assert loader.drop_last == config.drop_last
    if config.num_workers:
        assert loader.prefetch_factor == config.prefetch_factor
        assert loader.persistent_workers


def test_snippet_mentions_autocast_for_amp():
    code = snippet(make_result(amp="bfloat16"))
    assert "torch.autocast('cpu', dtype=torch.bfloat16)" in code
    assert "GradScaler" not in code
    fp16 = snippet(make_result(amp="float16", device="cuda:0"))
    assert "torch.autocast('cuda', dtype=torch.float16)" in fp16
    assert "GradScaler" in fp16
    assert "autocast" not in snippet(make_result(amp=None))


def test_report_prints_the_snippet():
    text = render(make_result())
    for line in snippet(make_result()).splitlines():
        assert line.strip() in text


def test_report_shows_the_step_alone_bound_and_what_binds_the_winner():
    text = render(make_result(step_rate=4000.0, predicted_bottleneck="the CPU cores"))
    assert "the training step alone" in text and "reaches 75% of it" in text
    assert "bound by the CPU cores" in text


def test_a_step_bound_the_winner_broke_is_not_printed_as_a_bound():
    text = render(make_result(step_rate=2000.0))  # the winner measured 3,000/s
    assert "reaches" not in text and "bounds nothing here" in text


def test_report_shows_predicted_and_measured_rates_side_by_side():
    finalists = tuple(replace(f, predicted=p) for f, p in
                      zip(make_result().finalists, (3300.0, 1400.0, None), strict=True))
    text = render(make_result(finalists=finalists))
    assert "predicted" in text and "3,300" in text and "1,400" in text
    assert "predicted" not in render(make_result())  # without a model, no such column


def test_report_shows_the_fetch_rate_when_there_is_no_model():
    text = render(make_result(step_rate=None, fetch_rate=1000.0))
    assert "one process fetches 1,000 samples/s" in text


def test_report_says_when_the_defaults_won():
    result = make_result()
    defaults = next(f for f in result.finalists if f.role == "defaults")
    won = replace(result, config=defaults.config, samples_per_second=defaults.median,
                  loader_kwargs=defaults.config.loader_kwargs())
    assert "the PyTorch defaults won" in render(won)


def test_the_finalists_table_fits_80_columns_without_folding_a_configuration():
    long = LoaderConfig(1000, num_workers=16, prefetch_factor=8, amp="bfloat16")
    finalists = (replace(make_result().finalists[0], config=long, predicted=3300.0),
                 *make_result().finalists[1:])
    result = make_result(config=long, loader_kwargs=long.loader_kwargs(), amp="bfloat16",
                         finalists=finalists)
    text = render(result)
    rows = [line for line in text.splitlines() if "bs=" in line and "w=" in line
            and "DataLoader" not in line]
    assert any(long.label() in line and line.rstrip().endswith("winner") for line in rows)
    assert all(len(line) <= 80 for line in text.splitlines())
    wide = io.StringIO()
    Console(file=wide, width=140, color_system=None).print(render_report(result))
    assert "host mem" in wide.getvalue() and "start" in wide.getvalue()


def test_a_prediction_off_by_more_than_2x_on_the_winner_is_left_out_and_said():
    finalists = tuple(replace(f, predicted=p) for f, p in
                      zip(make_result().finalists, (211.0, 1400.0, 900.0), strict=True))
    text = render(make_result(finalists=finalists, predicted_bottleneck="the CPU cores"))
    header = next(line for line in text.splitlines() if line.lstrip().startswith("configuration"))
    assert "samples/s" in header and "predicted" not in header
    assert "1,400" not in text and "bound by the CPU cores" not in text
    assert "predicted 211 samples/s for the winner, which measured 3,000" in text
    assert "off by more than 2x" in text
    unfitted = tuple(replace(f, predicted=p) for f, p in
                     zip(make_result().finalists, (None, 1400.0, 900.0), strict=True))
    text = render(make_result(finalists=unfitted))
    assert "1,400" not in text and "no prediction for the winner" in text


def test_the_wait_column_is_left_out_when_no_finalist_measured_it(clock):
    from conftest import SurfaceProbe

    class CutShort(SurfaceProbe):  # every window cut short: none measured its wait
        def measure(self, config, window):
            return replace(super().measure(config, window), cut_short=True,
                           data_wait_fraction=0.0)

    result = autoload.tune(TensorDataset(torch.zeros(240, 2)), probe=CutShort(clock),
                           clock=clock, timeout=60, n_trials=8)
    assert all(f.data_wait_fraction is None for f in result.finalists)
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(render_report(result))
    assert "wait" not in console.file.getvalue()
    wide = Console(file=io.StringIO(), width=140, color_system=None)
    wide.print(render_report(make_result()))
    assert " wait " in wide.file.getvalue() and "5%" in wide.file.getvalue()


def test_the_speed_up_is_split_into_the_loader_alone_and_what_changes_training():
    config = replace(WINNER, batch_size=240, amp="bfloat16")
    finalists = ((FinalistRecord(config=config, rates=(5250.0,)),)
                 + make_result().finalists[1:])  # the recipe, at the defaults' 64: 1,500/s
    result = make_result(config=config, loader_kwargs=config.loader_kwargs(), amp="bfloat16",
                         samples_per_second=5250.0, finalists=finalists)
    text = render(result)
    assert "5.25x faster than PyTorch defaults" in text
    assert f"the loader settings alone give 1.50x ({RECIPE.label()}: no change to training)" \
        in text
    assert "batch size 64 -> 240 and bfloat16 autocast add 3.50x" in text
    assert "the loader settings alone" not in render(make_result(config=RECIPE))


def test_batch_size_advice_without_the_users_batch_size_compares_with_the_defaults_and_says_so():
    text = render(make_result(optimizer="SGD"))
    assert "the batch size you train at is unknown" in text
    assert "compares with the defaults' batch size: batch size 64 -> 48" in " ".join(
        text.split())
    known = render(make_result(optimizer="SGD", reference_batch_size=96))
    assert "unknown" not in known and "batch size 96 -> 48" in known


def test_live_progress_interrupted_leaves_one_line_with_room_for_the_echoed_ctrl_c():
    best = LoaderConfig(256, num_workers=8, prefetch_factor=4, pin_memory=True, amp="bfloat16")
    console = Console(file=io.StringIO(), width=80, color_system=None)
    with pytest.raises(KeyboardInterrupt):
        with LiveProgress(console) as progress:
            progress(ProgressEvent(phase="search", done=12, total=40, elapsed=10.0, budget=60.0,
                                   best=123456.0, best_config=best))
            raise KeyboardInterrupt
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("search: trial 12 of 40"), lines
    # A terminal echoes Ctrl-C as "^C" after the line: it must fit, or every redraw after it
    # lands on the next line and the progress shows twice.
    assert len(lines[0]) + len("^C") < 80
