"""The retry plugin: what is retried, backoff, budget, exhaustion, named and replaced policies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import kservice
import pytest
from kservice import ConfigError, ServiceEnvironment, ServiceRequest, ServiceResponse
from kservice.plugins import retry
from kservice.plugins.retry import DefaultRetryPolicy, RetryBudget

from tests.policies.conftest import chain_of
from tests.policies.services import Flaky

FAST = {"retry_interval": 0.01, "retry_jitter": 0.0, "retry_backoff": 1.0}


def settings(**over: Any) -> dict[str, Any]:
    base = kservice.Config.load({}).get("service_call")
    return {**base, **FAST, **over}


def request(deadline_in: float | None = 10.0) -> ServiceRequest:
    return ServiceRequest("r1", "svc", "m", deadline=None if deadline_in is None else time.time() + deadline_in)


def runtime_failure(kind: str, may_have_run: bool | None = None) -> ServiceResponse:
    metadata = {} if may_have_run is None else {kservice.MAY_HAVE_RUN: may_have_run}
    return ServiceResponse(False, None, "x", "r1", error_type=kind, error_origin="runtime", metadata=metadata)


SERVICE_FAILURE = ServiceResponse(False, None, "boom", "r1", error_type="ConnectionError", error_origin="service")


# ------------------------------------------------------------- unit: policy


@pytest.mark.timeout(10)
def test_only_safe_failures_are_retried() -> None:
    policy = DefaultRetryPolicy(settings())
    # Unavailable, and the transport says the request never reached the service: any method goes again.
    never_ran = runtime_failure("ServiceUnavailableError", may_have_run=False)
    assert policy.should_retry(request(), never_ran, 0, False) is not None
    # It may have run (a host killed mid-call), or the transport did not say: idempotent methods only.
    for unknown in (
        runtime_failure("ServiceUnavailableError", may_have_run=True),
        runtime_failure("ServiceUnavailableError"),
    ):
        assert policy.should_retry(request(), unknown, 0, False) is None
        assert policy.should_retry(request(), unknown, 0, True) is not None
    assert policy.should_retry(request(), runtime_failure("ServiceNotFoundError"), 0, False) is not None
    # A method's own exception means the request reached it: only idempotent methods go again.
    assert policy.should_retry(request(), SERVICE_FAILURE, 0, False) is None
    assert policy.should_retry(request(), SERVICE_FAILURE, 0, True) is not None
    # A timeout may have run the method: idempotent only.
    assert policy.should_retry(request(), runtime_failure("ServiceTimeoutError"), 0, False) is None
    assert policy.should_retry(request(), runtime_failure("ServiceTimeoutError"), 0, True) is not None
    # Never: unknown method, caller-side middleware rejections, responses marked not retryable.
    assert policy.should_retry(request(), runtime_failure("MethodNotFoundError"), 0, True) is None
    client = ServiceResponse(False, None, "no", "r1", error_type="ValueError", error_origin="client")
    assert policy.should_retry(request(), client, 0, True) is None
    marked = runtime_failure("CircuitOpenError")
    marked.metadata["kservice.retryable"] = False
    assert policy.should_retry(request(), marked, 0, True) is None
    # Overload is opt-in: the runtime already waited for room.
    assert policy.should_retry(request(), runtime_failure("ServiceOverloadedError"), 0, False) is None
    opted = DefaultRetryPolicy(settings(retry_overloaded=True))
    assert opted.should_retry(request(), runtime_failure("ServiceOverloadedError"), 0, False) is not None


@pytest.mark.timeout(10)
def test_backoff_grows_to_the_cap_and_stops_at_max_retries_and_the_deadline() -> None:
    policy = DefaultRetryPolicy(settings(retry_interval=0.1, retry_backoff=2.0, retry_max_interval=0.3, max_retries=4))
    failure = runtime_failure("ServiceUnavailableError", may_have_run=False)
    assert [policy.should_retry(request(), failure, n, False) for n in range(5)] == [0.1, 0.2, 0.3, 0.3, None]
    jittery = DefaultRetryPolicy(settings(retry_interval=0.1, retry_jitter=0.05))
    delays = {jittery.should_retry(request(), failure, 0, False) for _ in range(20)}
    assert all(0.1 <= d <= 0.15 for d in delays) and len(delays) > 1  # type: ignore[operator]
    # The next attempt would start past the deadline: give up now.
    assert policy.should_retry(request(deadline_in=0.05), failure, 0, False) is None


@pytest.mark.timeout(10)
def test_budget_caps_retries_at_a_fraction_of_calls_plus_a_floor() -> None:
    now = [0.0]
    budget = RetryBudget(0.2, 0.0, capacity=100, clock=lambda: now[0])
    assert not budget.withdraw()  # nothing deposited, no floor
    budget.calls += 100  # 100 attempts deposit 20 tokens
    granted = sum(budget.withdraw() for _ in range(50))
    assert granted == 16  # each retry costs 1 + its own attempt's 0.2 deposit: 20 / 1.2
    floored = RetryBudget(0.0, 2.0, capacity=4, clock=lambda: now[0])
    assert sum(floored.withdraw() for _ in range(10)) == 2  # one second's floor to start with
    now[0] += 10.0
    assert sum(floored.withdraw() for _ in range(10)) == 4  # refilled, but capped


# -------------------------------------------------------- integration: calls


@pytest.mark.timeout(20)
def test_a_non_idempotent_method_that_failed_after_delivery_runs_once() -> None:
    with ServiceEnvironment("t", {"service_call": {**FAST, "max_retries": 5}}) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            with pytest.raises(ConnectionError, match="fail #1"):
                manager.call_service_sync("flaky", "fail")
            assert env.get_task("flaky").service.calls["fail"] == 1


@pytest.mark.timeout(20)
def test_an_idempotent_method_is_retried_until_it_succeeds() -> None:
    with ServiceEnvironment("t", {"service_call": {**FAST, "max_retries": 5}}) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            assert manager.call_service_sync("flaky", "succeed_on", (3,)) == 3
            assert manager.call_service_async("flaky", "succeed_on", (5,)).result(timeout=5) == 5


@pytest.mark.timeout(20)
def test_config_idempotent_list_makes_a_method_retryable() -> None:
    config = {
        "service_call": {**FAST, "max_retries": 2},
        "services": {"flaky": {"class": "tests.policies.services:Flaky", "idempotent": ["fail"]}},
    }
    with ServiceEnvironment("t", config) as env, env.manager() as manager:
        with pytest.raises(ConnectionError):
            manager.call_service_sync("flaky", "fail")
        assert env.get_task("flaky").service.calls["fail"] == 3


@pytest.mark.timeout(20)
def test_exhaustion_raises_the_last_error_with_the_attempts_recorded() -> None:
    with ServiceEnvironment("t", {"service_call": {**FAST, "max_retries": 3}}) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            with pytest.raises(ConnectionError, match="fail_idempotent #4") as caught:
                manager.call_service_sync("flaky", "fail_idempotent")
            assert caught.value.attempts == 4  # type: ignore[attr-defined]
            assert any(
                "gave up after 4 attempts" in note and "max_retries=3" in note for note in caught.value.__notes__
            )
            future = manager.call_service_async("flaky", "fail_idempotent")
            with pytest.raises(ConnectionError, match="fail_idempotent #8") as async_caught:
                future.result(timeout=5)
            assert async_caught.value.attempts == 4  # type: ignore[attr-defined]
            # Not retried at all: the error is raised as is.
            with pytest.raises(ConnectionError) as once:
                manager.call_service_sync("flaky", "fail")
            assert not hasattr(once.value, "attempts")


@pytest.mark.timeout(20)
def test_retries_never_run_past_the_calls_deadline() -> None:
    config = {"service_call": {"retry_interval": 0.2, "retry_jitter": 0.0, "retry_backoff": 1.0, "max_retries": 50}}
    with ServiceEnvironment("t", config) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            started = time.monotonic()
            with pytest.raises(ConnectionError) as caught:
                manager.call_service_sync("flaky", "fail_idempotent", timeout=0.5)
            assert time.monotonic() - started < 0.5
            assert env.get_task("flaky").service.calls["fail_idempotent"] == 3  # t = 0, 0.2, 0.4
            assert any("past the call's deadline" in note for note in caught.value.__notes__)


@pytest.mark.timeout(20)
def test_an_unavailable_service_is_retried_until_it_is_back() -> None:
    """A task that is not up yet (starting) is unavailable: the call waits for it across retries."""
    # The breaker is off here: with it, five unavailable attempts in a row would open it (test_breaker.py).
    config = {"service_call": {**FAST, "retry_interval": 0.03, "max_retries": 50}, "breaker": {"enabled": False}}
    with ServiceEnvironment("t", config) as env:
        task = env.register_service("flaky", Flaky)
        with env.manager() as manager:
            assert manager.call_service_sync("flaky", "ok", (1,)) == 1
            task._state = "starting"  # as while it (re)starts: calls are answered ServiceUnavailableError
            threading.Timer(0.15, lambda: setattr(task, "_state", "running")).start()
            started = time.monotonic()
            assert manager.call_service_sync("flaky", "ok", (2,)) == 2
            assert time.monotonic() - started >= 0.1
            assert task.service.calls["ok"] == 2  # the unavailable attempts never ran the method


@pytest.mark.timeout(20)
def test_a_service_stopped_on_purpose_fails_at_once() -> None:
    with ServiceEnvironment("t", {"service_call": {"retry_interval": 1.0, "max_retries": 3}}) as env:
        task = env.register_service("flaky", Flaky)
        with env.manager() as manager:
            assert manager.call_service_sync("flaky", "ok", (1,)) == 1
            task.stop_service()
            started = time.monotonic()
            with pytest.raises(kservice.ServiceStoppedError, match="stopped"):
                manager.call_service_sync("flaky", "fail_idempotent")  # idempotent, still not retried
            assert time.monotonic() - started < 0.5


@pytest.mark.timeout(30)
def test_the_budget_stops_a_retry_storm() -> None:
    config = {"service_call": {**FAST, "max_retries": 3, "retry_budget_ratio": 0.1, "retry_budget_min_per_second": 0.0}}
    with ServiceEnvironment("t", config) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            for _ in range(100):
                with pytest.raises(ConnectionError):
                    manager.call_service_sync("flaky", "fail_idempotent")
            executions = env.get_task("flaky").service.calls["fail_idempotent"]
    # Without a budget: 400 executions. With it: 100 calls + at most 10% more (each retry pays 1.1 tokens).
    assert 100 < executions <= 110


# ---------------------------------------------------------- policy choices


@pytest.mark.timeout(10)
def test_an_unknown_policy_name_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"service_call.retry_policy: 'fancy' is not one of 'default', 'never'"):
        kservice.Config.load({"service_call": {"retry_policy": "fancy"}})
    with pytest.raises(ConfigError, match=r"services\.kv\.service_call\.retry_policy"):
        kservice.Config.load({"services": {"kv": {"service_call": {"retry_policy": "fancy"}}}})


@pytest.mark.timeout(20)
def test_a_registered_named_policy_is_selected_by_config() -> None:
    class TwiceQuickly:
        def __init__(self, settings: dict[str, Any], budget: RetryBudget | None) -> None:
            self.asked = 0

        def should_retry(
            self, request: ServiceRequest, response: ServiceResponse, attempt: int, idempotent: bool
        ) -> float | None:
            self.asked += 1
            return 0.0 if attempt < 2 else None

    retry.register_retry_policy("twice", TwiceQuickly)
    try:
        with pytest.raises(ValueError, match="already registered"):
            retry.register_retry_policy("twice", TwiceQuickly)
        assert "twice" in retry.retry_policy_names()
        config = {
            "services": {"flaky": {"class": "tests.policies.services:Flaky", "service_call": {"retry_policy": "twice"}}}
        }
        with ServiceEnvironment("t", config) as env, env.manager() as manager:
            with pytest.raises(ConnectionError):
                manager.call_service_sync("flaky", "fail")  # not idempotent, yet this policy retries it
            assert env.get_task("flaky").service.calls["fail"] == 3
    finally:
        retry._policies.pop("twice", None)


@pytest.mark.timeout(20)
def test_never_policy_and_zero_retries_leave_the_chain_empty() -> None:
    config = {
        "services": {"flaky": {"class": "tests.policies.services:Flaky", "service_call": {"retry_policy": "never"}}}
    }
    with ServiceEnvironment("t", config) as env, env.manager() as manager:
        with pytest.raises(ConnectionError):
            manager.call_service_sync("flaky", "fail_idempotent")
        assert env.get_task("flaky").service.calls["fail_idempotent"] == 1
        assert not any(isinstance(m, retry.RetryBudgetCounter) for m in chain_of(manager, "flaky"))


@pytest.mark.timeout(60)
def test_the_example_distribution_replaces_the_policy_and_adds_middleware(example_plugin: Path) -> None:
    from tests.policies.conftest import REPO, run_script

    result = run_script(
        """
        import json, kservice
        from kservice._plugins import plugin_infos
        config = {"services": {
            "plain": {"class": "tests.policies.services:Flaky"},
            "custom": {"class": "tests.policies.services:Flaky", "example": {"enabled": True, "attempts": 2, "delay": 0.0}},
        }}
        seen = []
        class Peek(kservice.ServiceMiddleware):
            def after_call(self, response, request):
                seen.append(response.metadata.get("example.seen", False))
        env = kservice.ServiceEnvironment("t", config)
        env.add_middleware(Peek())  # environment middleware is outermost: it sees what the example's after_call set
        with env, env.manager() as manager:
            out = {"plugins": [p.name for p in plugin_infos()]}
            for name in ("plain", "custom"):
                try:
                    manager.call_service_sync(name, "fail")
                except ConnectionError:
                    pass
                out[name] = env.get_task(name).service.calls["fail"]
            out["stamp"] = manager.call_service_sync("custom", "request_metadata").get("example.stamp")
            out["plain_stamp"] = manager.call_service_sync("plain", "request_metadata").get("example.stamp")
            out["seen"] = seen[-2:]
            print(json.dumps(out))
        """,
        env={"PYTHONPATH": os.pathsep.join([str(example_plugin), str(REPO)])},
    )
    assert "example_policies" in result["plugins"]
    assert result["plain"] == 1  # built-in policy: not idempotent, not retried
    assert result["custom"] == 3  # the example's RetryEverything: 1 + 2 attempts
    assert result["stamp"] == "custom" and result["plain_stamp"] is None  # its middleware, only where enabled
    assert result["seen"] == [True, False]
