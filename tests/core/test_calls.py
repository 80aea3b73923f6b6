"""Calling services through the ServiceManager: sync, async, asyncio, proxy, timeouts, typed errors."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, wait

import kservice
import pytest
from kservice import (
    MethodNotFoundError,
    ServiceCallError,
    ServiceEnvironment,
    ServiceManager,
    ServiceNotFoundError,
    ServiceRequest,
    ServiceTimeoutError,
    ServiceUnavailableError,
)

from tests.core.services import KeyValue, Recorder


def test_sync_call_returns_the_methods_result(manager: ServiceManager) -> None:
    manager.call_service_sync("kv", "put", ("b", [1, 2]))
    assert manager.call_service_sync("kv", "get", ("b",)) == [1, 2]
    assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_kwargs_named_like_call_options_reach_the_method(manager: ServiceManager) -> None:
    got = manager.call_service_sync(
        "kv", "reserved_names", kwargs={"timeout": 7.5, "method": "m", "service_name": "s"}, timeout=5
    )
    assert got == {"timeout": 7.5, "method": "m", "service_name": "s"}


def test_async_call_returns_a_future_completed_by_the_response(manager: ServiceManager) -> None:
    future = manager.call_service_async("kv", "get", ("a",))
    assert isinstance(future, Future)
    assert future.result(timeout=5) == 1


def test_async_calls_hold_no_thread_per_call(env: ServiceEnvironment) -> None:
    env.register_service("slow", Recorder)
    with ServiceManager(env) as manager:
        threads_before = threading.active_count()
        futures = [manager.call_service_async("slow", "work", (str(i), 0.2)) for i in range(200)]
        # 200 calls in flight: only the task's 10 workers and the manager's one timer thread exist.
        assert threading.active_count() <= threads_before + 1
        done, not_done = wait(futures, timeout=30)
        assert not not_done
        assert sorted(f.result() for f in done) == sorted(str(i) for i in range(200))


def test_acall_awaits_the_result(manager: ServiceManager) -> None:
    async def main() -> list[object]:
        return list(await asyncio.gather(*(manager.acall("kv", "get", ("a",)) for _ in range(20))))

    assert asyncio.run(main()) == [1] * 20


def test_proxy_turns_attribute_calls_into_sync_calls(manager: ServiceManager) -> None:
    kv = manager.proxy("kv")
    kv.put("p", 3)
    assert kv.get("p") == 3
    assert kv.get("missing", default="d") == "d"


def test_pickling_a_manager_or_a_proxy_says_what_to_pass_instead_and_copying_a_proxy_keeps_it(
    manager: ServiceManager,
) -> None:
    import copy
    import pickle

    kv = manager.proxy("kv")
    for handle, named in (
        (manager, "ServiceManager"),
        (kv, "proxy of service 'kv'"),
        (kv.get, "proxy of service 'kv'"),
    ):
        for dump in (pickle.dumps, copy.deepcopy):
            with pytest.raises(TypeError, match=f"{named}.*cannot be pickled or deep-copied.*pass the service name"):
                dump(handle)
    copied = copy.copy(kv)
    copied.put("c", 1)
    assert copy.copy(kv.get)("c") == 1


def test_remote_exception_is_a_service_call_error_and_the_original_class(manager: ServiceManager) -> None:
    with pytest.raises(KeyError) as caught:
        manager.call_service_sync("kv", "require", ("nope",))
    error = caught.value
    assert isinstance(error, ServiceCallError)
    assert error.remote_type == "KeyError"
    assert "require" in error.remote_traceback and "Traceback" in error.remote_traceback
    assert error.service_name == "kv" and error.method_name == "require"
    with pytest.raises(ValueError, match="boom"):
        manager.call_service_sync("kv", "fail", ("boom",))
    assert manager.call_service_sync("kv", "get", ("a",)) == 1  # still serving


def test_async_errors_arrive_in_the_future_with_their_types(manager: ServiceManager) -> None:
    future = manager.call_service_async("kv", "require", ("nope",))
    with pytest.raises(KeyError):
        future.result(timeout=5)
    future = manager.call_service_async("kv", "nope")
    with pytest.raises(MethodNotFoundError):
        future.result(timeout=5)


def test_wrong_arguments_raise_type_error(manager: ServiceManager) -> None:
    with pytest.raises(TypeError):
        manager.call_service_sync("kv", "get", ("a", "b", "c", "d"))
    assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_unknown_method_names_the_close_match(manager: ServiceManager) -> None:
    with pytest.raises(MethodNotFoundError, match="did you mean 'get'") as caught:
        manager.call_service_sync("kv", "gett", ("a",))
    assert isinstance(caught.value, AttributeError)
    assert "public methods:" in str(caught.value)


def test_private_methods_are_refused_and_never_run(manager: ServiceManager) -> None:
    for name in ("_secret", "__init__", "__class__", "_data", ""):
        with pytest.raises(MethodNotFoundError):
            manager.call_service_sync("kv", name)
    assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_unknown_service_names_known_ones_and_closest(manager: ServiceManager) -> None:
    with pytest.raises(ServiceNotFoundError) as caught:
        manager.call_service_sync("kvv", "get", ("a",))
    assert isinstance(caught.value, LookupError)
    assert "did you mean 'kv'" in str(caught.value)
    assert "known services: kv" in str(caught.value)


def test_timeout_raises_service_timeout_error(manager: ServiceManager) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceTimeoutError) as caught:
        manager.call_service_sync("kv", "sleep", (2.0,), timeout=0.1)
    assert isinstance(caught.value, TimeoutError)
    assert time.monotonic() - started < 1.5
    future = manager.call_service_async("kv", "sleep", (2.0,), timeout=0.1)
    with pytest.raises(ServiceTimeoutError):
        future.result(timeout=5)


def test_timed_out_request_that_has_not_started_never_runs() -> None:
    config = {"service": {"local": {"max_workers": 1}}}
    with ServiceEnvironment("t", config) as env:
        task = env.register_service("rec", Recorder)
        with ServiceManager(env) as manager:
            blocker = manager.call_service_async("rec", "work", ("blocker", 0.5))
            with pytest.raises(ServiceTimeoutError):
                manager.call_service_sync("rec", "work", ("queued",), timeout=0.1)
            assert blocker.result(timeout=5) == "blocker"
            assert manager.call_service_sync("rec", "work", ("after",)) == "after"
        assert "start queued" not in task.service.events
        assert task.get_service_status().expired_total == 1


def test_a_deadline_found_passed_by_the_service_is_reported_as_such_not_as_a_zero_timeout() -> None:
    with ServiceEnvironment("t") as env:
        task = env.register_service("rec", Recorder)
        late = ServiceRequest("r-late", "rec", "work", ("late",), deadline=time.time() - 2.5)
        error = task.execute(late).error or ""
        # Was "call rec.work timed out after 0.000s": the call had its whole timeout, and more.
        assert "0.000s" not in error
        assert "rec.work passed its deadline" in error and "before it started" in error, error
        assert "start late" not in task.service.events


def test_late_response_is_dropped_and_leaks_nothing(manager: ServiceManager) -> None:
    future = manager.call_service_async("kv", "sleep", (0.3,), timeout=0.05)
    with pytest.raises(ServiceTimeoutError):
        future.result(timeout=5)
    time.sleep(0.4)  # the method finishes and replies after the caller gave up
    assert future.exception() is not None and isinstance(future.exception(), ServiceTimeoutError)
    assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_default_timeout_comes_from_config() -> None:
    with ServiceEnvironment("t", {"service_call": {"default_timeout": 0.1}}) as env:
        env.register_service("kv", KeyValue)
        with ServiceManager(env) as manager:
            began = time.monotonic()
            with pytest.raises(ServiceTimeoutError, match=r"timed out after 0\.\d+s"):
                manager.call_service_sync("kv", "sleep", (1.0,))
            # The first call's 0.1 s include finding the service; the message gives what was left of them.
            assert time.monotonic() - began < 0.8


def test_cancelled_future_drops_the_response(manager: ServiceManager) -> None:
    future = manager.call_service_async("kv", "sleep", (0.2,))
    assert future.cancel()
    time.sleep(0.3)  # deliberate: the method finishes and its response arrives; it must not un-cancel the future
    assert future.cancelled()


def test_calling_a_stopped_service_fails_at_once(env: ServiceEnvironment, manager: ServiceManager) -> None:
    assert manager.call_service_sync("kv", "get", ("a",)) == 1
    env.get_task("kv").stop_service()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="stopped"):
        manager.call_service_sync("kv", "get", ("a",), timeout=10)
    assert time.monotonic() - started < 1.0


def test_closed_manager_refuses_calls(env: ServiceEnvironment) -> None:
    manager = ServiceManager(env)
    manager.close()
    manager.close()
    with pytest.raises(ServiceUnavailableError, match="closed"):
        manager.call_service_sync("kv", "get", ("a",))


def test_get_service_queue_returns_the_connection(manager: ServiceManager) -> None:
    connection = manager.get_service_queue("kv")
    assert isinstance(connection, kservice.Connection)
    assert connection is manager.get_service_queue("kv")


def test_service_method_reads_its_remaining_time(manager: ServiceManager) -> None:
    remaining = manager.call_service_sync("kv", "remaining", timeout=5)
    assert 3 < remaining <= 5
    assert kservice.remaining_time() is None and kservice.current_request() is None


def test_calling_a_service_that_was_never_started_fails_at_once() -> None:
    from kservice import ServiceStoppedError

    env = ServiceEnvironment("t")
    env.register_service("kv", KeyValue)
    with ServiceManager(env) as manager:
        started = time.monotonic()
        with pytest.raises(ServiceStoppedError, match="start it first"):
            manager.call_service_sync("kv", "get", ("a",), timeout=10)
        assert time.monotonic() - started < 1.0
