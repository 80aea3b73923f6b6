"""Suite-wide guards: every test leaves no kservice threads, child processes or shared-memory segments behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

SHM_DIR = Path(f"/dev/shm/kservice-{os.getuid()}")


def _kservice_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("kservice-") and t.is_alive()}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=False)}


def _segments() -> set[str]:
    try:
        return {p.name for p in SHM_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def _settle(check, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns an empty collection or ``timeout`` passes; returns the last value."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > end:
            return value
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Fail a test that leaks threads, child processes or shared-memory segments."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = _kservice_threads()
    children_before = _children()
    segments_before = _segments()
    yield
    leaked_threads = _settle(lambda: _kservice_threads() - threads_before)
    leaked_children = _settle(lambda: {pid for pid in _children() - children_before if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE})
    leaked_segments = _settle(lambda: _segments() - segments_before)
    assert not leaked_threads, f"test leaked threads: {sorted(leaked_threads)}"
    assert not leaked_children, f"test leaked child processes: {sorted(leaked_children)}"
    assert not leaked_segments, f"test leaked shared-memory segments in {SHM_DIR}: {sorted(leaked_segments)}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leaks: the test manages long-lived resources (session fixtures) itself")
