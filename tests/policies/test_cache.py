"""The cache plugin: hits skip the service, TTL and size bounds, unhashable arguments, errors."""

from __future__ import annotations

import time
from typing import Any

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceRequest, ServiceResponse
from kservice.plugins.cache import ResultCache, cache_info, clear_cache

from tests.policies.conftest import chain_of

FLAKY = "tests.policies.services:Flaky"


def settings(**over: Any) -> dict[str, Any]:
    return {**kservice.Config.load({}).get("cache"), "enabled": True, **over}


@pytest.mark.timeout(10)
def test_ttl_and_maxsize_with_a_driven_clock() -> None:
    now = [0.0]
    cache = ResultCache("svc", settings(ttl=10.0, maxsize=2), lambda m: True, clock=lambda: now[0])

    def through(x: int) -> ServiceResponse | None:
        request = ServiceRequest(f"r{x}", "svc", "m", (x,))
        hit = cache.before_call(request)
        if hit is None:
            cache.after_call(ServiceResponse(True, x * 10), request)
        return hit

    assert through(1) is None
    hit = through(1)
    assert hit is not None and hit.result == 10 and hit.metadata["kservice.cache"] == "hit"
    now[0] = 10.5
    assert through(1) is None  # expired
    through(2)
    through(3)  # maxsize 2: the least recently used (1) is evicted
    assert through(1) is None


@pytest.mark.timeout(30)
def test_hits_skip_the_service_and_are_marked() -> None:
    config = {"cache": {"enabled": True, "ttl": 60}}
    marks: list[Any] = []

    class Peek(kservice.ServiceMiddleware):
        def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
            marks.append(response.metadata.get("kservice.cache"))

    env = ServiceEnvironment("t", config)
    env.add_middleware(Peek())
    env.register_service(
        "flaky", kservice.ServiceFactory("flaky", __import__("tests.policies.services", fromlist=["Flaky"]).Flaky)
    )
    with env, env.manager() as manager:
        flaky = env.get_task("flaky").service
        assert [manager.call_service_sync("flaky", "square", (3,)) for _ in range(5)] == [9] * 5
        assert flaky.calls["square"] == 1
        assert marks == [None, "hit", "hit", "hit", "hit"]
        assert manager.call_service_sync("flaky", "square", (3.0,)) == 9.0  # 3.0 is not 3: own entry
        assert manager.call_service_sync("flaky", "square", (True,)) == 1
        assert flaky.calls["square"] == 3
        # Not idempotent and not listed: never cached.
        manager.call_service_sync("flaky", "ok", (1,))
        manager.call_service_sync("flaky", "ok", (1,))
        assert flaky.calls["ok"] == 2
        assert cache_info("flaky")["hits"] == 4  # type: ignore[index]
        clear_cache("flaky")
        manager.call_service_sync("flaky", "square", (3,))
        assert flaky.calls["square"] == 4


@pytest.mark.timeout(30)
def test_unhashable_arguments_bypass_errors_are_not_cached_and_ttl_expires() -> None:
    config = {
        "services": {"flaky": {"class": FLAKY, "cache": {"enabled": True, "ttl": 0.2, "methods": ["lookup", "fail"]}}}
    }
    with ServiceEnvironment("t", config) as env, env.manager() as manager:
        flaky = env.get_task("flaky").service
        for _ in range(2):
            assert manager.call_service_sync("flaky", "lookup", ([1, 2],), {"k": {"a": 1}}) == [
                ([1, 2],),
                {"k": {"a": 1}},
            ]
        assert flaky.calls["lookup"] == 2  # unhashable: both ran, neither failed
        for _ in range(2):
            manager.call_service_sync("flaky", "lookup", (1,), {"b": 2, "a": 1})
        assert flaky.calls["lookup"] == 3
        manager.call_service_sync("flaky", "lookup", (1,), {"a": 1, "b": 2})  # kwargs order does not matter
        assert flaky.calls["lookup"] == 3
        for _ in range(2):
            with pytest.raises(ConnectionError):
                manager.call_service_sync("flaky", "fail")
        assert flaky.calls["fail"] == 2
        manager.call_service_sync("flaky", "square", (2,))
        manager.call_service_sync("flaky", "square", (2,))
        assert flaky.calls["square"] == 2  # methods list given: only those are cached
        time.sleep(0.25)  # deliberate: let the cache's TTL expire
        manager.call_service_sync("flaky", "lookup", (1,), {"a": 1, "b": 2})
        assert flaky.calls["lookup"] == 4  # the real-time TTL passed


