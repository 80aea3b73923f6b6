"""Calls to ``kservice serve`` hosts under faults, with the default retry settings.

A host killed during a call: the call ran at most once and the caller is told it
may have run. A host draining on SIGTERM: every call it accepted gets its answer,
whatever else the calling process does meanwhile. A cancelled call that has not
started never starts. Closing the manager fails its calls in flight at once.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kservice import (
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceNotFoundError,
    ServiceStoppedError,
    ServiceUnavailableError,
)
from kservice.plugins.mmap import reclaim, registry
from kservice.testing import wait_for

from tests.blocking_callbacks import check_a_blocking_done_callback_is_named
from tests.cli.helpers import KV_TARGET, start_host, stop_host

from .services import KV, Host, child_env, unique

pytestmark = pytest.mark.timeout(90)


def tags(path: Path) -> list[str]:
    """The tags of the runs the ledger file recorded, in order."""
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


class Hosts:
    """The hosts a test started (each stopped at the end)."""

    def __init__(self) -> None:
        self.started: list[Host] = []

    def start(self, spec: str) -> Host:
        host = Host(spec)
        self.started.append(host)
        host.wait_ready()
        return host

    def kill_then_restart(self, host: Host, spec: str, when: Callable[[], bool]) -> threading.Thread:
        """In a thread: once ``when()``, ``kill -9`` the host, and 0.3 s later start a new one under the same name."""

        def run() -> None:
            wait_for(when, timeout=20, what="the fault's moment")
            host.process.kill()
            host.process.wait()
            time.sleep(0.3)  # deliberate: a gap in which no host serves the name
            self.start(spec)

        thread = threading.Thread(target=run)
        thread.start()
        return thread


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    started = Hosts()
    try:
        yield started
    finally:
        for host in started.started:
            host.stop()
        reclaim()


def accepted(manager: ServiceManager, name: str) -> int:
    """How many calls the host of ``name`` has accepted and not finished (running or queued)."""
    status = manager.get_service_status(name)
    assert isinstance(status, dict)
    return int(status["in_flight"]) + int(status["queue_depth"])


# ------------------------------------------------------------------ at most once


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_cut_off_by_a_host_kill_is_not_retried_and_says_it_may_have_run(
    hosts: Hosts, tmp_path: Path, mode: str
) -> None:
    name = unique("ledger")
    spec = f"{name}=tests.mmap.services:Ledger"
    path = tmp_path / "ledger.txt"
    first = hosts.start(spec)
    with ServiceManager() as manager:  # the default retry settings
        assert manager.call_service_sync(name, "pid", timeout=30) == first.pid
        killer = hosts.kill_then_restart(first, spec, lambda: tags(path) == ["once"])
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="may have run") as failed:
            if mode == "sync":
                manager.call_service_sync(name, "record", (str(path), "once", 3.0), timeout=30)
            else:
                manager.call_service_async(name, "record", (str(path), "once", 3.0), timeout=30).result(30)
        assert time.monotonic() - started < 5  # the kill is seen in about a second, not at the timeout
        assert failed.value.may_have_run is True
        killer.join(30)
        assert tags(path) == ["once"]  # it ran once, and was not re-sent to the new host
        # The new host serves the next call through the same manager.
        second = hosts.started[-1]
        assert manager.call_service_sync(name, "record", (str(path), "next", 0.0), timeout=30) == second.pid
        assert tags(path) == ["once", "next"]


@pytest.mark.parametrize(
    "declared_by",
    [
        # The caller's own config says so, for a method the class does not declare (the host's class is
        # not imported here).
        "the caller's config",
        # No config in the caller: the host publishes the class's @idempotent methods with its address.
        "the class, through the host",
    ],
)
def test_an_idempotent_call_cut_off_by_a_host_kill_is_retried_on_the_new_host(
    hosts: Hosts, tmp_path: Path, declared_by: str
) -> None:
    name = unique("ledger")
    spec = f"{name}=tests.mmap.services:Ledger"
    path = tmp_path / "ledger.txt"
    first = hosts.start(spec)
    if declared_by == "the caller's config":
        method, config = "record", {"services": {name: {"idempotent": ["record"]}}}
    else:
        method, config = "record_idempotent", {}
    with ServiceManager(config=config) as manager:  # the default retry settings otherwise
        assert manager.call_service_sync(name, "pid", timeout=30) == first.pid
        killer = hosts.kill_then_restart(first, spec, lambda: tags(path) == ["again"])
        future = manager.call_service_async(name, method, (str(path), "again", 1.0), timeout=30)
        assert future.result(30) == hosts.started[-1].pid != first.pid
        killer.join(30)
        assert tags(path) == ["again", "again"]


def test_a_request_the_killed_host_never_read_is_reported_as_never_run(hosts: Hosts) -> None:
    name = unique("frozen")
    host = hosts.start(f"{name}=tests.mmap.services:KV")
    with ServiceManager(config={"service_call": {"max_retries": 0}}) as manager:
        manager.call_service_sync(name, "put", ("k", "v"), timeout=30)
        host.process.send_signal(signal.SIGSTOP)  # it reads nothing more
        try:
            unread = manager.call_service_async(name, "put", ("k", "w"), timeout=30)
            time.sleep(0.2)  # time for the request to be written to the ring (a stopped host cannot report it)
        finally:
            host.process.kill()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="never ran") as failed:
            unread.result(10)
        assert time.monotonic() - started < 5
        assert failed.value.may_have_run is False  # so any retry policy may send it again
        # The connection knows its host is gone: the next call is refused before anything is written.
        with pytest.raises((ServiceUnavailableError, ServiceNotFoundError)) as refused:
            manager.call_service_sync(name, "put", ("k", "x"), timeout=10)
        assert getattr(refused.value, "may_have_run", False) is not True


# ------------------------------------------------------------ no answer lost


def test_a_draining_host_answers_every_call_in_flight_whatever_the_process_does_meanwhile(hosts: Hosts) -> None:
    name = unique("drain")
    host = hosts.start(f"{name}=tests.mmap.services:KV")
    with ServiceManager() as manager:  # the default retry settings
        manager.call_service_sync(name, "echo", (0,), timeout=30)
        in_flight = [manager.call_service_async(name, "sleep", (1.5,), timeout=30) for _ in range(16)]
        wait_for(lambda: accepted(manager, name) >= 16, what="the host to accept all 16 calls")
        host.process.send_signal(signal.SIGTERM)
        wait_for(lambda: registry.lookup(name) is None, timeout=20, what="the host to stop accepting")
        # A new call is refused; its route is refreshed (and the old connection closed) ...
        with pytest.raises((ServiceUnavailableError, ServiceNotFoundError)):
            manager.call_service_sync(name, "echo", (1,), timeout=10)
        # ... and every call the host accepted still gets its own answer.
        assert [future.result(30) for future in in_flight] == [1.5] * 16
        assert host.process.wait(30) == 0


# --------------------------------------------------------------- cancellation


def test_cancelling_a_queued_call_keeps_it_from_ever_running_in_the_host(hosts: Hosts, tmp_path: Path) -> None:
    name = unique("serial")
    hosts.start(f"{name}=tests.mmap.services:SerialLedger")
    path = tmp_path / "ledger.txt"
    with ServiceManager() as manager:
        busy = manager.call_service_async(name, "record", (str(path), "busy", 1.0), timeout=30)
        wait_for(lambda: tags(path) == ["busy"], timeout=20, what="the busy call to start")
        queued = manager.call_service_async(name, "record", (str(path), "queued", 0.0), timeout=30)
        wait_for(lambda: accepted(manager, name) >= 2, what="the call to reach the host's queue, behind the busy call")
        assert queued.cancel()

        async def wait_for_cancelled() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(manager.acall(name, "record", (str(path), "wait_for", 0.0), timeout=30), 0.1)

        asyncio.run(wait_for_cancelled())
        busy.result(10)
        assert manager.call_service_sync(name, "record", (str(path), "next", 0.0), timeout=10) > 0
        time.sleep(0.1)  # deliberate: room for the cancelled call to run late, which it must not
        assert tags(path) == ["busy", "next"]


# -------------------------------------------------------------------- close


def test_close_fails_async_calls_in_flight_at_once(hosts: Hosts) -> None:
    name = unique("closing")
    hosts.start(f"{name}=tests.mmap.services:KV")
    manager = ServiceManager()
    manager.call_service_sync(name, "put", ("k", "v"), timeout=30)
    in_flight = [manager.call_service_async(name, "sleep", (1.5,), timeout=t) for t in (0.3, 30)]
    wait_for(lambda: accepted(manager, name) >= 2, what="both calls to reach the host")
    started = time.monotonic()
    manager.close()
    for future in in_flight:
        with pytest.raises(ServiceStoppedError, match="closed"):
            future.result(5)
    assert time.monotonic() - started < 1.0
    with ServiceManager() as other:
        assert other.call_service_sync(name, "get", ("k",), timeout=10) == "v"


STOPPED_CALLER = """
import os, signal, sys
from kservice import ServiceManager
manager = ServiceManager()
manager.call_service_sync(sys.argv[1], "echo", (1,))
# Many answers of 50 kB: more than its response ring holds, and they come once it is stopped.
futures = [manager.call_service_async(sys.argv[1], "slow_bytes", (50_000, 0.02), timeout=60) for _ in range(400)]
print("sent", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # Ctrl-Z, a debugger, a paused container
print("resumed", manager.call_service_sync(sys.argv[1], "add", (2, 2), timeout=30), flush=True)
"""


@pytest.mark.timeout(180)
def test_a_stopped_caller_whose_ring_is_full_does_not_hold_up_other_callers(tmp_path: Path) -> None:
    """A caller stopped with many answers due (its response ring full): the host waited 2 s for room for
    each answer in turn, so its workers and then every other caller waited behind them (a sync call of
    another caller timed out after 30 s). Answers to a caller whose ring stays full are dropped at once
    after the first wait: the other callers are served; the stopped caller's calls end at their deadline,
    and once it reads again it is answered again."""
    name = unique("stuckcaller")
    host = start_host(f"{name}={KV_TARGET}")
    stopped = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CALLER, name], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert stopped.stdout is not None and stopped.stdout.readline().strip() == "sent"
        with ServiceManager() as manager:
            end = time.monotonic() + 6  # the stopped caller's answers keep coming due meanwhile
            slowest = 0.0
            while time.monotonic() < end:  # another caller, all along
                began = time.monotonic()
                assert manager.call_service_sync(name, "add", (1, 2), timeout=20) == 3
                slowest = max(slowest, time.monotonic() - began)
                time.sleep(0.01)
            assert slowest < 5.0, f"another caller waited {slowest:.1f} s behind the stopped one"
        stopped.send_signal(signal.SIGCONT)  # it reads again: it is answered again
        assert stopped.stdout.readline().strip() == "resumed 4"
    finally:
        stopped.send_signal(signal.SIGCONT)
        stopped.kill()
        stopped.wait(30)
        stop_host(host)
        reclaim()  # the killed caller's rings


def test_a_done_callback_that_blocks_the_response_thread_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Callbacks of an async call's future run in the process's response thread, as Python's futures run
    them in the thread that completes them. One that blocks (a slow write, a lock) holds up the answers
    of the process's other async calls: they end at their deadlines, never later, and the stall is now
    named in a warning on ``kservice.mmap`` saying what to do (before: nothing said why a call whose
    service answered in microseconds timed out)."""
    with ServiceEnvironment("blocking-callback") as env:
        env.register_service("kv", ServiceFactory("kv", KV, ()), kind="process")
        with ServiceManager(env) as manager, caplog.at_level("WARNING", logger="kservice.mmap"):
            assert manager.call_service_sync("kv", "echo", (0,), timeout=30) == 0
            check_a_blocking_done_callback_is_named(manager, "kv", caplog, "this process's response thread", 1.5)
