"""Finding a service (resolvers, connecting, compiling its chain) is part of the call and bounded by its deadline.

A plugin's ``kservice_resolve_service`` that hangs (a directory service that
stopped answering, a Ray head node gone) must not hold a caller past its
timeout, nor block an event loop, nor stop the manager's timer from ending
other calls at their deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceTimeoutError, hookimpl

from tests.core.conftest import make_distribution, run_python
from tests.core.services import KeyValue

pytestmark = pytest.mark.timeout(60)

HANGING_RESOLVER = """
import time
import kservice

@kservice.hookimpl
def kservice_resolve_service(service_name, options, manager):
    if service_name == "directory-down":
        time.sleep(8)  # a directory service that stopped answering
    return None
"""

CALLS = """
import time
import kservice
from kservice import ServiceTimeoutError

env = kservice.ServiceEnvironment("p")
env.register_service("kv", dict)
with env, kservice.ServiceManager(env) as m:
    began = time.monotonic()
    try:
        m.call_service_sync("directory-down", "get", ("x",), timeout=0.5)
    except ServiceTimeoutError as exc:
        print("waited:", round(time.monotonic() - began, 2))
        print("may_have_run:", exc.may_have_run)
        print("error:", exc)
    print("next:", m.call_service_sync("kv", "get", ("x", 1)))
"""


def test_a_resolver_that_hangs_ends_the_call_at_its_deadline_naming_the_plugin(tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path,
        "acme_directory",
        {"kservice": {"acme_directory": "acme_directory"}},
        {"acme_directory": HANGING_RESOLVER},
    )
    began = time.monotonic()
    result = run_python(CALLS, site=site)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    # Before: the call waited the resolver's 8 s, and its 0.5 s timeout only began after it.
    assert float(lines["waited"]) < 3.0, lines
    assert lines["may_have_run"] == "False"
    error = lines["error"]
    assert "'directory-down'" in error and "0.5" in error, error
    assert "plugin 'acme_directory'" in error and "kservice_resolve_service" in error, error
    assert "nothing was sent" in error
    assert lines["next"] == "1"  # the manager goes on serving
    assert time.monotonic() - began < 7.5  # the interpreter's exit does not wait for the hung resolver either


class _Directory:
    """A resolver plugin that answers for ``names`` with other environments' addresses, or hangs while ``down``."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.up = threading.Event()
        self.up.set()
        self.answers: dict[str, Any] = {}
        self.asked = 0
        self.delay = 0.0

    @hookimpl
    def kservice_resolve_service(self, service_name: str, options: Any, manager: Any) -> Any:
        if service_name not in self.answers and service_name != "directory-down":
            return None
        self.asked += 1
        if self.delay:
            time.sleep(self.delay)
        if service_name == "directory-down" or self.down.is_set():
            self.up.wait(30)
        return self.answers.get(service_name)


@pytest.fixture
def directory() -> Iterator[_Directory]:
    plugin = _Directory()
    plugin.up.clear()
    pm = kservice.get_plugin_manager()
    pm.register(plugin, name="test-directory")
    try:
        yield plugin
    finally:
        plugin.up.set()  # lets the hung resolver, and its thread, end
        pm.unregister(name="test-directory")


def test_an_async_call_and_acall_are_bounded_by_their_timeout_and_the_event_loop_keeps_running(
    directory: _Directory,
) -> None:
    with ServiceManager() as manager:
        began = time.monotonic()
        with pytest.raises(ServiceTimeoutError) as raised:
            manager.call_service_async("directory-down", "get", ("x",), timeout=0.3)
        assert time.monotonic() - began < 2.0
        assert raised.value.may_have_run is False

        async def main() -> tuple[int, BaseException | None]:
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(ticker())
            try:
                await manager.acall("directory-down", "get", ("x",), timeout=0.5)
                error: BaseException | None = None
            except ServiceTimeoutError as exc:
                error = exc
            stop.set()
            await ticking
            return ticks, error

        began = time.monotonic()
        ticks, error = asyncio.run(main())
        assert isinstance(error, ServiceTimeoutError), error
        assert time.monotonic() - began < 2.5
        assert ticks >= 10, ticks  # before: the loop stood still while the resolver hung
        began = time.monotonic()
        with pytest.raises(ServiceTimeoutError):
            manager.get_service_status("directory-down", timeout=0.3)
        assert time.monotonic() - began < 2.0
        # Every waiter shares the one resolution in flight: the hung resolver was asked once.
        assert directory.asked == 1


