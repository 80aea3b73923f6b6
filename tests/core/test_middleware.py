"""ServiceMiddleware: ordering, rejection, failures seen by after-hooks, replacement, short-circuit."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kservice import (
    MAY_HAVE_RUN,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
)

from tests.core.faulty import Counter
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


class ExitsInHooks(ServiceMiddleware):
    """Client hooks that raise what ends threads: SystemExit after ``add``'s answer, KeyboardInterrupt before ``value``."""

    def before_call(self, request: ServiceRequest) -> None:
        if request.method_name == "value":
            raise KeyboardInterrupt("pressed in a before-hook")

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if request.method_name == "add":
            raise SystemExit(9)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_client_hook_raising_system_exit_is_its_calls_outcome_and_async_calls_go_on(kind: str) -> None:
    """Before: over mmap, the after-hook ran in the connection's response thread and SystemExit ended it,
    so this call and every later async call of the process waited out its timeout; in-process, the call
    waited out its deadline and was then reported as held by the hook."""
    environment = ServiceEnvironment("hook-exits", {"service_call": {"max_retries": 0}})
    environment.register_service("counter", ServiceFactory("counter", Counter), kind=kind)
    environment.add_middleware(ExitsInHooks())
    with environment, ServiceManager(environment) as manager:
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(SystemExit):  # as from a sync call, whose hooks run in the caller's thread
                manager.call_service_async("counter", "add", (1,), timeout=5).result(10)
            with pytest.raises(KeyboardInterrupt, match="before-hook"):
                manager.call_service_async("counter", "value", timeout=5).result(10)
            assert time.monotonic() - began < 2.5, "a call waited for its timeout"
            futures = [manager.call_service_async("counter", "echo", (i,), timeout=5) for i in range(20)]
            assert [future.result(10) for future in futures] == list(range(20))
        with pytest.raises(SystemExit):
            manager.call_service_sync("counter", "add", (1,), timeout=5)
        assert manager.call_service_sync("counter", "echo", ("still serving",), timeout=5) == "still serving"


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


class FailFirstSuccess(ServiceMiddleware):
    """Turns the first successful answer into a runtime failure that provably never ran (so it is retried)."""

    def __init__(self) -> None:
        self.turned = 0

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        if response.success and not self.turned:
            self.turned += 1
            failed = ServiceResponse.from_exception(
                request.request_id, ServiceUnavailableError("turned by middleware"), origin="runtime"
            )
            failed.metadata[MAY_HAVE_RUN] = False
            return failed
        return None


@pytest.mark.timeout(30)
def test_async_success_turned_into_a_failure_by_an_after_hook_fails_or_is_retried_as_sync() -> None:
    # An async call's successful reply takes a shorter path through its after-hooks than a failed
    # one: a hook that raises there still fails the future (outer middleware seeing the error), and
    # a hook that turns the success into a retryable failure still gets the call retried.
    log: list[str] = []
    with _env(Trace("outer", log), BrokenAfter()) as env, ServiceManager(env) as manager:
        with pytest.raises(RuntimeError, match="metrics backend down"):
            manager.call_service_async("kv", "get", ("a",)).result(timeout=5)
        assert log[-1] == "outer.after_call RuntimeError"
    turning = FailFirstSuccess()
    with _env(turning) as env, ServiceManager(env) as manager:
        assert manager.call_service_async("kv", "get", ("a",), timeout=10).result(timeout=10) == 1
        assert turning.turned == 1
        assert env.get_task("kv").get_service_status().requests_total == 2  # sent again
        assert manager.call_service_async("kv", "get", ("a",)).result(timeout=5) == 1


def test_middleware_that_overrides_nothing_is_not_in_the_chain() -> None:
    from kservice._middleware import MiddlewareChain

    assert not MiddlewareChain([ServiceMiddleware(), object()], "client")
    assert MiddlewareChain([Reject()], "client")
    assert not MiddlewareChain([Reject()], "server")


# ------------------------------------------------------------- observers


