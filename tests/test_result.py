"""``TuneResult``: JSON round trip, atomic save, malformed files, speedup and dropped samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autoload import LoaderConfig, ResultFileError, TuneResult

from conftest import DEFAULTS, build_result

WINNER = LoaderConfig(batch_size=48, num_workers=2, prefetch_factor=4, amp="bfloat16")


def make_result(**changes) -> TuneResult:
    return build_result(WINNER, infeasible=1, **changes)


def test_json_round_trip_is_equal():
    result = make_result()
    again = TuneResult.from_json(result.to_json())
    assert again == result
    assert again.to_json() == result.to_json()
    assert isinstance(again.finalists, tuple) and isinstance(again.finalists[0].rates, tuple)
    assert again.winner.config == WINNER


def test_json_round_trip_of_an_iterable_data_set_result():
    result = make_result(samples_per_epoch=None, amp=None, config=DEFAULTS,
                         loader_kwargs=DEFAULTS.loader_kwargs(), notes=())
    assert TuneResult.from_json(result.to_json(indent=None)) == result


def test_json_top_level_keys():
    data = json.loads(make_result().to_json())
    for key in ("loader_kwargs", "amp", "samples_per_second", "baselines", "trials"):
        assert key in data
    assert data["loader_kwargs"] == WINNER.loader_kwargs()
    assert data["amp"] == "bfloat16"
    assert data["baselines"] == {"defaults": 1000.0, "recipe": 1500.0}
    assert [t["state"] for t in data["trials"]] == [
        "ok", "ok", "ok", "infeasible", "failed", "repeat"
    ]


def test_save_and_load(tmp_path):
    path = tmp_path / "result.json"
    result = make_result()
    result.save(path)
    assert TuneResult.load(path) == result
    assert TuneResult.load(str(path)) == result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_save_is_atomic_when_the_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("original content")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        make_result().save(path)
    assert path.read_text() == "original content"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


def test_save_writes_through_a_temp_file_then_replaces(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("original content")
    calls = []
    real_replace = os.replace

    def spy_replace(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        calls.append((src, dst))
        assert os.path.dirname(src) == str(tmp_path)  # same folder, so the rename is atomic
        assert src != os.fspath(path)
        assert path.read_text() == "original content"  # untouched until the replace
        TuneResult.from_json(Path(src).read_text())  # the temp file is complete before the replace
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    result = make_result()
    result.save(path)
    assert len(calls) == 1 and calls[0][1] == os.fspath(path)
    assert TuneResult.load(path) == result
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[1, 2, 3]",
        "null",
        '"a string"',
        "{}",
    ],
)
def test_malformed_json_is_a_result_file_error(text):
    with pytest.raises(ResultFileError, match="not an autoload result"):
        TuneResult.from_json(text)


@pytest.mark.parametrize(
    "field", ["config", "loader_kwargs", "amp", "samples_per_second", "baselines", "finalists",
              "trials", "device", "samples_per_epoch", "elapsed_seconds", "space_size", "notes"],
)
def test_json_missing_a_field_is_a_result_file_error(field):
    data = json.loads(make_result().to_json())
    del data[field]
    with pytest.raises(ResultFileError, match=field):
        TuneResult.from_json(json.dumps(data))


def test_json_with_broken_nested_records_is_a_result_file_error():
    data = json.loads(make_result().to_json())
    del data["trials"][0]["config"]["batch_size"]
    with pytest.raises(ResultFileError):
        TuneResult.from_json(json.dumps(data))
    data = json.loads(make_result().to_json())
    data["finalists"][0]["unexpected"] = 1
    with pytest.raises(ResultFileError):
        TuneResult.from_json(json.dumps(data))


def test_unknown_format_version_is_a_result_file_error():
    data = json.loads(make_result().to_json())
    data["format_version"] = 999
    with pytest.raises(ResultFileError, match="format_version"):
        TuneResult.from_json(json.dumps(data))


def test_load_of_malformed_or_missing_file_is_a_result_file_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{truncated")
    with pytest.raises(ResultFileError):
        TuneResult.load(bad)
    with pytest.raises(ResultFileError, match="cannot read result file"):
        TuneResult.load(tmp_path / "missing.json")


def test_speedup():
    result = make_result()
    assert result.speedup("defaults") == pytest.approx(3.0)
    assert result.speedup("recipe") == pytest.approx(2.0)
    assert result.speedup("unknown") is None
    assert make_result(baselines={"defaults": 0.0}).speedup("defaults") is None


def test_dropped_per_epoch():
    assert make_result().dropped_per_epoch == 0  # no drop_last: nothing dropped
    config = LoaderConfig(batch_size=64, drop_last=True)
    dropping = make_result(config=config, loader_kwargs=config.loader_kwargs(),
                           samples_per_epoch=1009)
    assert dropping.dropped_per_epoch == 1009 % 64 == 49
    exact = make_result(config=config, loader_kwargs=config.loader_kwargs(),
                        samples_per_epoch=640)
    assert exact.dropped_per_epoch == 0
    iterable = make_result(config=config, loader_kwargs=config.loader_kwargs(),
                           samples_per_epoch=None)
    assert iterable.dropped_per_epoch == 0


def test_epoch_seconds_and_winner():
    result = make_result()
    assert result.epoch_seconds() == pytest.approx(240 / 3000.0)
    assert make_result(samples_per_epoch=None).epoch_seconds() is None
    assert result.winner.median == 3000.0


def test_a_version_1_result_without_loader_options_still_reads():
    data = json.loads(make_result().to_json())
    assert data["format_version"] == 3
    data["format_version"] = 1
    del data["loader_options"]
    again = TuneResult.from_json(json.dumps(data))
    assert again.loader_options == {} and again.dataloader_kwargs == again.loader_kwargs


def test_a_version_2_result_reads_its_limit_as_the_predicted_bottleneck():
    data = json.loads(make_result(predicted_bottleneck="the CPU cores").to_json())
    data["format_version"] = 2
    data["limit"] = data.pop("predicted_bottleneck")
    assert TuneResult.from_json(json.dumps(data)).predicted_bottleneck == "the CPU cores"
