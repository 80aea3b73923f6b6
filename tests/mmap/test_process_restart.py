"""A service stopped and started again: callers reach the new host at once, and a stopped one is named at once.

The host is a real child process (``kind="process"``) reached over shared memory: a
restart gives it a new pid and a new request queue, so a route compiled before the
restart points at a queue that no longer exists.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceStoppedError
from kservice.testing import wait_for

from tests.mmap.services import KV, hosting, unique
from tests.streaming.services import TokenModel

pytestmark = pytest.mark.timeout(120)


def _sync(manager: ServiceManager) -> Any:
    return manager.call_service_sync("model", "echo", ("x",), timeout=30)


def _async(manager: ServiceManager) -> Any:
    return manager.call_service_async("model", "echo", ("x",), timeout=30).result(60)


def _acall(manager: ServiceManager) -> Any:
    return asyncio.run(manager.acall("model", "echo", ("x",), timeout=30))


def _stream(manager: ServiceManager) -> Any:
    return "".join(str(item) for item in manager.stream("model", "count", (1,), timeout=30)) and "x"


def _map(manager: ServiceManager) -> Any:
    results = list(manager.map("model", "echo", ["x", "x"], timeout=30))
    assert results == ["x", "x"]
    return results[0]


CALLS: dict[str, Callable[[ServiceManager], Any]] = {
    "sync": _sync,
    "async": _async,
    "acall": _acall,
    "stream": _stream,
    "map": _map,
}


@pytest.mark.parametrize("how", list(CALLS))
def test_the_first_call_after_a_restart_reaches_the_new_host(how: str) -> None:
    """With retries off, a call on the route compiled before the restart would fail: none may be needed."""
    call = CALLS[how]
    config = {"service_call": {"max_retries": 0}}
    with ServiceEnvironment("restart", config) as env:
        task = env.register_service("model", ServiceFactory("model", TokenModel), kind="process")
        with ServiceManager(env) as manager:
            assert call(manager) == "x"
            first_pid = manager.call_service_sync("model", "pid")
            task.stop_service()
            task.start_service()
            assert call(manager) == "x"
            assert manager.call_service_sync("model", "pid") == task.pid != first_pid


@pytest.mark.parametrize("kind", ["local", "process"])
@pytest.mark.parametrize("how", list(CALLS))
def test_a_call_while_stopped_fails_at_once_naming_the_service(kind: str, how: str) -> None:
    """Not retried for seconds as if the service might come back, nor counted by the breaker."""
    call = CALLS[how]
    with ServiceEnvironment("stopped") as env:
        task = env.register_service("model", ServiceFactory("model", TokenModel), kind=kind)
        with ServiceManager(env) as manager:
            assert call(manager) == "x"
            task.stop_service()
            for _ in range(3):  # enough failures to open a breaker that counted them
                began = time.monotonic()
                with pytest.raises(ServiceStoppedError, match="'model' is stopped") as caught:
                    call(manager)
                assert time.monotonic() - began < 5.0, "a stopped service is not retried"
                assert caught.value.may_have_run is not True
            task.start_service()
            # The service serves the next call at once (no breaker left open, no stale route).
            assert call(manager) == "x"


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_call_retried_across_a_stop_ends_with_the_stop(how: str) -> None:
    """A call refused while the host drains is retried; once the service is stopped it ends naming that."""
    config = {"service_call": {"max_retries": 10, "retry_interval": 0.2}}
    with ServiceEnvironment("stopping", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KV), kind="process")
        with ServiceManager(env) as manager:
            slow = manager.call_service_async("kv", "sleep", (3.0,), timeout=60)
            wait_for(lambda: manager.get_service_status("kv").in_flight == 1, timeout=30, what="the slow call to run")
            stopper = threading.Thread(target=task.stop_service, args=(60,))
            stopper.start()
            try:
                wait_for(lambda: task.state == "stopping", timeout=30, what="the stop to begin")
                # Calls go on being served until the host begins to drain; the first one refused must
                # end with the stop, however long its retries wait for the drain.
                began = time.monotonic()
                with pytest.raises(ServiceStoppedError, match="'kv' is stopped") as caught:
                    while time.monotonic() - began < 30.0:
                        if how == "sync":
                            manager.call_service_sync("kv", "echo", ("x",), timeout=60)
                        else:
                            manager.call_service_async("kv", "echo", ("x",), timeout=60).result(90)
                assert caught.value.may_have_run is False
                assert time.monotonic() - began < 30.0, "not retried on a closed connection until the retries run out"
            finally:
                stopper.join(90)
            assert slow.result(60) == 3.0  # the call running at the stop finished within the drain
            task.start_service()
            assert manager.call_service_sync("kv", "echo", ("y",), timeout=30) == "y"


@pytest.mark.parametrize("how", ["sync", "async", "stream"])
def test_a_caller_without_the_environment_reaches_a_restarted_host_without_the_retry_pause(how: str) -> None:
    """A `kservice serve` host restarted under the same name: the refused attempt is re-sent to the new host
    at once (it never ran, and the name now resolves elsewhere), not after the retry policy's pause."""
    name = unique("model")
    spec = f"{name}=tests.streaming.services:TokenModel"
    config = {"service_call": {"max_retries": 1, "retry_interval": 10.0}}

    def call(manager: ServiceManager) -> Any:
        if how == "sync":
            return manager.call_service_sync(name, "pid", timeout=30)
        if how == "async":
            return manager.call_service_async(name, "pid", timeout=30).result(60)
        return list(manager.stream(name, "count", (2,), timeout=30))

    with ServiceManager(config=config) as manager:
        with hosting(spec) as first:
            assert call(manager)
        with hosting(spec) as second:
            began = time.monotonic()
            assert call(manager) in (second.pid, [0, 1])
            took = time.monotonic() - began
            assert took < 5.0, f"the call waited {took:.1f}s (retry_interval is 10 s)"
            assert first.pid != second.pid
