"""Fixtures of the CLI tests: a service hosted by ``kservice serve`` for the whole module."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .helpers import KSERVICE, cli_env, stop_host


@dataclass
class Served:
    name: str
    process: subprocess.Popen[str]
    first_line: str


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A KV service hosted by ``kservice serve`` in a subprocess, under a name unique to this run."""
    name = f"cli-kv-{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen(
        [KSERVICE, "serve", f"{name}=sample_services:KV"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("serving"):
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"kservice serve did not start: {line!r} {err}")
    try:
        yield Served(name, process, line)
    finally:
        status = stop_host(process, timeout=20)
        assert status == 0, f"kservice serve exited with {status}"
