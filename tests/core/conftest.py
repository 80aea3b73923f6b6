"""Fixtures for the core tests: environments with real tasks, and real distributions on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import kservice
import pytest

from tests.conftest import clean_environ
from tests.core.services import KeyValue

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env() -> Iterator[kservice.ServiceEnvironment]:
    environment = kservice.ServiceEnvironment("test")
    environment.register_service("kv", KeyValue, {"a": 1})
    with environment:
        yield environment


@pytest.fixture
def manager(env: kservice.ServiceEnvironment) -> Iterator[kservice.ServiceManager]:
    with kservice.ServiceManager(env) as m:
        yield m


def make_distribution(root: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
    """Write an installed distribution (a real ``.dist-info``) under ``root``; returns the directory to put on sys.path."""
    site = root / "site"
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{ep_name} = {target}" for ep_name, target in eps.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


def run_python(
    code: str,
    *,
    site: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a fresh plugin manager), with ``site`` on its path."""
    environ = clean_environ()
    paths = [str(REPO)] + ([str(site)] if site else [])
    environ["PYTHONPATH"] = os.pathsep.join([*paths, environ.get("PYTHONPATH", "")])
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
        cwd=cwd,
    )