@pytest.mark.timeout(30)
def test_cache_is_off_by_default_and_costs_nothing_then() -> None:
    with ServiceEnvironment("t", {"services": {"flaky": {"class": FLAKY}}}) as env, env.manager() as manager:
        manager.call_service_sync("flaky", "square", (2,))
        manager.call_service_sync("flaky", "square", (2,))
        assert env.get_task("flaky").service.calls["square"] == 2
        assert not any(isinstance(m, ResultCache) for m in chain_of(manager, "flaky"))


@pytest.mark.timeout(30)
def test_a_cache_hit_is_served_while_the_breaker_is_open_and_is_not_a_probe() -> None:
    config = {
        "service_call": {"max_retries": 0},
        "cache": {"enabled": True, "methods": ["square"]},
        "breaker": {"failure_threshold": 1, "cooldown": 30, "count_service_errors": True},
    }
    with ServiceEnvironment("t", {**config, "services": {"flaky": {"class": FLAKY}}}) as env, env.manager() as manager:
        assert manager.call_service_sync("flaky", "square", (4,)) == 16
        with pytest.raises(ConnectionError):
            manager.call_service_sync("flaky", "fail")
        from kservice.plugins.breaker import breaker_state

        assert breaker_state("flaky") == "open"
        assert manager.call_service_sync("flaky", "square", (4,)) == 16
        assert breaker_state("flaky") == "open"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_streams_are_never_cached_and_every_stream_yields_its_items(kind: str) -> None:
    # A stream's end is a success with no result: stored, it answered the next stream with nothing.
    from tests.streaming.services import TokenModel

    name = f"cached-tokens-{kind}"
    env = ServiceEnvironment("cache-streams", {"service_call": {"max_retries": 0}})
    env.register_service(
        name,
        kservice.ServiceFactory(name, TokenModel),
        kind=kind,
        idempotent=["count", "echo"],
        cache={"enabled": True},
    )
    with env, env.manager() as manager:
        for _ in range(3):
            assert list(manager.stream(name, "count", (3, "cached"))) == [0, 1, 2]
        assert manager.call_service_sync(name, "report")["closed"].count("cached") == 3  # the generator ran each time
        info = cache_info(name)
        assert info is not None and info["size"] == 0 and info["hits"] == 0
        # Plain calls of the same service are still cached, and the service keeps serving.
        assert [manager.call_service_sync(name, "echo", (5,)) for _ in range(2)] == [5, 5]
        info = cache_info(name)
        assert info is not None and info["size"] == 1 and info["hits"] == 1
        assert list(manager.stream(name, "count", (2,))) == [0, 1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_cached_result_is_not_changed_by_a_caller_changing_the_one_it_got(kind: str) -> None:
    """Every answer is the caller's own, as a call over the wire gives: a caller that appends to the list it
    got changes neither the cached result nor what the next hit returns. Before, the first answer and
    every hit were one shared object, so one caller's change reached every later caller of the service."""
    from tests.policies.services import Flaky

    name = f"cached-mutable-{kind}"
    env = ServiceEnvironment("cache-mutable", {"service_call": {"max_retries": 0}})
    env.register_service(
        name, kservice.ServiceFactory(name, Flaky), kind=kind, idempotent=["lookup"], cache={"enabled": True}
    )
    with env, env.manager() as manager:
        first = manager.call_service_sync(name, "lookup", ("books",))
        assert first == [("books",), {}]
        first.append("changed by the first caller")
        hit = manager.call_service_sync(name, "lookup", ("books",))
        assert hit == [("books",), {}]
        hit[1]["page"] = "changed by the second caller"
        again = manager.call_service_sync(name, "lookup", ("books",))
        assert again == [("books",), {}] and again is not hit
        info = cache_info(name)
        assert info is not None and info["hits"] == 2 and info["misses"] == 1
