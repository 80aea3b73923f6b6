"""How calls travel: plain values as pickled bytes, anything else through Ray's serializer; async completion."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from kservice import ServiceEnvironment, ServiceManager, ServiceRequest, ServiceResponse
from kservice.plugins import ray as ray_plugin
from kservice.testing import wait_for
from ray_services import quiet_config


@pytest.fixture(scope="module")
def env(ray_cluster: Any) -> Iterator[ServiceEnvironment]:
    environment = ServiceEnvironment(
        "ray-wire",
        quiet_config({"wire": {"class": "ray_services:EchoService", "kind": "ray", "ray": {"max_concurrency": 4}}}),
    )
    environment.start()
    try:
        yield environment
    finally:
        environment.stop()


def test_plain_values_are_packed_and_ray_values_are_left_to_ray(ray_cluster: Any) -> None:
    envelope = ("id-1", "echo", (b"x" * 90, "s", 1.5, None), {"k": [1, 2]}, 12.5, {"trace": "t"})
    packed = ray_plugin._pack(envelope)
    assert isinstance(packed, bytes)
    assert ray_plugin._from_wire(_request(), packed).result == envelope
    main_class = type("FromMain", (), {"__module__": "__main__"})
    refused = [
        ray.put(1),  # needs Ray's reference counting
        (main_class(),),  # cloudpickle sends __main__ classes by value
        main_class,
        lambda: 1,  # not picklable by the stdlib
        np.arange(3),  # out-of-band buffer: Ray avoids a copy
        threading.Lock(),  # not picklable at all: Ray reports it
    ]
    for value in refused:
        assert ray_plugin._pack(value) is None, value
    # The pickler is reused per thread and stays usable after a refusal.
    assert ray_plugin._pack("again") is not None


def _request() -> ServiceRequest:
    return ServiceRequest("id-1", "wire", "echo")


@pytest.mark.timeout(60)
def test_values_only_ray_can_carry_still_travel_both_ways(manager: ServiceManager) -> None:
    # An ObjectRef nested in an argument arrives as a ref the service can resolve.
    assert manager.call_service_sync("wire", "fetch", ((ray.put("stored"),),)) == "stored"
    assert manager.call_service_async("wire", "fetch", ((ray.put("async"),),)).result(20) == "async"
    # A closure comes back through cloudpickle; an actor handle through Ray's own reducer.
    assert manager.call_service_sync("wire", "adder", (5,))(1) == 6
    handle = manager.call_service_sync("wire", "handle_of_self")
    assert ray.get(handle.ready.remote()).success
    # numpy arrays go through Ray's zero-copy path, both ways.
    array = np.arange(100_000, dtype=np.int64)
    assert np.array_equal(manager.call_service_sync("wire", "echo", (array,)), array)
    # A result that is itself a tuple or a ServiceResponse is returned as is.
    assert manager.call_service_sync("wire", "echo", ((1, "two"),)) == (1, "two")
    carried = ServiceResponse(False, None, "not an error of this call", "other-id")
    assert manager.call_service_sync("wire", "echo", (carried,)) == carried


@pytest.mark.timeout(60)
def test_many_async_calls_complete_each_once_with_their_own_result(manager: ServiceManager) -> None:
    futures = [manager.call_service_async("wire", "echo", (i,)) for i in range(500)]
    assert [f.result(30) for f in futures] == list(range(500))


@pytest.mark.timeout(60)
def test_a_long_call_in_flight_does_not_hold_back_the_completion_of_quick_ones(
    env: ServiceEnvironment, manager: ServiceManager
) -> None:
    slow = [manager.call_service_async("wire", "sleep", (3.0,)) for _ in range(2)]
    task = env.get_task("wire")
    wait_for(lambda: task.get_service_status().in_flight == 2, timeout=10, what="the two long calls to run")
    started = time.monotonic()
    assert manager.call_service_async("wire", "echo", ("quick",)).result(20) == "quick"
    assert time.monotonic() - started < 1.0
    assert [f.result(20) for f in slow] == [3.0, 3.0]


def _object_refs_in(value: Any, depth: int = 0) -> int:
    if isinstance(value, ray.ObjectRef):
        return 1
    if depth > 3:
        return 0
    if isinstance(value, dict):
        return sum(_object_refs_in(k, depth + 1) + _object_refs_in(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return sum(_object_refs_in(v, depth + 1) for v in value)
    return 0


@pytest.mark.timeout(60)
def test_the_completer_holds_no_object_ref_while_it_waits(env: ServiceEnvironment) -> None:
    """An ObjectRef freed after ``ray.shutdown()`` makes Ray end the process: an idle completer keeps none."""
    with ServiceManager(env) as manager:
        futures = [manager.call_service_async("wire", "echo", (i,)) for i in range(200)]
        assert [f.result(30) for f in futures] == list(range(200))
        assert list(manager.map("wire", "echo", range(500))) == list(range(500))

        def completer_frames() -> list[Any] | None:
            thread = next((t for t in threading.enumerate() if t.name == "kservice-ray-completer"), None)
            frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident else None
            frames = []
            while frame is not None:
                frames.append(frame)
                frame = frame.f_back
            waiting = any(f.f_code.co_name == "wait" for f in frames)
            return frames if waiting and any(f.f_code.co_name == "_run" for f in frames) else None

        frames = wait_for(completer_frames, timeout=10, what="the completer to wait for work")
        held = sum(_object_refs_in(list(f.f_locals.values())) for f in frames)
        assert held == 0, f"the waiting completer thread holds {held} ObjectRef(s)"
