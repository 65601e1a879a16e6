"""The ``autoload`` command, driven through ``autoload.cli.main`` with a captured console.

The ``tune`` runs are real (short budgets, at most one worker); each runs once per module and
the tests read its output and JSON.
"""

from __future__ import annotations

import io
import json
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console

from autoload import TuneResult
from autoload.cli import main

pytestmark = pytest.mark.usefixtures("restore_sys_path")

DATA_MODULE = """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    N = 240


    def make_dataset():
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(N, 8, generator=g), torch.randint(0, 3, (N,), generator=g))


    def make_prime_dataset():
        return TensorDataset(torch.randn(1009, 8))


    def make_empty_dataset():
        return TensorDataset(torch.zeros(0, 8))


    def make_model():
        return nn.Linear(8, 3)


    def boom():
        raise ValueError("boom")


    NUMBER = 3
    DATASET = make_dataset()


    def make_loader():
        return torch.utils.data.DataLoader(make_dataset(), batch_size=24, shuffle=True)


    def my_step(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)


    def not_a_loss(model, batch):
        return "not a tensor"
"""

LIGHTNING_MODULE = """
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset


    class Data(L.LightningDataModule):
        def setup(self, stage):
            g = torch.Generator().manual_seed(0)
            self.train = TensorDataset(torch.randn(96, 8, generator=g),
                                       torch.randint(0, 3, (96,), generator=g))

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=16)


    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)
"""

BROKEN_IMPORT_MODULE = """
    import does_not_exist_autoload_xyz  # noqa: F401

    def make_dataset():
        return None
"""


@dataclass
class Run:
    code: int
    out: str
    json_path: Path | None = None


def run_cli(argv: list[str]) -> Run:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    code = main(argv, console=console)
    return Run(code, console.file.getvalue())


