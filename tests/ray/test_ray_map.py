"""ServiceManager.map on Ray: a map's calls leave as handle_batch actor calls, each answered on its own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import ServiceCallError, ServiceEnvironment, ServiceManager
from kservice.plugins.ray import RayConnection
from ray_services import quiet_config

SERVICE = {"class": "ray_services:EchoService", "kind": "ray", "ray": {"max_concurrency": 2}}


@pytest.fixture(scope="module")
def env(ray_cluster: Any) -> Iterator[ServiceEnvironment]:
    environment = ServiceEnvironment("ray-map", quiet_config({"echo": SERVICE}))
    with environment:  # started, and stopped after the module's tests
        yield environment


@pytest.mark.timeout(120)
def test_a_map_travels_in_batches_and_every_call_gets_its_own_outcome(manager: ServiceManager) -> None:
    connection = manager.get_service_queue("echo")
    assert isinstance(connection, RayConnection)
    replicas = connection.replicas
    sent_before, carried_before = replicas.batches_sent, replicas.batched_calls
    assert list(manager.map("echo", "echo", range(2000))) == list(range(2000))
    batches, carried = replicas.batches_sent - sent_before, replicas.batched_calls - carried_before
    # Before the method's cost is known nothing else batches; a map does from its first chunk. How many of
    # its calls share an actor call depends on how many wait when a slot frees (1488 of 2000 on a busy
    # machine, nearly all on an idle one); without batching none would.
    assert carried >= 1000 and batches <= carried // 16, (batches, carried)

    results = list(manager.map("echo", "fail", ["a", "b"], return_exceptions=True))
    assert all(isinstance(r, ServiceCallError) for r in results), results
    assert ["a" in str(results[0]), "b" in str(results[1])] == [True, True]
    mixed = list(manager.map("echo", "echo", [1, threading.Lock(), 3], return_exceptions=True))
    assert mixed[0] == 1 and mixed[2] == 3
    assert isinstance(mixed[1], TypeError) and "item 1 of map over echo.echo" in " ".join(mixed[1].__notes__), mixed
    assert manager.call_service_sync("echo", "echo", ("still serving",)) == "still serving"
