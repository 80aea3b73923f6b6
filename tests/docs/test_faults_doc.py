"""docs/faults.md stays true: every test a row names exists, and every table row names one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "docs" / "faults.md"
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _rows() -> list[str]:
    """The fault rows of every table (the header, the rule and the 'May have run' legend left out)."""
    rows = []
    for line in FAULTS.read_text().splitlines():
        if (
            line.startswith("| ")
            and not line.startswith(("| fault ", "| value ", "|---"))
            and "`False`" not in line[:12]
        ):
            if not line.startswith(("| `True`", "| absent")):
                rows.append(line)
    return rows


def test_every_test_the_fault_model_names_exists() -> None:
    references = TEST_REFERENCE.findall(FAULTS.read_text())
    assert len(references) > 30
    missing = [f"{path}::{name}" for path, name in references if name not in _test_functions(ROOT / path)]
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"


def test_every_fault_row_names_a_test() -> None:
    rows = _rows()
    assert len(rows) > 30
    untested = [row[:80] for row in rows if not TEST_REFERENCE.search(row)]
    assert not untested, f"fault rows without a test: {untested}"
