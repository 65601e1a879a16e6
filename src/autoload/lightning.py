"""``LoaderTuner``: a Lightning callback that tunes the training loader when ``Trainer.fit``
starts, in the manner of Lightning's ``BatchSizeFinder``.

Importing this module imports Lightning (the ``lightning`` package); ``import autoload`` does
not import this module.

Lightning has no public way to hand the fit loop another training loader, so the callback does
what ``BatchSizeFinder`` does, through two attributes of the fit loop: it asks the loop's data
source for the loader (``train_dataloader()`` of the module or data module, or the loader given
to ``fit``), tunes it, and points the source at the tuned loader for the one request the loop
makes next (``setup_data``, right after ``on_fit_start``), dropping a combined loader another
callback may have set up already; the source is given back at ``on_train_start``. Lightning
then processes the tuned loader as it would the user's (limits, the length of an epoch,
validation intervals). Only the tuned loader's workers ever start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.data
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from autoload.config import AmpDtype
from autoload.errors import ConfigError
from autoload.loader import DataLoader
from autoload.probe import Probe, StepFn
from autoload.report import report_text
from autoload.result import TuneResult
from autoload.sources import lightning_step, resolve
from autoload.space import AmpChoice
from autoload.tuner import best_loader, tune

__all__ = ["LoaderTuner"]

# Lightning's precision flags and the autocast they train under.
_AUTOCAST: dict[str, AmpDtype] = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
_PRECISION: dict[AmpDtype, Any] = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}


class LoaderTuner(Callback):
    """Tunes the training DataLoader at the start of ``Trainer.fit`` and trains on the tuned one.

    The loader is measured with the LightningModule's own ``training_step`` and the Trainer's
    optimizer, through :func:`autoload.tune` with the data set and every argument of the
    user's loader that autoload does not tune (sampler, ``shuffle``, ``collate_fn``, ...). The
    model, the optimizer and the RNGs are restored bit for bit before training starts.

    What may change is the caller's choice. By default only the loading changes (workers,
    ``prefetch_factor``, ``pin_memory`` on CUDA, persistent workers): the batch size stays the
    loader's and the steps are measured at the Trainer's ``precision``, so training follows the
    same path it would without the callback, faster. ``batch_size=True`` searches the batch
    size too (see the report's advice on the learning rate); ``amp=True`` searches autocast
    when the Trainer trains in full precision (``precision="32-true"``) and switches the
    Trainer to ``"bf16-mixed"`` (or ``"16-mixed"`` on CUDA) when it wins.

    Only the training loader is replaced, once: validation loaders are left alone, and with
    ``reload_dataloaders_every_n_epochs`` the epochs after a reload train on the loader
    ``train_dataloader()`` returns. The tuning runs in one process: a Trainer of several
    processes is refused (tune on one device and pass ``result.loader_kwargs`` to your loader).

    Args:
        timeout: The tuning's budget in seconds.
        memory_cap: Host memory the training process and its workers may use (bytes or e.g.
            ``"8GiB"``); default: what they use now plus 80% of what is available.
        batch_size: Search the batch size (between ``min_batch_size`` and
            ``max_batch_size``) instead of keeping the loader's.
        min_batch_size: Smallest batch size searched, with ``batch_size=True``.
        max_batch_size: Largest batch size searched, with ``batch_size=True``.
        amp: Search autocast under a full-precision Trainer, and train with it if it wins.
        max_workers: Largest worker count searched (default: the usable CPUs).
        cache: Use and keep remembered results (see :func:`autoload.tune`).
        cache_dir: The folder results are remembered in.
        online: Do not tune at fit start: train on ``autoload.DataLoader(...,
            num_workers="auto", prefetch_factor="auto")``, which tunes its workers while the
            training runs (autoload's online mode); the batch size stays the loader's.
        verbose: Write the report through Lightning's rank-zero log (``rank_zero_info``).
        probe: Measures configurations (as :func:`autoload.tune`'s; for tests).
        clock: The tuning's clock (as :func:`autoload.tune`'s; for tests).

    Attributes:
        result: The :class:`~autoload.TuneResult` of the last fit (``None`` before one, or
            with ``online=True``).

    Example:
        >>> import lightning as L
        >>> from autoload.lightning import LoaderTuner
        >>> trainer = L.Trainer(callbacks=[LoaderTuner(timeout=30)], max_epochs=1,
        ...                     logger=False, enable_progress_bar=False)
    """

    def __init__(self, *, timeout: float = 60.0, memory_cap: int | str | None = None,
                 batch_size: bool = False, min_batch_size: int = 8, max_batch_size: int = 1024,
                 amp: bool = False, max_workers: int | None = None, cache: bool = True,
                 cache_dir: str | os.PathLike[str] | None = None, online: bool = False,
                 verbose: bool = True, probe: Probe | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if online and (batch_size or amp):
            raise ConfigError(
                "online=True keeps the loader's batch size and the Trainer's precision, so it "
                f"cannot be combined with ({batch_size=}, {amp=}); drop one of them.")
        self.timeout, self.memory_cap, self.max_workers = timeout, memory_cap, max_workers
        self.batch_size, self.min_batch_size = batch_size, min_batch_size
        self.max_batch_size, self.amp = max_batch_size, amp
        self.cache, self.cache_dir, self.online, self.verbose = cache, cache_dir, online, verbose
        self.probe, self.clock = probe, clock
        self.result: TuneResult | None = None
        self._given_back: Callable[[], None] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.limit_train_batches == 0:
            return  # no training: Lightning never asks for the loader
        _check_trainer(trainer, pl_module)
        source = trainer.fit_loop._data_source
        loader = source.dataloader()
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ConfigError(
                f"LoaderTuner tunes one training DataLoader, but the training data is a "
                f"{type(loader).__name__}; return one DataLoader from train_dataloader(), or "
                "tune each loader with autoload.tune() and build them with result.loader_kwargs.")
        if getattr(trainer, "reload_dataloaders_every_n_epochs", 0):
            rank_zero_warn("LoaderTuner tunes the first training loader only: with "
                           "reload_dataloaders_every_n_epochs, the epochs after a reload train "
                           "on the loader train_dataloader() returns.")
        tuned = self._online(loader) if self.online else self._tuned(trainer, pl_module, loader)
        original = source.instance
        source.instance = tuned

        def give_back() -> None:
            source.instance = original

        self._given_back = give_back
        trainer.fit_loop._combined_loader = None  # one set up before this callback is stale

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._give_back()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        self._give_back()

    def _give_back(self) -> None:
        """Point the fit loop's data source at what it was (the module, data module or loader
        the fit was given): the tuned loader was for one request."""
        if self._given_back is not None:
            self._given_back()
            self._given_back = None

    def _tuned(self, trainer: Trainer, pl_module: LightningModule,
               loader: torch.utils.data.DataLoader[Any]) -> DataLoader[Any]:
        precision = str(trainer.precision)
        searched = self.amp and precision == "32-true"
        amp: AmpChoice = "auto" if searched else _AUTOCAST.get(precision, "off")
        step = _step(pl_module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        with _logging_silenced(pl_module):
            result = tune(loader, model=pl_module, step=step, optimizer=optimizer,
                          device=pl_module.device, timeout=self.timeout,
                          memory_cap=self.memory_cap, keep_batch_size=not self.batch_size,
                          min_batch_size=self.min_batch_size,
                          max_batch_size=self.max_batch_size, amp=amp,
                          max_workers=self.max_workers, cache=self.cache,
                          cache_dir=self.cache_dir, probe=self.probe, clock=self.clock)
        self.result = result
        if searched and result.amp is not None:
            trainer.strategy.precision_plugin = MixedPrecision(
                _PRECISION[result.amp], device=pl_module.device.type)
        if self.verbose:
            switched = (f"; precision {precision} -> {trainer.precision}"
                        if str(trainer.precision) != precision else "")
            rank_zero_info(f"LoaderTuner: training on autoload.DataLoader with "
                           f"{result.config.label()}{switched}\n{report_text(result)}")
        return best_loader(loader, result=result)

    def _online(self, loader: torch.utils.data.DataLoader[Any]) -> DataLoader[Any]:
        """The user's loader as autoload's online loader, which tunes its own workers."""
        source = resolve(loader)
        arguments: dict[str, Any] = {**source.loader_options, "batch_size": source.batch_size,
                                     "drop_last": bool(source.drop_last),
                                     "pin_memory": loader.pin_memory,
                                     "num_workers": "auto", "prefetch_factor": "auto"}
        if self.verbose:
            rank_zero_info("LoaderTuner: training on autoload.DataLoader(num_workers='auto', "
                           "prefetch_factor='auto'), which tunes its workers as it trains")
        return DataLoader(source.dataset, **arguments)


def _check_trainer(trainer: Trainer, pl_module: LightningModule) -> None:
    if trainer.world_size > 1:
        raise ConfigError(
            f"LoaderTuner tunes the loader in one process, but this Trainer runs "
            f"{trainer.world_size} (world_size={trainer.world_size}); tune on one device "
            "(Trainer(devices=1) with the callback, or autoload.tune) and build your loader "
            "with result.loader_kwargs.")
    if not pl_module.automatic_optimization:
        raise ConfigError(
            f"LoaderTuner measures {type(pl_module).__name__}.training_step as a loss to "
            "backpropagate, but it uses manual optimization (automatic_optimization=False); "
            "tune with autoload.tune(loader, model=..., step=...) and a step of your own.")


def _step(pl_module: LightningModule) -> StepFn:
    """The module's ``training_step`` on a batch the probe moved to the device, after the
    module's ``on_after_batch_transfer`` (where some modules augment on the GPU), as the Trainer
    calls them."""
    inner = lightning_step(pl_module)
    if inner is None:  # a LightningModule always has both methods; this keeps mypy honest
        raise ConfigError(f"{type(pl_module).__name__} has no training_step to measure.")
    training_step = inner

    def step(net: torch.nn.Module, batch: Any) -> torch.Tensor:
        return training_step(net, pl_module.on_after_batch_transfer(batch, 0))

    return step


@contextmanager
def _logging_silenced(pl_module: LightningModule) -> Iterator[None]:
    """``self.log`` in ``training_step`` is an error in ``on_fit_start``, and the tuning's
    steps are not training to report: the module's ``log`` and ``log_dict`` do nothing while
    it runs, and are its class's again after."""
    def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    had = {name: name in vars(pl_module) for name in ("log", "log_dict")}
    saved = {name: vars(pl_module)[name] for name, present in had.items() if present}
    for name in had:
        object.__setattr__(pl_module, name, quiet)
    try:
        yield
    finally:
        for name in had:
            if name in saved:
                object.__setattr__(pl_module, name, saved[name])
            else:
                object.__delattr__(pl_module, name)
