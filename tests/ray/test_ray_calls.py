"""Calls to a running ray service: results, typed errors, bad input, middleware, status, timeouts."""

from __future__ import annotations

import _thread
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from kservice import (
    MethodNotFoundError,
    ServiceCallError,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceTimeoutError,
)
from kservice.plugins.ray import RayServiceTask
from kservice.testing import wait_for
from ray_services import EchoService, LoadBomb, ShoutMiddleware, quiet_config


@pytest.fixture(scope="module")
def env(ray_cluster: Any) -> Iterator[ServiceEnvironment]:
    environment = ServiceEnvironment(
        "ray-calls",
        quiet_config(
            {
                "echo": {"class": "ray_services:EchoService", "kind": "ray", "ray": {"max_concurrency": 4}},
                "slow": {"class": "ray_services:EchoService", "kind": "ray", "ray": {"max_concurrency": 1}},
            }
        ),
    )
    environment.add_middleware(ShoutMiddleware())
    with environment:  # started, and stopped after the module's tests
        yield environment


@pytest.mark.timeout(60)
def test_calls_run_in_a_named_replica_actor(env: ServiceEnvironment, manager: ServiceManager) -> None:
    task = env.get_task("echo")
    assert isinstance(task, RayServiceTask) and task.kind == "ray"
    where = manager.call_service_sync("echo", "where")
    assert where["pid"] != os.getpid()
    assert where["actor"].startswith(f"kservice:echo:{task.deployment}:")
    assert manager.call_service_sync("echo", "echo", ({"a": [1, 2]},)) == {"a": [1, 2]}
    futures = [manager.call_service_async("echo", "echo", (i,)) for i in range(50)]
    assert [f.result(30) for f in futures] == list(range(50))


@pytest.mark.timeout(60)
def test_keyword_arguments_named_like_call_options_reach_the_method(manager: ServiceManager) -> None:
    assert manager.call_service_sync("echo", "timeout", kwargs={"method": "m"}, timeout=20) == "m"


@pytest.mark.timeout(60)
def test_method_error_arrives_typed_and_the_service_keeps_serving(manager: ServiceManager) -> None:
    with pytest.raises(ValueError, match="bad input 42") as caught:
        manager.call_service_sync("echo", "fail", ("bad input 42",))
    assert isinstance(caught.value, ServiceCallError)
    assert caught.value.remote_type == "ValueError"
    assert "raise ValueError(message)" in caught.value.remote_traceback
    future = manager.call_service_async("echo", "fail", ("async bad",))
    with pytest.raises(ValueError, match="async bad"):
        future.result(20)
    assert manager.call_service_sync("echo", "echo", ("still here",)) == "still here"


@pytest.mark.timeout(60)
def test_private_and_unknown_methods_are_refused(manager: ServiceManager) -> None:
    with pytest.raises(MethodNotFoundError, match="private"):
        manager.call_service_sync("echo", "_secret")
    with pytest.raises(MethodNotFoundError, match="did you mean 'echo'"):
        manager.call_service_sync("echo", "ecko")
    assert manager.call_service_sync("echo", "echo", (1,)) == 1


@pytest.mark.timeout(60)
def test_unpicklable_argument_is_a_clear_error_and_the_service_keeps_serving(manager: ServiceManager) -> None:
    with pytest.raises(TypeError, match=r"cannot send call echo\.echo through Ray.*pass picklable values"):
        manager.call_service_sync("echo", "echo", (threading.Lock(),))
    future = manager.call_service_async("echo", "echo", (threading.Lock(),))
    with pytest.raises(TypeError, match="cannot be serialized"):
        future.result(20)
    assert manager.call_service_sync("echo", "echo", ("next",)) == "next"


