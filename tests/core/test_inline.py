"""In-process sync calls to a fast method of a thread-safe service run in the caller's own thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import kservice
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kservice import ServiceEnvironment, ServiceTimeoutError


class Where:
    def __init__(self) -> None:
        self.delay = 0.0

    def thread(self) -> str:
        if self.delay:
            time.sleep(self.delay)
        return threading.current_thread().name


@kservice.service(thread_safe=False)
class SerialWhere(Where):
    pass


def _env(name: str, cls: type, **local: Any) -> ServiceEnvironment:
    config = {"services": {name: {"class": f"{__name__}:{cls.__name__}", "local": local}}} if local else {}
    environment = ServiceEnvironment(f"inline-{name}", config)
    if not local:
        environment.register_service(name, cls)
    return environment


def test_a_fast_method_runs_in_the_callers_thread_after_its_first_call() -> None:
    with _env("where", Where, inline_limit=0.05) as environment, environment.manager() as manager:
        first = manager.call_service_sync("where", "thread")
        assert first.startswith("kservice-where-")  # unknown cost: the worker pool
        assert manager.call_service_sync("where", "thread") == threading.current_thread().name
        status = environment.get_task("where").get_service_status()  # type: ignore[union-attr]
        assert status.requests_total == 2 and status.in_flight == 0


def test_async_calls_and_serial_services_always_use_the_pool() -> None:
    with _env("where", Where) as environment, environment.manager() as manager:
        manager.call_service_sync("where", "thread")
        assert manager.call_service_async("where", "thread").result(10).startswith("kservice-where-")
    with _env("serial", SerialWhere) as environment, environment.manager() as manager:
        for _ in range(3):
            assert manager.call_service_sync("serial", "thread").startswith("kservice-serial-")


def test_inline_limit_zero_sends_every_call_to_the_pool() -> None:
    with _env("pooled", Where, inline_limit=0.0) as environment, environment.manager() as manager:
        for _ in range(3):
            assert manager.call_service_sync("pooled", "thread").startswith("kservice-pooled-")


def test_a_method_that_turns_slow_times_out_once_then_goes_to_the_pool() -> None:
    with _env("where", Where, inline_limit=0.05) as environment, environment.manager() as manager:
        manager.call_service_sync("where", "thread")
        assert manager.call_service_sync("where", "thread") == threading.current_thread().name
        instance = environment.get_task("where")._service  # type: ignore[union-attr]
        instance.delay = 0.2
        began = time.monotonic()
        with pytest.raises(ServiceTimeoutError):
            manager.call_service_sync("where", "thread", timeout=0.05)
        assert time.monotonic() - began >= 0.2  # it ran here: the caller waited for it, this once
        instance.delay = 0.0
        assert manager.call_service_sync("where", "thread").startswith("kservice-where-")  # now pooled


@given(st.lists(st.floats(min_value=0.0, max_value=0.01), min_size=1, max_size=20))
def test_a_tasks_cost_estimate_follows_next_cost_estimate(runs: list[float]) -> None:
    """The task's inlined estimate (observe_cost) and the exported rule transports use agree on every run."""
    task = kservice.LocalServiceTask(kservice.ServiceFactory("estimate", object))
    expected: float | None = None
    for seconds in runs:
        task.observe_cost("m", seconds)
        expected = kservice.next_cost_estimate(expected, seconds, task.inline_limit)
        assert task.method_cost("m") == expected
