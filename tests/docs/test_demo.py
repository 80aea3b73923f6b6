"""``python -m kservice.demo`` (the README's first command, ``make demo``) runs the whole tour cleanly."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.cli.helpers import cli_env, marked_processes
from tests.conftest import REGISTRY_DIR, SHM_DIR


def _segments_naming(pid: int) -> list[str]:
    """Files of ``pid`` in the session's directories (which the demo inherits through cli_env)."""
    found = []
    for directory in (SHM_DIR, REGISTRY_DIR):
        if directory.is_dir():
            found += [p.name for p in directory.iterdir() if f".{pid}." in p.name or f"-{pid}-" in p.name]
    return found


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_demo_exits_0_and_leaves_nothing_behind(ray_cluster: Any) -> None:
    mark = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, "-m", "kservice.demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # The session's Ray: the suite starts Ray once.
        env=cli_env(KSERVICE_TEST_MARK=mark, RAY_ADDRESS=ray_cluster.address),
    )
    out, err = process.communicate(timeout=140)
    assert process.returncode == 0, out + err
    # Each step of the tour really happened.
    assert "text.where()" in out and "tenant 'acme'" in out
    assert "500 ok" in out
    assert "model.complete(...) (async def)" in out
    for name in ("model", "text", "text-ray"):
        assert f"{name}.generate(...)" in out  # streamed in-process, over mmap and on Ray
    assert "stops the generator in the service: True" in out
    assert "calls during the kill:" in out and " 0 failed" in out
    assert "replicas healthy again: 2/2" in out
    assert "child processes left: 0; shared-memory segments left: 0" in out
    assert "every step behaved as described" in out
    # Checked from outside too: the demo's children (the process host, Ray's daemons) are gone.
    assert marked_processes(mark) == []
    assert _segments_naming(process.pid) == []
