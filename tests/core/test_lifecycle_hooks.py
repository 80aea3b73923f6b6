"""Lifecycle hooks that raise are reported and never stop a task starting, stopping or failing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceManager, get_plugin_manager, hookimpl

from tests.core.conftest import make_distribution, run_python
from tests.core.faulty import Counter

pytestmark = pytest.mark.timeout(60)

LIFECYCLE_HOOKS = ("kservice_task_started", "kservice_task_stopping", "kservice_task_stopped", "kservice_task_status")


class RaisingPlugin:
    """Raises from one hook; counts the calls of every lifecycle hook."""

    def __init__(self, raising: str) -> None:
        self.raising = raising
        self.calls: dict[str, int] = {}

    #: what the hook raises (a subclass may raise SystemExit)
    error: type[BaseException] = RuntimeError

    def _seen(self, hook: str) -> None:
        self.calls[hook] = self.calls.get(hook, 0) + 1
        if hook == self.raising:
            raise self.error(f"{hook} exploded on purpose")

    @hookimpl
    def kservice_task_started(self, task: Any) -> None:
        self._seen("kservice_task_started")

    @hookimpl
    def kservice_task_stopping(self, task: Any) -> None:
        self._seen("kservice_task_stopping")

    @hookimpl
    def kservice_task_stopped(self, task: Any) -> None:
        self._seen("kservice_task_stopped")

    @hookimpl
    def kservice_task_failed(self, task: Any, error: BaseException) -> None:
        self._seen("kservice_task_failed")

    @hookimpl
    def kservice_task_status(self, task: Any, status: Any) -> None:
        self._seen("kservice_task_status")
        status.extra["raising_plugin"] = True

    @hookimpl
    def kservice_environment_stopped(self, environment: Any) -> None:
        self._seen("kservice_environment_stopped")


class Witness:
    """A well-behaved plugin registered before the raising one: pluggy calls it after."""

    def __init__(self) -> None:
        self.stopping = 0

    @hookimpl
    def kservice_task_stopping(self, task: Any) -> None:
        self.stopping += 1


@pytest.fixture
def plugins() -> Iterator[Any]:
    pm = get_plugin_manager()
    names: list[str] = []

    def register(plugin: Any, name: str) -> Any:
        pm.register(plugin, name=name)
        names.append(name)
        return plugin

    yield register
    for name in reversed(names):
        if pm.has_plugin(name):
            pm.unregister(name=name)


def _workers(service: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"kservice-{service}-") and t.is_alive()]


class ExitingPlugin(RaisingPlugin):
    error = SystemExit


def test_a_lifecycle_hook_raising_system_exit_is_a_warning_naming_the_plugin_like_any_error(plugins: Any) -> None:
    # Before: SystemExit ended the hook's thread silently: no warning named the plugin.
    plugins(ExitingPlugin("kservice_task_started"), "exiting_plugin")
    env = ServiceEnvironment("hooks", {"health": {"enabled": False}})
    env.register_service("counter", Counter)
    with pytest.warns(RuntimeWarning, match=r"plugin 'exiting_plugin': its kservice_task_started raised SystemExit"):
        env.start()
    try:
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("counter", "add", (2,)) == 2
    finally:
        env.stop()


@pytest.mark.parametrize("raising", LIFECYCLE_HOOKS)
def test_a_raising_lifecycle_hook_is_a_warning_naming_the_plugin_and_the_task_stops_for_good(
    raising: str, plugins: Any
) -> None:
    witness = plugins(Witness(), "witness")
    plugin = plugins(RaisingPlugin(raising), "raising_plugin")
    env = ServiceEnvironment("hooks", {"health": {"enabled": False}})
    env.register_service("counter", Counter)
    with pytest.warns(
        RuntimeWarning, match=rf"plugin 'raising_plugin': its {raising} raised RuntimeError: {raising} exploded"
    ):
        env.start()
        task = env.get_task("counter")
        assert task is not None and task.state == "running"
        manager = env.manager()
        assert manager.call_service_sync("counter", "add", (2,)) == 2
        status = task.get_service_status()
        assert status.healthy
        started = time.monotonic()
        task.stop_service(5)
        assert time.monotonic() - started < 3.0
    assert task.state == "stopped"
    assert not _workers("counter"), "worker threads outlived the stop"
    assert witness.stopping == 1, "the other plugins' hooks still ran"
    assert plugin.calls["kservice_task_stopped"] == 1
    task.stop_service(5)  # idempotent: returns, changes nothing
    assert task.state == "stopped" and plugin.calls["kservice_task_stopped"] == 1
    env.stop()
    # The service can be started again and serves with a fresh instance.
    with pytest.warns(RuntimeWarning) if raising == "kservice_task_started" else _nothing():
        task.start_service()
        try:
            assert env.manager().call_service_sync("counter", "add", (1,)) == 1
        finally:
            task.stop_service(5)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def test_a_raising_environment_hook_does_not_stop_the_environment_stopping(plugins: Any) -> None:
    plugins(RaisingPlugin("kservice_environment_stopped"), "raising_plugin")
    env = ServiceEnvironment("hooks", {"health": {"enabled": False}})
    task = env.register_service("counter", Counter)
    env.start()
    with pytest.warns(RuntimeWarning, match="plugin 'raising_plugin': its kservice_environment_stopped raised"):
        env.stop()
    assert task.state == "stopped"


STOPPING_PLUGIN = """
import kservice

