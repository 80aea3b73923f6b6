"""Deadlines, end to end: one timeout per call, carried as an absolute deadline, inherited by nested calls."""

from __future__ import annotations

import time

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceTimeoutError
from kservice.testing import wait_for

from tests.policies.services import Flaky, Relay, Sleeper


@pytest.mark.timeout(20)
def test_the_timeout_becomes_an_absolute_deadline_the_method_can_read() -> None:
    with ServiceEnvironment("t") as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            before = time.time()
            seen = manager.call_service_sync("flaky", "timing", timeout=2.0)
            assert before + 2.0 <= seen["deadline"] <= time.time() + 2.0
            assert 1.5 < seen["remaining"] <= 2.0
            default = manager.call_service_sync("flaky", "timing")  # service_call.default_timeout
            assert 25 < default["remaining"] <= 30
    assert kservice.remaining_time() is None and kservice.current_request() is None  # outside any call


@pytest.mark.timeout(20)
def test_expired_work_is_never_started() -> None:
    config = {"service": {"local": {"max_workers": 1}}, "service_call": {"max_retries": 0}}
    with ServiceEnvironment("t", config) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            busy = manager.call_service_async("flaky", "sleep", (0.3,))
            task = env.get_task("flaky")
            wait_for(lambda: task.get_service_status().in_flight >= 1, what="the busy call to run")
            started = time.monotonic()
            with pytest.raises(ServiceTimeoutError):
                manager.call_service_sync("flaky", "ok", (1,), timeout=0.1)
            assert time.monotonic() - started < 0.25  # the caller got its timeout on time
            assert busy.result(timeout=2) == 0.3
            wait_for(lambda: task.get_service_status().expired_total == 1, what="the queued call to expire")
            assert task.service.calls["ok"] == 0  # queued behind the sleep, expired before a worker got to it
            assert task.get_service_status().expired_total == 1
            assert manager.call_service_sync("flaky", "ok", (2,)) == 2


@pytest.mark.timeout(20)
def test_a_nested_call_inherits_the_outer_deadline_and_times_out_with_it() -> None:
    with ServiceEnvironment("t") as env:
        relay = env.register_service("a", Relay, env).service
        sleeper = env.register_service("b", Sleeper).service
        with env.manager() as manager:
            started = time.monotonic()
            # The caller gives A 0.3 s; A asks B for 10 s, B would take 0.6 s. Both waits end at the one
            # deadline, so the caller gets either its own timeout or A's report of B's: never a late answer.
            try:
                outer = manager.call_service_sync("a", "relay", (0.6, 10.0), timeout=0.3)
            except ServiceTimeoutError:
                outer = "timeout"
            assert outer == "timeout"
            assert time.monotonic() - started < 0.45
            wait_for(lambda: sleeper.remaining and relay.outcomes, what="B to start and A to record its outcome")
            assert sleeper.remaining and sleeper.remaining[0] is not None and sleeper.remaining[0] <= 0.3
            # A's own call to B failed with ServiceTimeoutError at A's deadline, not after B's 0.6 s.
            assert relay.outcomes[0]["outcome"] == "timeout"
            assert relay.outcomes[0]["elapsed"] < 0.45
            # A shorter inner timeout than the outer one is kept as given.
            assert manager.call_service_sync("a", "relay", (0.0, 5.0), timeout=10.0) == "ok"
            assert 4.0 < sleeper.remaining[-1] <= 5.0  # type: ignore[operator]
