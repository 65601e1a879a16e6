"""What the user already has: a DataLoader, a factory, a LightningDataModule, dict batches for a
Hugging Face model; real packages, tiny models, nothing downloaded."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

import autoload
from autoload import ConfigError, DatasetError
from autoload.sources import resolve

from conftest import worker_processes
from toydata import EveryOther, Indexed, collate_pairs, seed_worker

FAST = dict(timeout=5, max_workers=1, final_rounds=1)
TUNED = ("batch_size", "num_workers", "pin_memory", "prefetch_factor", "persistent_workers",
         "drop_last")


def _users_loader():
    generator = torch.Generator().manual_seed(1)
    return DataLoader(Indexed(96), batch_size=12, sampler=EveryOther(96),
                      collate_fn=collate_pairs, worker_init_fn=seed_worker, generator=generator)


def test_a_dataloader_keeps_everything_autoload_does_not_tune(simulated):
    users = _users_loader()
    tuned = autoload.best_loader(users, max_workers=1, **simulated)
    for key in ("dataset", "sampler", "collate_fn", "worker_init_fn", "generator"):
        assert getattr(tuned, key) is getattr(users, key), key
    assert [x[:, 0].long().tolist() for x, _ in tuned][0][:3] == [0, 2, 4]  # its own order
    served = sorted(torch.cat([x[:, 0] for x, _ in tuned]).long().tolist())
    assert served == list(range(96))  # every sample exactly once per epoch


def test_shuffle_and_the_default_collate_are_recognised_not_copied(simulated):
    loader = DataLoader(Indexed(64), batch_size=8, shuffle=True)
    source = resolve(loader)
    assert source.loader_options == {"shuffle": True} and source.batch_size == 8
    tuned = autoload.best_loader(loader, **simulated)
    assert isinstance(tuned.sampler, RandomSampler)


def test_a_factory_of_a_dataloader_is_called_once(simulated):
    calls = []

    def make():
        calls.append(1)
        return _users_loader()

    autoload.best_loader(make, **simulated)
    assert len(calls) == 1


def test_a_batch_sampler_is_a_one_line_error_naming_the_way_out():
    batches = torch.utils.data.BatchSampler(range(64), batch_size=8, drop_last=False)
    loader = DataLoader(Indexed(64), batch_sampler=batches)
    with pytest.raises(ConfigError, match="batch_sampler=.*build it with the sampler") as info:
        autoload.tune(loader, **FAST)
    assert "\n" not in str(info.value)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net, self.steps = nn.Linear(4, 3), 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # outside a Trainer: only a warning, silenced
        return {"loss": loss}

    def configure_optimizers(self):
        return {"optimizer": torch.optim.Adam(self.parameters(), lr=1e-3)}


class Data(L.LightningDataModule):
    def setup(self, stage):
        self.train = Indexed(96) if stage == "fit" else None

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16, shuffle=True)


def test_a_datamodule_and_a_lightning_module_train_with_their_own_step_and_optimizer():
    module = Module()
    result = autoload.tune(Data(), model=module, **FAST)
    assert module.steps > 0  # its training_step ran (and the model was restored after)
    assert result.optimizer == "Adam" and result.reference_batch_size == 16
    assert not worker_processes()


def test_a_datamodule_without_train_dataloader_is_a_one_line_error():
    class NoTrain(L.LightningDataModule):
        def setup(self, stage):
            pass

    with pytest.raises(DatasetError, match="without train_dataloader"):
        autoload.tune(NoTrain(), **FAST)


def test_a_factory_of_a_datamodule_without_train_dataloader_says_so():
    class NoTrainDataModule(L.LightningDataModule):
        def setup(self, stage):
            pass

    with pytest.raises(DatasetError, match=r"make\(\) is a NoTrainDataModule without "
                                           r"train_dataloader\(\); define it"):
        resolve(NoTrainDataModule, name="make")
    with pytest.raises(DatasetError, match="without train_dataloader"):
        autoload.tune(lambda: NoTrainDataModule(), **FAST)


def test_a_batch_sampler_message_names_the_loader_once():
    batches = torch.utils.data.BatchSampler(range(64), batch_size=8, drop_last=False)
    with pytest.raises(ConfigError, match="^the DataLoader was built with batch_sampler="):
        resolve(DataLoader(Indexed(64), batch_sampler=batches))

    class Batched(L.LightningDataModule):
        def setup(self, stage):
            pass

        def train_dataloader(self):
            return DataLoader(Indexed(64), batch_sampler=batches)

    with pytest.raises(ConfigError, match="^the Batched's DataLoader was built with"):
        resolve(Batched())


def test_a_step_that_returns_a_number_names_its_type_and_why_it_must_be_a_tensor():
    def step(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y).item()

    with pytest.raises(DatasetError, match=r"the step returned no loss tensor \(got float\); "
                                           r"backward\(\) needs a tensor") as info:
        autoload.tune(Indexed(64), model=nn.Linear(4, 3), step=step, **FAST)
    assert "loss.item()" in str(info.value) and "\n" not in str(info.value)


def test_a_step_that_returns_no_tensor_is_a_one_line_error():
    with pytest.raises(DatasetError, match="the step returned no loss tensor"):
        autoload.tune(Indexed(64), model=nn.Linear(4, 3), step=lambda m, b: "oops", **FAST)


def _hugging_face():
    import datasets
    import transformers

    rows = {"input_ids": [[(i * 7 + k) % 50 for k in range(8)] for i in range(64)],
            "attention_mask": [[1] * 8 for _ in range(64)],
            "labels": [i % 2 for i in range(64)]}
    data = datasets.Dataset.from_dict(rows).with_format("torch")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return data, transformers.BertForSequenceClassification(config)


def test_dict_batches_train_a_hugging_face_model_on_its_own_loss():
    data, model = _hugging_face()
    before = [p.detach().clone() for p in model.parameters()]
    # 8 s: beside two busy processes, this model's first windows ran past a 3 s budget's end.
    result = autoload.tune(data, model=model, **{**FAST, "timeout": 8})
    assert result.samples_per_second > 0 and 64 % result.config.batch_size == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_keep_batch_size_tunes_the_rest_at_the_users_and_advice_explains_a_change(simulated):
    loader = DataLoader(Indexed(96), batch_size=12)
    kept = autoload.tune(loader, keep_batch_size=True, **simulated)
    assert {t.config.batch_size for t in kept.trials} == {12} and not kept.batch_size_advice()
    changed = autoload.tune(loader, batch_size=48, model=nn.Linear(4, 3),
                            loss_fn=nn.functional.cross_entropy,
                            optimizer=torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1),
                            **simulated)
    advice = " ".join(changed.batch_size_advice())
    assert "batch size 12 -> 48 (8 steps an epoch become 2)" in advice
    assert "multiply SGD's learning rate by 4" in advice
