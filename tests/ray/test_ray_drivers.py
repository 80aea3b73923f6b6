"""Other processes: a second driver on the same cluster, Ray missing, a bad cluster address, the plugin disabled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import ray
from kservice import ServiceManager, ServiceNotFoundError, ServiceUnavailableError
from kservice.plugins.ray import ACTOR_PREFIX, RayServiceTask


def run_python(script: str, *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter; a hang fails the test at ``timeout`` (the child is killed)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.timeout(120)
def test_a_second_driver_calls_a_detached_service_by_name_and_stops_it(ray_cluster: Any) -> None:
    started = run_python(
        f"""
        import ray
        from kservice import ServiceEnvironment
        ray.init(address={ray_cluster.address!r}, log_to_driver=False)
        env = ServiceEnvironment("publisher", {{"services": {{"shared": {{
            "class": "ray_services:LedgerService", "args": ["/dev/null"], "kind": "ray", "replicas": 2,
            "ray": {{"lifetime": "detached"}}}}}}}})
        env.start()
        print("READY", env.get_task("shared").deployment)
        # Exits without stopping: the detached replicas outlive this driver.
        """,
        timeout=90,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    deployment = started.stdout.split("READY ")[1].split()[0]
    with ServiceManager() as manager:
        assert "shared" in manager.known_services()
        assert manager.call_service_sync("shared", "record", ("t1",)) == "t1"
        futures = [manager.call_service_async("shared", "record", (f"t{i}",)) for i in range(10)]
        assert [f.result(30) for f in futures] == [f"t{i}" for i in range(10)]
        where = {manager.call_service_sync("shared", "where")["actor"] for _ in range(10)}
        assert all(name.startswith(f"{ACTOR_PREFIX}shared:{deployment}:") for name in where)
        status = manager.get_service_status("shared")
        assert status["state"] == "running" and len(status["extra"]["replicas"]) == 2
        task = RayServiceTask.attach("shared")
        assert task.deployment == deployment and task.running
        names = [r.name for r in task.replica_set.snapshot()]  # type: ignore[union-attr]
        task.stop_service()
        for name in names:
            with pytest.raises(ValueError):
                ray.get_actor(name, namespace="kservice")
        with pytest.raises(ServiceUnavailableError):
            manager.call_service_sync("shared", "record", ("late",), timeout=10)
    with ServiceManager() as fresh, pytest.raises(ServiceNotFoundError):
        fresh.call_service_sync("shared", "record", ("gone",))


# Blocks ``import ray`` as if Ray were not installed.
BLOCK_RAY = """
import sys
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoRay())
"""


#: A child's script: ask for a ray service (printing the error) and call a local one.
_RAY_AND_LOCAL_SERVICE = """
class Echo:
    def echo(self, x): return x
env = ServiceEnvironment("{name}")
try:
    env.register_service("r", ServiceFactory("r", Echo), kind="ray")
except ConfigError as exc:
    print("ERROR", exc)
env.register_service("local", ServiceFactory("local", Echo))
with env:
    with env.manager() as manager:
        print("LOCAL", manager.call_service_sync("local", "echo", ("ok",)))
"""


@pytest.mark.timeout(60)
def test_without_ray_installed_a_ray_service_is_a_clear_error_and_local_ones_work() -> None:
    result = run_python(
        BLOCK_RAY
        + """
import kservice
from kservice import ConfigError, ServiceEnvironment, ServiceFactory
from kservice._plugins import plugin_infos
import kservice.plugins.ray as ray_plugin
assert "ray" in {info.name for info in plugin_infos()}, "the plugin loads without Ray"
"""
        + _RAY_AND_LOCAL_SERVICE.format(name="no-ray")
        + """assert "ray" not in sys.modules
""",
        timeout=50,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "ERROR services.r.kind: 'ray' needs Ray, which is not installed: pip install 'kservice[ray]'" in result.stdout
    )
    assert "LOCAL ok" in result.stdout


@pytest.mark.timeout(60)
def test_disabling_the_ray_plugin_leaves_the_rest_working() -> None:
    result = run_python(
        """
from kservice import ConfigError, ServiceEnvironment, ServiceFactory
"""
        + _RAY_AND_LOCAL_SERVICE.format(name="no-ray-plugin"),
        timeout=50,
        env={"KSERVICE_DISABLE_PLUGINS": "ray"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no task kind 'ray' is registered" in result.stdout
    assert "LOCAL ok" in result.stdout


@pytest.mark.timeout(60)
def test_an_unreachable_cluster_address_fails_start_quickly_with_a_clear_error() -> None:
    started = time.monotonic()
    result = run_python(
        """
import time
from kservice import ServiceEnvironment, ServiceUnavailableError
env = ServiceEnvironment("bad-address", {"services": {"far": {
    "class": "ray_services:EchoService", "kind": "ray", "ray": {"address": "127.0.0.1:1", "connect_timeout": 3}}}})
began = time.monotonic()
try:
    env.start()
except ServiceUnavailableError as exc:
    print("ERROR", exc, "AFTER", round(time.monotonic() - began, 1))
import ray
print("INITIALIZED", ray.is_initialized())
""",
        timeout=50,
        env={"RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in result.stdout
    assert "ray start --head" in result.stdout
    assert "INITIALIZED False" in result.stdout
    assert time.monotonic() - started < 45


@pytest.mark.timeout(120)
def test_a_caller_in_another_driver_keeps_no_more_calls_in_a_replica_than_it_runs_at_once(tmp_path: Any) -> None:
    from kservice import Config, ServiceFactory, TaskContext
    from kservice.testing import wait_for
    from ray_services import LedgerService, without_breaker

    ledger = tmp_path / "ledger"
    ledger.write_text("")
    # Two calls at once in the replica (Ray's max_concurrency); the hosted task's own pool keeps its default (10).
    config = Config.load({"services": {"narrow": {"ray": {"max_concurrency": 2}, **without_breaker()}}})
    task = RayServiceTask(ServiceFactory("narrow", LedgerService, (str(ledger),)), TaskContext(config=config))
    task.start_service()
    try:
        assert RayServiceTask.attach("narrow").max_workers == 2
        # No environment holds the task here: the manager reaches it as a caller in another driver does.
        with ServiceManager(config={"services": {"narrow": without_breaker()}}) as manager:
            futures = [manager.call_service_async("narrow", "record", (f"t{i}", 3.0), timeout=60) for i in range(6)]
            wait_for(lambda: len(ledger.read_text().split()) >= 2, timeout=30, what="two calls to start")
            time.sleep(0.3)  # a third call sent to the replica would have started by now if it could
            ray.kill(task.replica_set.snapshot()[0].handle, no_restart=False)  # type: ignore[union-attr]
            may_have_run = []
            for future in futures:
                try:
                    future.result(60)
                except ServiceUnavailableError as exc:
                    assert exc.may_have_run, exc  # a call refused unrun is re-sent once the replica is back
                    may_have_run.append(exc)
        # Only the two calls running in the replica were lost (before: all six had been sent to it and failed).
        assert len(may_have_run) == 2, may_have_run
    finally:
        task.stop_service()
