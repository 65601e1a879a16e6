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


@dataclass
class TrainingState:
    """Parameters, grads, all buffers (persistent or not), training modes, optimizer state and
    RNG states, copied so that :meth:`restore` puts them back exactly.

    Example:
        >>> net = nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> saved = TrainingState.capture(net, opt)
        >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> saved.restore()
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]]
    buffers: list[tuple[nn.Module, str, torch.Tensor | None]]
    modes: list[tuple[nn.Module, bool]]
    optimizer_state: dict[str, Any] | None
    rng: tuple[Any, ...]

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainingState:
        with torch.no_grad():
            params = [
                (p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                for p in model.parameters()
            ]
            buffers: list[tuple[nn.Module, str, torch.Tensor | None]] = [
                (module, name, None if buf is None else buf.detach().clone())
                for module in model.modules()
                for name, buf in module.named_buffers(recurse=False)
            ]
        modes = [(module, module.training) for module in model.modules()]
        opt_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
        rng = (torch.get_rng_state(), cuda_rng, np.random.get_state(), random.getstate())
        return cls(model, optimizer, params, buffers, modes, opt_state, rng)

    def restore(self) -> None:
        with torch.no_grad():
            for param, data, grad in self.params:
                param.copy_(data)
                if grad is None:
                    param.grad = None
                elif param.grad is None or param.grad.shape != grad.shape:
                    param.grad = grad.clone()
                else:
                    param.grad.copy_(grad)
            for module, name, saved in self.buffers:
                current = getattr(module, name, None)
                if saved is not None and current is not None and current.shape == saved.shape \
                        and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:
                    setattr(module, name, saved)
        for module, training in self.modes:
            module.training = training
        if self.optimizer is not None and self.optimizer_state is not None:
            # load_state_dict may keep the given tensors: hand it a copy, keep ours intact.
            self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        cpu_rng, cuda_rng, np_rng, py_rng = self.rng
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
