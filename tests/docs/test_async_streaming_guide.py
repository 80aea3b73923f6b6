"""docs/async-and-streaming.md: its examples run as written (the Ray one in tests/ray/test_ray_aio.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.test_guides import python_blocks, run_python

PAGE = "async-and-streaming.md"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_guide_block_runs(index: int, tmp_path: Path) -> None:
    blocks = python_blocks(PAGE)
    assert len(blocks) == 4
    result = run_python(blocks[index], tmp_path)
    assert result.returncode == 0, (blocks[index], result.stderr[-3000:])
    if index == 0:
        assert "cancelled at the deadline" in result.stdout
