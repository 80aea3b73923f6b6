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
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from kservice.plugins.mmap import _futex

from tests.mmap.services import REPO_ROOT, child_env

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


#: What ``kservice call`` of a running service has no use for: the hosting side, the other commands,
#: Ray's replica machinery, and (the entry points being cached) the distribution metadata reader.
NOT_FOR_A_CALL = (
    "kservice.plugins.mmap.host",
    "kservice.plugins.mmap.commands",
    "kservice.cli.status",
    "kservice.cli.bench",
    "kservice.cli.config",
    "kservice.plugins.ray.connection",
    "kservice.plugins.ray.task",
    "importlib.metadata",
    "rich",
)

_CLI_CALLER = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(set(sys.modules) & set(sys.argv[1:]))), file=sys.stderr))
from kservice.cli import main
main(["call", "cold-kv", "echo", '["hi"]'])
"""


@pytest.mark.timeout(120)
def test_kservice_call_loads_only_what_a_call_needs(tmp_path: Path) -> None:
    from tests.cli.helpers import KSERVICE, cli_env

    env = cli_env(KSERVICE_CACHE_DIR=str(tmp_path / "cache"))
    host = subprocess.Popen(
        [KSERVICE, "serve", "--app-dir", str(REPO_ROOT), "cold-kv=tests.mmap.services:KV"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None and host.stdout.readline().startswith("serving cold-kv")
        for attempt in ("writes the entry-point cache", "reads it"):
            done = subprocess.run(
                [sys.executable, "-c", _CLI_CALLER, *NOT_FOR_A_CALL],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert done.returncode == 0 and done.stdout.strip() == '"hi"', (attempt, done.stderr)
        loaded = json.loads(done.stderr.strip().splitlines()[-1])
        assert loaded == [], f"kservice call imported {loaded}"
    finally:
        host.terminate()
        host.communicate(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A ``kservice serve`` host of ``cold-kv`` (KV) and ``cold-model`` (TokenModel); the environment to call it."""
    from tests.cli.helpers import KV_TARGET, cli_env, start_host, stop_host

    env = cli_env(KSERVICE_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    host = start_host(
        f"cold-kv={KV_TARGET}", "cold-model=tests.streaming.services:TokenModel", env=env, app_dir=REPO_ROOT
    )
    try:
        yield env
    finally:
        stop_host(host)


#: What a process that calls a service hosted elsewhere has no use for on its first call: the task
#: machinery and what only it uses, streams, batches, status records, the health monitor, the mmap
#: plugin's streams, the records ``kservice plugins`` lists, the timer's heap, random (Ray's balancer), the
#: error paths, pickle.py, zlib, async calls' futures (and logging) and ctypes (the compiled ring has the
#: native calls).
NOT_FOR_A_CALLER = (
    "kservice._task",
    "kservice._environment",
    "kservice._stream",
    "kservice._batch",
    "kservice._status",
    "kservice._aio",
    "kservice._plugininfo",
    "kservice.plugins._health_monitor",
    "kservice.plugins.mmap.streams",
    "kservice.plugins.mmap.host",
    "kservice.plugins.ray.connection",
    "kservice.plugins.ray.task",
    "kservice.plugins.ray.common",  # asked to resolve a name, the Ray plugin first sees Ray is not imported
    "queue",
    "heapq",
    "random",
    "difflib",
    "pickle",  # the codec uses the C pickler (_pickle) itself, not pickle.py's pure-Python one
    "zlib",  # the entry-point cache's file name hashes the interpreter's prefix without it
    # async calls' futures, imported with the first async call (the mmap transport and the call log
    # look their loggers up at their first message)
    "kservice._asynccall",
    "kservice._future",
    "concurrent.futures",
    "logging",
    # the futex and mutex calls come from the compiled extension when it is built
    *(("ctypes",) if _futex.NATIVE else ()),
)

_PLAIN_CALLER = """
import json, sys
from kservice import ServiceManager
assert ServiceManager().call_service_sync("cold-kv", "echo", ("hi",)) == "hi"
print(json.dumps(sorted(set(sys.modules) & set(sys.argv[1:]))))
"""


@pytest.mark.timeout(120)
def test_a_callers_first_call_loads_only_the_calling_side(served: dict[str, str]) -> None:
    for attempt in ("writes the entry-point cache", "reads it"):
        done = subprocess.run(
            [sys.executable, "-c", _PLAIN_CALLER, *NOT_FOR_A_CALLER],
            capture_output=True,
            text=True,
            env=served,
            timeout=60,
        )
        assert done.returncode == 0, (attempt, done.stderr)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"a caller's first call imported {loaded}"


_STREAMS_AFTER_CALLS = """
import json, os, sys
from kservice import ServiceManager
from kservice.plugins.mmap.ring import queue_directory

def stream_rings():
    return sorted(n for n in os.listdir(queue_directory()) if n.startswith(f"str.{os.getpid()}."))

manager = ServiceManager()
assert manager.call_service_sync("cold-kv", "echo", ("hi",)) == "hi"
assert "kservice.plugins.mmap.streams" not in sys.modules  # plain calls load no stream machinery
for _ in range(20):
    assert list(manager.stream("cold-model", "count", (3,))) == [0, 1, 2]
during = stream_rings()
with manager.stream("cold-model", "count", (3,)) as first:
    assert next(iter(first)) == 0
    assert list(manager.stream("cold-model", "count", (2,))) == [0, 1]  # a second ring while the first is held
manager.close()
print(json.dumps({"during": during, "after": stream_rings()}))
"""


@pytest.mark.timeout(120)
def test_streams_after_plain_calls_reuse_pooled_rings_and_the_last_connection_removes_them(
    served: dict[str, str],
) -> None:
    """The stream machinery loads with the first stream, and still counts the connections opened before it."""
    done = subprocess.run(
        [sys.executable, "-c", _STREAMS_AFTER_CALLS], capture_output=True, text=True, env=served, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rings = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rings["during"]) == 1, rings  # one pooled ring served 20 streams one after another
    assert rings["after"] == [], rings  # the manager's close (its last connection) removed the idle ones


def test_a_caller_of_one_thread_registers_for_membarrier_when_the_plugin_loads() -> None:
    # A caller's rings open in the thread that builds its route; registering then, with two threads,
    # would cost the kernel an RCU grace period (~5 ms here) on every first call.
    code = (
        "import threading, kservice\n"
        "kservice.ServiceManager()\n"
        "from kservice.plugins.mmap import _futex\n"
        "print(threading.active_count(), _futex._impl._membarrier_state)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    threads, registered = result.stdout.split()
    assert threads == "1"
    assert registered != "None"  # asked the kernel already (True where it offers membarrier), no ring opened yet
