"""The supported Python versions are declared once and checked against: packaging, linting and typing agree."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_oldest_supported_python_is_the_one_linted_and_type_checked() -> None:
    project = _pyproject()
    match = re.fullmatch(r">=\s*3\.(\d+)", project["project"]["requires-python"])
    assert match, project["project"]["requires-python"]
    oldest = int(match.group(1))
    # The code uses 3.11 APIs (BaseException.add_note, tomllib, python -P semantics): 3.10 is not supported.
    assert oldest >= 11
    assert project["tool"]["ruff"]["target-version"] == f"py3{oldest}"
    assert project["tool"]["mypy"]["python_version"] == f"3.{oldest}"
    assert sys.version_info >= (3, oldest)


def test_the_docs_name_the_same_oldest_python() -> None:
    oldest = re.fullmatch(r">=\s*(3\.\d+)", _pyproject()["project"]["requires-python"]).group(1)  # type: ignore[union-attr]
    for page in ("README.md", "docs/quickstart.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        named = set(re.findall(r"Python (3\.\d+)", text))
        assert named == {oldest}, (page, named)
