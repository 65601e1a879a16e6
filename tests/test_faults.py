"""Faults inside trials: the study goes on, the trial is marked, nothing is lost."""

import signal
import subprocess
import sys
import textwrap
import time

import optuna
import psutil
import pytest
import torch
from torch import nn

import autoload
from autoload import LoaderConfig, TrainingProbe, Window

from conftest import SurfaceProbe, worker_processes
from toydata import Hangs, InterruptsAfter, Raises, Stream, Unpicklable

FAST = dict(timeout=5, max_workers=1, final_rounds=2)
CPU = torch.device("cpu")


def test_hung_worker_is_bounded_by_the_deadline():
    # The loader's own timeout is the window's deadline: the error names it.
    with pytest.raises(autoload.TrialTimeout, match=r"no batch came from the DataLoader.* 1\.5 "):
        TrainingProbe(Hangs(64), device=CPU).measure(
            LoaderConfig(16, num_workers=1, prefetch_factor=1), Window(seconds=0.2, deadline=1.5))
    assert not worker_processes()


def test_error_in_getitem_every_trial_stops_with_the_users_error():
    with pytest.raises(autoload.TuningFailedError, match="ValueError: cannot read item") as info:
        autoload.tune(Raises(64), **FAST)
    assert isinstance(info.value.__cause__, ValueError)
    assert not worker_processes()


def test_unpicklable_dataset_under_spawn_fails_worker_trials_only():
    result = autoload.tune(Unpicklable(64), num_workers=[0, 1],
                           loader_options={"multiprocessing_context": "spawn"}, **FAST)
    assert result.config.num_workers == 0
    failed = [t for t in result.trials if t.state == "failed"]
    assert failed and all(t.config.num_workers == 1 for t in failed)
    assert any("pickle" in (t.reason or "").lower() for t in failed)
    assert not worker_processes()


def test_cuda_oom_is_infeasible_not_fatal(clock):
    def fail(config):
        if config.batch_size >= 256:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = torch.utils.data.TensorDataset(torch.zeros(1024, 2))
    result = autoload.tune(data, probe=SurfaceProbe(clock, fail=fail), clock=clock, timeout=60)
    oom = [t for t in result.trials if t.state == "infeasible"]
    assert oom and all(t.reason == "CUDA out of memory" for t in oom)
    assert result.config.batch_size < 256


def test_ctrl_c_keeps_finished_trials_restores_the_model_and_leaves_no_worker(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in net.parameters()]
    url = f"sqlite:///{tmp_path / 'study.db'}"
    data = InterruptsAfter(960, after=1, armed=False)

    def arm_after_two_trials(event):
        data.armed = event.phase == "search" and event.done >= 2  # Ctrl-C at the third's start

    # The interrupt ends the run, not the budget: 15 s hold the pilot and two trials of 0.25 s
    # windows many times over. (5 s did not, on a busy machine: the search ended after one
    # trial, and the interrupt came in the final's second measurement.)
    with pytest.raises(KeyboardInterrupt):
        autoload.tune(data, model=net, loss_fn=nn.functional.cross_entropy, optimizer=opt,
                      storage=url, study_name="s", num_workers=0, progress=arm_after_two_trials,
                      **{**FAST, "timeout": 15})
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert not opt.state  # the momentum buffers the trials made are gone
    assert not worker_processes()
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2


def test_cli_ctrl_c_exits_130_and_leaves_no_worker(tmp_path):
    marker = tmp_path / "started"
    (tmp_path / "slowdata.py").write_text(textwrap.dedent(f"""
        import time, torch
        from torch.utils.data import Dataset, get_worker_info

        class Slow(Dataset):
            def __len__(self):
                return 256

            def __getitem__(self, i):
                if get_worker_info() is not None:  # a trial with workers has begun
                    open({str(marker)!r}, "w").close()
                time.sleep(0.01)
                return torch.zeros(4)

        def make():
            return Slow()
    """))
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoload.cli", "tune", f"{tmp_path}/slowdata.py:make",
         "--timeout", "60", "--workers", "1,2", "--quiet"],  # workers from the first trial
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None and marker.exists(), proc.communicate()
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert [p for p in workers if "resource_tracker" not in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not [p for p in alive if "resource_tracker" not in " ".join(p.cmdline())]


def _completed_trials(url: str) -> int:
    try:
        summaries = optuna.get_all_study_summaries(storage=url)
    except Exception:  # the database is not there yet, or is being written
        return 0
    done = (optuna.trial.TrialState.COMPLETE,)
    return sum(len(optuna.load_study(study_name=s.study_name, storage=url).get_trials(
        deepcopy=False, states=done)) for s in summaries)


def test_cli_sigterm_ends_like_ctrl_c_keeps_finished_trials_and_leaves_no_worker(tmp_path):
    (tmp_path / "slowdata.py").write_text(textwrap.dedent("""
        import time, torch
        from torch.utils.data import Dataset

        class Slow(Dataset):
            def __len__(self):
                return 256

            def __getitem__(self, i):
                time.sleep(0.002)
                return torch.zeros(4)
    """))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoload", "tune", "slowdata.py:Slow", "--timeout", "30",
         "--max-workers", "2", "--quiet", "--no-cache", "--storage", url, "--study-name", "s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    deadline = time.monotonic() + 120
    while _completed_trials(url) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.splitlines() == ["autoload: terminated; the model and optimizer were restored."]
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not [p for p in alive if "resource_tracker" not in " ".join(p.cmdline())]
    assert _completed_trials(url) >= 2  # the finished trials stay in --storage


def test_iterable_dataset_keeps_num_workers_zero_and_says_so(simulated):
    result = autoload.tune(Stream(200), **simulated)
    assert {t.config.num_workers for t in result.trials} == {0}
    assert any("IterableDataset" in note for note in result.notes)
    assert result.samples_per_epoch is None


def test_user_state_survives_a_trial_that_raises_mid_window():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    before = [p.detach().clone() for p in net.parameters()]
    data = InterruptsAfter(64, after=40)
    probe = TrainingProbe(data, device=CPU, model=net, loss_fn=nn.functional.cross_entropy)
    with pytest.raises(KeyboardInterrupt):
        probe.measure(LoaderConfig(16), Window(seconds=5))
    assert data.calls == 40  # two batches trained before the interrupt, in the third
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert net.training and torch.is_grad_enabled() and not worker_processes()


def test_segfault_in_a_worker_fails_that_trial_only():
    from toydata import SegfaultsInWorker

    result = autoload.tune(SegfaultsInWorker(64), num_workers=[0, 1], **FAST)
    assert result.config.num_workers == 0
    failed = [t for t in result.trials if t.state == "failed"]
    assert failed and all((t.reason or "").startswith("worker died") for t in failed)
    assert not worker_processes()
