"""``autoload.importer.import_from_string``: spec errors, file specs, and the user's own errors."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autoload import SpecError
from autoload.importer import import_from_string

pytestmark = pytest.mark.usefixtures("restore_sys_path")

WriteModule = Callable[[str], tuple[str, Path]]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write a uniquely named module into tmp_path; undo every sys.path and sys.modules change.

    ``syspath_prepend`` makes monkeypatch restore the whole of ``sys.path`` afterwards, including
    the entries the importer inserts itself (the file's folder, the working directory).
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str) -> tuple[str, Path]:
        name = f"autoload_user_{uuid.uuid4().hex[:12]}"
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        names.append(name)
        return name, path

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_spec_without_colon_is_a_spec_error():
    with pytest.raises(SpecError, match=r"must be MODULE:ATTR"):
        import_from_string("os.path.join")


@pytest.mark.parametrize("spec", [":join", "os.path:"])
def test_spec_with_an_empty_side_is_a_spec_error(spec):
    with pytest.raises(SpecError, match=r"must be MODULE:ATTR"):
        import_from_string(spec)


def test_missing_module_is_a_spec_error_naming_it():
    with pytest.raises(SpecError, match=r"no module named 'no_such_module_autoload_xyz'"):
        import_from_string("no_such_module_autoload_xyz:thing")


def test_missing_submodule_of_a_missing_package_is_a_spec_error():
    with pytest.raises(SpecError, match=r"no module named 'no_such_pkg_autoload_xyz\.sub'"):
        import_from_string("no_such_pkg_autoload_xyz.sub:thing")


def test_missing_attribute_is_a_spec_error_naming_it():
    with pytest.raises(SpecError, match=r"module 'os\.path' has no attribute 'no_such_attr'"):
        import_from_string("os.path:no_such_attr")


def test_missing_file_is_a_spec_error(tmp_path):
    missing = tmp_path / "not_here.py"
    with pytest.raises(SpecError, match=r"does not exist"):
        import_from_string(f"{missing}:make")


def test_module_spec_loads_the_attribute():
    import os.path

    assert import_from_string("os.path:join") is os.path.join


def test_file_spec_loads_module_under_its_own_name_with_folder_on_sys_path(write_module):
    name, path = write_module(
        """
        VALUE = 42

        def make():
            return "made"
        """
    )
    sys.path.remove(str(path.parent))  # the importer must put the folder there itself
    make = import_from_string(f"{path}:make")
    assert make() == "made"
    module = sys.modules[name]
    assert module.__name__ == name
    assert make.__module__ == name  # picklable by reference, as spawn workers need
    assert Path(module.__file__).resolve() == path.resolve()
    assert str(path.parent.resolve()) in sys.path
    # a second load of the same file reuses the module instead of executing it again
    assert import_from_string(f"{path}:VALUE") == 42
    assert sys.modules[name] is module


def test_file_spec_clashing_with_an_imported_module_is_a_spec_error(tmp_path):
    import json  # noqa: F401  (make sure the clashing name is imported)

    clash = tmp_path / "json.py"
    clash.write_text("x = 1\n")
    with pytest.raises(SpecError, match=r"already imported"):
        import_from_string(f"{clash}:x")


def test_dotted_attribute(write_module):
    name, path = write_module(
        """
        class Holder:
            class Inner:
                value = "deep"

            @staticmethod
            def factory():
                return 7
        """
    )
    assert import_from_string(f"{path}:Holder.Inner.value") == "deep"
    assert import_from_string(f"{name}:Holder.factory")() == 7


def test_missing_dotted_attribute_is_a_spec_error(write_module):
    name, _ = write_module("class Holder:\n    pass\n")
    with pytest.raises(SpecError, match=r"has no attribute 'Holder\.missing'"):
        import_from_string(f"{name}:Holder.missing")


def test_import_error_inside_a_file_module_is_the_users_own(write_module):
    name, path = write_module("import does_not_exist_xyz  # noqa: F401\n")
    with pytest.raises(ModuleNotFoundError) as info:
        import_from_string(f"{path}:anything")
    assert not isinstance(info.value, SpecError)
    assert info.value.name == "does_not_exist_xyz"
    assert name not in sys.modules  # a failed load leaves no half-initialised module behind


def test_import_error_inside_a_named_module_is_the_users_own(write_module):
    name, _ = write_module("import does_not_exist_xyz  # noqa: F401\n")
    with pytest.raises(ModuleNotFoundError) as info:
        import_from_string(f"{name}:anything")
    assert not isinstance(info.value, SpecError)
    assert info.value.name == "does_not_exist_xyz"


def test_other_errors_inside_the_users_module_propagate(write_module):
    _, path = write_module("raise RuntimeError('broken at import')\n")
    with pytest.raises(RuntimeError, match="broken at import"):
        import_from_string(f"{path}:anything")
