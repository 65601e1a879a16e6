"""Load ``MODULE:ATTR`` specs the way the CLI takes them."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from autoload.errors import SpecError

__all__ = ["import_from_string"]


def import_from_string(spec: str) -> Any:
    """The object ``spec`` names: ``module:attr``, ``pkg.module:obj.attr`` or ``path/file.py:attr``.

    A ``.py`` path is loaded under its own name in ``sys.modules`` with its folder on ``sys.path``,
    so worker processes started with ``spawn`` can unpickle what it defines. An ImportError raised
    inside the user's module is theirs and propagates untouched.

    Raises:
        SpecError: The spec has no colon, or the module or attribute does not exist.

    Example:
        >>> import_from_string("os.path:join").__name__
        'join'
    """
    module_str, sep, attrs = spec.rpartition(":")
    if not sep or not module_str or not attrs:
        raise SpecError(
            f"spec {spec!r} must be MODULE:ATTR, e.g. my_module:make_dataset or "
            "path/to/file.py:make_dataset."
        )
    module = _import_module(module_str)
    obj: Any = module
    for part in attrs.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(
                f"module {module_str!r} has no attribute {attrs!r}; check the name after the colon."
            ) from None
    return obj


def _import_module(module_str: str) -> Any:
    if module_str.endswith(".py") or os.sep in module_str:
        return _import_file(Path(module_str))
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:  # a console script does not put it there
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_str)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not (module_str == missing or module_str.startswith(f"{missing}.")):
            raise  # the user's module imports something missing: their error, not ours
        raise SpecError(
            f"no module named {module_str!r} in the current directory or on sys.path; run from "
            "its folder or give the path to its .py file."
        ) from None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise SpecError(f"file {str(path)!r} does not exist; check the path before the colon.")
    path = path.resolve()
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", None) or "").resolve() == path:
            return existing
        raise SpecError(
            f"{str(path)!r} would load as module {name!r}, which is already imported from "
            f"{getattr(existing, '__file__', None) or 'a built-in'}; rename the file."
        )
    added = str(path.parent) not in sys.path
    if added:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot load {str(path)!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        if added:
            sys.path.remove(str(path.parent))
        raise
    return module
