"""docs/configuration.md is exactly what ``kservice config reference --builtin`` prints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.cli.helpers import cli_env, run_cli

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
    # The example names myapp.kv:KV and myapp.text:Text: `config check` looks for them on the path.
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kv.py").write_text("class KV:\n    pass\n")
    (package / "text.py").write_text("class Text:\n    pass\n")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    for index, block in enumerate(blocks):
        path = tmp_path / f"block{index}.yaml"
        path.write_text(block)
        result = run_cli("config", "check", str(path), env=env)
        assert result.returncode == 0, (block, result)
