"""A process that only calls services loads what a call needs, not every plugin's heavy parts.

Building a ``ServiceManager`` loads every installed plugin; the plugins keep
their heavy dependencies (the CLI's click, PyYAML, tenacity, psutil,
OpenTelemetry, prometheus-client, rich) for when they are used, so a short-lived
caller (``kservice call``, a worker) does not pay for them on every start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from tests.mmap.services import child_env

#: Imported by nothing a plain caller needs (each one is used by a command, a config file, a retry,
#: a configured tracer provider or a metrics endpoint).
HEAVY = ("click", "rich", "yaml", "tenacity", "psutil", "opentelemetry", "prometheus_client", "kservice.cli", "asyncio")

_CALLER = """
import json, sys
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager
from tests.mmap.services import KV
with ServiceEnvironment("cold", {"health": {"enabled": False}}) as environment:
    environment.register_service("kv", ServiceFactory("kv", KV), kind="process")
    # a manager of its own, as a separate caller process would build it
    manager = ServiceManager(environment=environment)
    assert manager.call_service_sync("kv", "echo", ("hi",)) == "hi"
    heavy = sorted({m.split(".")[0] if not m.startswith("kservice") else m for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps(heavy))
"""


@pytest.mark.timeout(120)
def test_a_caller_loads_no_heavy_dependency() -> None:
    env = child_env()
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    done = subprocess.run([sys.executable, "-c", _CALLER, *HEAVY], capture_output=True, text=True, env=env, timeout=100)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_process_liveness_from_procfs_matches_psutil() -> None:
    from kservice.plugins.mmap import registry

    for pid in (os.getpid(), os.getppid(), 1):
        start = psutil.Process(pid).create_time()
        assert abs(registry.process_start_time(pid) - start) < 0.05
        assert registry.process_alive(pid, start)
        assert not registry.process_alive(pid, start - 5.0)  # a recycled pid: another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not registry.process_alive(child.pid)
    assert registry.process_start_time(child.pid) == 0.0
    assert not registry.process_alive(0) and not registry.process_alive(-1)