class Observer(ServiceMiddleware):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, float]] = []
        self.handles: list[tuple[str, Any, float]] = []

    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        self.calls.append((request.method_name, response.result if response.success else response.error_type, seconds))

    def observe_handle(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        self.handles.append((threading.current_thread().name, response.result, seconds))


class Times(ServiceMiddleware):
    """Multiplies an int result in after_call (registered after the observer, so it runs before it)."""

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        if response.success and isinstance(response.result, int):
            return ServiceResponse(True, response.result * 10, request_id=response.request_id)
        return None


def test_observers_see_the_final_response_and_the_attempt_duration_on_both_sides() -> None:
    observer = Observer()
    with _env(observer, Times()) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv", "get", ("a",)) == 10
        assert manager.call_service_async("kv", "sleep", (0.05,)).result(timeout=5) == 0.05
        with pytest.raises(KeyError):
            manager.call_service_sync("kv", "require", ("missing",))
    (get, got, _), (slept, napped, nap_seconds), (require, failed, _) = observer.calls
    assert (get, got) == ("get", 10)  # after every after-hook: the result the caller got
    assert (slept, napped) == ("sleep", 0.05) and nap_seconds >= 0.05
    assert (require, failed) == ("require", "KeyError")
    assert len(observer.handles) == 3 and observer.handles[0][1] == 1  # the server side sees the method's result
    assert all(name.startswith("kservice-kv") for name, _, _ in observer.handles[:2])
    assert observer.handles[1][2] >= 0.05


class Doubling(ServiceMiddleware):
    """Server side: an after-hook that doubles the result, and an observer that logs what it sees."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if response.success:
            response.result *= 2

    def observe_handle(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        self.log.append(("observed", response.result, response.error_type, seconds))


@pytest.mark.timeout(30)
def test_execute_answers_after_the_after_hooks_and_before_the_observers_even_when_answering_fails() -> None:
    log: list[Any] = []

    def answer(request: ServiceRequest, response: ServiceResponse) -> None:
        log.append(("answered", request.request_id, response.result, response.error_type))
        time.sleep(0.05)  # not counted in the observed duration
        if request.args == ("boom",):
            raise BrokenPipeError("the caller's ring is gone")

    with _env(Doubling(log)) as env:
        task = env.tasks()["kv"]
        response = task.execute(ServiceRequest("r-1", "kv", "get", ("a",)), answer=answer)
        assert response.result == 2
        with pytest.raises(BrokenPipeError):
            task.execute(ServiceRequest("r-2", "kv", "require", ("boom",)), answer=answer)
        expired = ServiceRequest("r-3", "kv", "get", ("a",), deadline=time.time() - 1)
        assert task.execute(expired, answer=answer).error_type == "ServiceTimeoutError"
        # An unknown method reaches the chain: answered, then observed.
        assert task.execute(ServiceRequest("r-4", "kv", "nope"), answer=answer).error_type == "MethodNotFoundError"
    assert log[0] == ("answered", "r-1", 2, "")
    assert log[1][:3] == ("observed", 2, "") and log[1][3] < 0.05
    assert log[2] == ("answered", "r-2", None, "KeyError")
    assert log[3][:3] == ("observed", None, "KeyError")  # observed although answering raised
    assert log[4] == ("answered", "r-3", None, "ServiceTimeoutError")  # refused before any hook: answered, not observed
    assert log[5] == ("answered", "r-4", None, "MethodNotFoundError")
    assert log[6][:3] == ("observed", None, "MethodNotFoundError")
    assert len(log) == 7


class BrokenObserver(ServiceMiddleware):
    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        raise RuntimeError("observer down")

    observe_handle = observe_call


def test_an_observer_that_raises_changes_nothing_and_one_not_reached_is_not_told() -> None:
    inner = Observer()
    with _env(BrokenObserver(), Answer(), inner) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv", "get", ("a",)) == 1
        assert manager.call_service_sync("kv", "get", ("cached",)) == "from middleware"
    # Answer (registered before it) answered the second call: it never reached the inner observer.
    assert [(method, result) for method, result, _ in inner.calls] == [("get", 1)]
    assert len(inner.handles) == 1


# ------------------------------------------------ compiled chain vs its specification

_BEFORE_ACTIONS = ("none", "replace", "answer", "raise")
_AFTER_ACTIONS = ("none", "replace", "raise")


class Scripted(ServiceMiddleware):
    """A middleware whose hooks act as scripted, recording what they saw."""

    def __init__(
        self, index: int, before: str | None, after: str | None, observe: bool, log: list[Any], idle: bool | None = None
    ) -> None:
        self.index, self.log = index, log
        if idle is not None:
            self.hooks_idle = idle  # declares ServiceMiddleware.hooks_idle: the client chain reads it
        if before is not None:
            self.before_call = lambda request: self._before(before, request)  # type: ignore[method-assign]
        if after is not None:
            self.after_call = lambda response, request: self._after(after, response, request)  # type: ignore[method-assign]
        if observe:
            self.observe_call = self._observe  # type: ignore[method-assign]

    def _before(self, action: str, request: ServiceRequest) -> Any:
        self.log.append(("before", self.index, request.args))
        if action == "raise":
            raise ValueError(f"before {self.index}")
        if action == "answer":
            return ServiceResponse(True, f"answered by {self.index}", request_id=request.request_id)
        if action == "replace":
            return ServiceRequest(
                request.request_id,
                request.service_name,
                request.method_name,
                (*request.args, self.index),
                deadline=request.deadline,
            )
        return None

    def _after(self, action: str, response: ServiceResponse, request: ServiceRequest) -> Any:
        self.log.append(("after", self.index, response.result, response.error, request.args))
        if action == "raise":
            raise KeyError(f"after {self.index}")
        if action == "replace":
            return ServiceResponse(True, f"{response.result}>{self.index}", request_id=response.request_id)
        return None

    def _observe(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        self.log.append(("observe", self.index, response.result, response.error, request.args, seconds >= 0))


def _specified(middlewares: list[Scripted], request: ServiceRequest, log: list[Any]) -> ServiceResponse:
    """The chain's documented behaviour, written as plainly as possible."""
    limit = len(middlewares)
    response = None
    for index, middleware in enumerate(middlewares):
        if "before_call" not in vars(middleware) or middleware.hooks_idle:
            continue
        try:
            outcome = middleware.before_call(request)
        except Exception as exc:
            response = ServiceResponse.from_exception(request.request_id, exc, origin="client")
            limit = index
            break
        if isinstance(outcome, ServiceResponse):
            response, limit = outcome, index
            break
        if outcome is not None:
            request = outcome
    if response is None:
        response = ServiceResponse(True, f"served {request.args}", request_id=request.request_id)
    for index in reversed(range(limit)):
        middleware = middlewares[index]
        if "after_call" in vars(middleware) and (not response.success or not middleware.hooks_idle):
            try:
                outcome = middleware.after_call(response, request)
            except Exception as exc:
                outcome = ServiceResponse.from_exception(request.request_id, exc, origin="client")
            if outcome is not None:
                response = outcome
    for index in range(limit):
        if "observe_call" in vars(middlewares[index]):
            middlewares[index].observe_call(request, response, 0.0)
    return response


@given(
    st.lists(
        st.tuples(
            st.sampled_from((None, *_BEFORE_ACTIONS)),
            st.sampled_from((None, *_AFTER_ACTIONS)),
            st.booleans(),
            st.sampled_from((None, False, True)),
        ),
        max_size=6,
    ),
    st.sampled_from(("run_after", "two steps", "run_sync")),
)
@settings(max_examples=300, deadline=None)
def test_the_compiled_chain_behaves_as_specified(
    script: list[tuple[str | None, str | None, bool, bool | None]], mode: str
) -> None:
    """``run_after``, the same in two steps (``run_after_hooks``, then ``run_observers``), or a sync
    call's whole attempt (``run_sync``, the transport's call included), as specified.

    A middleware that is ``hooks_idle`` has its before-hook skipped and its after-hook run for failures only.
    """
    from kservice._middleware import MiddlewareChain, MiddlewareError

    def build(log: list[Any]) -> list[Scripted]:
        return [
            Scripted(i, before, after, observe, log, idle) for i, (before, after, observe, idle) in enumerate(script)
        ]

    request = ServiceRequest("r-1", "svc", "m", ("arg",))
    expected_log: list[Any] = []
    expected = _specified(build(expected_log), request, expected_log)

    log: list[Any] = []
    chain = MiddlewareChain(build(log), "client")
    if mode == "run_sync":

        class Connection:
            def call(self, sent: ServiceRequest, timeout: float) -> ServiceResponse:
                assert 0 < timeout <= 60
                return ServiceResponse(True, f"served {sent.args}", request_id=sent.request_id)

        timed = ServiceRequest("r-1", "svc", "m", ("arg",), deadline=time.time() + 60)
        got = chain.run_sync(timed, Connection())
        assert _outcome(got) == _outcome(expected)
        assert log == expected_log
        return
    began = time.perf_counter()
    try:
        sent, response, limit = chain.run_before(request)
    except MiddlewareError as exc:  # as the manager does
        sent, limit = exc.request, exc.index
        response = ServiceResponse.from_exception(request.request_id, exc.error, origin="client")
    if response is None:
        response = ServiceResponse(True, f"served {sent.args}", request_id=sent.request_id)
    if mode == "two steps":
        got = chain.run_after_hooks(sent, response, limit)
        assert chain.has_observers == any(observe for _, _, observe, _ in script)
        chain.run_observers(sent, got, limit, time.perf_counter() - began)
    else:
        got = chain.run_after(sent, response, limit, began)
    assert _outcome(got) == _outcome(expected)
    assert log == expected_log


def _outcome(response: ServiceResponse) -> tuple[Any, ...]:
    """What a caller sees of a response: success, result, error and its type."""
    return response.success, response.result, response.error, response.error_type


class ExplodingBefore(ServiceMiddleware):
    def before_call(self, request: ServiceRequest) -> None:
        raise LookupError("raised inside the chain")


def test_a_traceback_through_a_compiled_chain_shows_the_generated_source() -> None:
    """The generated chain's code is in linecache: tracebacks (and debuggers) show its lines, not blanks."""
    import traceback

    from kservice._middleware import MiddlewareChain, MiddlewareError

    chain = MiddlewareChain([ServiceMiddleware(), ExplodingBefore()], "client")
    with pytest.raises(MiddlewareError) as caught:
        chain.run_before(ServiceRequest("r-1", "svc", "get"))
    shown = "".join(traceback.format_exception(caught.value.error))
    assert "outcome = before_1(request)" in shown, shown
    assert "<kservice middleware chain" in shown and "in run_before" in shown
    # Chains of the same shape share one generated source (linecache does not grow per route).
    again = MiddlewareChain([ServiceMiddleware(), ExplodingBefore()], "client")
    assert again.run_before.__code__.co_filename == chain.run_before.__code__.co_filename


_GENERATED = ("admit", "run_before", "run_sync", "run_after", "run_after_hooks", "run_observers")


def _compiled(chain: Any) -> set[str]:
    """The generated functions ``chain`` has compiled (read through the slots: reading compiles none)."""
    from kservice._middleware import MiddlewareChain

    found = set()
    for name in _GENERATED:
        try:
            getattr(MiddlewareChain, name).__get__(chain)
        except AttributeError:
            continue
        found.add(name)
    return found


class Admitting(Trace):
    def admit(self, service_name: str, method_name: str) -> BaseException | None:
        return None

    def on_refused(self, service_name: str, method_name: str, error: BaseException) -> None:
        pass


def test_a_chain_compiles_each_function_when_first_read() -> None:
    """A sync caller compiles its route's ``admit`` and ``run_sync`` only; the rest when something reads them."""
    log: list[str] = []
    with _env(Admitting("m", log)) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv", "get", ("a",)) == 1
        chain = manager._routes["kv"].chain
        assert chain is not None
        assert _compiled(chain) == {"admit", "run_sync"}
        assert manager.call_service_async("kv", "get", ("a",)).result(timeout=10) == 1
        assert _compiled(chain) == {"admit", "run_sync", "run_before", "run_after"}
    assert [line for line in log if "_call" in line] == ["m.before_call get", "m.after_call ok"] * 2
    with pytest.raises(AttributeError, match="no attribute 'run_nothing'"):
        chain.run_nothing  # noqa: B018
    # A task's server chain is built when the task starts: what the task runs is compiled then.
    from kservice._middleware import MiddlewareChain

    server = MiddlewareChain([Admitting("m", log)], "server")
    assert _compiled(server) == {"admit", "run_before", "run_after", "run_after_hooks", "run_observers"}
