"""``async def`` methods: awaited on the task's own event loop, on every in-host transport."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator

import kservice
import pytest
from kservice.testing import wait_for

from tests.streaming.services import AsyncGreeter, SelfCaller, SerialAsync

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env() -> Iterator[kservice.ServiceEnvironment]:
    environment = kservice.ServiceEnvironment("aio", {"service": {"local": {"max_concurrency": 3}}})
    environment.register_service("greeter", AsyncGreeter)
    environment.register_service("serial", SerialAsync)
    with environment:
        yield environment


@pytest.fixture
def manager(env: kservice.ServiceEnvironment) -> Iterator[kservice.ServiceManager]:
    with kservice.ServiceManager(env) as m:
        yield m


def test_a_coroutine_method_returns_its_result_not_a_coroutine(manager: kservice.ServiceManager) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would fail the test
        assert manager.call_service_sync("greeter", "hello", (21,)) == "hello 42"
        assert manager.call_service_async("greeter", "hello", (1,)).result(5) == "hello 2"
        assert asyncio.run(manager.acall("greeter", "hello", (2,))) == "hello 4"
        assert manager.proxy("greeter").hello(3) == "hello 6"


def test_coroutines_run_on_the_tasks_loop_and_sync_methods_in_the_pool(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    task = env.get_task("greeter")
    assert task is not None and task.event_loop is not None
    where = manager.call_service_sync("greeter", "where", timeout=5)
    assert where["thread"] == "kservice-greeter-loop"
    assert task.service.setup_loop == "kservice-greeter-loop"  # async setup() ran on the same loop
    assert manager.call_service_sync("greeter", "sync_where") != "kservice-greeter-loop"


def test_current_request_and_remaining_time_work_inside_coroutines(manager: kservice.ServiceManager) -> None:
    futures = [manager.call_service_async("greeter", "where", timeout=10) for _ in range(20)]
    seen = [f.result(5) for f in futures]
    assert all(s["request_id"] for s in seen)
    assert len({s["request_id"] for s in seen}) == 20  # each coroutine sees its own request
    assert all(0 < s["remaining"] <= 10 for s in seen)


def test_at_most_max_concurrency_coroutines_run_at_once_and_all_finish(manager: kservice.ServiceManager) -> None:
    began = time.monotonic()
    futures = [manager.call_service_async("greeter", "nap", (0.2, str(i))) for i in range(9)]
    assert sorted(f.result(10) for f in futures) == sorted(str(i) for i in range(9))
    stats = manager.call_service_sync("greeter", "stats")
    assert stats["most_running"] == 3
    # Three rounds of 0.2 s, not nine: they overlap on one loop thread.
    assert time.monotonic() - began < 1.8


def test_many_coroutines_wait_without_holding_worker_threads(env: kservice.ServiceEnvironment) -> None:
    threads_before = threading.active_count()
    with kservice.ServiceManager(env) as manager:
        futures = [manager.call_service_async("greeter", "nap", (0.05, str(i))) for i in range(60)]
        assert len([f.result(10) for f in futures]) == 60
    assert threading.active_count() <= threads_before + 2


def test_the_deadline_cancels_the_coroutine_inside_the_method(manager: kservice.ServiceManager) -> None:
    with pytest.raises(kservice.ServiceTimeoutError):
        manager.call_service_sync("greeter", "nap", (5.0, "late"), timeout=0.3)
    wait_for(
        lambda: "late" in manager.call_service_sync("greeter", "stats")["cancelled"],
        timeout=5,
        what="the coroutine to be cancelled at its deadline",
    )
    # The service keeps serving.
    assert manager.call_service_sync("greeter", "hello", (5,)) == "hello 10"


def test_cancelling_the_callers_future_cancels_the_coroutine(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    task = env.get_task("greeter")
    assert task is not None and task.event_loop is not None
    loop = task.event_loop
    future = manager.call_service_async("greeter", "nap", (5.0, "gave-up"), timeout=30)
    wait_for(lambda: loop.in_flight == 1, timeout=5, what="the coroutine to be running")
    # The caller gives up: what its connection is told when a call is abandoned.
    manager.get_service_queue("greeter").cancel(future._request)  # type: ignore[attr-defined]
    with pytest.raises(kservice.ServiceError):
        future.result(5)
    assert "gave-up" in manager.call_service_sync("greeter", "stats")["cancelled"]


def test_an_exception_reaches_the_caller_typed(manager: kservice.ServiceManager) -> None:
    with pytest.raises(ValueError, match="boom"):
        manager.call_service_sync("greeter", "fail", ("boom",))
    assert manager.call_service_sync("greeter", "hello", (1,)) == "hello 2"


def test_async_cleanup_runs_on_stop() -> None:
    environment = kservice.ServiceEnvironment("aio-stop")
    environment.register_service("greeter", AsyncGreeter)
    environment.start()
    task = environment.get_task("greeter")
    assert task is not None
    instance = task.service
    loop_thread = task.event_loop.thread  # type: ignore[union-attr]
    environment.stop()
    assert instance.cleaned_up
    assert not loop_thread.is_alive()


def test_stop_cancels_coroutines_still_running_at_the_drain_deadline() -> None:
    environment = kservice.ServiceEnvironment("aio-drain")
    environment.register_service("greeter", AsyncGreeter)
    environment.start()
    task = environment.get_task("greeter")
    assert task is not None
    instance = task.service
    with kservice.ServiceManager(environment) as manager:
        future = manager.call_service_async("greeter", "nap", (30.0, "stopped"), timeout=60)
        loop = task.event_loop
        assert loop is not None
        wait_for(lambda: loop.in_flight == 1, timeout=5, what="the coroutine to be running")
        task.stop_service(timeout=0.3)
        with pytest.raises(kservice.ServiceError):
            future.result(5)
    assert "stopped" in instance.cancelled
    environment.stop()


def test_a_not_thread_safe_service_runs_its_coroutines_and_sync_calls_one_at_a_time(
    manager: kservice.ServiceManager,
) -> None:
    futures = [manager.call_service_async("serial", "step", (0.05,)) for _ in range(4)]
    futures += [manager.call_service_async("serial", "sync_step", (0.05,)) for _ in range(4)]
    assert max(f.result(10) for f in futures) == 0  # no two calls were ever inside at once
    assert manager.call_service_sync("serial", "step", (0.0,)) == 0
    # An async generator's steps too, beside sync calls.
    stream = manager.stream("serial", "steps", (6, 0.03))
    calls = [manager.call_service_async("serial", "sync_step", (0.03,)) for _ in range(4)]
    assert max(stream) == 0 and max(f.result(10) for f in calls) == 0


def test_max_concurrency_is_in_the_config_schema() -> None:
    config = kservice.Config.load({"service": {"local": {"max_concurrency": 7}}})
    assert config.for_service("x")["local"]["max_concurrency"] == 7
    with pytest.raises(kservice.ConfigError, match="max_concurrency"):
        kservice.Config.load({"service": {"local": {"max_concurrency": 0}}})


def test_a_sync_call_from_a_coroutine_to_its_own_service_coroutine_is_refused_at_once() -> None:
    """It would wait for the event loop it blocks (until its deadline): a RuntimeError saying to await it."""
    with kservice.ServiceEnvironment("aio-self") as environment:
        environment.register_service(
            "selfcall", kservice.ServiceFactory("selfcall", SelfCaller, (environment, "selfcall"))
        )
        with kservice.ServiceManager(environment) as manager:
            began = time.monotonic()
            with pytest.raises(RuntimeError, match=r"would wait forever.*await manager\.acall\('selfcall', 'inner'"):
                manager.call_service_sync("selfcall", "outer", (False,), timeout=30)
            assert time.monotonic() - began < 10  # refused, not waited out until the deadline
            assert manager.call_service_sync("selfcall", "outer", (True,), timeout=30) == "inner"
            assert manager.call_service_sync("selfcall", "inner", timeout=30) == "inner"


@pytest.mark.parametrize("kind", ["local", "process"])
def test_an_async_method_behind_a_decorator_that_hides_it_is_a_clear_error_not_a_coroutine(kind: str) -> None:
    """A decorator without ``functools.wraps`` makes an ``async def`` method look plain, so it is called and
    not awaited. Before, an in-process caller got the coroutine object as its result (the method's body never
    ran), and over mmap a TypeError about pickling a coroutine. Now every call form fails with a TypeError
    saying what happened and how to fix it, and the service keeps serving."""
    from tests.core.services import HiddenAsync

    fix = r"svc\.fetch returned a coroutine: .*functools\.wraps"
    with kservice.ServiceEnvironment("hidden-async", {"service_call": {"max_retries": 0}}) as env:
        env.register_service("svc", kservice.ServiceFactory("svc", HiddenAsync), kind=kind)
        with kservice.ServiceManager(env) as manager, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the coroutine is closed, never left "never awaited"
            with pytest.raises(TypeError, match=fix):
                manager.call_service_sync("svc", "fetch", (21,), timeout=10)
            with pytest.raises(TypeError, match=fix):
                manager.call_service_async("svc", "fetch", (21,), timeout=10).result()
            with pytest.raises(TypeError, match=fix):
                list(manager.map("svc", "fetch", [1, 2, 3], timeout=10))
            assert manager.call_service_sync("svc", "times_fetched", timeout=10) == 0  # its body never ran
