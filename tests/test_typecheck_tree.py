"""scripts/typecheck.py lays out for mypy exactly the package that Python imports.

mypy cannot follow pyproject.toml's package-dir mapping, so the strict type check
runs on a tree of symlinks; these tests keep that tree true to the installed
package (every module at the name it is imported by) as files come and go.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _typecheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kservice_typecheck_script", ROOT / "scripts" / "typecheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _modules(tree: Path) -> dict[str, Path]:
    """Dotted module name -> the real source file, for every module under ``tree``."""
    found: dict[str, Path] = {}
    for directory, _dirs, files in os.walk(tree, followlinks=True):
        for name in files:
            if name.endswith(".py"):
                parts = Path(directory, name).relative_to(tree).with_suffix("").parts
                dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                found[dotted] = Path(directory, name).resolve()
    return found


def test_every_module_of_the_tree_is_the_file_python_imports_under_that_name(tmp_path: Path) -> None:
    typecheck = _typecheck()
    typecheck.build_tree(*typecheck.wanted_links(typecheck.package_dirs(), tmp_path))
    modules = _modules(tmp_path)
    # all three source directories are in, under the names pyproject.toml gives them
    assert {"kservice", "kservice.plugins", "kservice.middleware", "kservice.plugins.mmap.ring"} <= modules.keys()
    assert not any(name.startswith(("core", "plugins", "middleware")) for name in modules)
    for name, source in modules.items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert Path(spec.origin).resolve() == source, name


def test_the_tree_follows_files_added_and_removed(tmp_path: Path) -> None:
    typecheck = _typecheck()
    source, sub = tmp_path / "src", tmp_path / "sub"
    for directory in (source, sub):
        directory.mkdir()
        (directory / "__init__.py").write_text("")
    (source / "old.py").write_text("")
    mapping = {"pkg": source, "pkg.sub": sub}
    tree = tmp_path / "tree"
    typecheck.build_tree(*typecheck.wanted_links(mapping, tree))
    assert _modules(tree).keys() == {"pkg", "pkg.old", "pkg.sub"}

    (source / "old.py").unlink()
    (source / "new.py").write_text("")
    (sub / "inner.py").write_text("")
    typecheck.build_tree(*typecheck.wanted_links(mapping, tree))
    assert _modules(tree).keys() == {"pkg", "pkg.new", "pkg.sub", "pkg.sub.inner"}
    assert not (tree / "pkg" / "old.py").is_symlink()


def test_a_module_hiding_a_mapped_subpackage_is_refused_by_name(tmp_path: Path) -> None:
    typecheck = _typecheck()
    source, sub = tmp_path / "src", tmp_path / "sub"
    source.mkdir()
    sub.mkdir()
    (source / "sub.py").write_text("")
    with pytest.raises(SystemExit, match=r"sub\.py hides the mapped package pkg\.sub"):
        typecheck.wanted_links({"pkg": source, "pkg.sub": sub}, tmp_path / "tree")