@pytest.mark.timeout(90)
def test_a_value_whose_pickling_or_unpickling_raises_system_exit_fails_its_call_and_the_replica_lives(
    ray_cluster: Any,
) -> None:
    # Before: Ray ran the same code serializing the result (or reading the arguments) and the SystemExit
    # ended the replica's actor: the call failed as a lost replica and the service waited for a restart.
    config = quiet_config({"bombs": {"class": "ray_services:Bombs", "kind": "ray"}})
    config["service_call"] = {"max_retries": 0}
    with ServiceEnvironment("ray-bombs", config) as env, ServiceManager(env) as manager:
        replica = manager.call_service_sync("bombs", "pid", timeout=30)
        for attempt in ("sync", "async"):
            with pytest.raises(
                TypeError, match=r"bombs\.bomb.*cannot be sent back to the caller.*not picklable.*SystemExit"
            ):
                if attempt == "sync":
                    manager.call_service_sync("bombs", "bomb", timeout=30)
                else:
                    manager.call_service_async("bombs", "bomb", timeout=30).result(35)
            with pytest.raises(TypeError, match=r"could not decode the arguments.*SystemExit"):
                manager.call_service_sync("bombs", "echo", (LoadBomb(),), timeout=30)
            assert manager.call_service_sync("bombs", "pid", timeout=30) == replica, "the replica's process changed"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sharing-an-object", "alone", "beside-a-ray-only-item"])
def test_a_stream_item_whose_pickling_raises_system_exit_ends_the_stream_after_the_items_before_it(
    ray_cluster: Any, how: str
) -> None:
    """Items made quickly travel several per Ray object; one made after a pause travels alone. Before, an item
    whose pickling raised SystemExit made its whole object fail, so the items made before it in that object
    never reached the caller (``[]`` instead of ``[1, 2]``); alone, Ray's serializer ran its code and the
    SystemExit ended the replica's worker (the stream broke "may have run", the replica restarted), as it
    still did beside an item only Ray's serializer carries (the object's items then went to it as they were)."""
    config = quiet_config({"bombs": {"class": "ray_services:Bombs", "kind": "ray"}})
    config["service_call"] = {"max_retries": 0}
    with ServiceEnvironment("ray-stream-bombs", config) as env, ServiceManager(env) as manager:
        replica = manager.call_service_sync("bombs", "pid", timeout=30)
        received: list[Any] = []
        with pytest.raises(TypeError, match=r"bombs\.bomb_items.*cannot be sent.*SystemExit"):
            for item in manager.stream("bombs", "bomb_items", (how,), timeout=30):
                received.append(item)
        assert [getattr(item, "tolist", lambda item=item: item)() for item in received] == (
            [1, [0, 1, 2]] if how == "beside-a-ray-only-item" else [1, 2]
        )
        assert manager.call_service_sync("bombs", "pid", timeout=30) == replica, "the replica's process changed"


