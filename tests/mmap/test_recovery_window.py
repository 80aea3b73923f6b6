"""Calls made while health recovery replaces a hung `process` host.

The host is a real child process, really stopped with SIGSTOP: its health checks
time out, recovery drains it (it cannot answer), kills it and spawns a new one. A
call made in that window is refused "being restarted" with nothing sent, and a
retry waits for the new host instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceError, ServiceFactory, ServiceManager, ServiceUnavailableError
from kservice.plugins.mmap.host import ProcessServiceTask
from kservice.testing import wait_for

from tests.mmap.services import KV, FailsToStartWhile
from tests.streaming.services import AsyncGreeter, TokenModel

pytestmark = pytest.mark.timeout(180)


def _config(**service_call: Any) -> dict[str, Any]:
    return {
        # The stopped host cannot drain: recovery kills it after drain_timeout.
        "health": {"period": 0.3, "timeout": 1.0, "failure_threshold": 2, "max_restarts": 1, "drain_timeout": 2.0},
        "service_call": service_call,
    }


@contextlib.contextmanager
def _replacing(
    config: dict[str, Any], service_class: type = KV
) -> Iterator[tuple[ServiceManager, ProcessServiceTask, int]]:
    """A process task whose host was SIGSTOPped, yielded once recovery is replacing it."""
    with ServiceEnvironment("recovery-window", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", service_class, ()), kind="process")
        assert isinstance(task, ProcessServiceTask)
        with ServiceManager(env) as manager:
            old_pid = manager.call_service_sync("kv", "pid", timeout=30)
            assert old_pid == task.pid
            os.kill(old_pid, signal.SIGSTOP)
            try:
                wait_for(lambda: task.replacing_host, timeout=30, what="recovery to start replacing the host")
                yield manager, task, old_pid
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old_pid, signal.SIGCONT)


def test_without_retries_a_call_during_replacement_is_refused_saying_so() -> None:
    with _replacing(_config(max_retries=0)) as (manager, task, old_pid):
        with pytest.raises(ServiceUnavailableError, match="being restarted") as caught:
            manager.call_service_sync("kv", "pid", timeout=30)
        assert "nothing was sent" in str(caught.value)
        assert "start it first" not in str(caught.value)
        assert caught.value.may_have_run is False  # type: ignore[attr-defined]
        with pytest.raises(ServiceUnavailableError, match="being restarted"):
            manager.call_service_async("kv", "pid", timeout=30).result(60)
        # The refusal is not kept as the route: once the new host is up, the next call reaches it.
        wait_for(lambda: not task.replacing_host, timeout=60, what="the new host")
        new_pid = manager.call_service_sync("kv", "pid", timeout=30)
        assert new_pid == task.pid and new_pid != old_pid


def test_a_retried_call_during_replacement_reaches_the_new_host() -> None:
    # One retry, with a delay far shorter than the replacement: the retry waits for the new host.
    with _replacing(_config(max_retries=1, retry_interval=0.01)) as (manager, task, old_pid):
        pending = manager.call_service_async("kv", "pid", timeout=60)
        new_pid = manager.call_service_sync("kv", "pid", timeout=60)
        assert new_pid == task.pid and new_pid != old_pid
        assert pending.result(60) == new_pid
        assert not task.replacing_host


CALLS: dict[str, Callable[[ServiceManager], Any]] = {
    "sync": lambda m: m.call_service_sync("kv", "echo", ("x",), timeout=60),
    "async": lambda m: m.call_service_async("kv", "echo", ("x",), timeout=60).result(90),
    "acall": lambda m: asyncio.run(m.acall("kv", "echo", ("x",), timeout=60)),
    "stream": lambda m: list(m.stream("kv", "count", (2,), timeout=60)),
    "map": lambda m: list(m.map("kv", "echo", ["x", "y"], timeout=60)),
}


def test_every_call_form_made_during_replacement_is_served_by_the_new_host() -> None:
    with (
        _replacing(_config(max_retries=1, retry_interval=0.01), TokenModel) as (manager, task, old_pid),
        ThreadPoolExecutor(len(CALLS)) as pool,
    ):
        pending = {how: pool.submit(call, manager) for how, call in CALLS.items()}
        results = {how: future.result(120) for how, future in pending.items()}
        assert results == {"sync": "x", "async": "x", "acall": "x", "stream": [0, 1], "map": ["x", "y"]}
        assert task.pid not in (None, old_pid)


def test_recovery_lets_a_running_call_finish_within_health_drain_timeout() -> None:
    # Recovery (as the health plugin runs it) replacing a host while a call runs there. It used to kill the
    # old host 5 s after it began, whatever was configured: this call was cut.
    config = {"health": {"enabled": False, "drain_timeout": 30.0}}  # retries at their defaults
    with ServiceEnvironment("recovery-drain", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KV, ()), kind="process")
        assert isinstance(task, ProcessServiceTask)
        with ServiceManager(env) as manager, ThreadPoolExecutor(1) as pool:
            old_pid = manager.call_service_sync("kv", "pid", timeout=30)
            running = manager.call_service_async("kv", "sleep", (8.0,), timeout=60)
            wait_for(lambda: task.get_service_status().in_flight == 1, timeout=30, what="the call to run")
            recovery = pool.submit(task.recover, "test")
            wait_for(lambda: task.replacing_host, timeout=30, what="recovery to start replacing the host")
            assert running.result(60) == 8.0
            recovery.result(60)
            wait_for(lambda: not task.replacing_host, timeout=60, what="the new host")
            new_pid = manager.call_service_sync("kv", "pid", timeout=30)
            assert new_pid == task.pid and new_pid != old_pid


def test_a_host_that_cannot_be_restarted_is_unhealthy_named_to_callers_and_restarted_later(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    config = {"health": {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "max_restarts": 3}}
    with ServiceEnvironment("recovery-fails", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", FailsToStartWhile, (str(flag),)), kind="process")
        assert isinstance(task, ProcessServiceTask)
        with ServiceManager(env) as manager:
            old_pid = manager.call_service_sync("kv", "pid", timeout=30)
            flag.touch()
            os.kill(old_pid, signal.SIGKILL)
            wait_for(
                lambda: "told to fail" in task.get_service_status().extra["health"]["last_recovery"],
                timeout=60,
                what="a failed respawn",
            )
            status = task.get_service_status()
            assert status.state == "running" and not status.healthy, status
            with pytest.raises(ServiceUnavailableError, match="no address") as caught:
                manager.call_service_sync("kv", "pid", timeout=30)
            assert "start it first" not in str(caught.value)
            # The failed respawn keeps the task unhealthy, so recovery tries again; once the host can start, it serves.
            flag.unlink()
            wait_for(lambda: bool(task.addresses), timeout=60, what="a later respawn")
            assert manager.call_service_sync("kv", "pid", timeout=30) == task.pid != old_pid


@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_call_running_longer_than_stuck_after_within_its_deadline_is_not_a_stuck_pool(kind: str) -> None:
    """A long call its caller still waits for (a batch job, a model run): the pool is busy, not stuck.
    Before, after ``health.stuck_after`` without a completed call, recovery replaced the host (or rebuilt
    the instance) and cut the call "may have run", although its caller had given it 30 s."""
    config = {
        # The default retry policy: a call cut "may have run" is not re-sent, so it cannot run twice.
        "health": {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "stuck_after": 0.5, "drain_timeout": 0.2},
    }
    with ServiceEnvironment("busy-not-stuck", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KV, ()), kind=kind)
        with ServiceManager(env) as manager:
            host = manager.call_service_sync("kv", "pid", timeout=30)
            assert manager.call_service_sync("kv", "sleep", (3.0,), timeout=30) == 3.0
            assert manager.call_service_sync("kv", "pid", timeout=30) == host
            status = task.get_service_status()
            assert status.restarts == 0 and status.healthy, status


#: Work that runs outside the worker pool, 3 s in all: (service class, what the caller does, what it gets).
LONG_WORK: dict[str, tuple[type, Callable[[ServiceManager], Any], Any]] = {
    "stream": (TokenModel, lambda manager: list(manager.stream("svc", "slow", (15, 0.2), timeout=30)), list(range(15))),
    "async-generator-stream": (
        TokenModel,
        lambda manager: list(manager.stream("svc", "acount", (15, "", 0.2), timeout=30)),
        list(range(15)),
    ),
    "async-method": (
        AsyncGreeter,
        lambda manager: manager.call_service_sync("svc", "nap", (3.0, "done"), timeout=30),
        "done",
    ),
}


@pytest.mark.parametrize("work", sorted(LONG_WORK))
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_stream_or_coroutine_running_longer_than_stuck_after_within_its_deadline_is_not_a_stuck_pool(
    kind: str, work: str
) -> None:
    """A stream of tokens, a log tail or an ``async def`` call its caller still waits for: busy, not stuck.
    Before, such work ran outside the worker pool, so the status never said until when it was awaited:
    after ``health.stuck_after`` without a completed call, recovery rebuilt the instance under it (its state
    lost) or replaced the host, breaking the stream "host died mid-stream" and cutting the call "may have run"."""
    service_class, run, expected = LONG_WORK[work]
    config = {
        # The default retry policy: a call cut "may have run" is not re-sent, so it cannot run twice.
        "health": {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "stuck_after": 0.5, "drain_timeout": 0.2},
    }
    with ServiceEnvironment("busy-not-stuck", config) as env:
        task = env.register_service("svc", ServiceFactory("svc", service_class, ()), kind=kind)
        with ServiceManager(env) as manager:
            assert run(manager) == expected
            status = task.get_service_status()
            assert status.restarts == 0 and status.healthy, status


def test_a_call_still_running_past_its_deadline_is_a_stuck_pool_and_recovered() -> None:
    """Its caller gave up: the worker is held for nothing, and recovery replaces the host as before."""
    config = {
        # The default retry policy: a call cut "may have run" is not re-sent, so it cannot run twice.
        "health": {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "stuck_after": 0.5, "drain_timeout": 0.2},
    }
    with ServiceEnvironment("stuck-past-deadline", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KV, ()), kind="process")
        assert isinstance(task, ProcessServiceTask)
        with ServiceManager(env) as manager:
            old_pid = manager.call_service_sync("kv", "pid", timeout=30)
            with pytest.raises(ServiceError):  # the caller's own deadline
                manager.call_service_sync("kv", "sleep", (60.0,), timeout=1.0)
            wait_for(
                lambda: task.pid not in (None, old_pid) and not task.replacing_host,
                timeout=60,
                what="recovery to replace the host",
            )
            assert manager.call_service_sync("kv", "pid", timeout=30) == task.pid
