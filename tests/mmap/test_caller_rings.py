"""A host lets go of the response rings of callers that are gone, so their shared memory is freed.

A caller removes its rings when it ends, but a removed file's shared memory lives
as long as some process maps it: a host that kept every caller's ring mapped
(1 MiB each, one per ``kservice call`` run) held on to memory that nobody could
use. Real processes, real mappings (``/proc/<host>/maps``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager
from kservice.plugins.mmap.ring import attach_queue, create_queue, queue_directory
from kservice.testing import wait_for

from .services import KV

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CALLER = """
import sys
from kservice import ServiceManager
with ServiceManager() as manager:
    assert manager.call_service_sync(sys.argv[1], "echo", ("hi",)) == "hi"
"""


def _caller_rings(host_pid: int) -> dict[int, int]:
    """Caller response rings ``host_pid`` maps, counted by the pid of the caller that made each."""
    directory = str(queue_directory(sweep=False))
    rings: dict[int, int] = {}
    with open(f"/proc/{host_pid}/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
            name = os.path.basename(path.removesuffix(" (deleted)"))
            if path.startswith(directory) and name.startswith("rsp."):
                caller = int(name.split(".")[1])
                rings[caller] = rings.get(caller, 0) + 1
    return rings


@pytest.fixture
def host() -> Iterator[tuple[str, ServiceManager, int]]:
    name = f"rings-{uuid.uuid4().hex[:8]}"
    env = ServiceEnvironment("caller-rings")
    env.register_service(
        name, ServiceFactory(name, KV), kind="process", mmap={"caller_ring_check": 0.2, "publish": True}
    )
    with env:
        manager = env.manager()
        yield name, manager, manager.call_service_sync(name, "pid")


def _run_caller(name: str) -> None:
    """One caller process: it calls ``name`` once and ends (removing its response ring)."""
    caller = subprocess.run(
        [sys.executable, "-c", CALLER, name], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert caller.returncode == 0, caller.stderr


def test_a_host_unmaps_the_rings_of_callers_that_ended_and_keeps_those_of_callers_alive(
    host: tuple[str, ServiceManager, int],
) -> None:
    name, manager, host_pid = host
    for _ in range(3):
        _run_caller(name)
    # This process called too (the fixture's first call) and is alive: its ring stays mapped.
    assert os.getpid() in _caller_rings(host_pid)
    wait_for(
        lambda: set(_caller_rings(host_pid)) == {os.getpid()},
        timeout=20,
        what="the host to unmap the rings of the three callers that ended",
    )
    # Nothing was lost for callers alive: this one and a new one are answered.
    assert manager.call_service_sync(name, "echo", ("still",)) == "still"
    _run_caller(name)
    wait_for(lambda: set(_caller_rings(host_pid)) == {os.getpid()}, timeout=20, what="the new caller's ring let go")


def test_linked_tells_a_removed_or_replaced_queue_file() -> None:
    queue = create_queue(f"linked-{uuid.uuid4().hex[:8]}", 4096)
    other = attach_queue(queue.name)
    try:
        assert queue.linked and other.linked
        queue.unlink()
        assert not other.linked  # removed
        replacement = create_queue(queue.name, 4096)
        try:
            assert not other.linked  # the same name, another file
            assert replacement.linked
        finally:
            replacement.unlink()
            replacement.close()
    finally:
        other.close()
        queue.close()
    assert not queue.linked  # a closed handle can still be asked


BIG_CALLER = """
import sys
from kservice import ServiceManager
with ServiceManager() as manager:
    assert manager.call_service_sync(sys.argv[1], "size", (b"x" * (4 << 20),)) == 4 << 20
"""


def _pooled_segments(host_pid: int) -> dict[int, set[str]]:
    """Other processes' pooled segments ``host_pid`` maps, by the pid of the process that made each."""
    directory = str(queue_directory(sweep=False))
    segments: dict[int, set[str]] = {}
    with open(f"/proc/{host_pid}/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
            name = os.path.basename(path.removesuffix(" (deleted)"))
            if path.startswith(directory) and name.startswith("pool-"):
                sender = int(name.split("-")[1])
                if sender != host_pid:
                    segments.setdefault(sender, set()).add(name)
    return segments


def test_a_host_unmaps_the_pooled_segments_of_callers_that_ended_and_keeps_serving(
    host: tuple[str, ServiceManager, int],
) -> None:
    name, manager, host_pid = host
    # This process sends a large argument too and stays alive: its segment may stay mapped.
    assert manager.call_service_sync(name, "size", (b"y" * (4 << 20),)) == 4 << 20
    callers = []
    for _ in range(3):
        caller = subprocess.run(
            [sys.executable, "-c", BIG_CALLER, name], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert caller.returncode == 0, caller.stderr
        callers.append(caller)
    wait_for(
        lambda: set(_pooled_segments(host_pid)) <= {os.getpid()},
        timeout=20,
        what="the host to unmap the pooled segments of the three callers that ended",
    )
    assert os.getpid() in _pooled_segments(host_pid)
    # The host keeps serving large arguments, from this caller and from a new one.
    assert manager.call_service_sync(name, "size", (b"z" * (4 << 20),)) == 4 << 20
    caller = subprocess.run(
        [sys.executable, "-c", BIG_CALLER, name], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert caller.returncode == 0, caller.stderr
    wait_for(
        lambda: set(_pooled_segments(host_pid)) <= {os.getpid()},
        timeout=20,
        what="the new caller's pooled segment let go",
    )
