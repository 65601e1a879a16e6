"""Remembered answers: a finished run's result, found again by what changes the answer.

The key covers the machine (CPU model and usable count, GPU, memory), the versions of torch and
autoload, the data set (type, length, the shapes, dtypes and bytes of a few sampled items), the
model (class, parameter shapes), the step or loss, the optimizer's class, the fixed loader
options and the search's bounds; nothing else (the budget, the seed and the progress callback
do not change what is fastest). Each entry is the JSON that ``autoload show`` reads, with the
key's parts and the time it was stored beside it, in one folder: the one given
(``tune(cache_dir=...)``, ``--cache-dir``), else ``$AUTOLOAD_CACHE_DIR``, else the platform's
cache folder (``$XDG_CACHE_HOME/autoload`` on Linux). The folder may be shared (a cluster's
file system, so that the nodes of one kind tune once): each write goes to a temporary file of
its own in the folder and is renamed over the entry, so two processes that finish together
leave one whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import psutil
import torch

from autoload.errors import ResultFileError
from autoload.result import TuneResult, write_atomically
from autoload.space import usable_cpus

__all__ = ["ENV", "CacheWarning", "cache_dir", "clear", "entries", "find", "fingerprint", "load",
           "read", "store", "write"]

ENV = "AUTOLOAD_CACHE_DIR"
Folder = str | os.PathLike[str] | None

class CacheWarning(UserWarning):
    """A cache file that could not be read was ignored."""


def cache_dir(folder: Folder = None) -> Path:
    """Where results are remembered: ``folder`` when given, else ``$AUTOLOAD_CACHE_DIR`` when
    set, else the platform's user cache folder for autoload.

    Example:
        >>> cache_dir("/shared/autoload")
        PosixPath('/shared/autoload')
    """
    if folder is not None and str(folder):
        return Path(folder).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
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


def _path(digest: str, folder: Folder = None) -> Path:
    return cache_dir(folder) / f"{digest[:32]}.json"


def read(parts: Mapping[str, Any], folder: Folder = None) -> tuple[Path, dict[str, Any]] | None:
    """The remembered JSON for ``parts`` and its path, or ``None``. A file that cannot be read,
    or that belongs to another key, is ignored with a :class:`CacheWarning`, never an error."""
    path = _path(key(parts), folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or (data.get("cache") or {}).get("key") != key(parts):
            raise ResultFileError("it belongs to another key")
    except (OSError, ValueError, ResultFileError) as exc:
        warnings.warn(f"ignored the cache file {path}: {exc}", CacheWarning, stacklevel=3)
        return None
    return path, data


def write(parts: Mapping[str, Any], data: Mapping[str, Any], folder: Folder = None
          ) -> Path | None:
    """Remember the JSON ``data`` under ``parts`` (atomically: processes that store the same key
    at once, on one machine or several sharing the folder, leave one whole file); ``None``
    when the folder is not writable (a cache is a convenience: the run has its answer either
    way)."""
    path = _path(key(parts), folder)
    entry = dict(data)
    entry["cache"] = {"key": key(parts), "fingerprint": dict(parts),
                      "stored": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(entry, indent=2, default=str))
    except OSError as exc:
        warnings.warn(f"could not write the cache file {path}: {exc}", CacheWarning,
                      stacklevel=3)
        return None
    return path


def load(parts: Mapping[str, Any], folder: Folder = None) -> TuneResult | None:
    """The remembered result for ``parts``, or ``None``. A file that is not an autoload result
    for this key is ignored with a :class:`CacheWarning`, never an error."""
    found = read(parts, folder)
    if found is None:
        return None
    path, data = found
    try:
        result = TuneResult.from_json(json.dumps(data))
    except ResultFileError as exc:
        warnings.warn(f"ignored the cache file {path}: {exc}", CacheWarning, stacklevel=2)
        return None
    return replace(result, cached=str(path))


def store(parts: Mapping[str, Any], result: TuneResult, folder: Folder = None) -> Path | None:
    """Remember ``result`` under ``parts`` (see :func:`write`)."""
    return write(parts, json.loads(result.to_json()), folder)


def entries(folder: Folder = None) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every cache file, with its JSON (``None`` for one that cannot be read); an entry
    written before autoload recorded ``cache.stored`` gets the file's time instead."""
    found: list[tuple[Path, dict[str, Any] | None]] = []
    for path in sorted(cache_dir(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("cache"), dict):
                data["cache"].setdefault("stored", datetime.fromtimestamp(
                    path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"))
            found.append((path, data))
        except (OSError, ValueError):
            found.append((path, None))
    return found


def find(prefix: str, folder: Folder = None) -> Path:
    """The cache file whose key starts with ``prefix`` (the id ``autoload cache list``
    prints, or more or fewer of the key's hex digits).

    Raises:
        ResultFileError: No entry's key starts with ``prefix``, or more than one does.
    """
    wanted = prefix.strip().lower()
    where = cache_dir(folder)
    if not wanted or any(c not in string.hexdigits for c in wanted):
        raise ResultFileError(f"{prefix!r} is neither a result file nor a cache id (hex digits, "
                              "as `autoload cache list` prints them).")
    found = [path for path in sorted(where.glob("*.json")) if _key_starts(path, wanted)]
    if not found:
        raise ResultFileError(f"no cached result's id starts with {wanted!r} in {str(where)!r}; "
                              "`autoload cache list` shows the ids (--cache-dir picks another "
                              "folder).")
    if len(found) > 1:
        raise ResultFileError(f"{len(found)} cached results' ids start with {wanted!r} in "
                              f"{str(where)!r}; give more of the id.")
    return found[0]


def _key_starts(path: Path, prefix: str) -> bool:
    if len(prefix) <= len(path.stem):
        return path.stem.startswith(prefix)
    try:  # longer than the file's name: the whole key is inside
        data = json.loads(path.read_text())
        return str((data.get("cache") or {}).get("key", "")).startswith(prefix)
    except (OSError, ValueError, AttributeError):
        return False


def clear(folder: Folder = None) -> int:
    """Delete every cache file; how many there were."""
    count = 0
    for path in cache_dir(folder).glob("*.json"):
        path.unlink(missing_ok=True)
        count += 1
    return count
