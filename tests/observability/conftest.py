"""Helpers for the observability tests: polling, fresh interpreters, runtime plugins."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kservice
import pytest

from tests.core.conftest import run_python as run_python_in

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a fresh plugin manager) from the repository root."""
    return run_python_in(code, env=env, timeout=timeout, cwd=REPO)


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
    return manager.client_middlewares(service_name)
