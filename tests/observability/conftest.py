"""Helpers for the observability tests: polling, fresh interpreters, runtime plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kservice
import pytest

from tests.conftest import clean_environ

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``predicate()`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a fresh plugin manager) from the repository root."""
    environ = clean_environ()
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")])
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=timeout, cwd=REPO
    )


@pytest.fixture
def register_plugin() -> Iterator[Callable[[Any, str], None]]:
    """Register plugin objects for one test; they are unregistered afterwards."""
    pm = kservice.get_plugin_manager()
    names: list[str] = []

    def register(plugin: Any, name: str) -> None:
        pm.register(plugin, name=name)
        names.append(name)

    yield register
    for name in reversed(names):
        if pm.has_plugin(name):
            pm.unregister(name=name)


def server_chain(task: kservice.BaseServiceTask) -> tuple[Any, ...]:
    """The middleware compiled into a task's server chain (empty chains are None in the core)."""
    chain = task._server_chain
    return () if chain is None else tuple(chain.middlewares)


def client_chain(manager: kservice.ServiceManager, service_name: str) -> tuple[Any, ...]:
    """The middleware compiled into a manager's client chain for one service."""
    chain = manager._route(service_name).chain
    return () if chain is None else tuple(chain.middlewares)
