"""Batching: pipelined async calls of a fast method to a busy replica leave together, each answered on its own."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from kservice import ServiceCallError, ServiceEnvironment, ServiceManager, ServiceTimeoutError, ServiceUnavailableError
from kservice.plugins.ray import RayConnection
from kservice.testing import wait_for
from ray_services import quiet_config, without_breaker

# One request slot: a call in flight makes the replica busy, so the next async calls of a fast method batch.
SERVICE = {"class": "ray_services:EchoService", "kind": "ray", "ray": {"max_concurrency": 1}, "idempotent": ["timeout"]}


@pytest.fixture(scope="module")
def env(ray_cluster: Any) -> Iterator[ServiceEnvironment]:
    unbatched = {**SERVICE, "ray": {"max_concurrency": 1, "batch_max": 0}}
    environment = ServiceEnvironment("ray-batching", quiet_config({"batched": SERVICE, "unbatched": unbatched}))
    environment.start()
    try:
        yield environment
    finally:
        environment.stop()


def _connection(manager: ServiceManager, name: str = "batched") -> RayConnection:
    connection = manager.get_service_queue(name)
    assert isinstance(connection, RayConnection)
    return connection


def _known_fast(manager: ServiceManager, name: str, method: str, *args: Any) -> None:
    """Call ``method`` until the replica's reported run times make it batchable (a cold first run may not)."""
    costs = _connection(manager, name).replicas
    for _ in range(50):
        manager.call_service_sync(name, method, args)
        if costs.method_cost.get(method, 1.0) < costs.batch_cost_limit:
            return
    raise AssertionError(f"{method} never ran under {costs.batch_cost_limit}s: {costs.method_cost}")


def _settled(connection: RayConnection) -> int:
    """Calls the connection still counts in flight, once the completer caught up (0 when nothing leaked)."""
    wait_for(
        lambda: sum(replica.in_flight for replica in connection.replicas.snapshot()) == 0,
        timeout=10,
        what="the connection to count no call in flight",
    )
    return 0


@pytest.mark.timeout(60)
def test_pipelined_calls_of_a_fast_method_leave_in_batches_and_each_gets_its_own_answer(
    manager: ServiceManager,
) -> None:
    connection = _connection(manager)
    _known_fast(manager, "batched", "echo", -1)
    sent_before, calls_before = connection.replicas.batches_sent, connection.replicas.batched_calls
    busy = manager.call_service_async("batched", "sleep", (0.5,))
    futures = [manager.call_service_async("batched", "echo", (i,)) for i in range(400)]
    assert [f.result(30) for f in futures] == list(range(400))  # no call lost, none answered with another's result
    assert busy.result(30) == 0.5
    batches, carried = connection.replicas.batches_sent - sent_before, connection.replicas.batched_calls - calls_before
    assert carried >= 300 and batches <= carried // 4, (batches, carried)
    assert carried <= batches * connection.replicas.batch_max
    assert _settled(connection) == 0
    batching = manager.get_service_status("batched").extra["batching"]  # type: ignore[union-attr]
    assert batching["batched_calls"] >= carried and batching["batch_max"] == 64


@pytest.mark.timeout(60)
def test_batch_max_zero_turns_batching_off(manager: ServiceManager) -> None:
    connection = _connection(manager, "unbatched")
    _known_fast(manager, "unbatched", "echo", -1)
    busy = manager.call_service_async("unbatched", "sleep", (0.2,))
    futures = [manager.call_service_async("unbatched", "echo", (i,)) for i in range(100)]
    assert [f.result(30) for f in futures] == list(range(100))
    busy.result(30)
    assert connection.replicas.batched_calls == 0


@pytest.mark.timeout(60)
def test_slow_idempotent_and_unobserved_methods_always_travel_alone(manager: ServiceManager) -> None:
    connection = _connection(manager)
    _known_fast(manager, "batched", "timeout", "x")  # but declared idempotent: Ray retries it per call
    manager.call_service_sync("batched", "sleep", (0.01,))  # observed slower than the batching limit
    before = connection.replicas.batched_calls
    busy = manager.call_service_async("batched", "sleep", (0.3,))
    calls = [manager.call_service_async("batched", "timeout", (f"m{i}",)) for i in range(20)]
    calls += [manager.call_service_async("batched", "sleep", (0.01,)) for _ in range(5)]
    calls += [manager.call_service_async("batched", "where") for _ in range(5)]  # never observed yet
    for future in [busy, *calls]:
        future.result(30)
    assert connection.replicas.batched_calls == before
    assert _settled(connection) == 0


