"""Run ``mypy --strict`` over the whole ``kservice`` package: core, plugins and middleware.

Why a script: pyproject.toml maps the package onto three source directories
(``kservice`` <- ``core/``, ``kservice.plugins`` <- ``plugins/``,
``kservice.middleware`` <- ``middleware/``).  mypy resolves modules from
directories only; it cannot read setuptools' ``package-dir`` and does not run the
import hook an editable install puts on ``sys.path``, so ``import kservice`` from a
plugin is unresolvable to it.  This script lays the mapping out as a tree of
symlinks (``build/typecheck/kservice/...``, read from pyproject.toml on every run,
so new files and packages are picked up), points mypy at it (``mypy_path`` in
``[tool.mypy]``) and checks ``-p kservice``, printing each error under the path
of the source file it is in (``plugins/ray/task.py``, not the link).

Usage: ``python scripts/typecheck.py [extra mypy arguments]``; the exit status is
mypy's.  Needs only the dependencies installed (the dev extra), not kservice itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
SKIP = {"__pycache__"}


def package_dirs() -> dict[str, Path]:
    """The ``[tool.setuptools] package-dir`` mapping: dotted package name -> source directory."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {package: ROOT / source for package, source in mapping.items()}


def wanted_links(mapping: dict[str, Path], tree: Path = TREE) -> tuple[dict[Path, Path], set[Path]]:
    """Each link of the tree under ``tree`` and the source it points at, and the tree's real directories.

    A package with no mapped subpackage is one link to its source directory; a
    package with mapped subpackages becomes a real directory holding a link per
    entry of its source directory plus one per mapped subpackage.
    """
    links: dict[Path, Path] = {}
    directories: set[Path] = set()
    for package, source in mapping.items():
        place = tree.joinpath(*package.split("."))
        children = {name.rpartition(".")[2] for name in mapping if name.rpartition(".")[0] == package}
        if not children:
            links[place] = source
            continue
        directories.add(place)
        for entry in source.iterdir():
            if entry.name in children or (entry.suffix in (".py", ".pyi") and entry.stem in children):
                raise SystemExit(f"{entry} hides the mapped package {package}.{entry.stem}; rename one of them")
            if entry.name not in SKIP:
                links[place / entry.name] = entry
    return links, directories


def build_tree(links: dict[Path, Path], directories: set[Path]) -> None:
    """Make the tree hold exactly ``links``, replacing only what changed (safe to run concurrently)."""
    for link, source in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(source, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        temporary = link.with_name(f".{link.name}.{os.getpid()}")
        temporary.symlink_to(target)
        temporary.replace(link)
    # drop the links of files removed or renamed since the last run
    for directory in directories:
        for entry in directory.iterdir():
            if entry.is_symlink() and entry not in links and entry not in directories:
                entry.unlink()


def main(argv: list[str]) -> int:
    mapping = package_dirs()
    build_tree(*wanted_links(mapping))
    # longest prefix first, so kservice/plugins/ maps to plugins/ and not to core/plugins/
    prefixes = sorted(
        (
            (os.path.relpath(TREE.joinpath(*package.split(".")), ROOT) + os.sep, os.path.relpath(source, ROOT) + os.sep)
            for package, source in mapping.items()
        ),
        key=lambda pair: len(pair[0]),
        reverse=True,
    )
    command = [sys.executable, "-m", "mypy", "--strict", "-p", "kservice", *argv]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as mypy:
        assert mypy.stdout is not None
        for line in mypy.stdout:
            for link_prefix, source_prefix in prefixes:
                if line.startswith(link_prefix):
                    line = source_prefix + line[len(link_prefix) :]
                    break
            sys.stdout.write(line)
    return mypy.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
