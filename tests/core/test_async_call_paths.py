"""``call_service_async``'s common call takes a shorter path: what it skips must not change what a call does.

The common call (a plain-number timeout, a service called before, no keyword
arguments or metadata, no call being served around it) builds its request and
arms its deadline without the general helpers. Every other call still takes
them: a timeout that is no number of seconds is refused, a call made while
serving one inherits its deadline and metadata, and a call whose deadline
shares a timeout with earlier calls still ends at it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceTimeoutError


class Inner:
    def seen(self) -> dict[str, Any]:
        request = kservice.current_request()
        assert request is not None
        return {"deadline": request.deadline, "metadata": dict(request.metadata)}

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


class Outer:
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env

    def ask(self) -> dict[str, Any]:
        # The plain form of an async call, made while this call is served.
        with self.env.manager() as manager:
            return manager.call_service_async("inner", "seen", timeout=30).result(timeout=10)  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [True, math.nan, math.inf, -math.inf, 1e300, "5", [1]])
def test_an_async_timeout_that_is_no_number_of_seconds_is_refused_and_the_next_call_runs(timeout: Any) -> None:
    with ServiceEnvironment("t") as env:
        env.register_service("inner", Inner)
        with env.manager() as manager:
            assert manager.call_service_async("inner", "sleep", (0,), timeout=5).result(timeout=5) == 0  # route built
            with pytest.raises((TypeError, ValueError), match="timeout"):
                manager.call_service_async("inner", "sleep", (0,), timeout=timeout)
            assert manager.call_service_async("inner", "sleep", (0.0,), timeout=5.0).result(timeout=5) == 0.0


@pytest.mark.timeout(30)
def test_an_async_call_made_while_serving_one_inherits_its_deadline_and_metadata() -> None:
    with ServiceEnvironment("t") as env:
        env.register_service("inner", Inner)
        env.register_service("outer", Outer, env)
        with env.manager() as manager:
            manager.call_service_sync("inner", "seen")  # the route to inner exists: the plain path is the one taken
            before = time.time()
            seen = manager.call_service_sync("outer", "ask", timeout=2.0, metadata={"trace": "t-1"})
            assert seen["metadata"] == {"trace": "t-1"}
            assert before < seen["deadline"] <= time.time() + 2.0  # the outer call's 2 s, not the inner 30 s


@pytest.mark.timeout(30)
def test_async_calls_sharing_a_timeout_each_end_at_their_deadline() -> None:
    config = {"service": {"local": {"max_workers": 1}}, "service_call": {"max_retries": 0}}
    with ServiceEnvironment("t", config) as env:
        env.register_service("inner", Inner)
        env.register_service("spare", Inner)
        with env.manager() as manager:
            started = time.monotonic()
            # The first call's timeout opens the deadline queue; the next ones join it on the short path.
            futures = [manager.call_service_async("inner", "sleep", (1.0,), timeout=0.3) for _ in range(20)]
            for future in futures:
                with pytest.raises(ServiceTimeoutError):
                    future.result(timeout=5)
            assert time.monotonic() - started < 0.9  # each at its 0.3 s deadline, not after the 1 s sleeps
            # (inner's breaker is open now: the manager goes on serving the next call elsewhere)
            assert manager.call_service_async("spare", "sleep", (0,), timeout=5).result(timeout=5) == 0