def test_the_time_spent_finding_the_service_counts_against_the_calls_timeout(directory: _Directory) -> None:
    remote = ServiceEnvironment("remote")
    remote.register_service("kv", KeyValue, {"a": 1})
    with remote, ServiceManager() as manager:
        directory.up.set()
        directory.answers["far-kv"] = remote.get_task("kv").addresses
        directory.delay = 0.6
        with pytest.raises(ServiceTimeoutError):
            # Before: the 1 s timeout began once the 0.6 s resolution was done, so the 0.6 s call passed.
            manager.call_service_sync("far-kv", "sleep", (0.6,), timeout=1.0)
        directory.delay = 0.0
        assert manager.call_service_sync("far-kv", "get", ("a",), timeout=5) == 1  # the route was kept


def test_a_resolver_hanging_on_an_async_calls_reroute_does_not_hold_the_deadlines_of_other_calls(
    directory: _Directory,
) -> None:
    remote = ServiceEnvironment("remote", {"health": {"enabled": False}})  # nobody restarts the host
    remote.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
    with remote, ServiceManager() as manager:
        directory.up.set()
        directory.answers["far-kv"] = remote.get_task("kv").addresses
        assert manager.call_service_sync("far-kv", "get", ("a",), timeout=10) == 1
        directory.up.clear()
        directory.down.set()  # from now on the directory hangs
        pid = remote.get_task("kv").pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        began = time.monotonic()
        # Refused by the dead host's ring (or failed as never read by it): the call is re-routed or
        # retried from the manager's timer, which resolves the name again and meets the hung directory.
        moved = manager.call_service_async("far-kv", "get", ("a",), timeout=0.5)
        other = manager.call_service_async("far-kv", "get", ("a",), timeout=0.8)
        for future in (moved, other):
            with pytest.raises(ServiceTimeoutError):
                future.result(timeout=5)  # before: TimeoutError of the wait, the timer stood in the resolver
        assert time.monotonic() - began < 3.0


def test_a_search_that_ends_after_its_manager_closed_keeps_no_route_or_connection(directory: _Directory) -> None:
    remote = ServiceEnvironment("remote")
    remote.register_service("kv", KeyValue, {"a": 1})
    with remote:
        manager = ServiceManager()
        directory.answers["directory-down"] = remote.get_task("kv").addresses
        with pytest.raises(ServiceTimeoutError):
            manager.call_service_sync("directory-down", "get", ("a",), timeout=0.2)
        manager.close()
        directory.up.set()  # the search ends now, with an address
        deadline = time.monotonic() + 10
        while any(t.name == "kservice-route-directory-down" for t in threading.enumerate()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert manager._routes == {}  # its connection was closed, not kept by a closed manager


FLAKY_DIRECTORY = """
import time
import kservice

answers = {}
asked = []

@kservice.hookimpl
def kservice_resolve_service(service_name, options, manager):
    if service_name not in answers:
        return None
    asked.append(service_name)
    if len(asked) > 1:
        time.sleep(30)  # the directory stops answering after its first answer
    return answers[service_name]
"""

EXITS = """
import os, signal, time
import kservice
from kservice import ServiceFactory
import acme_flaky
from tests.core.services import KeyValue

remote = kservice.ServiceEnvironment("remote", {"health": {"enabled": False}})
remote.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
remote.start()
acme_flaky.answers["far-kv"] = remote.get_task("kv").addresses
manager = kservice.ServiceManager()
assert manager.call_service_sync("far-kv", "get", ("a",), timeout=10) == 1
os.kill(remote.get_task("kv").pid, signal.SIGKILL)
time.sleep(0.3)
future = manager.call_service_async("far-kv", "get", ("a",), timeout=20)
try:
    future.result(1)
except TimeoutError:
    print("still waiting", flush=True)  # the program gives up on the call and ends
remote.stop()
print("exiting", time.monotonic(), flush=True)
"""


def test_a_retry_waiting_on_a_hung_plugin_does_not_hold_up_the_programs_exit(tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path, "acme_flaky", {"kservice": {"acme_flaky": "acme_flaky"}}, {"acme_flaky": FLAKY_DIRECTORY}
    )
    result = run_python(EXITS, site=site)
    ended = time.monotonic()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "still waiting", lines
    exiting = float(lines[1].split()[1])
    # The call's re-route waits on the directory in a worker thread, up to the call's 20 s deadline;
    # the interpreter's exit waits for no such thread.
    assert ended - exiting < 5.0


def test_an_acall_given_up_while_the_service_is_found_leaves_nothing_for_the_loop_to_wait_for(
    directory: _Directory,
) -> None:
    with ServiceManager() as manager:

        async def main() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(manager.acall("directory-down", "get", ("x",), timeout=20), 0.3)

        began = time.monotonic()
        asyncio.run(main())  # closing the loop waits for no thread still searching (it would, 20 s)
        assert time.monotonic() - began < 3.0
