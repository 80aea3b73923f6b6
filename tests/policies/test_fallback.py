"""The fallback plugin: declared answers for open breakers, unavailable and timed-out services."""

from __future__ import annotations

from typing import Any

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceRequest, ServiceResponse
from kservice.plugins import fallback as fb

from tests.policies.conftest import chain_of
from tests.policies.services import Flaky

FLAKY = "tests.policies.services:Flaky"


class Seen(kservice.ServiceMiddleware):
    """An environment middleware (outermost): records the response the caller gets."""

    def __init__(self) -> None:
        self.responses: list[ServiceResponse] = []

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        self.responses.append(response)


@pytest.mark.timeout(30)
def test_config_fallback_answers_when_the_breaker_is_open_and_is_marked_degraded() -> None:
    config = {
        "service_call": {"max_retries": 0},
        "breaker": {"failure_threshold": 2, "cooldown": 30, "count_service_errors": True},
        "services": {"flaky": {"class": FLAKY, "fallback": {"methods": {"toggle": {"value": "cached-answer"}}}}},
    }
    seen = Seen()
    env = ServiceEnvironment("t", config)
    env.add_middleware(seen)
    with env, env.manager() as manager:
        flaky = env.get_task("flaky").service
        flaky.failing = True
        before = fb.degraded_counts().get(("flaky", "toggle"), 0)
        for _ in range(2):
            with pytest.raises(ConnectionError):  # method errors are not covered by default
                manager.call_service_sync("flaky", "toggle")
        assert manager.call_service_sync("flaky", "toggle") == "cached-answer"  # breaker open -> fallback
        assert flaky.calls["toggle"] == 2
        last = seen.responses[-1]
        assert last.degraded and last.metadata["kservice.degraded"] is True
        assert last.metadata["kservice.fallback"] == "circuit_open"
        assert fb.degraded_counts()[("flaky", "toggle")] == before + 1
        with pytest.raises(kservice.ServiceUnavailableError):  # no fallback declared for this method
            manager.call_service_sync("flaky", "ok")


@pytest.mark.timeout(30)
def test_decorator_fallback_answers_a_timeout_sync_and_async() -> None:
    with ServiceEnvironment("t", {"service_call": {"max_retries": 0}}) as env:
        flaky = env.register_service("flaky", Flaky).service
        with env.manager() as manager:
            assert manager.call_service_sync("flaky", "recommend", ("ann",)) == {"items": ["ann"], "source": "service"}
            flaky.failing = True  # recommend now takes 0.3 s
            answer = manager.call_service_sync("flaky", "recommend", ("ann",), timeout=0.05)
            assert answer == {"items": [], "source": "decorator"}
            answer["items"].append("mutated")  # values are copied per call
            future = manager.call_service_async("flaky", "recommend", ("bob",), timeout=0.05)
            assert future.result(timeout=2) == {"items": [], "source": "decorator"}


@pytest.mark.timeout(30)
def test_caller_registered_handler_gets_the_request_and_the_error() -> None:
    got: list[Any] = []

    def handler(request: ServiceRequest, error: BaseException) -> str:
        got.append((request.method_name, request.args, type(error).__name__))
        return f"fallback for {request.args[0]}"

    fb.register_fallback("flaky", "ok", handler=handler)
    try:
        with ServiceEnvironment("t", {"service_call": {"max_retries": 0}}) as env:
            task = env.register_service("flaky", Flaky)
            with env.manager() as manager:
                assert manager.call_service_sync("flaky", "ok", ("x",)) == "x"
                task._state = "starting"  # unavailable
                assert manager.call_service_sync("flaky", "ok", ("y",)) == "fallback for y"
                task.stop_service()  # stopped on purpose is covered as 'unavailable' too
                assert manager.call_service_sync("flaky", "ok", ("z",)) == "fallback for z"
        assert got == [("ok", ("y",), "ServiceUnavailableError"), ("ok", ("z",), "ServiceStoppedError")]
    finally:
        assert fb.unregister_fallback("flaky", "ok")


def _notes_of_a_timeout_covered_by(handler: Any) -> list[str]:
    """The notes of a call that times out while fallback ``handler`` covers it; the service serves on after it."""
    fb.register_fallback("flaky", "sleep", handler=handler)
    try:
        with ServiceEnvironment("t", {"service_call": {"max_retries": 0}}) as env:
            env.register_service("flaky", Flaky)
            with env.manager() as manager:
                with pytest.raises(kservice.ServiceTimeoutError) as caught:
                    manager.call_service_sync("flaky", "sleep", (0.2,), timeout=0.02)
                assert manager.call_service_sync("flaky", "ok", (1,)) == 1  # still serving
        return caught.value.__notes__
    finally:
        fb.unregister_fallback("flaky", "sleep")


@pytest.mark.timeout(30)
def test_a_failing_handler_gives_the_original_error_with_a_note() -> None:
    def broken(request: ServiceRequest, error: BaseException) -> None:
        raise RuntimeError("handler bug")

    assert any("handler bug" in note for note in _notes_of_a_timeout_covered_by(broken))


