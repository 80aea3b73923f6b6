"""Service tasks: lifecycle, worker pool, drain, status, request handling."""

from __future__ import annotations

import threading
import time

import pytest
from kservice import (
    MAY_HAVE_RUN,
    BaseServiceTask,
    LocalServiceTask,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceOverloadedError,
    ServiceRequest,
    ServiceResponse,
    ServiceStatus,
    ServiceStoppedError,
    ServiceTimeoutError,
    ServiceUnavailableError,
)
from kservice.testing import wait_for

from tests.core.services import ClosesOnStop, FailsToStart, KeyValue, NotThreadSafe, Recorder


def test_lifecycle_states_and_setup_cleanup() -> None:
    task = LocalServiceTask(ServiceFactory("kv", KeyValue))
    assert task.get_service_status().state == "created"
    assert task.service is None
    task.start_service()
    instance = task.service
    assert instance.setup_called
    status = task.get_service_status()
    assert isinstance(status, ServiceStatus)
    assert (status.state, status.healthy) == ("running", True)
    assert status.to_dict()["service_name"] == "kv"
    task.start_service()  # idempotent
    task.stop_service()
    assert instance.cleaned_up
    assert task.get_service_status().state == "stopped"
    assert not task.get_service_status().healthy
    task.stop_service()  # idempotent
    assert task.get_service_status().state == "stopped"


def test_close_is_called_on_stop() -> None:
    ClosesOnStop.closed.clear()
    task = LocalServiceTask(ServiceFactory("c", ClosesOnStop))
    task.start_service()
    task.stop_service()
    assert ClosesOnStop.closed == ["closed"]


def test_failing_setup_fails_the_task_with_a_clear_error() -> None:
    task = LocalServiceTask(ServiceFactory("db", FailsToStart))
    with pytest.raises(ServiceUnavailableError, match="failed to start: RuntimeError: database unreachable"):
        task.start_service()
    assert task.get_service_status().state == "failed"
    task.stop_service()


def test_a_slow_method_does_not_stall_other_callers() -> None:
    with ServiceEnvironment("t") as env:
        task = env.register_service("rec", Recorder)
        with ServiceManager(env) as manager:
            slow = manager.call_service_async("rec", "work", ("slow", 1.0))
            started = time.monotonic()
            assert manager.call_service_sync("rec", "work", ("fast",)) == "fast"
            assert time.monotonic() - started < 0.5
            assert slow.result(timeout=5) == "slow"
        assert task.service.max_active == 2


def test_not_thread_safe_service_runs_one_request_at_a_time() -> None:
    with ServiceEnvironment("t") as env:
        task = env.register_service("rec", NotThreadSafe)
        assert task.max_workers == 1
        with ServiceManager(env) as manager:
            futures = [manager.call_service_async("rec", "work", (str(i), 0.01)) for i in range(20)]
            assert [f.result(timeout=10) for f in futures] == [str(i) for i in range(20)]
        assert task.service.max_active == 1


def test_max_workers_from_config_bounds_concurrency() -> None:
    config = {"services": {"rec": {"class": "tests.core.services:Recorder", "local": {"max_workers": 3}}}}
    with ServiceEnvironment("t", config) as env:
        task = env.get_task("rec")
        assert task.max_workers == 3
        with ServiceManager(env) as manager:
            futures = [manager.call_service_async("rec", "work", (str(i), 0.05)) for i in range(12)]
            [f.result(timeout=10) for f in futures]
        assert task.service.max_active == 3


@pytest.mark.parametrize("timeout", [5.0, 1e10, float("inf")])
def test_stop_drains_in_flight_and_queued_calls(timeout: float, caplog: pytest.LogCaptureFixture) -> None:
    """A stop lets the call running and those queued finish; one whose timeout is longer than a wait can
    take (1e10, infinity) drains without limit (it broke off with an OverflowError)."""
    env = ServiceEnvironment("t", {"service": {"local": {"max_workers": 1}}})
    task = env.register_service("rec", Recorder)
    env.start()
    manager = ServiceManager(env)
    futures = [manager.call_service_async("rec", "work", (str(i), 0.1)) for i in range(3)]
    wait_for(lambda: task.get_service_status().in_flight == 1, what="the first call to run, two queued")
    task.stop_service(timeout=timeout)
    assert [f.result(timeout=1) for f in futures] == ["0", "1", "2"]
    assert task.get_service_status().state == "stopped"
    assert "raised" not in caplog.text  # the drain ran to its end, nothing was cut short by an error
    env.stop(timeout=timeout)


@pytest.mark.parametrize("timeout", [float("nan"), True, "5"])
def test_stop_refuses_a_timeout_that_is_no_number_of_seconds_and_keeps_serving(timeout: object) -> None:
    with ServiceEnvironment("t") as env:
        task = env.register_service("rec", Recorder)
        manager = ServiceManager(env)
        with pytest.raises((TypeError, ValueError), match="timeout"):
            task.stop_service(timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="timeout"):
            env.stop(timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="timeout"):
            env.unregister_service("rec", timeout=timeout)  # type: ignore[arg-type]
        assert manager.call_service_sync("rec", "work", ("still",)) == "still"


def test_stop_timeout_answers_leftover_calls_with_unavailable() -> None:
    env = ServiceEnvironment("t", {"service": {"local": {"max_workers": 1}}})
    task = env.register_service("rec", Recorder)
    env.start()
    manager = ServiceManager(env)
    running = manager.call_service_async("rec", "work", ("running", 0.5))
    queued = manager.call_service_async("rec", "work", ("queued", 0.5))
    wait_for(lambda: task.get_service_status().queue_depth == 1, timeout=5, what="one call running, one queued")
    task.stop_service(timeout=0.1)
    with pytest.raises(ServiceUnavailableError):
        queued.result(timeout=2)
    assert running.result(timeout=2) == "running"
    env.stop()


