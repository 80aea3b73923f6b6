"""Health checks: the scheduler thread, the built-in checks, hung checks, recovery and its limit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import kservice
import pytest
from kservice import BaseServiceTask, Listener, ServiceAddress, Transport, hookimpl
from kservice.plugins import health
from kservice.testing import wait_for

from tests.observability.services import AlwaysSick, AsyncPoisonable, Echo, HangingCheck, Poisonable

FAST = {"period": 0.02, "timeout": 1.0, "failure_threshold": 2, "max_restarts": 3}


def health_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "kservice-health"}


def extra(task: BaseServiceTask) -> dict[str, Any]:
    return task.get_service_status().extra["health"]  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
def test_one_scheduler_thread_runs_while_tasks_are_monitored() -> None:
    assert not health_threads()
    env = kservice.ServiceEnvironment("h", {"health": FAST})
    env.register_service("a", Echo)
    env.register_service("b", Echo)
    with env:
        assert health_threads() == {"kservice-health"}
        wait_for(lambda: all(extra(t)["rounds"] >= 3 for t in env), what="rounds of both tasks")
        assert health.monitored_tasks() and len(health.monitored_tasks()) == 2
        env.unregister_service("a")
        assert health_threads() == {"kservice-health"}, "b is still monitored"
    assert not health_threads(), "the scheduler stops with the last monitored task"
    assert health.monitored_tasks() == []


@pytest.mark.timeout(30)
def test_healthy_task_reports_last_check_time() -> None:
    with kservice.ServiceEnvironment("h", {"health": FAST}) as env:
        task = env.register_service("echo", Echo)
        before = time.time()
        wait_for(lambda: (task.last_health_check or 0) > before, what="a check after start")
        status = task.get_service_status()
        assert status.healthy and status.health_reason == ""
        assert status.last_health_check is not None and status.last_health_check >= before
        assert status.extra["health"]["state"] == "healthy"


@pytest.mark.timeout(30)
def test_disabled_health_starts_no_thread_and_reports_unmonitored() -> None:
    with kservice.ServiceEnvironment("h", {"health": {**FAST, "enabled": False}}) as env:
        task = env.register_service("echo", Echo)
        time.sleep(0.1)  # deliberate: time for a health thread to start, which it must not
        assert not health_threads()
        assert task.get_service_status().extra["health"] == {"monitored": False}
        assert task.last_health_check is None


@pytest.mark.timeout(30)
def test_per_service_override_disables_one_service() -> None:
    config = {
        "health": FAST,
        "services": {"quiet": {"class": "tests.observability.services:Echo", "health": {"enabled": False}}},
    }
    with kservice.ServiceEnvironment("h", config) as env:
        loud = env.register_service("loud", Echo)
        wait_for(lambda: extra(loud)["rounds"] >= 2, what="rounds of loud")
        assert extra(env.get_task("quiet")) == {"monitored": False}  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_failing_check_health_recovers_by_rebuilding_the_instance() -> None:
    with kservice.ServiceEnvironment("h", {"health": FAST}) as env:
        task = env.register_service("p", Poisonable)
        manager = env.manager()
        first = task.service
        manager.call_service_sync("p", "poison")
        assert manager.call_service_sync("p", "is_poisoned") is True
        wait_for(lambda: task.restarts == 1, what="a rebuild")
        wait_for(lambda: extra(task)["state"] == "healthy", what="healthy again")
        assert task.service is not first
        assert manager.call_service_sync("p", "is_poisoned") is False, "calls reach the new instance"
        status = task.get_service_status()
        assert status.healthy and status.restarts == 1
        info = status.extra["health"]
        assert info["recoveries"] == 1 and info["failures"] >= 2
        assert "poisoned by a test" in info["last_failure"]
        assert info["last_recovery"] == "rebuilt the service instance"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_an_async_check_health_is_awaited_and_its_answer_counts(kind: str) -> None:
    """``async def check_health()`` (one asking a database) is awaited on the task's event loop. Before, it
    was called and its coroutine, never awaited, read as a truthy answer: a sick service stayed healthy."""
    with kservice.ServiceEnvironment("h", {"health": FAST}) as env:
        task = env.register_service("p", kservice.ServiceFactory("p", AsyncPoisonable), kind=kind)
        manager = env.manager()
        wait_for(lambda: extra(task)["rounds"] >= 5, what="healthy rounds")
        status = task.get_service_status()
        assert status.healthy and status.restarts == 0, status
        manager.call_service_sync("p", "poison")
        wait_for(lambda: task.get_service_status().restarts == 1, what="a rebuild")
        assert manager.call_service_sync("p", "is_poisoned") is False, "calls reach the new instance"
        if kind == "local":  # a process task's instance is rebuilt by its host's own monitor, which keeps the reason
            assert "poisoned by a test" in extra(task)["last_failure"]


@pytest.mark.timeout(30)
def test_restart_limit_reached_leaves_the_task_failed_and_alone() -> None:
    with kservice.ServiceEnvironment("h", {"health": {**FAST, "failure_threshold": 1, "max_restarts": 2}}) as env:
        task = env.register_service("sick", AlwaysSick)
        wait_for(lambda: extra(task)["state"] == "failed", what="the failed state")
        status = task.get_service_status()
        assert not status.healthy
        assert status.restarts == 2
        assert "check_health() returned False" in status.health_reason
        assert "health.max_restarts=2" in status.health_reason
        rounds = status.extra["health"]["rounds"]
        time.sleep(0.15)  # deliberate: time for more checks to run, which they must not
        assert extra(task)["rounds"] == rounds, "no more checks once failed"
        assert task.restarts == 2, "no more recovery once failed"
        # Left alone, not stopped: it still serves calls.
        assert env.manager().call_service_sync("sick", "ping") == "pong"


@pytest.mark.timeout(30)
def test_hanging_check_is_abandoned_after_timeout_and_counted_as_failure() -> None:
    release = threading.Event()
    # Rounds of 'hung' start 0.3 s apart, so its timeout report stays readable for 0.2 s.
    config = {
        "health": {"period": 0.3, "timeout": 0.1, "failure_threshold": 3, "max_restarts": 0},
        "services": {
            "other": {"class": "tests.observability.services:Echo", "health": {"period": 0.02, "timeout": 5.0}}
        },
    }
    try:
        with kservice.ServiceEnvironment("h", config) as env:
            hung = env.register_service("hung", HangingCheck, release)
            other = env.get_task("other")
            assert other is not None
            wait_for(lambda: extra(hung)["failures"] >= 1, what="the first timed-out round")
            assert "health check 'check_health' timed out after 0.1s" in hung.get_service_status().health_reason
            # The scheduler is not blocked: the other task keeps being checked meanwhile.
            rounds = extra(other)["rounds"]
            wait_for(lambda: extra(other)["rounds"] >= rounds + 3, what="rounds of the other task")
            wait_for(lambda: extra(hung)["state"] == "failed", what="failed after 3 failures")
            status = hung.get_service_status()
            assert not status.healthy and "still hung" in status.health_reason
            assert extra(other)["state"] == "healthy"
            # One abandoned round at a time: no thread piles up behind a hung check.
            checkers = [t for t in threading.enumerate() if t.name.startswith("kservice-health-check-")]
            assert len(checkers) <= 3
            assert env.manager().call_service_sync("hung", "ping") == "pong"
    finally:
        release.set()


@pytest.mark.timeout(30)
def test_stuck_worker_pool_is_unhealthy() -> None:
    release = threading.Event()
    config = {"health": {**FAST, "stuck_after": 0.1, "max_restarts": 0, "failure_threshold": 1}}
    try:
        with kservice.ServiceEnvironment("h", config) as env:
            task = env.register_service("echo", Echo)
            manager = env.manager()
            # A call still running after its caller gave up (its deadline passed): the worker is held for nothing.
            future = manager.call_service_async("echo", "wait", (release,), timeout=0.2)
            wait_for(lambda: "worker pool stuck" in task.get_service_status().health_reason, what="the stuck report")
            assert "1 call(s) in flight" in task.get_service_status().health_reason
            with pytest.raises(kservice.ServiceTimeoutError):
                future.result(5)
            release.set()
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_one_stuck_call_is_recovered_once_and_a_later_one_again() -> None:
    config = {"health": {**FAST, "stuck_after": 0.1, "max_restarts": 3, "failure_threshold": 1}}
    releases: list[threading.Event] = []
    try:
        with kservice.ServiceEnvironment("h", config) as env:
            task = env.register_service("echo", Echo)
            manager = env.manager()
            for episode in (1, 2):
                release = threading.Event()
                releases.append(release)
                # Still running after its caller gave up (its deadline passed): the pool is stuck on it.
                future = manager.call_service_async("echo", "wait", (release, 30.0), timeout=0.2)
                wait_for(lambda e=episode: extra(task)["recoveries"] >= e, what=f"recovery of stuck episode {episode}")
                # Many stuck_after windows pass while the same call is still the one in flight.
                rounds = extra(task)["rounds"]
                wait_for(
                    lambda r=rounds: extra(task)["rounds"] >= r + 50 or extra(task)["state"] == "failed",
                    what="50 more check rounds",
                    timeout=30,
                )
                health_view = extra(task)
                assert health_view["recoveries"] == episode, health_view
                assert health_view["state"] == "unhealthy", health_view
                assert "worker pool stuck" in task.health_reason
                assert "not recovering again" in task.health_reason
                with pytest.raises(kservice.ServiceTimeoutError):
                    future.result(10)
                release.set()
                wait_for(lambda: extra(task)["state"] == "healthy", what="a healthy round after the call ended")
            assert manager.call_service_sync("echo", "echo", ("x",)) == "x"
    finally:
        for release in releases:
            release.set()


@pytest.mark.timeout(30)
def test_queue_depth_over_limit_is_unhealthy_and_clears() -> None:
    release = threading.Event()
    config = {
        "health": {**FAST, "max_queue_depth": 1, "max_restarts": 0, "failure_threshold": 1000},
        "services": {"one": {"class": "tests.observability.services:Echo", "local": {"max_workers": 1}}},
    }
    try:
        with kservice.ServiceEnvironment("h", config) as env:
            task = env.get_task("one")
            assert task is not None
            manager = env.manager()
            futures = [manager.call_service_async("one", "wait", (release,)) for _ in range(4)]
            wait_for(
                lambda: "queue depth 3 is over health.max_queue_depth=1" in task.health_reason, what="the queue report"
            )
            release.set()
            for future in futures:
                assert future.result(5) is True
            wait_for(lambda: task.get_service_status().healthy, what="healthy once drained")
    finally:
        release.set()


class FlakyListener(Listener):
    """A listener whose receiving can be stopped by the test and is resumed by ``restart()``."""

    def __init__(self, task: BaseServiceTask) -> None:
        self.address = ServiceAddress("flaky", task.service_name, task.service_name)
        self.receiving = True
        self.restarted = 0

    @property
    def alive(self) -> bool:
        return self.receiving

    def restart(self) -> None:
        self.receiving = True
        self.restarted += 1

    def close(self) -> None:
        self.receiving = False


class FlakyTransport(Transport):
    name = "flaky"

    def __init__(self) -> None:
        self.listeners: list[FlakyListener] = []

    def listen(self, task: BaseServiceTask) -> Listener:
        listener = FlakyListener(task)
        self.listeners.append(listener)
        return listener

    def connect(self, address: ServiceAddress) -> Any:
        raise NotImplementedError


@pytest.mark.timeout(30)
def test_dead_listener_is_restarted(register_plugin: Callable[[Any, str], None]) -> None:
    transport = FlakyTransport()

    class Plugin:
        @hookimpl
        def kservice_register_transports(self, register: Callable[[Transport], None]) -> None:
            register(transport)

    register_plugin(Plugin(), "test-flaky-transport")
    config = {
        "health": FAST,
        "services": {"echo": {"class": "tests.observability.services:Echo", "transports": ["flaky"]}},
    }
    with kservice.ServiceEnvironment("h", config) as env:
        task = env.get_task("echo")
        assert task is not None
        instance = task.service
        (listener,) = transport.listeners
        listener.receiving = False
        wait_for(lambda: listener.restarted == 1, what="the listener restart")
        wait_for(lambda: extra(task)["state"] == "healthy", what="healthy again")
        info = extra(task)
        assert info["last_recovery"] == "restarted 1 listener(s)"
        assert "listener(s) stopped receiving: flaky" in info["last_failure"]
        assert task.restarts == 1
        assert task.service is instance, "a dead listener is restarted, the instance kept"


@pytest.mark.timeout(30)
def test_an_async_check_from_the_hook_is_awaited_and_its_answer_counts(
    register_plugin: Callable[[Any, str], None],
) -> None:
    """A plugin's ``async def`` check (one probing an endpoint) is awaited. Before, its coroutine was taken
    as the reason: the task was reported unhealthy ("<coroutine object ...>") whatever the check said."""
    verdict: dict[str, Any] = {"reason": None}

    async def endpoint_check(task: BaseServiceTask) -> str | None:
        await asyncio.sleep(0.001)
        return verdict["reason"]  # type: ignore[no-any-return]

    class Plugin:
        @hookimpl
        def kservice_health_checks(self, task: BaseServiceTask) -> list[Callable[[BaseServiceTask], Any]]:
            return [endpoint_check]

    register_plugin(Plugin(), "test-async-check")
    with kservice.ServiceEnvironment("h", {"health": {**FAST, "max_restarts": 0, "failure_threshold": 100}}) as env:
        task = env.register_service("echo", Echo)
        wait_for(lambda: extra(task)["rounds"] >= 3, what="rounds")
        status = task.get_service_status()
        assert status.healthy, status.health_reason
        verdict["reason"] = "endpoint down"
        wait_for(lambda: task.health_reason == "endpoint down", what="the awaited reason")


@pytest.mark.timeout(30)
def test_checks_from_the_hook_run_and_a_raising_one_is_a_failure(register_plugin: Callable[[Any, str], None]) -> None:
    verdict: dict[str, Any] = {"reason": None}

    def disk_check(task: BaseServiceTask) -> str | None:
        if verdict["reason"] == "raise":
            raise OSError("disk gone")
        return verdict["reason"]  # type: ignore[no-any-return]

    class Plugin:
        @hookimpl
        def kservice_health_checks(self, task: BaseServiceTask) -> list[Callable[[BaseServiceTask], str | None]]:
            return [disk_check]

    register_plugin(Plugin(), "test-disk-check")
    with kservice.ServiceEnvironment("h", {"health": {**FAST, "max_restarts": 0, "failure_threshold": 100}}) as env:
        task = env.register_service("echo", Echo)
        wait_for(lambda: extra(task)["rounds"] >= 1, what="a round")
        assert task.get_service_status().healthy
        verdict["reason"] = "disk full"
        wait_for(lambda: task.health_reason == "disk full", what="the contributed reason")
        verdict["reason"] = "raise"
        wait_for(lambda: "raised OSError: disk gone" in task.health_reason, what="the raising check")
        assert "disk_check" in task.health_reason
        verdict["reason"] = None
        wait_for(lambda: task.get_service_status().healthy, what="healthy again")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("error", "named"),
    [
        (RuntimeError("database unreachable"), "RuntimeError: database unreachable"),
        # Before: it ended the health pool's thread, and the round was reported as a check still hung.
        (SystemExit("pool thread gone"), "SystemExit: pool thread gone"),
    ],
)
def test_raising_check_health_is_a_failure_with_the_error_named(error: BaseException, named: str) -> None:
    class Raising(Echo):
        def check_health(self) -> None:
            raise error

    with kservice.ServiceEnvironment("h", {"health": {**FAST, "max_restarts": 0, "failure_threshold": 100}}) as env:
        task = env.register_service("r", Raising)
        wait_for(lambda: task.health_reason, what="a failed round")
        assert f"health check 'check_health' raised {named}" in task.health_reason
        assert not task.get_service_status().healthy


@pytest.mark.timeout(30)
def test_recover_on_a_stopped_task_does_nothing() -> None:
    task = kservice.LocalServiceTask(kservice.ServiceFactory("p", Poisonable))
    task.start_service()
    instance = task.service
    task.stop_service()
    assert task.recover("test") == "nothing: task is stopped"
    assert task.restarts == 0 and task.service is None and instance is not None


@pytest.mark.timeout(30)
def test_manager_reports_the_health_of_a_service() -> None:
    with kservice.ServiceEnvironment("h", {"health": {**FAST, "failure_threshold": 1, "max_restarts": 0}}) as env:
        env.register_service("sick", AlwaysSick)
        manager = env.manager()
        status = wait_for(
            lambda: (s := manager.get_service_status("sick")) and not s.healthy and s,  # type: ignore[union-attr]
            what="an unhealthy report",
        )
        assert status.health_reason.startswith("check_health() returned False")
        assert status.last_health_check is not None


@pytest.mark.timeout(30)
def test_unregistering_the_plugin_stops_the_scheduler() -> None:
    pm = kservice.get_plugin_manager()
    with kservice.ServiceEnvironment("h", {"health": FAST}) as env:
        task = env.register_service("echo", Echo)
        wait_for(lambda: extra(task)["rounds"] >= 1, what="a round")
        assert health_threads()
        pm.unregister(health, name="health")
        try:
            wait_for(lambda: not health_threads(), what="the scheduler to stop")
            assert health.monitored_tasks() == []
            assert "health" not in task.get_service_status().extra
        finally:
            pm.register(health, name="health")


@pytest.mark.timeout(30)
def test_a_period_longer_than_a_wait_can_take_is_refused_at_registration_and_checks_go_on() -> None:
    from kservice import ConfigError

    with kservice.ServiceEnvironment("h", {"health": FAST}) as env:
        task = env.register_service("echo", Echo)
        with pytest.raises(ConfigError, match=r"health\.period: 1000000000000\.0 is above the maximum"):
            env.register_service("slow", kservice.ServiceFactory("slow", Echo), health={"period": 1e12})
        # The scheduler thread lives on: the running task's checks go on, and it keeps serving.
        rounds = extra(task)["rounds"]
        wait_for(lambda: extra(task)["rounds"] > rounds, what="more rounds after the refused registration")
        assert health_threads() == {"kservice-health"}
        with kservice.ServiceManager(env) as manager:
            assert manager.call_service_sync("echo", "echo", ("still",)) == "still"
