"""A process forked from a Ray driver: Ray's connection to its cluster stays with the driver."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ray.test_ray_drivers import run_python

FORKED_DRIVER = """
import os, time
import ray
import kservice
from kservice import ServiceUnavailableError

ray.init(address={address!r}, log_to_driver=False)
env = kservice.ServiceEnvironment("forked-driver", {{
    "services": {{"echo": {{"class": "ray_services:EchoService", "kind": "ray"}}}}, "health": {{"enabled": False}}}})
env.start()
manager = env.manager()
assert manager.call_service_sync("echo", "echo", ("parent",)) == "parent"
pid = os.fork()
if pid == 0:
    try:
        fresh = env.manager()  # a route built in the child, as well as the parent's
        for name, caller in (("sync", manager), ("fresh", fresh)):
            began = time.monotonic()
            try:
                caller.call_service_sync("echo", "echo", ("child",), timeout=3)
                print(name, "answered", flush=True)
            except ServiceUnavailableError as exc:
                print(name, "refused", round(time.monotonic() - began, 1), exc.may_have_run, exc, flush=True)
            except Exception as exc:
                print(name, type(exc).__name__, round(time.monotonic() - began, 1), flush=True)
        try:
            manager.call_service_async("echo", "echo", ("child",), timeout=3).result(6)
        except ServiceUnavailableError:
            print("async refused", flush=True)
        env.stop()  # lets go of the parent's replicas
        print("stopped", flush=True)
    except BaseException as exc:
        print("child failed", type(exc).__name__, exc, flush=True)
    finally:
        os._exit(0)  # never Ray's exit handlers: its connection is the parent's
os.waitpid(pid, 0)
print("parent", manager.call_service_sync("echo", "echo", ("after",), timeout=30), os.getpid())
env.stop()
"""


@pytest.mark.timeout(120)
def test_a_process_forked_from_a_driver_is_refused_at_once_and_leaves_the_replicas_serving(ray_cluster: Any) -> None:
    result = run_python(FORKED_DRIVER.format(address=ray_cluster.address), timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    parent_pid = lines[-1].split()[-1]
    # Before: each call from the child waited its whole timeout and ended ServiceTimeoutError.
    for name, line in zip(("sync", "fresh"), lines[:2], strict=True):
        words = line.split(maxsplit=4)
        assert words[:2] == [name, "refused"], lines
        assert float(words[2]) < 2.0 and words[3] == "False", lines
        assert f"forked from a Ray driver (pid {parent_pid})" in words[4], lines
    assert lines[2:4] == ["async refused", "stopped"], lines
    assert lines[4] == f"parent after {parent_pid}", lines