class UserModules:
    """Writes uniquely named user modules and undoes the sys.path and sys.modules changes."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        # syspath_prepend makes monkeypatch restore all of sys.path afterwards, including the
        # folders the importer inserts for a file spec (or the working directory for a name).
        monkeypatch.syspath_prepend(str(folder))
        self.names: list[str] = []

    def write(self, source: str, stem: str = "autoload_cli_data") -> Path:
        name = f"{stem}_{uuid.uuid4().hex[:12]}"
        path = self.folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        self.names.append(name)
        return path

    def cleanup(self) -> None:
        for name in self.names:
            sys.modules.pop(name, None)


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[UserModules]:
    user = UserModules(tmp_path, monkeypatch)
    yield user
    user.cleanup()


@pytest.fixture
def data(modules: UserModules) -> Path:
    return modules.write(DATA_MODULE)


def module_run(tmp_path_factory: pytest.TempPathFactory,
               args: Callable[[Path, Path], list[str]]) -> Iterator[Run]:
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        user = UserModules(folder, mp)
        path = user.write(DATA_MODULE)
        json_path = folder / "result.json"
        run = run_cli(args(path, json_path))
        run.json_path = json_path
        yield run
        user.cleanup()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield from module_run(tmp_path_factory, lambda path, out: [
        "tune", f"{path}:make_dataset", "--model", f"{path}:make_model",
        "--loss", "cross_entropy", "--device", "cpu", "--timeout", "5", "--max-workers", "1",
        "--quiet", "--json", str(out),
    ])


@pytest.fixture(scope="module")
def data_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield from module_run(tmp_path_factory, lambda path, out: [
        "tune", f"{path}:DATASET", "--device", "cpu", "--timeout", "3", "--max-workers", "1",
        "--quiet", "--json", str(out),
    ])


@pytest.fixture(scope="module")
def drop_last_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield from module_run(tmp_path_factory, lambda path, out: [
        "tune", f"{path}:make_prime_dataset", "--drop-last", "--device", "cpu",
        "--timeout", "3", "--max-workers", "1", "--quiet", "--json", str(out),
    ])


def assert_one_error_line(run: Run, code: int = 2) -> str:
    assert run.code == code, run.out
    assert "Traceback" not in run.out
    lines = run.out.splitlines()
    assert len(lines) == 1, run.out
    assert lines[0].startswith("autoload: error: ")
    return lines[0]


# --- tune, end to end ------------------------------------------------------------------------


def test_tune_with_a_model_end_to_end(model_run):
    assert model_run.code == 0, model_run.out
    assert "Traceback" not in model_run.out
    assert model_run.json_path.is_file()
    result = TuneResult.load(model_run.json_path)
    assert 240 % result.loader_kwargs["batch_size"] == 0
    assert result.loader_kwargs == result.config.loader_kwargs()
    assert result.loader_kwargs["num_workers"] in (0, 1)
    assert result.device == "cpu"
    assert result.samples_per_epoch == 240
    assert result.samples_per_second > 0
    assert set(result.baselines) == {"defaults", "recipe"}
    assert "Winning settings" in model_run.out
    assert _compares_with_defaults(model_run.out)
    assert f"batch_size={result.loader_kwargs['batch_size']}," in model_run.out
    # rich may wrap the long temporary path: compare without whitespace
    assert f"resultwrittento{model_run.json_path}" in re.sub(r"\s", "", model_run.out)


def test_tune_without_a_model_end_to_end(data_run):
    assert data_run.code == 0, data_run.out
    result = TuneResult.load(data_run.json_path)
    assert 240 % result.loader_kwargs["batch_size"] == 0
    assert result.amp is None  # without a model there is no autocast to search
    assert "Winning settings" in data_run.out
    assert _compares_with_defaults(data_run.out)
    assert "drop_last:" not in data_run.out


def test_show_rerenders_a_saved_result(model_run):
    shown = run_cli(["show", str(model_run.json_path)])
    assert shown.code == 0, shown.out
    assert "Winning settings" in shown.out
    assert _compares_with_defaults(shown.out)
    # the same report as the tune run printed, less the line about writing the JSON
    assert model_run.out.startswith(shown.out)


def test_prime_length_with_drop_last_succeeds_and_reports_dropped_samples(drop_last_run):
    assert drop_last_run.code == 0, drop_last_run.out
    result = TuneResult.load(drop_last_run.json_path)
    batch_size = result.loader_kwargs["batch_size"]
    assert result.loader_kwargs["drop_last"] is True
    assert result.dropped_per_epoch == 1009 % batch_size
    match = re.search(r"drop_last: each epoch drops (\d+) of 1009 samples", drop_last_run.out)
    assert match is not None, drop_last_run.out
    assert int(match.group(1)) == 1009 % batch_size


# --- bad input: one line, no traceback ---------------------------------------------------------


def test_spec_without_colon():
    line = assert_one_error_line(run_cli(["tune", "no_colon_here"]))
    assert "MODULE:ATTR" in line


def test_missing_module():
    line = assert_one_error_line(run_cli(["tune", "no_such_module_autoload_xyz:make"]))
    assert "no_such_module_autoload_xyz" in line


def test_missing_file(tmp_path):
    line = assert_one_error_line(run_cli(["tune", f"{tmp_path / 'nope.py'}:make"]))
    assert "does not exist" in line


def test_missing_attribute(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:no_such_attr"]))
    assert "no_such_attr" in line


def test_attribute_that_is_an_int(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:NUMBER"]))
    assert "neither a Dataset, a DataLoader" in line


def test_module_spec_by_name_from_the_working_directory(data, monkeypatch):
    monkeypatch.chdir(data.parent)
    # the folder is reachable only as the working directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(data.parent)])
    line = assert_one_error_line(run_cli(["tune", f"{data.stem}:NUMBER"]))
    assert "neither a Dataset, a DataLoader" in line


def test_factory_that_raises_is_the_users_error(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:boom"]), code=1)
    assert "ValueError" in line and "boom" in line
    assert str(data) in line  # where it was raised


def test_debug_shows_the_users_exception(data):
    with pytest.raises(ValueError, match="boom"):
        run_cli(["--debug", "tune", f"{data}:boom"])


def test_import_error_inside_the_users_module(modules):
    path = modules.write(BROKEN_IMPORT_MODULE)
    run = run_cli(["tune", f"{path}:make_dataset"])
    assert run.code != 0
    line = assert_one_error_line(run, code=run.code)
    assert "does_not_exist_autoload_xyz" in line
    assert "ModuleNotFoundError" in line


def test_factory_returning_a_non_dataset(modules):
    path = modules.write("def make():\n    return 3\n")
    line = assert_one_error_line(run_cli(["tune", f"{path}:make"]))
    assert "not a Dataset" in line


def test_memory_cap_banana(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--memory-cap",
                                          "banana"]))
    assert "--memory-cap" in line and "banana" in line


def test_negative_trials(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--trials", "-1"]))
    assert "--trials" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("with_model", [False, True])
def test_device_cuda_without_a_gpu(data, with_model):
    argv = ["tune", f"{data}:make_dataset", "--device", "cuda", "--quiet"]
    if with_model:
        argv += ["--model", f"{data}:make_model", "--loss", "cross_entropy"]
    line = assert_one_error_line(run_cli(argv))
    assert "CUDA" in line and "cpu" in line


def test_model_without_loss(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--model",
                                          f"{data}:make_model"]))
    assert "--loss" in line


def test_loss_without_model(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--loss", "mse"]))
    assert "--model" in line


def test_unknown_loss(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--model",
                                          f"{data}:make_model", "--loss", "nonsense"]))
    assert "nonsense" in line


def test_empty_dataset(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_empty_dataset", "--quiet"]))
    assert "length 0" in line


def test_prime_length_without_drop_last_names_the_flag(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_prime_dataset", "--quiet"]))
    assert "--drop-last" in line
    assert "1009" in line


def test_no_arguments_and_unknown_command():
    assert "required" in assert_one_error_line(run_cli([]))
    assert "bogus" in assert_one_error_line(run_cli(["bogus"]))


def test_show_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{this is not json")
    line = assert_one_error_line(run_cli(["show", str(path)]))
    assert "not an autoload result" in line


def test_show_json_missing_fields(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"format_version": 1, "loader_kwargs": {"batch_size": 8}}))
    line = assert_one_error_line(run_cli(["show", str(path)]))
    assert "not an autoload result" in line


def test_show_missing_file(tmp_path):
    line = assert_one_error_line(run_cli(["show", str(tmp_path / "missing.json")]))
    assert "cannot read result file" in line


def _compares_with_defaults(out: str) -> bool:
    """The report states the winner's speedup over PyTorch's defaults, or that they won."""
    return "faster than PyTorch defaults" in out or "the PyTorch defaults won" in out



# --- what the user already has ----------------------------------------------------------------

# 4 s: beside two busy processes, a Lightning module's first windows ran past a 3 s budget's end.
QUICK = ["--device", "cpu", "--timeout", "4", "--max-workers", "1", "--quiet"]


def test_tune_a_dataloader_and_a_step_from_the_command_line(data, tmp_path):
    out = tmp_path / "r.json"
    run = run_cli(["tune", f"{data}:make_loader", "--model", f"{data}:make_model",
                   "--step", f"{data}:my_step", "--json", str(out), *QUICK])
    assert run.code == 0, run.out
    result = TuneResult.load(out)
    assert result.reference_batch_size == 24 and 240 % result.config.batch_size == 0


def test_tune_a_datamodule_with_a_lightning_module_needs_no_loss(modules):
    path = modules.write(LIGHTNING_MODULE)
    run = run_cli(["tune", f"{path}:Data", "--model", f"{path}:Classifier", *QUICK])
    assert run.code == 0, run.out
    assert "Winning settings" in run.out


def test_keep_batch_size_and_the_cache_from_the_command_line(data):
    args = ["tune", f"{data}:make_loader", "--keep-batch-size", *QUICK]
    first = run_cli(args)
    assert first.code == 0 and "batch_size=24" in first.out and "from the cache" not in first.out
    assert "from the cache" in run_cli(args).out
    assert "from the cache" not in run_cli([*args, "--no-cache"]).out


def test_loss_and_step_together_is_an_error(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--model",
                                          f"{data}:make_model", "--loss", "mse", "--step",
                                          f"{data}:my_step", *QUICK]))
    assert "give one of them" in line


def test_a_step_returning_no_tensor_is_one_line(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--model",
                                          f"{data}:make_model", "--step",
                                          f"{data}:not_a_loss", *QUICK]))
    assert "returned no loss tensor" in line


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_version(flag, capsys):
    import autoload

    assert main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"autoload {autoload.__version__}"


def test_python_dash_m_autoload_runs_the_command():
    import subprocess

    import autoload

    proc = subprocess.run([sys.executable, "-m", "autoload", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"autoload {autoload.__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_and_after_the_subcommand(data, where):
    argv = ["tune", f"{data}:boom"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="boom"):
        run_cli(argv)


def _help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["tune", "show", "cache"])
def test_every_option_and_argument_has_a_help_text(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    lines = _help_of([command, "--help"], capsys).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("positional arguments"))
    entries = [i for i in range(start, len(lines)) if re.match(r"  \S", lines[i])]
    for i in entries:  # the help text follows on the same line or on the next, indented
        same = re.match(r"  \S.*?\S {2,}\S", lines[i])
        following = i + 1 < len(lines) and re.match(r" {6,}\S", lines[i + 1])
        assert same or following, f"{lines[i].strip()!r} has no help text"


def test_max_workers_help_says_the_search_may_go_past_the_cpus(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = " ".join(_help_of(["tune", "--help"], capsys).split())
    assert "--max-workers MAX_WORKERS largest num_workers searched; by default the usable CPUs, "\
           "or up to 4x them when fetching took more than 10% of the time" in text


def test_a_storage_url_optuna_cannot_open_is_bad_input(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--storage",
                                          "notadb://user:secret@x/db", "--timeout", "4"]))
    assert "'notadb://user:***@x/db'" in line and "sqlite:///autoload.db" in line
    assert "secret" not in line


def test_a_memory_cap_the_process_already_uses_is_bad_input(data):
    line = assert_one_error_line(run_cli(["tune", f"{data}:make_dataset", "--memory-cap", "1MiB",
                                          "--quiet", "--no-cache"]))
    assert "is below what this process already uses" in line and "--memory-cap" in line