@pytest.mark.timeout(30)
def test_on_error_covers_method_exceptions_and_disabled_means_no_middleware() -> None:
    config = {
        "service_call": {"max_retries": 0},
        "services": {
            "a": {"class": FLAKY, "fallback": {"on": ["error"], "methods": {"key_error": {"value": 0}}}},
            "b": {"class": FLAKY, "fallback": {"enabled": False, "methods": {"key_error": {"value": 0}}}},
        },
    }
    with ServiceEnvironment("t", config) as env, env.manager() as manager:
        assert manager.call_service_sync("a", "key_error") == 0
        with pytest.raises(KeyError):
            manager.call_service_sync("b", "key_error")
        assert not any(isinstance(m, fb.FallbackMiddleware) for m in chain_of(manager, "b"))


@pytest.mark.timeout(30)
def test_bad_fallback_config_is_a_clear_error_and_bad_declarations_are_refused() -> None:
    config = {"services": {"flaky": {"class": FLAKY, "fallback": {"methods": {"ok": "plain"}}}}}
    env = ServiceEnvironment("t", config)
    # Checked when the service's chains are compiled: the task refuses to start, naming the key.
    with pytest.raises(
        kservice.ServiceUnavailableError,
        match=r"services.flaky.fallback.methods.ok: expected a mapping with exactly one key 'value'",
    ) as caught:
        env.start()
    assert isinstance(caught.value.__cause__, kservice.ConfigError)
    env.stop()
    with pytest.raises(TypeError, match="exactly one of value"):
        fb.register_fallback("x", "y")
    with pytest.raises(TypeError, match="exactly one of value"):
        fb.fallback(1, handler=lambda r, e: 2)


def test_values_are_copied_per_call_unless_nothing_in_them_can_change() -> None:
    request = ServiceRequest("r", "svc", "m")
    error = kservice.ServiceUnavailableError("down")
    mutable = fb.Fallback({"items": [("a", 1)]})
    first, second = mutable.answer(request, error), mutable.answer(request, error)
    assert first == second == {"items": [("a", 1)]} and first is not second and first["items"] is not second["items"]
    for value in ("degraded", b"x", 0, 1.5, None, True, ("a", (1, None)), frozenset({"a"})):
        assert fb.Fallback(value).answer(request, error) is value
    nested = fb.Fallback(("a", ["mutable"]))  # a tuple holding a list is copied
    assert nested.answer(request, error) is not nested.value


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_fallback_replaces_a_stream_that_failed_before_its_first_item_never_one_that_yielded(kind: str) -> None:
    # A stream cut mid-way and "rescued" looked complete: the caller saw a truncated stream end as a success.
    from tests.streaming.services import TokenModel

    name = f"fallback-tokens-{kind}"
    fb.register_fallback(name, "broken", value=["stand-in", "items"])
    fb.register_fallback(name, "slow", value=["late"])
    try:
        env = ServiceEnvironment("fallback-streams", {"service_call": {"max_retries": 0}})
        env.register_service(
            name, kservice.ServiceFactory(name, TokenModel), kind=kind, fallback={"on": ["error", "timeout"]}
        )
        with env, env.manager() as manager:
            before = fb.degraded_counts().get((name, "broken"), 0)
            got: list[Any] = []
            with pytest.raises(ValueError, match="broke after 2"):
                for item in manager.stream(name, "broken", (2,)):
                    got.append(item)
            assert got == [0, 1]  # the items, then the method's own error
            got = []
            with pytest.raises(kservice.ServiceTimeoutError):
                for item in manager.stream(name, "slow", (1000, 0.05), timeout=0.5):
                    got.append(item)
            assert 1 <= len(got) < 20 and got == list(range(len(got)))
            assert fb.degraded_counts().get((name, "broken"), 0) == before  # neither counted as degraded
            # Failed before its first item: the fallback's value is the stream's items.
            assert list(manager.stream(name, "broken", (0,))) == ["stand-in", "items"]
            assert fb.degraded_counts()[(name, "broken")] == before + 1
            assert list(manager.stream(name, "count", (3,))) == [0, 1, 2]  # the service keeps serving
    finally:
        fb.unregister_fallback(name, "broken")
        fb.unregister_fallback(name, "slow")


@pytest.mark.timeout(30)
def test_an_async_handler_is_refused_when_declared_and_a_coroutine_answer_is_no_value() -> None:
    """A fallback handler runs in the caller's thread, inside the call: its answer is the value the caller
    gets. Before, an ``async def`` handler was called and its coroutine, never awaited, was the caller's
    result: a "degraded" success holding a coroutine object."""

    async def fetch_stale(request: ServiceRequest, error: BaseException) -> str:
        return "stale"

    with pytest.raises(TypeError, match=r"fallback handler \S*fetch_stale is async def.*plain function"):
        fb.register_fallback("flaky", "ok", handler=fetch_stale)
    with pytest.raises(TypeError, match=r"fallback handler \S*fetch_stale is async def"):
        fb.fallback(handler=fetch_stale)
    # A plain callable that hands back a coroutine all the same: the call's own error, with a note saying why.
    notes = _notes_of_a_timeout_covered_by(lambda request, error: fetch_stale(request, error))
    assert any("returned a coroutine" in note for note in notes), notes
