"""docs/configuration.md is exactly what ``kservice config reference --builtin`` prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli.helpers import run_cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.mark.timeout(60)
def test_configuration_reference_is_generated_from_the_schema() -> None:
    result = run_cli("config", "reference", "--builtin")
    assert result.returncode == 0, result
    assert result.stdout == DOC.read_text(encoding="utf-8"), (
        "docs/configuration.md is out of date: regenerate it with "
        "`kservice config reference --builtin > docs/configuration.md`"
    )


@pytest.mark.timeout(60)
def test_the_yaml_blocks_of_the_reference_are_valid_configs(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        path = tmp_path / f"block{index}.yaml"
        path.write_text(block)
        result = run_cli("config", "check", str(path))
        assert result.returncode == 0, (block, result)
