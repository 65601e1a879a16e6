"""Snapshot and restore of everything a training window changes, bit for bit."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TrainingState"]

_Saved = tuple[Any, Any]  # (the original object, a copy of its value)
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _save(value: Any) -> _Saved:
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return value, copy.deepcopy(value)


def _put_back(original: Any, saved: Any) -> Any:
    """The original object holding the saved value again (a fresh copy if it cannot)."""
    if isinstance(original, torch.Tensor) and isinstance(saved, torch.Tensor):
        if original.shape == saved.shape and original.dtype == saved.dtype:
            with torch.no_grad():
                original.copy_(saved)
            return original
        return saved.clone()
    return copy.deepcopy(saved)


def _autocast_modes() -> list[tuple[str, bool, torch.dtype]]:
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4 has no per-device calls
        return []
    return [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in _AUTOCAST_DEVICES]


@dataclass(kw_only=True)
class TrainingState:
    """Parameters, grads, all buffers (persistent or not), training modes, optimizer state and
    hyperparameters, RNG states, and whether autograd and autocast are on, saved so that
    :meth:`restore` puts them back exactly.

    Autograd and autocast are the thread's, not the model's, but a window can leave them
    changed: a time limit's signal raised between two lines of a ``finally`` that turns
    autograd back on (the optimizer's step runs with it off) leaves it off, and every later
    step fails ("element 0 of tensors does not require grad").

    Restoring writes into the original tensor objects, so references the user holds (to a
    grad, a momentum buffer, a BatchNorm statistic) see the old values again too.

    Example:
        >>> net = nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> saved = TrainingState.capture(net, opt)
        >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> saved.restore()
    """

    params: list[tuple[nn.Parameter, torch.Tensor, _Saved | None]]
    buffers: list[tuple[nn.Module, str, _Saved]]
    modes: list[tuple[nn.Module, bool]]
    optimizer: torch.optim.Optimizer | None
    optimizer_state: dict[Any, dict[str, _Saved]]
    optimizer_groups: list[dict[str, Any]]
    rng: tuple[Any, ...]
    grad_enabled: bool
    autocast: list[tuple[str, bool, torch.dtype]]

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainingState:
        params = [(p, p.detach().clone(), None if p.grad is None else _save(p.grad))
                  for p in model.parameters()]
        buffers = [(module, name, _save(buf))
                   for module in model.modules()
                   for name, buf in module.named_buffers(recurse=False)]
        modes = [(module, module.training) for module in model.modules()]
        opt_state: dict[Any, dict[str, _Saved]] = {}
        groups: list[dict[str, Any]] = []
        if optimizer is not None:
            opt_state = {p: {k: _save(v) for k, v in s.items()} for p, s in optimizer.state.items()}
            groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                      for g in optimizer.param_groups]
        cuda_rng = (torch.cuda.get_rng_state_all()
                    if torch.cuda.is_initialized() else None)  # type: ignore[no-untyped-call]
        rng = (torch.get_rng_state(), cuda_rng, np.random.get_state(), random.getstate())
        return cls(params=params, buffers=buffers, modes=modes, optimizer=optimizer,
                   optimizer_state=opt_state, optimizer_groups=groups, rng=rng,
                   grad_enabled=torch.is_grad_enabled(), autocast=_autocast_modes())

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad_enabled)
        for device, enabled, dtype in self.autocast:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        with torch.no_grad():
            for param, data, grad in self.params:
                param.copy_(data)
                param.grad = None if grad is None else _put_back(*grad)
        for module, name, (original, saved) in self.buffers:
            value = _put_back(original, saved)
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
        for module, training in self.modes:
            module.training = training
        if self.optimizer is not None:
            self.optimizer.state.clear()
            for param, entries in self.optimizer_state.items():
                self.optimizer.state[param] = {k: _put_back(*saved) for k, saved in entries.items()}
            groups = zip(self.optimizer.param_groups, self.optimizer_groups, strict=True)
            for group, saved_group in groups:
                group.update(copy.deepcopy(saved_group))
        cpu_rng, cuda_rng, np_rng, py_rng = self.rng
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
