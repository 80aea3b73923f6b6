"""ServiceMiddleware: ordering, rejection, failures seen by after-hooks, replacement, short-circuit."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kservice import (
    ServiceEnvironment,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
)

from tests.core.services import KeyValue


class Trace(ServiceMiddleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def before_call(self, request: ServiceRequest) -> None:
        self.log.append(f"{self.name}.before_call {request.method_name}")

    def after_call(self, response: ServiceResponse) -> None:  # the seed's one-argument form
        self.log.append(f"{self.name}.after_call {'ok' if response.success else response.error_type}")

    def before_handle(self, request: ServiceRequest) -> None:
        self.log.append(f"{self.name}.before_handle {threading.current_thread().name.startswith('kservice-kv')}")

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> None:
        self.log.append(f"{self.name}.after_handle {request.method_name}")


def _env(*middlewares: Any) -> ServiceEnvironment:
    env = ServiceEnvironment("mw")
    for middleware in middlewares:
        env.add_middleware(middleware)
    env.register_service("kv", KeyValue, {"a": 1})
    return env


def test_before_hooks_in_order_after_hooks_reversed_on_both_sides() -> None:
    log: list[str] = []
    with _env(Trace("m1", log), Trace("m2", log)) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv", "get", ("a",)) == 1
    assert log == [
        "m1.before_call get",
        "m2.before_call get",
        "m1.before_handle True",  # server hooks run in the worker thread
        "m2.before_handle True",
        "m2.after_handle get",
        "m1.after_handle get",
        "m2.after_call ok",
        "m1.after_call ok",
    ]


def test_after_hooks_see_failures_and_finish_before_the_caller_returns() -> None:
    log: list[str] = []
    with _env(Trace("m", log)) as env, ServiceManager(env) as manager:
        with pytest.raises(KeyError):
            manager.call_service_sync("kv", "require", ("x",))
        assert log[-1] == "m.after_call KeyError"
        future = manager.call_service_async("kv", "require", ("x",))
        with pytest.raises(KeyError):
            future.result(timeout=5)
        assert log[-1] == "m.after_call KeyError"


class Reject(ServiceMiddleware):
    def before_call(self, request: ServiceRequest) -> None:
        if request.method_name == "put":
            raise PermissionError("read-only client")


def test_before_hook_that_raises_rejects_the_call_before_the_service_sees_it() -> None:
    log: list[str] = []
    with _env(Trace("outer", log), Reject()) as env, ServiceManager(env) as manager:
        with pytest.raises(PermissionError, match="read-only client"):
            manager.call_service_sync("kv", "put", ("a", 2))
        with pytest.raises(PermissionError):
            manager.call_service_async("kv", "put", ("a", 2)).result(timeout=5)
        assert not any("before_handle" in line for line in log)
        assert log[-1] == "outer.after_call PermissionError"  # earlier middleware still sees the failure
        assert manager.call_service_sync("kv", "get", ("a",)) == 1


class Rewrite(ServiceMiddleware):
    def before_call(self, request: ServiceRequest) -> ServiceRequest:
        request.args = tuple(a.upper() if isinstance(a, str) else a for a in request.args)
        return request

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse:
        if response.success and isinstance(response.result, int):
            return ServiceResponse(True, response.result * 10, request_id=response.request_id)
        return response


def test_hooks_may_replace_request_and_response() -> None:
    with _env(Rewrite()) as env, ServiceManager(env) as manager:
        manager.call_service_sync("kv", "put", ("k", 4))
        assert env.get_task("kv").service.keys() == ["K", "a"]
        assert manager.call_service_sync("kv", "get", ("k",)) == 40
        assert manager.call_service_async("kv", "get", ("k",)).result(timeout=5) == 40


class Answer(ServiceMiddleware):
    def before_call(self, request: ServiceRequest) -> ServiceResponse | None:
        if request.method_name == "get" and request.args == ("cached",):
            return ServiceResponse(True, "from middleware", request_id=request.request_id)
        return None


def test_before_hook_can_answer_without_reaching_the_service() -> None:
    with _env(Answer()) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv", "get", ("cached",)) == "from middleware"
        assert manager.call_service_async("kv", "get", ("cached",)).result(timeout=5) == "from middleware"
        assert env.get_task("kv").get_service_status().requests_total == 0


class BrokenAfter(ServiceMiddleware):
    def after_call(self, response: ServiceResponse) -> None:
        raise RuntimeError("metrics backend down")


class BrokenServerSide(ServiceMiddleware):
    def before_handle(self, request: ServiceRequest) -> None:
        if request.method_name == "keys":
            raise LookupError("tenant unknown")


def test_raising_after_hook_and_server_hook_give_typed_errors_and_keep_serving() -> None:
    log: list[str] = []
    with _env(Trace("outer", log), BrokenAfter()) as env, ServiceManager(env) as manager:
        with pytest.raises(RuntimeError, match="metrics backend down"):
            manager.call_service_sync("kv", "get", ("a",))
        assert log[-1] == "outer.after_call RuntimeError"
        assert env.get_task("kv").get_service_status().requests_total == 1
    with _env(BrokenServerSide()) as env, ServiceManager(env) as manager:
        with pytest.raises(LookupError, match="tenant unknown"):
            manager.call_service_sync("kv", "keys")
        assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_middleware_that_overrides_nothing_is_not_in_the_chain() -> None:
    from kservice._middleware import MiddlewareChain

    assert not MiddlewareChain([ServiceMiddleware(), object()], "client")
    assert MiddlewareChain([Reject()], "client")
    assert not MiddlewareChain([Reject()], "server")
