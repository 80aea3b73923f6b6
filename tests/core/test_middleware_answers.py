"""A middleware hook that returns something it does not return: the call fails with a TypeError naming it, by its deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceMiddleware

pytestmark = pytest.mark.timeout(60)


class WrongBeforeCall(ServiceMiddleware):
    def before_call(self, request: Any) -> Any:
        return 5


class WrongAfterCall(ServiceMiddleware):
    def after_call(self, response: Any, request: Any) -> Any:
        return "done"


class WrongBeforeHandle(ServiceMiddleware):
    def before_handle(self, request: Any) -> Any:
        return 5


class WrongAfterHandle(ServiceMiddleware):
    def after_handle(self, response: Any, request: Any) -> Any:
        return {"result": 1}


CASES = [
    (WrongBeforeCall, "before_call returned int 5"),
    (WrongAfterCall, "after_call returned str 'done'"),
    (WrongBeforeHandle, "before_handle returned int 5"),
    (WrongAfterHandle, "after_handle returned dict"),
]


@pytest.fixture(params=["local", "process"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


@pytest.mark.parametrize(("middleware", "fragment"), CASES, ids=[case[0].__name__ for case in CASES])
def test_a_hook_answering_something_it_does_not_return_fails_the_call_naming_it_and_the_service_keeps_serving(
    middleware: type, fragment: str, kind: str
) -> None:
    environment = ServiceEnvironment("wrong-answers")
    environment.register_service("kv", ServiceFactory("kv", dict, ({"a": 1},)), kind=kind)
    environment.add_middleware(middleware())
    with environment, ServiceManager(environment) as manager:
        # Before: a bare AttributeError ('int' object has no attribute 'deadline' ...) for a sync
        # call, and for an async one a future that never completed (its worker thread died).
        with pytest.raises(Exception) as raised:
            manager.call_service_sync("kv", "get", ("a",), timeout=5)
        assert fragment in str(raised.value), raised.value
        assert f"{middleware.__qualname__}" in str(raised.value)
        began = time.monotonic()
        error = manager.call_service_async("kv", "get", ("a",), timeout=5).exception(timeout=10)
        assert error is not None and fragment in str(error), error
        assert time.monotonic() - began < 5
        task = environment.get_task("kv")
        assert task is not None and task.state == "running"  # the service itself keeps serving


class WrongAdmit(ServiceMiddleware):
    def admit(self, service_name: str, method_name: str) -> Any:
        return "closed"


def test_an_admit_answering_something_that_is_no_exception_refuses_with_a_type_error_naming_it() -> None:
    environment = ServiceEnvironment("wrong-admit")
    environment.register_service("kv", ServiceFactory("kv", dict, ({"a": 1},)))
    environment.add_middleware(WrongAdmit())
    with environment, ServiceManager(environment) as manager:
        # Before: "TypeError: exceptions must derive from BaseException", naming nothing.
        with pytest.raises(
            TypeError, match=r"WrongAdmit\.admit returned str 'closed'; it returns None, or the exception"
        ):
            manager.call_service_sync("kv", "get", ("a",), timeout=5)
        error = manager.call_service_async("kv", "get", ("a",), timeout=5).exception(timeout=10)
        assert isinstance(error, TypeError) and "WrongAdmit.admit" in str(error), error


class AsyncObserver(ServiceMiddleware):
    async def observe_call(self, request: Any, response: Any, elapsed: float) -> None:
        pass


class AsyncBeforeCall(ServiceMiddleware):
    async def before_call(self, request: Any) -> Any:
        return None


class AsyncAfterHandle(ServiceMiddleware):
    async def after_handle(self, response: Any, request: Any) -> Any:
        return None


@pytest.mark.parametrize("middleware", [AsyncObserver, AsyncBeforeCall, AsyncAfterHandle])
def test_a_middleware_with_an_async_def_hook_is_refused_naming_the_hook(middleware: type) -> None:
    """Hooks run inside the call and are never awaited. Before, an ``async def`` observer silently never ran
    (its coroutine was dropped, "never awaited"), and a before- or after-hook failed every call with
    "returned coroutine"; now the middleware is refused when added, naming the hook and what to do."""
    environment = ServiceEnvironment("async-hooks")
    environment.register_service("kv", ServiceFactory("kv", dict, ({"a": 1},)))
    hook = next(name for name in vars(middleware) if not name.startswith("_"))
    with pytest.raises(
        TypeError, match=rf"{middleware.__qualname__}\.{hook} is async def: .* make it a plain function"
    ):
        environment.add_middleware(middleware())
    assert environment.middlewares == ()
    with environment, ServiceManager(environment) as manager:
        assert manager.call_service_sync("kv", "get", ("a",), timeout=5) == 1


def test_a_plugins_middleware_with_an_async_def_hook_is_refused_when_the_service_starts_naming_the_hook() -> None:
    """A plugin's middleware is checked when a chain is compiled: the service it applies to refuses to start,
    naming the hook (as a bad fallback config does); other services start and serve."""
    import kservice
    from kservice import hookimpl

    class Plugin:
        @hookimpl
        def kservice_middleware(self, service_name: str, options: dict[str, Any]) -> Any:
            return AsyncObserver() if service_name == "kv" else None

    plugins = kservice.get_plugin_manager()
    plugins.register(Plugin(), name="test-async-observer")
    try:
        environment = ServiceEnvironment("async-hooks-plugin")
        other = environment.register_service("other", ServiceFactory("other", dict, ({"b": 2},)))
        other.start_service()
        with pytest.raises(kservice.ServiceUnavailableError) as raised:
            environment.register_service("kv", ServiceFactory("kv", dict, ({"a": 1},))).start_service()
        assert isinstance(raised.value.__cause__, TypeError), raised.value
        assert "AsyncObserver.observe_call is async def" in str(raised.value.__cause__)
        with ServiceManager(environment) as manager:
            assert manager.call_service_sync("other", "get", ("b",), timeout=5) == 2
        environment.stop()
    finally:
        plugins.unregister(name="test-async-observer")