def test_a_restarted_one_at_a_time_service_does_not_wait_for_a_call_its_old_instance_still_runs() -> None:
    """One at a time is per instance: the new instance is not held by the call the stop left running."""
    with ServiceEnvironment("t", {"service_call": {"max_retries": 0}}) as env:
        task = env.register_service("rec", NotThreadSafe)
        with ServiceManager(env) as manager:
            release = threading.Event()
            left_running = manager.call_service_async("rec", "wait_for", (release, 60.0), timeout=90)
            wait_for(lambda: task.get_service_status().in_flight == 1, what="the call to run")
            task.stop_service(timeout=0.1)
            task.start_service()
            try:
                assert manager.call_service_sync("rec", "work", ("new", 0.0), timeout=5) == "new"
            finally:
                release.set()
            assert left_running.result(timeout=10) is True


def test_full_request_queue_is_overloaded_after_queue_timeout() -> None:
    config = {
        "service": {"local": {"max_workers": 1, "request_queue_size": 2, "queue_timeout": 0.2}},
        "service_call": {"max_retries": 0},  # an overloaded call would otherwise be retried
    }
    with ServiceEnvironment("t", config) as env:
        task = env.register_service("rec", Recorder)
        with ServiceManager(env) as manager:
            running = manager.call_service_async("rec", "work", ("r", 1.0))
            wait_for(lambda: task.get_service_status().in_flight == 1, timeout=5, what="the first call to run")
            queued = [manager.call_service_async("rec", "work", (f"q{i}", 0.0)) for i in range(2)]
            started = time.monotonic()
            overloaded = manager.call_service_async("rec", "work", ("x",))
            with pytest.raises(ServiceOverloadedError, match="request_queue_size=2") as refused:
                overloaded.result(timeout=5)
            assert 0.15 < time.monotonic() - started < 0.9
            assert refused.value.may_have_run is False  # it never ran: any retry policy may send it again
            assert running.result(timeout=5) == "r"
            assert [f.result(timeout=5) for f in queued] == ["q0", "q1"]
            assert manager.call_service_sync("rec", "work", ("next",)) == "next"


def test_refusals_before_the_method_starts_say_it_did_not_run() -> None:
    """A stopped task's refusal and a request found past its deadline before it started: ``may_have_run`` False."""
    with ServiceEnvironment("t", {"service_call": {"max_retries": 0}}) as env:
        task = env.register_service("rec", Recorder)
        expired = ServiceRequest("late-1", "rec", "work", ("late",), deadline=time.time() - 1.0)
        response = task.execute(expired)
        assert response.metadata[MAY_HAVE_RUN] is False, response
        error = response.to_exception("rec", "work")
        assert isinstance(error, ServiceTimeoutError) and error.may_have_run is False
        assert "did not run" in str(error)
        assert task.service.events == [], "the late request did not run"
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("rec", "work", ("next",)) == "next", "the task kept serving"
            task.stop_service()
            answers: list[ServiceResponse] = []
            task.submit(ServiceRequest("stopped-1", "rec", "work", ("x",)), answers.append)
            assert answers[0].metadata[MAY_HAVE_RUN] is False, answers
            stopped = answers[0].to_exception("rec", "work")
            assert isinstance(stopped, ServiceStoppedError) and stopped.may_have_run is False


def test_status_counts_requests_errors_in_flight_and_queue_depth() -> None:
    with ServiceEnvironment("t", {"service": {"local": {"max_workers": 1}}}) as env:
        task = env.register_service("kv", KeyValue)
        with ServiceManager(env) as manager:
            manager.call_service_sync("kv", "put", ("a", 1))
            with pytest.raises(ValueError):
                manager.call_service_sync("kv", "fail", ("x",))
            slow = manager.call_service_async("kv", "sleep", (0.3,))
            queued = manager.call_service_async("kv", "get", ("a",))
            wait_for(lambda: task.get_service_status().queue_depth == 1, timeout=5, what="the second call to be queued")
            status = task.get_service_status()
            assert (status.in_flight, status.queue_depth) == (1, 1)
            slow.result(timeout=5), queued.result(timeout=5)
        status = task.get_service_status()
        assert (status.requests_total, status.errors_total, status.in_flight, status.queue_depth) == (4, 1, 0, 0)
        assert status.max_workers == 1 and status.started_at is not None


class Doubler(BaseServiceTask):
    """A task that changes how a request becomes a result."""

    default_transports = ("inproc",)

    def handle_request(self, request: ServiceRequest) -> object:
        return ("handled", request.method_name, super().handle_request(request))


def test_subclass_can_override_handle_request() -> None:
    with ServiceEnvironment("t") as env:
        env.register_service("kv", Doubler(ServiceFactory("kv", KeyValue, ({"a": 1},))))
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("kv", "get", ("a",)) == ("handled", "get", 1)


def test_execute_runs_in_the_calling_thread() -> None:
    task = LocalServiceTask(ServiceFactory("kv", KeyValue))
    task.start_service()
    seen: list[str] = []

    class Probe:
        def where(self) -> str:
            seen.append(threading.current_thread().name)
            return "ok"

    task2 = LocalServiceTask(ServiceFactory("probe", Probe))
    task2.start_service()
    response = task2.execute(ServiceRequest("1", "probe", "where"))
    assert response.success and response.result == "ok"
    assert seen == [threading.current_thread().name]
    task.stop_service()
    task2.stop_service()
