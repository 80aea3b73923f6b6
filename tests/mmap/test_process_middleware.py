"""Environment middleware runs its service-side hooks inside a `process` task's child."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from kservice import (
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
)

from tests.core.services import KeyValue


class StampPid(ServiceMiddleware):
    """Server side: records the pid of the process that ran the method."""

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse:
        if response.success:
            response.result = (response.result, os.getpid())
        return response


@pytest.mark.timeout(120)
def test_environment_middleware_runs_in_the_child() -> None:
    with ServiceEnvironment("mw") as env:
        env.add_middleware(StampPid())
        task = env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
        with ServiceManager(env) as manager:
            value, pid = manager.call_service_sync("kv", "get", ("a",))
        assert value == 1
        assert pid == task.pid and pid != os.getpid()


#: What SlowObserver saw, in the host process (read back through Observed.observed).
OBSERVED: list[tuple[Any, float]] = []
OBSERVER_SECONDS = 2.0


class SlowObserver(ServiceMiddleware):
    """Server side: takes OBSERVER_SECONDS to observe a call whose argument is "slow" (an exporter that stalls),
    and raises observing one whose argument is "boom" (an exporter that fails)."""

    def observe_handle(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        if request.args[:1] == ("slow",):
            time.sleep(OBSERVER_SECONDS)
        if request.args[:1] == ("boom",):
            raise RuntimeError("the exporter is down")
        OBSERVED.append((request.args, seconds))


class Observed:
    def echo(self, value: Any) -> Any:
        return value

    def observed(self) -> list[tuple[Any, float]]:
        return list(OBSERVED)


@pytest.mark.timeout(120)
def test_a_call_run_on_the_listener_thread_is_answered_before_the_server_observers_run() -> None:
    # A generous inline limit: a warm-up call preempted on a busy machine must not send echo to the pool.
    with ServiceEnvironment("mw-observe", {"mmap": {"inline_limit": 0.1}}) as env:
        env.add_middleware(SlowObserver())
        env.register_service("obs", ServiceFactory("obs", Observed), kind="process")
        with ServiceManager(env) as manager:
            for _ in range(5):  # the host learns echo is fast: it runs on the listener thread from now on
                assert manager.call_service_sync("obs", "echo", ("warm",)) == "warm"
            began = time.monotonic()
            assert manager.call_service_sync("obs", "echo", ("slow",)) == "slow"
            answered = time.monotonic() - began
            # The listener observes before it reads its next record: this call sees the slow one observed.
            seen = manager.call_service_sync("obs", "observed", timeout=30)
            waited = time.monotonic() - began
            # An observer that raises after the answer left changes nothing: the answer, the next call.
            assert manager.call_service_sync("obs", "echo", ("boom",)) == "boom"
            assert manager.call_service_sync("obs", "echo", ("after",)) == "after"
            assert manager.call_service_sync("obs", "observed")[-1][0] == ("after",)
    assert answered < OBSERVER_SECONDS / 2, f"the answer waited for the observer ({answered:.2f} s)"
    assert waited >= OBSERVER_SECONDS
    assert [args for args, _ in seen] == [("warm",)] * 5 + [("slow",)]
    # The observed duration is the call's own (method and middleware), not the observer's.
    assert seen[-1][1] < OBSERVER_SECONDS / 2
