"""Fixtures for the call-policy tests: the example plugin distribution, and subprocess helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import clean_environ, install_distribution

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = Path(__file__).resolve().parent / "example_plugin"


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin distribution, installed into a directory of its own (see ``install_distribution``)."""
    site = install_distribution(EXAMPLE, tmp_path_factory.mktemp("example"))
    assert any(site.glob("kservice_example_policies-*.dist-info"))
    return site


def chain_of(manager: Any, service_name: str) -> tuple[Any, ...]:
    """The client middlewares a manager compiled for a service (none: the route has no chain)."""
    return tuple(manager.client_middlewares(service_name))


def run_script(code: str, *, env: dict[str, str] | None = None, timeout: float = 90) -> Any:
    """Run ``code`` in a fresh interpreter (a fresh plugin manager); returns the JSON it prints last."""
    environ = clean_environ()
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")])
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=timeout
    )
    assert done.returncode == 0, f"script failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])
