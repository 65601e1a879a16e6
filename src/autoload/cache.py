"""Remembered answers: a finished run's result, found again by what changes the answer.

The key covers the machine (CPU model and usable count, GPU, memory), the versions of torch and
autoload, the data set (type, length, the shapes, dtypes and bytes of a few sampled items), the
model (class, parameter shapes), the step or loss, the optimizer's class, the fixed loader
options and the search's bounds; nothing else (the budget, the seed and the progress callback
do not change what is fastest). Each entry is the JSON that ``autoload show`` reads, with the
key's parts beside it, in the platform's cache folder (``$XDG_CACHE_HOME/autoload`` on Linux).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import psutil
import torch

from autoload.errors import ResultFileError
from autoload.result import TuneResult
from autoload.space import usable_cpus

__all__ = ["CacheWarning", "cache_dir", "clear", "entries", "fingerprint", "load", "store"]

class CacheWarning(UserWarning):
    """A cache file that could not be read was ignored."""


def cache_dir() -> Path:
    """Where results are remembered: the platform's user cache folder for autoload."""
    return Path(platformdirs.user_cache_dir("autoload", appauthor=False))


def _name(obj: Any) -> str | None:
    if obj is None:
        return None
    target = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") \
        else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def _describe(value: Any, digest: Any) -> Any:
    """An item's structure (shapes, dtypes), feeding its content into ``digest``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes()[: 1 << 20])
        return ["tensor", list(tensor.shape), str(tensor.dtype)]
    if isinstance(value, Mapping):
        return {str(k): _describe(v, digest) for k, v in sorted(value.items(), key=str)}
    if isinstance(value, (list, tuple)):
        return [_describe(v, digest) for v in value]
    digest.update(repr(value).encode()[: 1 << 16])
    return type(value).__name__


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cpus": usable_cpus(), "gpu": gpu,
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30))}


def _data(dataset: Any) -> dict[str, Any]:
    """The data set's type, length, and a few items (first, middle, last): their structure and
    a hash of their content, read with the random generators seeded (an item that draws a
    random augmentation reads the same every time) and put back as they were."""
    digest = hashlib.sha256()
    try:
        n = len(dataset)
    except TypeError:
        n = None
    items = []
    if n and hasattr(dataset, "__getitem__"):
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            torch.manual_seed(0)
            np.random.seed(0)
            random.seed(0)
            items = [_describe(dataset[i], digest) for i in sorted({0, n // 2, n - 1})]
        except Exception as exc:  # the user's items raise: the trials will say so, not this
            items = [f"unreadable: {type(exc).__name__}"]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
    return {"type": _name(dataset), "length": n, "items": items, "content": digest.hexdigest()}


def _model(model: torch.nn.Module | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {"class": _name(model),
            "parameters": [[name, list(p.shape), str(p.dtype)]
                           for name, p in model.named_parameters()]}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    plain = (bool, int, float, str, type(None))
    return {k: v if isinstance(v, plain) else _name(v) for k, v in sorted(options.items())}


def fingerprint(*, dataset: Any, model: torch.nn.Module | None, step: Any, loss_fn: Any,
                optimizer: Any, device: str, loader_options: Mapping[str, Any],
                bounds: Mapping[str, Any], world: Mapping[str, Any] | None = None,
                ) -> dict[str, Any]:
    """Everything that changes the answer, as plain JSON."""
    from autoload import __version__

    return {
        "machine": _machine(), "torch": torch.__version__, "autoload": __version__,
        "device": device, "data": _data(dataset), "model": _model(model),
        "step": _name(step), "loss": _name(loss_fn), "optimizer": _name(optimizer),
        "loader_options": _options(loader_options),
        "bounds": {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                   for k, v in sorted(bounds.items())},
        "world": dict(world or {}),
    }


def key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _path(digest: str) -> Path:
    return cache_dir() / f"{digest[:32]}.json"


def load(parts: Mapping[str, Any]) -> TuneResult | None:
    """The remembered result for ``parts``, or ``None``. A file that is not an autoload result
    for this key is ignored with a :class:`CacheWarning`, never an error."""
    path = _path(key(parts))
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or (data.get("cache") or {}).get("key") != key(parts):
            raise ResultFileError("it belongs to another key")
        result = TuneResult.from_json(path.read_text())
    except (OSError, ValueError, ResultFileError) as exc:
        warnings.warn(f"ignored the cache file {path}: {exc}", CacheWarning, stacklevel=3)
        return None
    return replace(result, cached=str(path))


def store(parts: Mapping[str, Any], result: TuneResult) -> Path | None:
    """Remember ``result`` under ``parts`` (atomically); ``None`` when the folder is not
    writable (a cache is a convenience: the run has its result either way)."""
    path = _path(key(parts))
    data = json.loads(result.to_json())
    data["cache"] = {"key": key(parts), "fingerprint": dict(parts)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write the cache file {path}: {exc}", CacheWarning,
                      stacklevel=3)
        return None
    return path


def entries() -> list[tuple[Path, dict[str, Any] | None]]:
    """Every cache file, with its JSON (``None`` for one that cannot be read)."""
    found = []
    for path in sorted(cache_dir().glob("*.json")):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            found.append((path, None))
    return found


def clear() -> int:
    """Delete every cache file; how many there were."""
    count = 0
    for path in cache_dir().glob("*.json"):
        path.unlink(missing_ok=True)
        count += 1
    return count
