"""The Hugging Face ``Trainer``: ``TuneResult.training_arguments()`` builds real
``TrainingArguments``, the report shows them for a transformers model, and the README's online
recipe trains; a tiny randomly initialised BERT, nothing downloaded."""

import io
from dataclasses import replace

import pytest
import torch
from rich.console import Console
from torch import nn

import autoload
import autoload.tuner
from autoload import LoaderConfig, TuneResult
from autoload.report import render_report, training_arguments_snippet

from conftest import SurfaceProbe, build_result

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # TrainingArguments needs it to pick the device


class Tokens(torch.utils.data.Dataset):
    """Sequence-classification items with only the columns BERT's forward takes."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return {"input_ids": torch.tensor([(i * 7 + k) % 100 for k in range(8)]),
                "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": torch.tensor(i % 2)}


def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _render(result: TuneResult) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(render_report(result))
    return console.file.getvalue()


def test_a_transformers_models_result_builds_training_arguments(clock, monkeypatch, tmp_path):
    # bf16 measured (as on a CPU with native bf16) and winning on the simulated surface
    monkeypatch.setattr(autoload.tuner, "cpu_has_native_bf16", lambda: True)
    result = autoload.tune(Tokens(), model=_bert(), probe=SurfaceProbe(clock), clock=clock,
                           timeout=60, max_workers=2)
    assert result.framework == "transformers" and result.amp == "bfloat16"
    arguments = result.training_arguments()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **arguments)
    assert args.per_device_train_batch_size == result.config.batch_size
    assert args.dataloader_num_workers == result.config.num_workers
    assert args.dataloader_prefetch_factor == result.config.prefetch_factor
    assert args.bf16 and not args.fp16 and args.use_cpu  # bf16 on the CPU needs use_cpu
    assert TuneResult.from_json(result.to_json()).framework == "transformers"


def test_autocast_maps_to_bf16_or_fp16_and_no_workers_to_no_prefetch(tmp_path):
    plain = build_result(LoaderConfig(32)).training_arguments()
    assert plain == {"per_device_train_batch_size": 32, "dataloader_num_workers": 0,
                     "dataloader_prefetch_factor": None, "dataloader_pin_memory": False,
                     "dataloader_persistent_workers": False, "dataloader_drop_last": False,
                     "bf16": False, "fp16": False, "use_cpu": True}
    transformers.TrainingArguments(output_dir=str(tmp_path), **plain)  # no prefetch: accepted
    fp16 = build_result(LoaderConfig(64, num_workers=2, prefetch_factor=4, pin_memory=True,
                                     amp="float16"), device="cuda:0").training_arguments()
    assert (fp16["fp16"], fp16["bf16"], fp16["dataloader_pin_memory"]) == (True, False, True)
    assert fp16["dataloader_prefetch_factor"] == 4 and fp16["dataloader_persistent_workers"]
    assert "use_cpu" not in fp16  # the device the Trainer finds is the one tuned for


def test_the_report_shows_training_arguments_for_a_transformers_model_only(tmp_path):
    config = LoaderConfig(48, num_workers=2, prefetch_factor=4, amp="bfloat16")
    hugging = build_result(config, framework="transformers")
    text = _render(hugging)
    assert "With the Hugging Face Trainer:" in text and "args = TrainingArguments(" in text
    assert "bf16=True," in text and "dataloader_num_workers=2," in text
    code = training_arguments_snippet(hugging).replace('"out"', repr(str(tmp_path)))
    scope = {"TrainingArguments": transformers.TrainingArguments}
    exec(code, scope)  # the snippet as printed is Python that builds them
    assert scope["args"].per_device_train_batch_size == 48 and scope["args"].bf16
    assert "TrainingArguments" not in _render(replace(hugging, framework=None))


def test_a_plain_module_gets_no_training_arguments(clock):
    result = autoload.tune(torch.utils.data.TensorDataset(torch.randn(64, 4),
                                                          torch.randint(0, 2, (64,))),
                           model=nn.Linear(4, 2), loss_fn=nn.functional.cross_entropy,
                           probe=SurfaceProbe(clock), clock=clock, timeout=60)
    assert result.framework is None and "TrainingArguments" not in _render(result)


def test_the_readmes_online_trainer_trains(tmp_path):
    class AutoloadTrainer(transformers.Trainer):  # as in the README
        def get_train_dataloader(self):
            return autoload.DataLoader(
                self.train_dataset, batch_size=self.args.train_batch_size, shuffle=True,
                collate_fn=self.data_collator, pin_memory=self.args.dataloader_pin_memory,
                num_workers="auto", prefetch_factor="auto",
            )

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=8, use_cpu=True,
                                          report_to="none", save_strategy="no",
                                          disable_tqdm=True)
    trainer = AutoloadTrainer(model=_bert(), args=args, train_dataset=Tokens())
    assert trainer.train().global_step == 3