@pytest.mark.timeout(90)
def test_an_argument_the_replica_cannot_unpickle_fails_at_once_unretried_says_nothing_ran_and_the_service_keeps_serving(
    ray_cluster: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kservice.middleware import metrics

    # A module only this process can import (its directory is on this sys.path, not the workers'):
    # the caller pickles its class by reference, the replica cannot find it.
    (tmp_path / "caller_only_points.py").write_text("class Point:\n    def __init__(self, x):\n        self.x = x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from caller_only_points import Point  # type: ignore[import-not-found]

    # Declared idempotent, with retries: the default policy would send it again if the answer allowed it.
    config = quiet_config(
        {
            "undecodable": {"class": "ray_services:EchoService", "kind": "ray", "idempotent": ["echo"]},
            "undecodable-stream": {"class": "aio_ray_services:StreamReplica", "kind": "ray"},
        }
    )
    config["service_call"] = {"max_retries": 3, "retry_interval": 0.01}
    with ServiceEnvironment("ray-undecodable", config) as env, ServiceManager(env) as manager:
        for attempt in ("sync", "async"):
            began = time.monotonic()
            with pytest.raises(ServiceCallError) as caught:
                if attempt == "sync":
                    manager.call_service_sync("undecodable", "echo", (Point(1),), timeout=30)
                else:
                    manager.call_service_async("undecodable", "echo", (Point(1),), timeout=30).result(35)
            assert time.monotonic() - began < 15, attempt
            error = caught.value
            assert isinstance(error, TypeError), type(error).__mro__  # as over mmap: what the caller sent is wrong
            message = str(error)
            assert "undecodable.echo" in message and "could not decode the arguments" in message, message
            assert "caller_only_points" in message and "did not run" in message, message
            assert manager.call_service_sync("undecodable", "echo", (attempt,)) == attempt
        with pytest.raises(TypeError) as stream_caught:
            list(manager.stream("undecodable-stream", "count", (Point(3),), timeout=30))
        message = str(stream_caught.value)
        assert "undecodable-stream.count" in message and "did not run" in message, message
        assert list(manager.stream("undecodable-stream", "count", (2,))) == [0, 1]
        # Each refused call was attempted once (client metrics count attempts), the good ones too.
        attempts = metrics.snapshot()["client"]["undecodable"]["methods"]["echo"]
        assert attempts["calls"] == 4 and attempts["errors_by_type"] == {"TypeError": 2}, attempts


@pytest.mark.timeout(60)
def test_a_replicas_exception_keeps_its_arguments_and_attributes(manager: ServiceManager) -> None:
    from ray_services import CodedError

    with pytest.raises(CodedError) as coded:
        manager.call_service_sync("echo", "coded", (404, "missing"))
    assert (coded.value.code, coded.value.args) == (404, (404, "missing"))
    (failed,) = list(manager.map("echo", "coded", [(500, "in a map")], return_exceptions=True))
    assert isinstance(failed, CodedError) and (failed.code, failed.args) == (500, (500, "in a map"))
    with pytest.raises(ValueError) as plain:
        manager.call_service_async("echo", "fail", ("plain",)).result(20)
    assert plain.value.args == ("plain",) and str(plain.value) == "plain"


@pytest.mark.timeout(60)
def test_server_middleware_runs_inside_the_replica(manager: ServiceManager) -> None:
    assert manager.call_service_sync("echo", "echo", ("quiet",)) == "quiet"
    assert manager.call_service_sync("echo", "echo", ("loud",), metadata={"shout": True}) == "LOUD"


@pytest.mark.timeout(60)
def test_status_sums_the_replicas_and_names_them(env: ServiceEnvironment, manager: ServiceManager) -> None:
    before = env.get_task("echo").get_service_status()
    for i in range(5):
        manager.call_service_sync("echo", "echo", (i,))
    status = env.get_task("echo").get_service_status()
    assert status.state == "running" and status.healthy
    assert status.requests_total == before.requests_total + 5
    (replica,) = status.extra["replicas"]
    assert replica["healthy"] and replica["actor"].startswith("kservice:echo:")
    assert replica["requests_total"] == status.requests_total
    assert status.extra["ray"]["namespace"] == "kservice"
    assert status.max_workers == 4


@pytest.mark.timeout(60)
def test_timeout_shorter_than_the_method_cancels_the_queued_remote_task(
    env: ServiceEnvironment, manager: ServiceManager
) -> None:
    task = env.get_task("slow")
    before = task.get_service_status()
    # The replica runs one call at a time: the second call waits in Ray's queue behind the first.
    first = manager.call_service_async("slow", "sleep", (1.5,), timeout=20)
    wait_for(lambda: task.get_service_status().in_flight == 1, timeout=10, what="the first call to run in the replica")
    started = time.monotonic()
    # The message gives what was left of the 0.3 s when the call was sent (finding the service took some).
    with pytest.raises(ServiceTimeoutError, match=r"timed out after 0\.[0-3]\d\ds"):
        manager.call_service_sync("slow", "sleep", (0.0,), timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert first.result(20) == 1.5
    after = task.get_service_status()
    # Cancelled in Ray's queue: it never reached the service (not even to be refused as expired).
    assert after.requests_total == before.requests_total + 1
    assert after.expired_total == before.expired_total


@pytest.mark.timeout(60)
def test_a_sync_call_interrupted_while_it_waits_never_reaches_the_replica_and_frees_its_place(
    env: ServiceEnvironment, manager: ServiceManager
) -> None:
    # Ctrl-C (KeyboardInterrupt) while a sync call waits behind a running one: before, the call went on
    # to run after its caller had given up, or its place in the replica was never given back.
    task = env.get_task("slow")
    before = task.get_service_status()
    first = manager.call_service_async("slow", "sleep", (1.5,), timeout=20)
    wait_for(lambda: task.get_service_status().in_flight == 1, timeout=10, what="the first call to run in the replica")
    interrupter = threading.Timer(0.4, _thread.interrupt_main)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.call_service_sync("slow", "sleep", (0.0,), timeout=20)
    finally:
        interrupter.cancel()
    assert first.result(20) == 1.5
    time.sleep(0.3)  # deliberate: room for the interrupted call to reach the replica, had it not been dropped
    after = task.get_service_status()
    assert after.requests_total == before.requests_total + 1  # only the first call reached the service
    # Its place was given back: the next call runs at once.
    assert manager.call_service_sync("slow", "sleep", (0.0,), timeout=5) == 0.0


@pytest.mark.timeout(60)
def test_async_timeout_cancels_the_queued_remote_task(env: ServiceEnvironment, manager: ServiceManager) -> None:
    task = env.get_task("slow")
    before = task.get_service_status()
    first = manager.call_service_async("slow", "sleep", (1.5,), timeout=20)
    wait_for(lambda: task.get_service_status().in_flight == 1, timeout=10, what="the first call to run in the replica")
    queued = manager.call_service_async("slow", "sleep", (0.0,), timeout=0.3)
    with pytest.raises(ServiceTimeoutError):
        queued.result(20)
    assert first.result(20) == 1.5
    time.sleep(0.3)  # deliberate: room for the cancelled call to reach the replica, had the cancel not held
    after = task.get_service_status()
    # Cancelled in Ray's queue by the manager's timer: it never reached the service.
    assert after.requests_total == before.requests_total + 1
    assert after.expired_total == before.expired_total


@pytest.mark.timeout(60)
def test_async_timeout_is_a_service_timeout_error(manager: ServiceManager) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceTimeoutError):
        manager.call_service_async("echo", "sleep", (3.0,), timeout=0.3).result(20)
    assert time.monotonic() - started < 2.0
    assert manager.call_service_sync("echo", "echo", ("after",)) == "after"


@pytest.mark.timeout(60)
def test_register_service_with_a_factory_and_options(ray_cluster: Any) -> None:
    with ServiceEnvironment("ray-factory", quiet_config({})) as environment:
        task = environment.register_service(
            "prefixed", ServiceFactory("prefixed", EchoService, ("p-",)), kind="ray", replicas=2
        )
        assert isinstance(task, RayServiceTask) and task.replica_count == 2
        with environment.manager() as manager:
            assert manager.call_service_sync("prefixed", "echo", ("x",)) == "p-x"
        assert len(task.get_service_status().extra["replicas"]) == 2
        names = [r["actor"] for r in task.get_service_status().extra["replicas"]]
    for name in names:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="kservice")


@pytest.mark.timeout(120)
def test_the_status_read_by_the_caller_reports_the_replicas_load() -> None:
    config = quiet_config({"loaded": {"class": "ray_services:EchoService", "kind": "ray", "replicas": 2}})
    with ServiceEnvironment("ray-load", config) as environment, environment.manager() as manager:
        for i in range(10):
            assert manager.call_service_sync("loaded", "echo", (i,)) == i
        slow = [manager.call_service_async("loaded", "sleep", (2.0,), timeout=60) for _ in range(3)]
        task = environment.get_task("loaded")
        assert task is not None
        load = wait_for(
            lambda: (s := task.get_service_status().extra["load"])["in_flight"] == 3 and s,
            timeout=30,
            what="three calls in flight in the replicas",
        )
        # The replicas' own windows, summed: before, this process's empty window (0 calls, 0 ms) replaced them.
        assert load["calls"] >= 10 and load["calls_per_s"] > 0, load
        assert load["methods"]["echo"]["calls"] >= 10, load
        assert load["p50_ms"] is not None, load
        assert [s.result(30) for s in slow] == [2.0, 2.0, 2.0]
        assert task.get_service_status().extra["load"]["in_flight"] == 0
