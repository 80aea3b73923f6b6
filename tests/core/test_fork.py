"""A manager used in a process forked after it was made (multiprocessing's fork workers, a pre-forking server)."""

from __future__ import annotations

import pytest

from tests.core.conftest import run_python

pytestmark = pytest.mark.timeout(60)

FORKED = """
import os, sys, time
import kservice
from kservice import ServiceFactory, ServiceTimeoutError
from tests.core.services import KeyValue

env = kservice.ServiceEnvironment("forked")
env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
env.start()
manager = kservice.ServiceManager(env)
assert manager.call_service_async("kv", "get", ("a",)).result(10) == 1  # the parent's timer thread runs
pid = os.fork()
if pid == 0:
    began = time.monotonic()
    future = manager.call_service_async("kv", "sleep", (5.0,), timeout=0.5)
    try:
        future.result(4)
        print("answered")
    except ServiceTimeoutError:
        print("deadline", round(time.monotonic() - began, 1))
    except TimeoutError:
        print("still pending after 4 s")
    print("sync", manager.call_service_sync("kv", "get", ("a",), timeout=10))
    print("async", manager.call_service_async("kv", "get", ("a",), timeout=10).result(10), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
env.stop()
from kservice.plugins.mmap import reclaim
reclaim()  # the child ended with os._exit, as a fork worker does: its response rings are left to reclaim
"""


def test_async_calls_in_a_forked_child_end_at_their_deadline() -> None:
    result = run_python(FORKED)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # Before: the child had the parent's timer object but not its thread, so no deadline ever fired.
    assert lines[0].startswith("deadline"), lines
    assert float(lines[0].split()[1]) < 3.0
    assert lines[1:] == ["sync 1", "async 1"]
