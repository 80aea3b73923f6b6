"""Fixtures of the dashboard tests: a service hosted by ``kservice serve`` and a running ``kservice dashboard``."""

from __future__ import annotations

import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.cli.helpers import KSERVICE, cli_env


@dataclass
class Running:
    """A ``kservice`` subprocess and the first line it printed."""

    process: subprocess.Popen[str]
    first_line: str


def start(*args: str, expect: str) -> Running:
    """Start ``kservice ARGS`` and wait for its first stdout line, which must start with ``expect``."""
    process = subprocess.Popen(
        [KSERVICE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(expect):
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"kservice {' '.join(args)} did not start: {line!r} {err}")
    return Running(process, line)


def stop(running: Running, timeout: float = 20) -> tuple[str, str]:
    """SIGINT, wait, and return the rest of (stdout, stderr); kills it when it does not stop in time."""
    process = running.process
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"kservice did not stop within {timeout}s after SIGINT: {err}")
    return out, err


@pytest.fixture
def served() -> Iterator[tuple[str, Running]]:
    """A KV service (tests/cli/sample_services.py) hosted by ``kservice serve`` under a unique name."""
    name = f"dash-kv-{uuid.uuid4().hex[:8]}"
    running = start("serve", f"{name}=sample_services:KV", expect="serving")
    try:
        yield name, running
    finally:
        stop(running)
        assert running.process.returncode == 0


@pytest.fixture
def dashboard() -> Iterator[tuple[str, Running]]:
    """``kservice dashboard`` on a free loopback port, sampling twice a second; yields (base URL, process)."""
    running = start("dashboard", "--port", "0", "--interval", "0.5", expect="kservice dashboard at ")
    found = re.search(r"(http://\S+/)", running.first_line)
    assert found, running.first_line
    try:
        yield found.group(1), running
    finally:
        out, err = stop(running)
        assert running.process.returncode == 0, err
        assert "kservice dashboard stopped" in out
        assert "Traceback" not in err, err
