"""``autoload.lightning.LoaderTuner``: a real ``Trainer.fit`` on the CPU trains on the tuned
loader, with the model and optimizer as they were before the tuning."""

import logging
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import autoload
import autoload.tuner
from autoload import ConfigError
from autoload.lightning import LoaderTuner

from conftest import SurfaceProbe, worker_processes

# Lightning's own use of a torch API that torch deprecates, which we do not control.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


class Classifier(L.LightningModule):
    def __init__(self, data: TensorDataset, *, batch_size: int = 16) -> None:
        super().__init__()
        self.data, self.batch_size = data, batch_size
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # an error in on_fit_start, where the tuning runs
        return loss

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch  # bytes on the way, floats for the step: the tuning's steps see it too
        return x.float() / 255, y

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Witness(L.Callback):
    """Placed before the tuner: the parameters when the fit starts, and what the first real
    training step finds (parameters, optimizer state, the loader)."""

    def on_fit_start(self, trainer, pl_module):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            self.first = [p.detach().clone() for p in pl_module.parameters()]
            self.optimizer_state = dict(trainer.optimizers[0].state)
            self.first_batch = batch[0].shape[0]


def _data(n: int = 512) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 256, (n, 8), dtype=torch.uint8, generator=generator),
                         torch.randint(0, 2, (n,), generator=generator))


def _trainer(*callbacks: L.Callback, steps: int = 4, **options) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_train_batches=steps, callbacks=list(callbacks),
                     accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **options)


