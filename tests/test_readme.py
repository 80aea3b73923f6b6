"""The README's tour runs as written (the Ray part runs in tests/ray/test_readme_ray.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.readme_blocks import block_containing, serve_command, write_kvstore

VENV_BIN = Path(sys.executable).parent


def _run(code: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = clean_environ()
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("marker", ['manager.proxy("kv")', 'kind="process"', "class Audit", "class Model"])
def test_readme_python_block_runs(marker: str, tmp_path: Path) -> None:
    write_kvstore(tmp_path)
    result = _run(block_containing(marker), tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(120)
def test_readme_serve_then_call_from_another_process(tmp_path: Path) -> None:
    write_kvstore(tmp_path)
    env = clean_environ()
    host = subprocess.Popen(
        [str(VENV_BIN / "kservice"), *serve_command()[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith("serving kv"), line + (
            host.stderr.read() if host.poll() is not None and host.stderr else ""
        )
        result = _run(block_containing("with ServiceManager() as manager"), tmp_path)
        assert result.returncode == 0, result.stderr
        listing = subprocess.run(
            [str(VENV_BIN / "kservice"), "services", "--running"], capture_output=True, text=True, timeout=60
        )
        rows = [line.split() for line in listing.stdout.splitlines()]
        assert rows[0][:3] == ["name", "state", "transport"], listing.stdout
        assert ["kv", "running", "mmap"] in [row[:3] for row in rows], listing.stdout
    finally:
        host.send_signal(signal.SIGINT)
        try:
            assert host.wait(timeout=30) == 0
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
            for stream in (host.stdout, host.stderr):
                if stream is not None:
                    stream.close()