@kservice.hookimpl
def kservice_task_stopping(task):
    raise RuntimeError("stopping hook exploded")
"""

STOP_SCRIPT = """
import threading, time, warnings
import kservice
from tests.core.faulty import Counter
warnings.simplefilter("always")
env = kservice.ServiceEnvironment("p", {"health": {"enabled": False}})
task = env.register_service("counter", Counter)
env.start()
print("call", env.manager().call_service_sync("counter", "add", (3,)))
started = time.monotonic()
task.stop_service(5)
print("stopped", task.state, round(time.monotonic() - started) < 3)
print("workers", sorted(t.name for t in threading.enumerate() if t.name.startswith("kservice-counter")))
task.stop_service(5)
print("again", task.state)
env.stop()
"""


def test_an_installed_plugin_whose_stopping_hook_raises_cannot_keep_a_task_from_stopping(tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path, "acme_stopping", {"kservice": {"acme_stopping": "acme_stopping"}}, {"acme_stopping": STOPPING_PLUGIN}
    )
    result = run_python(STOP_SCRIPT, site=site)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == ["call 3", "stopped stopped True", "workers []", "again stopped"], result.stdout + result.stderr
    assert (
        "plugin 'acme_stopping': its kservice_task_stopping raised RuntimeError: stopping hook exploded"
        in result.stderr
    )


HANGING_PLUGIN = """
import time
import kservice

@kservice.hookimpl
def kservice_task_started(task):
    time.sleep(120)  # a plugin waiting on an endpoint that stopped answering

@kservice.hookimpl
def kservice_task_stopping(task):
    time.sleep(120)

@kservice.hookimpl
def kservice_task_status(task, status):
    time.sleep(120)
"""

HANG_SCRIPT = """
import threading, time, warnings
import kservice
import kservice._plugins
from tests.core.faulty import Counter
warnings.simplefilter("always")
kservice._plugins.PLUGIN_ANSWER_TIMEOUT = 0.5  # the bound of an announcement given none (5 s)
env = kservice.ServiceEnvironment("p", {"health": {"enabled": False}})
task = env.register_service("counter", Counter)
began = time.monotonic()
env.start()
print("started", task.state, time.monotonic() - began < 3)
print("call", env.manager().call_service_sync("counter", "add", (3,)))
began = time.monotonic()
status = task.get_service_status()
print("status", status.state, time.monotonic() - began < 3)
began = time.monotonic()
task.get_service_status()
print("status again at once", time.monotonic() - began < 0.5)
began = time.monotonic()
task.stop_service(1.0)
print("stopped", task.state, time.monotonic() - began < 2.5)
print("workers", sorted(t.name for t in threading.enumerate() if t.name.startswith("kservice-counter")))
env.stop()
"""


def test_an_installed_plugin_whose_lifecycle_hooks_hang_cannot_keep_a_task_from_starting_reporting_or_stopping_on_time(
    tmp_path: Path,
) -> None:
    site = make_distribution(
        tmp_path, "acme_hanging", {"kservice": {"acme_hanging": "acme_hanging"}}, {"acme_hanging": HANGING_PLUGIN}
    )
    # Before: env.start() waited for the plugin's hook as long as it hung, and so did every status
    # and stop_service(1.0), which promises to return within its timeout.
    result = run_python(HANG_SCRIPT, site=site, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "started running True",
        "call 3",
        "status running True",
        "status again at once True",
        "stopped stopped True",
        "workers []",
    ], result.stdout + result.stderr
    for hook in ("kservice_task_started", "kservice_task_status", "kservice_task_stopping"):
        assert f"plugin 'acme_hanging': its {hook} has not returned within" in result.stderr, result.stderr
    assert "plugin 'acme_hanging': its kservice_task_status was not called: it has not returned" in result.stderr


COLUMNS_PLUGIN = """
import time
import kservice

@kservice.hookimpl
def kservice_status_columns(status, extra):
    time.sleep(120)  # a plugin asking a monitoring endpoint that stopped answering
    return {"gpu": "n/a"}
"""

COLUMNS_SCRIPT = """
import time, warnings
import kservice
from kservice.cli.status import status_rows
from tests.core.faulty import Counter
warnings.simplefilter("always")
env = kservice.ServiceEnvironment("p", {"health": {"enabled": False}})
task = env.register_service("counter", Counter)
with env:
    status = task.get_service_status()
    for attempt in ("first", "again"):
        began = time.monotonic()
        rows = status_rows([status])
        print(attempt, rows[0]["service"], rows[0]["state"], round(time.monotonic() - began, 1) <= 2.0)
"""


def test_a_plugins_status_columns_that_hang_leave_the_table_its_other_cells_within_a_second(tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path, "acme_columns", {"kservice": {"acme_columns": "acme_columns"}}, {"acme_columns": COLUMNS_PLUGIN}
    )
    # Before: every row of `kservice status` and of the dashboard waited for the plugin as long as it hung.
    result = run_python(COLUMNS_SCRIPT, site=site, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["first counter running True", "again counter running True"], (
        result.stdout + result.stderr
    )
    assert "plugin 'acme_columns': its kservice_status_columns has not returned within 1.0 s" in result.stderr
    assert "its kservice_status_columns was not called: it has not returned from an earlier call" in result.stderr
