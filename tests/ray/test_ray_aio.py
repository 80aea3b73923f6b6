"""``async def`` methods and streams of services hosted in Ray replicas."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import (
    ServiceCallError,
    ServiceEnvironment,
    ServiceManager,
    ServiceTimeoutError,
    ServiceUnavailableError,
)
from kservice.testing import wait_for
from ray_services import quiet_config


@pytest.fixture(scope="module")
def env(ray_cluster: Any) -> Iterator[ServiceEnvironment]:
    config = quiet_config(
        {
            "areplica": {"class": "aio_ray_services:AsyncReplica", "kind": "ray", "ray": {"max_concurrency": 8}},
            "sreplica": {"class": "aio_ray_services:StreamReplica", "kind": "ray", "ray": {"max_concurrency": 4}},
            "dier": {"class": "aio_ray_services:StreamReplica", "kind": "ray"},
        }
    )
    config["service_call"] = {"max_retries": 0}
    environment = ServiceEnvironment("ray-aio", config)
    with environment:  # started, and stopped after the module's tests
        yield environment


@pytest.mark.timeout(120)
def test_coroutine_methods_are_awaited_in_an_async_replica(manager: ServiceManager) -> None:
    assert manager.call_service_sync("areplica", "hello", (21,)) == "hello 42"
    assert manager.call_service_sync("areplica", "plain", (1,)) == 2
    where = manager.call_service_sync("areplica", "where", timeout=10)
    assert where["setup_done"] and 0 < where["remaining"] <= 10
    assert where["thread"] == "kservice-areplica-loop"
    # 16 naps of 0.3 s on a replica running 8 at once: about two rounds, no Ray thread held per call.
    began = time.monotonic()
    futures = [manager.call_service_async("areplica", "nap", (0.3, str(i))) for i in range(16)]
    assert sorted(f.result(30) for f in futures) == sorted(str(i) for i in range(16))
    assert time.monotonic() - began < 4.0
    with pytest.raises(ValueError, match="nope"):
        manager.call_service_sync("areplica", "fail", ("nope",))


@pytest.mark.timeout(120)
def test_a_coroutine_raising_system_exit_in_a_replica_is_its_error_and_the_replica_serves_on(
    manager: ServiceManager,
) -> None:
    # Before: SystemExit ended the hosted task's event loop; this call and every later coroutine call
    # of the replica waited out its timeout.
    began = time.monotonic()
    with pytest.raises(ServiceCallError) as raised:
        manager.call_service_sync("areplica", "exit", (3,), timeout=10)
    assert raised.value.remote_type == "SystemExit"
    assert time.monotonic() - began < 5.0
    assert manager.call_service_sync("areplica", "hello", (2,), timeout=10) == "hello 4"


@pytest.mark.timeout(120)
def test_the_deadline_cancels_a_coroutine_in_a_replica(manager: ServiceManager) -> None:
    with pytest.raises(ServiceTimeoutError):
        manager.call_service_sync("areplica", "nap", (10.0, "late-ray"), timeout=0.5)
    wait_for(
        lambda: "late-ray" in manager.call_service_sync("areplica", "report"),
        timeout=10,
        what="the coroutine to be cancelled at its deadline",
        interval=0.1,
    )
    assert manager.call_service_sync("areplica", "hello", (1,)) == "hello 2"


@pytest.mark.timeout(120)
def test_generators_stream_from_replicas_in_order(manager: ServiceManager) -> None:
    assert list(manager.stream("sreplica", "count", (2000,))) == list(range(2000))
    assert list(manager.stream("areplica", "acount", (300,))) == list(range(300))
    assert [len(b) for b in manager.stream("sreplica", "items", (5, 200_000))] == [200_000] * 5
    got: list[int] = []
    with pytest.raises(ValueError, match="broke after 3"):
        for item in manager.stream("sreplica", "broken", (3,)):
            got.append(item)
    assert got == [0, 1, 2]
    with pytest.raises(TypeError, match="stream"):
        manager.call_service_sync("sreplica", "count", (3,))
    got_any: list[Any] = []
    with pytest.raises(TypeError, match=r"cannot be sent.*serialize"):
        for item in manager.stream("sreplica", "unpicklable"):
            got_any.append(item)
    assert got_any == [1]
    assert list(manager.stream("sreplica", "count", (3,))) == [0, 1, 2]  # the replica keeps serving


@pytest.mark.timeout(120)
def test_closing_a_ray_stream_stops_the_generator_in_the_replica(manager: ServiceManager) -> None:
    with manager.stream("sreplica", "slow", (100_000, 0.001, "ray-close"), window=4) as stream:
        assert [next(stream) for _ in range(5)] == list(range(5))
    wait_for(
        lambda: "ray-close" in manager.call_service_sync("sreplica", "report"),
        timeout=10,
        what="the replica's generator to close",
        interval=0.1,
    )
    with manager.stream("areplica", "acount", (100_000, 0.001, "ray-async-close"), window=4) as stream:
        assert [next(stream) for _ in range(3)] == [0, 1, 2]
    wait_for(
        lambda: "ray-async-close" in manager.call_service_sync("areplica", "report"),
        timeout=10,
        what="the async replica's generator to close",
        interval=0.1,
    )
    got: list[int] = []
    with pytest.raises(ServiceTimeoutError):
        for item in manager.stream("sreplica", "slow", (100_000, 0.05, "ray-deadline"), timeout=1.0):
            got.append(item)
    assert got and got == list(range(len(got)))
    wait_for(
        lambda: "ray-deadline" in manager.call_service_sync("sreplica", "report"),
        timeout=10,
        what="the deadline to stop the replica's generator",
        interval=0.1,
    )


@pytest.mark.timeout(120)
def test_a_replica_dying_mid_stream_ends_it_unavailable(manager: ServiceManager) -> None:
    got: list[int] = []
    began = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="broke"):
        for item in manager.stream("dier", "die_after", (5,), timeout=60):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert time.monotonic() - began < 30


@pytest.mark.timeout(180)
def test_the_guides_ray_example_runs(ray_cluster: Any, tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import clean_environ
    from tests.docs.test_guides import python_blocks

    block = python_blocks("async-and-streaming.md")[3]
    prelude = f"import ray\nray.init(address={ray_cluster.address!r}, log_to_driver=False)\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        env=clean_environ(),
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_a_thousand_abandoned_ray_streams_leave_nothing_running(manager: ServiceManager) -> None:
    import gc

    before = len(manager.call_service_sync("sreplica", "report"))
    for i in range(1000):
        stream = manager.stream("sreplica", "count", (10**9, f"r{i}"), window=2)
        next(stream)
        if i % 2:
            stream.close()
        del stream
    gc.collect()
    wait_for(
        lambda: len(manager.call_service_sync("sreplica", "report")) >= before + 1000,
        timeout=60,
        what="the replica to close the 1,000 abandoned streams",
        interval=0.2,
    )
    # Every stream ended in the replica too (a stream counts as in flight from its start to its end).
    wait_for(
        lambda: not manager.get_service_status("sreplica").in_flight,  # type: ignore[union-attr]
        timeout=60,
        what="no abandoned stream in flight in the replica",
        interval=0.2,
    )
    assert list(manager.stream("sreplica", "count", (3,))) == [0, 1, 2]


@pytest.mark.timeout(120)
def test_a_quick_generator_streams_several_items_per_ray_object_in_order_within_its_window(
    manager: ServiceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kservice.plugins.ray.connection import _RayStreamSource
    from kservice.plugins.ray.wire import stream_shape

    per_object: list[int] = []  # items carried by each Ray object the caller took
    receive = _RayStreamSource.receive

    def counted(self: _RayStreamSource, timeout: float | None) -> Any:
        items, end = receive(self, timeout)
        if items:
            per_object.append(len(items))
        return items, end

    monkeypatch.setattr(_RayStreamSource, "receive", counted)
    assert list(manager.stream("sreplica", "count", (5000, "batched"), window=64)) == list(range(5000))
    assert len(per_object) < 5000 // 2 and max(per_object) <= stream_shape(64)[0]
    # A slow consumer still holds the replica to the window, counted in items.
    window = 16
    with manager.stream("sreplica", "count", (10**6, "held"), window=window) as stream:
        taken = [next(stream) for _ in range(3)]
        wait_for(lambda: manager.call_service_sync("sreplica", "produced_by", ("held",)) >= 3, timeout=10)
        time.sleep(0.5)  # deliberate: room for the replica to run ahead, were it not held
        produced = manager.call_service_sync("sreplica", "produced_by", ("held",))
        assert taken == [0, 1, 2]
        assert produced <= len(taken) + window + 1, produced
    wait_for(lambda: "held" in manager.call_service_sync("sreplica", "report"), timeout=10)


@pytest.mark.timeout(120)
def test_a_replica_dead_for_good_leaves_the_rotation_of_streams_at_its_first_failure(ray_cluster: Any) -> None:
    import ray

    config = quiet_config({"streamers": {"class": "aio_ray_services:StreamReplica", "kind": "ray", "replicas": 2}})
    config["service_call"] = {"max_retries": 0}
    with ServiceEnvironment("ray-stream-dead", config) as environment, ServiceManager(environment) as manager:
        task = environment.get_task("streamers")
        assert list(manager.stream("streamers", "count", (3,))) == [0, 1, 2]
        victim = task.replica_set.snapshot()[0]  # type: ignore[attr-defined]
        ray.kill(victim.handle, no_restart=True)
        failed: list[ServiceUnavailableError] = []
        for _ in range(12):
            # Only streams: no plain call tells the caller the replica died.
            try:
                assert list(manager.stream("streamers", "count", (3,), timeout=30)) == [0, 1, 2]
            except ServiceUnavailableError as exc:
                failed.append(exc)
        # Before: the dead replica stayed in rotation and about half of every later stream failed.
        assert len(failed) <= 1, failed
        for exc in failed:
            assert victim.name in str(exc) and exc.may_have_run is True
        assert victim not in task.replica_set.live  # type: ignore[attr-defined]
        assert manager.call_service_sync("streamers", "produced_by", ("",)) >= 0
