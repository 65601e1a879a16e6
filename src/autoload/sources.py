"""What the user has, turned into what the tuner needs.

A training script already has one of: a ``Dataset``; a ``DataLoader`` with its own
``collate_fn``, ``sampler``, ``shuffle``, ``worker_init_fn``...; a zero-argument factory of
either; or a Lightning ``LightningDataModule``. Each becomes a :class:`Source`: the data set, the
loader arguments autoload does not tune (carried over untouched, so a tuned loader differs from
the user's only in the tuned keys), and the batch size the user trained at. A model can bring
its own step: a ``LightningModule``'s ``training_step`` and optimizer. Frameworks are recognised
by the names in a class's MRO, so that nothing here imports them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    default_collate,
)

from autoload.errors import ConfigError, DatasetError

__all__ = ["Source", "is_transformers_model", "lightning_optimizer", "lightning_step", "loss_of",
           "resolve"]

@dataclass(frozen=True, kw_only=True)
class Source:
    """The data a tuning run works on.

    Attributes:
        dataset: The data set.
        loader_options: The user's DataLoader arguments autoload does not tune.
        batch_size: The batch size the user's loader used, if they had one.
        drop_last: Whether the user's loader dropped its last batch, if they had one.
        kind: What the user gave, in words (for messages and the report).
    """

    dataset: Any
    loader_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    drop_last: bool | None = None
    kind: str = "Dataset"


def _is_dataset(obj: Any) -> bool:
    if isinstance(obj, type):
        return False
    if isinstance(obj, (Dataset, IterableDataset)):
        return True
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _defined_by_lightning(obj: Any, name: str) -> bool:
    """Whether ``obj``'s method ``name`` is Lightning's own (its base class's, which raises)."""
    for klass in type(obj).__mro__:
        if name in vars(klass):
            return klass.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
    return False


def _is_datamodule(obj: Any) -> bool:
    return (not isinstance(obj, type) and callable(getattr(obj, "train_dataloader", None))
            and callable(getattr(obj, "setup", None))
            and not _defined_by_lightning(obj, "train_dataloader"))


def _lacks_train_dataloader(obj: Any) -> bool:
    """A LightningDataModule whose class leaves ``train_dataloader`` to Lightning's base."""
    return not isinstance(obj, type) and _defined_by_lightning(obj, "train_dataloader")


def resolve(obj: Any, *, name: str = "the data") -> Source:
    """A :class:`Source` from a Dataset, a DataLoader, a LightningDataModule, or a
    zero-argument callable returning one of them.

    Raises:
        ConfigError: A DataLoader built with a ``batch_sampler`` (its batches are fixed).
        DatasetError: ``obj`` is none of these, or a DataModule lacks ``train_dataloader``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=4, shuffle=True)
        >>> source = resolve(loader)
        >>> source.batch_size, source.loader_options
        (4, {'shuffle': True})
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, DataLoader):
        return _from_loader(obj, kind="DataLoader")
    if _is_dataset(obj):
        return Source(dataset=obj)
    if _is_datamodule(obj):
        return _from_datamodule(obj)
    if _lacks_train_dataloader(obj):
        raise DatasetError(f"{name} is a {type(obj).__name__} without train_dataloader(); "
                           "define it, or pass the Dataset or DataLoader itself.")
    if callable(obj):  # a factory, or a class whose arguments all have defaults
        made = obj()
        if (isinstance(made, DataLoader) or _is_dataset(made) or _is_datamodule(made)
                or _lacks_train_dataloader(made)):
            return resolve(made, name=f"{name}()")
        raise DatasetError(f"{name}() returned a {type(made).__name__}, not a Dataset (with "
                           "__len__ and __getitem__, or an IterableDataset), a DataLoader or a "
                           "LightningDataModule.")
    raise DatasetError(f"{name} is of type {type(obj).__name__}, neither a Dataset, a "
                       "DataLoader, a LightningDataModule nor a callable returning one.")


def _from_datamodule(module: Any) -> Source:
    if callable(getattr(module, "prepare_data", None)):
        module.prepare_data()
    module.setup("fit")
    loader = module.train_dataloader()
    if not isinstance(loader, DataLoader):
        raise DatasetError(f"{type(module).__name__}.train_dataloader() returned a "
                           f"{type(loader).__name__}, not one DataLoader; autoload tunes one "
                           "training loader: return it, or pass it directly.")
    return _from_loader(loader, kind=type(module).__name__)


def _from_loader(loader: DataLoader[Any], *, kind: str) -> Source:
    if loader.batch_size is None and loader.batch_sampler is not None:
        whose = "the DataLoader" if kind == "DataLoader" else f"the {kind}'s DataLoader"
        raise ConfigError(
            f"{whose} was built with batch_sampler=, which fixes its batches, so "
            "there is no batch size to tune; build it with the sampler that batch sampler wraps "
            "and a batch_size instead."
        )
    options: dict[str, Any] = {}
    if not isinstance(loader.dataset, IterableDataset):
        options.update(_sampler_options(loader))
    if loader.collate_fn is not default_collate:
        options["collate_fn"] = loader.collate_fn
    for key in ("worker_init_fn", "generator", "multiprocessing_context"):
        value = getattr(loader, key, None)
        if value is not None:
            options[key] = value
    if loader.timeout:
        options["timeout"] = loader.timeout
    if getattr(loader, "pin_memory_device", ""):
        options["pin_memory_device"] = loader.pin_memory_device
    if getattr(loader, "in_order", True) is False:
        options["in_order"] = False
    return Source(dataset=loader.dataset, loader_options=options, batch_size=loader.batch_size,
                  drop_last=loader.drop_last, kind=kind)


def _sampler_options(loader: DataLoader[Any]) -> dict[str, Any]:
    """``shuffle`` for the samplers DataLoader builds itself; the user's own sampler else."""
    sampler: Any = loader.sampler
    dataset: Any = loader.dataset
    if type(sampler) is SequentialSampler and sampler.data_source is dataset:
        return {}
    if (type(sampler) is RandomSampler and sampler.data_source is dataset
            and not sampler.replacement and sampler._num_samples is None):
        return {"shuffle": True}
    return {"sampler": sampler}


def loss_of(out: Any, where: str) -> torch.Tensor:
    """The loss a step returned: a tensor, ``out["loss"]``, or ``out.loss``."""
    loss = out
    if isinstance(out, Mapping):
        loss = out.get("loss")
    elif not isinstance(out, torch.Tensor):
        loss = getattr(out, "loss", out)
    if isinstance(loss, torch.Tensor):
        return loss
    got = type(out).__name__
    if loss is not None and loss is not out:
        got = f"a {got} whose loss is a {type(loss).__name__}"
    hint = (" (a number such as loss.item() has no graph to backpropagate)"
            if isinstance(loss, (int, float)) else "")
    raise DatasetError(f"{where} returned no loss tensor (got {got}); backward() needs a "
                       f"tensor{hint}: return the loss tensor itself, or a dict or object with "
                       "a 'loss' tensor.")


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (read from its class's MRO, so
    that a program without transformers never imports it)."""
    return any(klass.__name__ == "PreTrainedModel"
               and klass.__module__.split(".")[0] == "transformers"
               for klass in type(model).__mro__)


def lightning_step(model: nn.Module) -> Callable[[nn.Module, Any], torch.Tensor] | None:
    """The model's own ``training_step(batch, batch_idx)`` as autoload's step, when it is a
    LightningModule (``self.log`` outside a Trainer only warns, and is silenced here)."""
    if not (callable(getattr(model, "training_step", None))
            and callable(getattr(model, "configure_optimizers", None))):
        return None

    def step(net: nn.Module, batch: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
            out = net.training_step(batch, 0)  # type: ignore[operator]
        return loss_of(out, f"{type(net).__name__}.training_step")

    return step


def lightning_optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    """The first optimizer a LightningModule's ``configure_optimizers()`` returns."""
    configure = getattr(model, "configure_optimizers", None)
    if not callable(configure):
        return None
    found: Any = configure()
    while not isinstance(found, torch.optim.Optimizer):
        if isinstance(found, Mapping):
            found = found.get("optimizer")
        elif isinstance(found, (list, tuple)) and found:
            found = found[0]
        else:
            return None
    return found