@pytest.mark.timeout(60)
def test_a_result_ray_cannot_return_fails_only_its_own_call_in_a_batch(manager: ServiceManager) -> None:
    connection = _connection(manager)
    _known_fast(manager, "batched", "shaped", 0)
    before = connection.replicas.batched_calls
    busy = manager.call_service_async("batched", "sleep", (0.3,))
    kinds = {10: "lock", 20: "closure"}
    futures = [manager.call_service_async("batched", "shaped", (i, kinds.get(i, "plain"))) for i in range(40)]
    busy.result(30)
    with pytest.raises(ServiceCallError, match="could not be returned through Ray"):
        futures[10].result(30)
    assert futures[20].result(30)(1) == 21  # a closure: Ray stored it on its own
    assert [f.result(30) for i, f in enumerate(futures) if i not in kinds] == [i for i in range(40) if i not in kinds]
    assert connection.replicas.batched_calls - before >= 30
    assert manager.call_service_sync("batched", "echo", ("still serving",)) == "still serving"


@pytest.mark.timeout(60)
def test_a_batched_call_past_its_deadline_times_out_and_is_not_left_counted(manager: ServiceManager) -> None:
    connection = _connection(manager)
    _known_fast(manager, "batched", "echo", 0)
    before = connection.replicas.batched_calls
    busy = manager.call_service_async("batched", "sleep", (1.0,))
    started = time.monotonic()
    late = manager.call_service_async("batched", "echo", ("late",), timeout=0.3)
    with pytest.raises(ServiceTimeoutError):
        late.result(10)
    assert time.monotonic() - started < 0.9  # at its deadline, not when the replica got to it
    assert busy.result(30) == 1.0
    assert connection.replicas.batched_calls - before <= 1
    assert _settled(connection) == 0


@pytest.mark.timeout(90)
def test_killing_the_replica_fails_its_batch_in_flight_and_refuses_the_waiting_calls_unrun(
    ray_cluster: Any, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.txt"
    # Calls of 20 ms count as fast here, so a batch takes long enough to be killed in the middle.
    doomed = {
        "class": "ray_services:LedgerService",
        "args": [str(path)],
        "kind": "ray",
        "ray": {"max_concurrency": 1, "max_restarts": 0, "batch_cost_limit": 1.0, "batch_max": 20},
        **without_breaker(),
    }
    config = quiet_config({"doomed": doomed})
    config["service_call"] = {"max_retries": 0}
    with ServiceEnvironment("ray-batch-kill", config) as environment, ServiceManager(environment) as manager:
        connection = _connection(manager, "doomed")
        _known_fast(manager, "doomed", "record", "warm", 0.02)
        busy = manager.call_service_async("doomed", "record", ("busy", 0.3))
        futures = {f"b{i}": manager.call_service_async("doomed", "record", (f"b{i}", 0.02)) for i in range(100)}
        wait_for(
            lambda: sum(token.startswith("b") for token in _runs(path)) >= 25,
            timeout=10,
            what="25 calls of the batches to run",
        )
        assert connection.replicas.batched_calls >= 20
        ray.kill(connection.replicas.snapshot()[0].handle, no_restart=True)
        started = time.monotonic()
        may_have_run, never_sent, ok = [], [], []
        for token, future in futures.items():
            try:
                assert future.result(20) == token
                ok.append(token)
            except ServiceUnavailableError as error:
                (may_have_run if "may or may not have run" in str(error) else never_sent).append(token)
        assert busy.result(20) == "busy"
        assert time.monotonic() - started < 15
        runs = _runs(path)
        # One batch was in the replica (max_concurrency 1): only its calls may have run; the waiting ones never left.
        assert len(may_have_run) <= 20, may_have_run
        assert never_sent and all(runs[token] == 0 for token in never_sent)
        assert all(runs[token] == 1 for token in ok) and all(runs[token] <= 1 for token in may_have_run)
        assert len(ok) + len(may_have_run) + len(never_sent) == 100
        assert _settled(connection) == 0


def _runs(path: Path) -> collections.Counter[str]:
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


@pytest.mark.timeout(60)
def test_replicas_of_an_older_wire_version_are_never_batched(manager: ServiceManager) -> None:
    connection = _connection(manager, "unbatched")
    replicas = connection.replicas
    batch_max, wire, costs = replicas.batch_max, replicas.wire, dict(replicas.method_cost)
    replicas.batch_max, replicas.wire = 64, 1  # as if the deployment predated the run-time trailer
    replicas.method_cost.clear()
    try:
        manager.call_service_sync("unbatched", "echo", (0,))
        assert replicas.method_cost == {}  # the last bytes of an answer are not read as a run time
        busy = manager.call_service_async("unbatched", "sleep", (0.2,))
        assert [
            f.result(30) for f in [manager.call_service_async("unbatched", "echo", (i,)) for i in range(50)]
        ] == list(range(50))
        busy.result(30)
        assert connection.replicas.batched_calls == 0
    finally:
        replicas.batch_max, replicas.wire = batch_max, wire
        replicas.method_cost.update(costs)
