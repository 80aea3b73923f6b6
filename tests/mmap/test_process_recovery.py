"""A `process` task whose hosting process dies is respawned by the health plugin, and callers carry on."""

from __future__ import annotations

import os
import signal

import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager
from kservice.testing import wait_for

from tests.core.services import KeyValue


@pytest.mark.timeout(120)
def test_killed_host_process_is_respawned_and_serves_again() -> None:
    config = {"health": {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "max_restarts": 2}}
    with ServiceEnvironment("recovery", config) as env:
        task = env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("kv", "get", ("a",)) == 1
            first_pid = task.pid
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)
            wait_for(
                lambda: task.restarts >= 1 and task.pid not in (None, first_pid),
                timeout=30,
                what="health recovery to respawn the killed host",
                interval=0.1,
            )
            # The new instance starts from its constructor arguments; callers find it without help.
            assert manager.call_service_sync("kv", "get", ("a",), timeout=10) == 1
            status = manager.get_service_status("kv")
            assert status.state == "running" and status.restarts >= 1
