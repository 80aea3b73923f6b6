"""``stop_service(timeout=T)`` of a ``process`` task keeps to T and tells each call what happened to it.

As a local task does: calls queued in the host that never started are answered
"did not run" (``may_have_run`` False), the call still running at the deadline
"may have run", and the stop returns by its deadline.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceUnavailableError
from kservice.testing import wait_for

from tests.mmap.services import KV

pytestmark = pytest.mark.timeout(120)

#: what the stop may take beyond its timeout (a noisy machine: generous, yet well below the drain a
#: host would otherwise take)
SLACK = 1.5


def _failure(future: Any) -> ServiceUnavailableError:
    with pytest.raises(ServiceUnavailableError) as caught:
        future.result(30)
    return caught.value


@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_stop_keeps_to_its_timeout_and_tells_queued_calls_they_did_not_run(kind: str) -> None:
    timeout = 3.0
    config = {"service_call": {"max_retries": 0}}
    with ServiceEnvironment("stop-deadline", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KV), kind=kind, local={"max_workers": 1})
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("kv", "echo", (1,)) == 1
            # Still running at the deadline (a local thread then runs on to its end).
            running = manager.call_service_async("kv", "sleep", (timeout + 2.0,), timeout=90)
            wait_for(lambda: manager.get_service_status("kv").in_flight == 1, timeout=30, what="the slow call to run")
            queued = [manager.call_service_async("kv", "sleep", (0.1,), timeout=90) for _ in range(3)]
            # Taken by the host into its worker queue: read, but never started.
            wait_for(lambda: manager.get_service_status("kv").queue_depth == 3, timeout=30, what="3 calls queued")
            began = time.monotonic()
            task.stop_service(timeout)
            took = time.monotonic() - began
            assert took < timeout + SLACK, f"stop_service({timeout}) took {took:.2f}s"
            for future in queued:
                error = _failure(future)
                assert error.may_have_run is False, error
                assert "could run" in str(error) or "never ran" in str(error), error
            if kind == "process":
                error = _failure(running)
                assert error.may_have_run is True, error
            else:  # a thread cannot be interrupted: the call runs on, and answers
                assert running.result(30) == timeout + 2.0
            task.start_service()
            assert manager.call_service_sync("kv", "echo", (2,), timeout=30) == 2


def test_a_stop_with_no_time_to_drain_returns_at_once() -> None:
    """``stop_service(0.1)``: the host is stopped now, not after a fixed grace period (it took at least 0.5 s).

    The fastest of three stops is compared, so one slow moment of a busy machine does not decide it.
    """
    config = {"service_call": {"max_retries": 0}}
    with ServiceEnvironment("stop-now", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KV), kind="process")
        with ServiceManager(env) as manager:
            took: list[float] = []
            for attempt in range(3):
                if attempt:
                    task.start_service()
                running = manager.call_service_async("kv", "sleep", (60.0,), timeout=90)
                wait_for(
                    lambda: manager.get_service_status("kv").in_flight == 1, timeout=30, what="the slow call to run"
                )
                began = time.monotonic()
                task.stop_service(0.1)
                took.append(time.monotonic() - began)
                assert _failure(running).may_have_run is True
            assert min(took) < 0.45, f"stop_service(0.1) took {', '.join(f'{t:.2f}' for t in took)} s"