@pytest.fixture
def report_lines():
    """What the callback writes through Lightning's rank-zero log."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = Keep(level=logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.slow
def test_a_real_fit_trains_on_the_tuned_loader_from_the_state_it_was_given(report_lines):
    witness, tuner = Witness(), LoaderTuner(timeout=6, max_workers=1)
    model = Classifier(_data())
    trainer = _trainer(witness, tuner)
    trainer.fit(model)

    result = tuner.result
    assert result is not None and result.reference_batch_size == 16
    assert result.optimizer == "Adam"  # the Trainer's optimizer took the tuning's steps
    loader = trainer.train_dataloader
    assert type(loader) is autoload.DataLoader  # the tuned loader, not the module's
    assert loader.dataset is model.data and isinstance(loader.sampler, RandomSampler)
    assert {k: getattr(loader, k) for k in result.loader_kwargs} == result.loader_kwargs
    assert loader.batch_size == 16 == witness.first_batch  # kept unless batch_size=True
    # the tuning's steps left nothing behind: training started where the fit started
    assert all(torch.equal(a, b) for a, b in zip(witness.before, witness.first, strict=True))
    assert witness.optimizer_state == {}
    assert trainer.global_step == 4  # and it trained
    after = list(model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(witness.before, after, strict=True))
    assert "log" not in vars(model) and "log_dict" not in vars(model)
    assert trainer.fit_loop._data_source.instance is model  # the source is the module again
    said = "\n".join(report_lines)
    assert "LoaderTuner: training on autoload.DataLoader with bs=16" in said
    assert "Winning settings:" in said
    assert not worker_processes()


def test_the_options_reach_the_loader_and_the_trainer(clock, monkeypatch):
    # A simulated surface on a fake clock: its best is bs=256, 2 workers, prefetch 4, bf16.
    monkeypatch.setattr(autoload.tuner, "cpu_has_native_bf16", lambda: True)
    witness = Witness()
    tuner = LoaderTuner(timeout=60, batch_size=True, amp=True, max_workers=2, verbose=False,
                        probe=SurfaceProbe(clock), clock=clock)
    trainer = _trainer(witness, tuner, steps=2)
    trainer.fit(Classifier(_data()))
    assert tuner.result is not None and tuner.result.amp == "bfloat16"
    assert trainer.precision == "bf16-mixed"  # autocast won, so the Trainer trains with it
    loader = trainer.train_dataloader
    assert (loader.batch_size, loader.num_workers, loader.prefetch_factor) == (256, 2, 4)
    assert loader.persistent_workers and witness.first_batch == 256
    assert trainer.global_step == 2
    assert not worker_processes()


def test_by_default_the_batch_size_and_the_precision_stay(clock):
    tuner = LoaderTuner(timeout=60, verbose=False, probe=SurfaceProbe(clock), clock=clock)
    trainer = _trainer(tuner, steps=1)
    trainer.fit(Classifier(_data(), batch_size=32))
    assert {t.config.batch_size for t in tuner.result.trials} == {32}
    assert {t.config.amp for t in tuner.result.trials} == {None}
    assert trainer.precision == "32-true" and trainer.train_dataloader.batch_size == 32


def test_loaders_given_to_fit_are_tuned_too(clock):
    tuner = LoaderTuner(timeout=60, verbose=False, probe=SurfaceProbe(clock), clock=clock)
    trainer = _trainer(tuner, steps=1)
    data = _data(256)
    given = DataLoader(data, batch_size=64)
    trainer.fit(Classifier(data), train_dataloaders=given)
    assert type(trainer.train_dataloader) is autoload.DataLoader
    assert trainer.fit_loop._data_source.instance is given


def test_reloading_loaders_is_warned_of(clock):
    tuner = LoaderTuner(timeout=60, verbose=False, probe=SurfaceProbe(clock), clock=clock)
    trainer = _trainer(tuner, steps=1, reload_dataloaders_every_n_epochs=1)
    with pytest.warns(UserWarning, match="tunes the first training loader only"):
        trainer.fit(Classifier(_data(256)))


def test_manual_optimization_is_refused_with_the_way_out():
    class Manual(Classifier):
        def __init__(self, data):
            super().__init__(data)
            self.automatic_optimization = False

    with pytest.raises(ConfigError, match=r"manual optimization .*autoload\.tune\("):
        _trainer(LoaderTuner(verbose=False), steps=1).fit(Manual(_data(64)))


def test_several_training_loaders_are_refused():
    class Two(Classifier):
        def train_dataloader(self):
            return {"a": DataLoader(self.data, batch_size=8), "b": DataLoader(self.data)}

    with pytest.raises(ConfigError, match="one training DataLoader, but the training data is "
                                          "a dict"):
        _trainer(LoaderTuner(verbose=False), steps=1).fit(Two(_data(64)))


def test_online_with_a_batch_size_search_is_refused():
    with pytest.raises(ConfigError, match="online=True keeps the loader's batch size"):
        LoaderTuner(online=True, batch_size=True)


def test_online_trains_on_the_online_loader_without_tuning_first(report_lines):
    tuner = LoaderTuner(online=True)
    trainer = _trainer(tuner, steps=3)
    model = Classifier(_data(256))
    trainer.fit(model)
    loader = trainer.train_dataloader
    assert isinstance(loader, autoload.DataLoader) and loader.batch_size == 16
    assert isinstance(loader.sampler, RandomSampler) and tuner.result is None
    assert trainer.global_step == 3
    assert any("num_workers='auto'" in line for line in report_lines)


def test_online_asks_autoload_dataloader_for_auto_workers_and_prefetch(monkeypatch):
    # A stand-in records the call and trains with 0 workers.
    calls = []

    class Online(autoload.DataLoader):
        def __init__(self, dataset, **kwargs):
            calls.append(dict(kwargs))
            kwargs.update(num_workers=0, prefetch_factor=None)
            super().__init__(dataset, **kwargs)

    monkeypatch.setattr("autoload.lightning.DataLoader", Online)
    tuner, model = LoaderTuner(online=True, verbose=False), Classifier(_data(128))
    trainer = _trainer(tuner, steps=2)
    trainer.fit(model)
    assert calls == [{"shuffle": True, "batch_size": 16, "drop_last": False,
                      "pin_memory": False, "num_workers": "auto", "prefetch_factor": "auto"}]
    assert type(trainer.train_dataloader) is Online and trainer.global_step == 2


def test_importing_autoload_imports_neither_lightning_nor_transformers():
    code = ("import sys, autoload; "
            "print(sorted(m for m in ('lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
