"""The breaker and the retry policy on ``ServiceManager.map``'s compact chunks (default plugins, a real host process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager
from kservice.middleware import metrics
from kservice.plugins.breaker import CircuitOpenError, breaker_state, reset_breaker

from tests.mmap.batch_services import count_chunk_records

pytestmark = pytest.mark.timeout(120)

SERVICE = "tests.mmap.batch_services:Items"
#: Every plugin at its defaults, stated for tracing: its default joins the chain only once an OpenTelemetry
#: provider is configured, which other tests of the session do (tracing has no batch hooks).
DEFAULTS: dict[str, Any] = {"health": {"enabled": False}, "tracing": {"enabled": False}}


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the compact chunk records sent (the compact path's trace)."""
    return count_chunk_records(monkeypatch)


def _host(name: str, config: dict[str, Any]) -> Iterator[ServiceManager]:
    env = ServiceEnvironment(name, {**DEFAULTS, **config})
    env.register_service(name, ServiceFactory(name, SERVICE), kind="process")
    with env:
        manager = env.manager()
        manager.call_service_sync(name, "check", (1,))  # known fast: the host runs chunks in its loop
        yield manager


def test_the_breaker_opens_on_failures_inside_a_chunk_and_refuses_the_later_chunks(chunks: list[int]) -> None:
    name = "items-map-breaker"
    for manager in _host(name, {"breaker": {"count_service_errors": True, "cooldown": 60.0}}):
        try:
            results = list(
                manager.map(
                    name,
                    "check",
                    range(40),
                    kwargs={"bad": 1},  # every call fails
                    chunk_size=10,
                    max_in_flight=10,  # one chunk in flight: the next leaves after the first is answered
                    return_exceptions=True,
                )
            )
            assert chunks == [10]  # only the first chunk was sent
            assert all(isinstance(r, ValueError) for r in results[:10]), results[:10]
            refused = results[10:]
            assert all(isinstance(r, CircuitOpenError) for r in refused), refused
            assert all(r.may_have_run is False for r in refused)
            assert len({id(r) for r in refused}) == len(refused)  # each item its own exception
            assert "item 10 of map" in " ".join(refused[0].__notes__)
            assert breaker_state(name) == "open"
            client = metrics.snapshot()["client"][name]["methods"]["check"]
            assert client["errors_by_type"]["CircuitOpenError"] == 30  # refused chunks are counted too
        finally:
            reset_breaker(name)
        assert manager.call_service_sync(name, "count") == 1 + 10  # the warm-up and the first chunk, no more


def test_the_retry_budget_counts_every_item_of_a_map(chunks: list[int]) -> None:
    name = "items-map-budget"
    for manager in _host(name, {}):
        (counter,) = [m for m in manager.client_middlewares(name) if type(m).__name__ == "RetryBudgetCounter"]
        before = counter.budget.calls
        assert list(manager.map(name, "check", range(500), chunk_size=100)) == list(range(500))
        assert chunks == [100] * 5
        assert counter.budget.calls - before == 500


def test_items_a_chunk_failed_that_may_be_retried_are_sent_again_one_by_one(chunks: list[int]) -> None:
    """An idempotent method's failures are retried under the policy, as a single call's are."""
    name = "items-map-retry"
    for manager in _host(name, {"service_call": {"retry_interval": 0.01, "retry_jitter": 0.0}}):
        (counter,) = [m for m in manager.client_middlewares(name) if type(m).__name__ == "RetryBudgetCounter"]
        before = counter.budget.calls
        count = 200
        assert list(manager.map(name, "once_failing", [(x, 10) for x in range(count)], chunk_size=50)) == list(
            range(count)
        )
        assert chunks == [50] * 4  # the first attempts went compact
        retried = count // 10
        assert counter.budget.calls - before == count + retried  # each retry is an attempt through before_call
        assert manager.call_service_sync(name, "count") == 1 + count + retried  # each failed item ran once more
