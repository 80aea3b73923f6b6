"""A Ray node lost while calls run on it: what callers see, at most once, re-routing, recovery and clean-up.

Each test adds a third node (resource ``node_c``) to the session's cluster,
places one replica of a two-replica service there and the other on
``node_b``, keeps sync and async calls (and a map and streams) running, and
kills the node without a graceful shutdown, as a machine that vanishes. The
service's ledger (:class:`ray_services.LedgerService`) counts how often each
call really ran.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from kservice import ServiceEnvironment, ServiceManager, ServiceTimeoutError, ServiceUnavailableError
from kservice.plugins.ray import RayServiceTask
from kservice.testing import wait_for
from ray.cluster_utils import Cluster
from ray_services import without_breaker

#: calls one replica runs at once
CONCURRENCY = 4
#: a call's end may follow its deadline by this much on a loaded machine (the timer, thread wake-ups)
SLACK = 2.0


@dataclass
class Outcome:
    kind: str
    token: str
    started: float
    ended: float
    timeout: float
    error: BaseException | None


class Load:
    """Sync calls in threads, async calls from a feeder, and (optionally) streams, until stopped."""

    def __init__(self, manager: ServiceManager, method: str, timeout: float, *, streams: bool) -> None:
        self.manager = manager
        self.method = method
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tokens = iter(range(10**9))
        self._pending: list[Any] = []
        loops: list[Callable[[], None]] = [self._sync, self._sync, self._async]
        if streams:
            loops.append(self._stream)
        self._threads = [threading.Thread(target=loop, name=f"node-loss-load-{i}") for i, loop in enumerate(loops)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for future in self._pending:
            # Every async call is answered, by its deadline at the latest.
            future.exception(timeout=self.timeout + SLACK)

    def _note(self, kind: str, token: str, started: float, error: BaseException | None) -> None:
        with self._lock:
            self.outcomes.append(Outcome(kind, token, started, time.monotonic(), self.timeout, error))

    def _token(self, kind: str) -> str:
        return f"{kind}{next(self._tokens)}"

    def _sync(self) -> None:
        while not self._stop.is_set():
            token, started = self._token("s"), time.monotonic()
            try:
                assert self.manager.call_service_sync("lost", self.method, (token, 0.1), timeout=self.timeout) == token
                self._note("sync", token, started, None)
            except Exception as exc:  # noqa: BLE001 - every outcome is recorded and judged by the test
                self._note("sync", token, started, exc)

    def _async(self) -> None:
        while not self._stop.is_set():
            token, started = self._token("a"), time.monotonic()
            future = self.manager.call_service_async("lost", self.method, (token, 0.1), timeout=self.timeout)
            future.add_done_callback(
                lambda f, token=token, started=started: self._note("async", token, started, f.exception())
            )
            self._pending.append(future)
            self._stop.wait(0.2)

    def _stream(self) -> None:
        while not self._stop.is_set():
            token, started = self._token("t"), time.monotonic()
            try:
                items = list(self.manager.stream("lost", "record_stream", (token, 10, 0.05), timeout=self.timeout))
                assert items == list(range(10))
                self._note("stream", token, started, None)
            except Exception as exc:  # noqa: BLE001 - judged by the test
                self._note("stream", token, started, exc)


@pytest.fixture
def node_c(ray_cluster: Cluster) -> Iterator[Any]:
    """A third node with resource ``node_c``, removed at the end whatever the test did with it."""
    node = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2, resources={"node_c": 10})
    ray_cluster.wait_for_nodes()
    try:
        yield node
    finally:
        if node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node, allow_graceful=False)
        # Until Ray's health checks declare the killed node dead (about 16 s after its removal), the session's
        # scheduler may still place actors there: a later test's replica restart would land on it and die.
        wait_for(
            lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node.node_id),
            timeout=60,
            what="Ray to declare the removed node dead",
            interval=0.2,
        )
        alive = {resource for n in ray.nodes() if n["Alive"] for resource in n["Resources"]}
        assert {"node_a", "node_b"} <= alive, "the session's own nodes must survive"


def start_across_nodes(
    path: Path, *, max_restarts: int, health: dict[str, Any] | None = None
) -> tuple[ServiceEnvironment, RayServiceTask]:
    """A started two-replica ledger service: replica 0 on node_b, replica 1 on node_c.

    Replicas of one service share their Ray options, so replica 1 is pinned to
    node_c by changing the options between the first and the second; they are
    set back to node_b, so replacements land on a node that lives.
    """
    config = {
        "services": {
            "lost": {
                "class": "ray_services:LedgerService",
                "args": [str(path)],
                "kind": "ray",
                "replicas": 1,
                "ray": {"max_concurrency": CONCURRENCY, "max_restarts": max_restarts, "resources": {"node_b": 1}},
                **without_breaker(),
            }
        },
        # Recovery is run by the test, when it asks, unless ``health`` says otherwise.
        "health": health or {"enabled": False},
        "service_call": {"max_retries": 0},  # what the transport itself does, no retry policy on top
    }
    env = ServiceEnvironment("ray-node-loss", config)
    env.start()
    task = env.get_task("lost")
    assert isinstance(task, RayServiceTask) and task.replica_set is not None
    task.ray_options["resources"] = {"node_c": 1}
    task.scale(2)
    task.ray_options["resources"] = {"node_b": 1}
    return env, task


def node_of(name: str) -> str:
    for node in ray.nodes():
        if node["Alive"] and name in node["Resources"]:
            return str(node["NodeID"])
    raise AssertionError(f"no live node with resource {name}")


def ledger(path: Path) -> collections.Counter[str]:
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


def out_of_rotation_at(task: RayServiceTask, index: int, removed_at: float, within: float) -> float:
    """When (monotonic) replica ``index`` left this process's rotation, waiting up to ``within`` s after the loss."""
    replica = next(r for r in task.replica_set.snapshot() if r.index == index)  # type: ignore[union-attr]

    def gone() -> float | None:
        return time.monotonic() if not replica.up or replica.dead or replica.leaving else None

    return wait_for(
        gone,
        timeout=max(0.1, removed_at + within - time.monotonic()),
        what=f"{replica.name} to leave the rotation",
        interval=0.05,
    )


def assert_ended_by_deadline(outcomes: list[Outcome]) -> None:
    late = [o for o in outcomes if o.ended - o.started > o.timeout + SLACK]
    assert not late, [(o.kind, o.token, round(o.ended - o.started, 2), repr(o.error)) for o in late[:5]]


def assert_recovers_and_cleans_up(
    env: ServiceEnvironment, task: RayServiceTask, manager: ServiceManager, lost_node: str, *, by_health: bool = False
) -> None:
    """Recovery replaces the lost replica on a live node; scale and stop work; nothing is left in the cluster.

    ``by_health``: the health plugin recovers the service on its own (else the test calls ``recover``).
    """
    if by_health:

        def replaced() -> list[Any]:
            members = task.replica_set.snapshot()  # type: ignore[union-attr]
            return members if [r.index for r in members] == [0, 2] and all(r.up for r in members) else []

        wait_for(replaced, timeout=30, what="health recovery to replace the lost replica", interval=0.1)
    else:
        assert "replaced replica(s)" in task.recover("node lost")
    members = task.replica_set.snapshot()  # type: ignore[union-attr]
    assert len(members) == 2 and all(r.up and not r.dead for r in members)
    assert all(r.info["node_id"] != lost_node for r in members)
    for i in range(6):
        assert manager.call_service_sync("lost", "record", (f"after{i}",), timeout=10) == f"after{i}"
    task.scale(1)
    task.scale(2)
    assert manager.call_service_sync("lost", "record", ("scaled",), timeout=10) == "scaled"
    names = [r.name for r in task.replica_set.snapshot()]  # type: ignore[union-attr]
    started = time.monotonic()
    env.stop()
    assert time.monotonic() - started < 30
    for name in names:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="kservice")


@pytest.mark.timeout(150)
def test_a_lost_node_fails_only_the_calls_running_there_at_most_once_and_calls_move_to_the_live_replica(
    ray_cluster: Cluster, node_c: Any, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.txt"
    lost_node = node_of("node_c")
    # The health plugin recovers the service itself, soon: a round every 0.5 s, two failed rounds in a row.
    health = {"enabled": True, "period": 0.5, "failure_threshold": 2, "drain_timeout": 1.0}
    env, task = start_across_nodes(path, max_restarts=3, health=health)
    try:
        manager = env.manager()
        with manager:
            assert task.replica_set.snapshot()[1].info["node_id"] == lost_node  # type: ignore[union-attr]
            with Load(manager, "record", 6.0, streams=True) as load:
                wait_for(lambda: len(load.outcomes) >= 10, timeout=20, what="calls to run before the loss")
                removed_at = time.monotonic()
                ray_cluster.remove_node(node_c, allow_graceful=False)
                mapped = manager.map(
                    "lost", "record", [(f"m{i}", 0.0) for i in range(30)], timeout=6.0, return_exceptions=True
                )
                map_results = list(mapped)
                map_ended = time.monotonic()
                left_at = out_of_rotation_at(task, 1, removed_at, within=12.0)
                # Calls keep coming after the replica left; the live one serves them (a dozen or more).
                time.sleep(1.5)
            outcomes = load.outcomes
            assert_ended_by_deadline(outcomes)
            assert map_ended - removed_at <= 6.0 + SLACK
            failed = [o for o in outcomes if o.error is not None]
            for o in failed:
                # In flight on the lost node: "may or may not have run", never reported as not run.
                assert isinstance(o.error, ServiceUnavailableError | ServiceTimeoutError), (o.kind, repr(o.error))
                if isinstance(o.error, ServiceUnavailableError):
                    assert o.error.may_have_run is True, (o.kind, repr(o.error))
                assert o.started < left_at + 0.5, f"{o.kind} {o.token} sent after the replica left failed: {o.error!r}"
            after = [o for o in outcomes if o.started > left_at + 0.5]
            assert after and all(o.error is None for o in after)
            for result in map_results:
                if isinstance(result, BaseException):
                    assert isinstance(result, ServiceUnavailableError) and result.may_have_run is True, repr(result)
            # At most once: nothing ran twice, and every call answered with its result ran exactly once.
            runs = ledger(path)
            assert not [token for token, count in runs.items() if count > 1], runs.most_common(3)
            answered = {o.token for o in outcomes if o.error is None and o.kind != "stream"}
            assert all(runs[token] == 1 for token in answered)
            assert_recovers_and_cleans_up(env, task, manager, lost_node, by_health=True)
    finally:
        env.stop()


@pytest.mark.timeout(150)
def test_idempotent_calls_leave_a_replica_on_a_lost_node_once_one_times_out_there(
    ray_cluster: Cluster, node_c: Any, tmp_path: Path
) -> None:
    """Ray holds an idempotent call for the lost replica's restart and reports nothing, which never comes when the
    replica was pinned to the lost node: the calls held there end at their deadline, and the replica leaves the
    rotation, so later calls all go to the live replica."""
    path = tmp_path / "ledger.txt"
    lost_node = node_of("node_c")
    env, task = start_across_nodes(path, max_restarts=3)
    try:
        manager = env.manager()
        with manager:
            with Load(manager, "record_idempotent", 3.0, streams=False) as load:
                wait_for(lambda: len(load.outcomes) >= 10, timeout=20, what="calls to run before the loss")
                removed_at = time.monotonic()
                ray_cluster.remove_node(node_c, allow_graceful=False)
                # The first calls held there time out after 3 s; the replica must be out soon after.
                left_at = out_of_rotation_at(task, 1, removed_at, within=3.0 + 6.0)
                time.sleep(2.0)  # calls keep coming after it left: the live replica serves them
            outcomes = load.outcomes
            assert_ended_by_deadline(outcomes)
            for o in outcomes:
                if o.error is not None:
                    assert isinstance(o.error, ServiceUnavailableError | ServiceTimeoutError), (o.kind, repr(o.error))
                    assert o.started < left_at + 0.5, (
                        f"{o.kind} {o.token} sent after the replica left failed: {o.error!r}"
                    )
            after = [o for o in outcomes if o.started > left_at + 0.5]
            assert after and all(o.error is None for o in after)
            assert_recovers_and_cleans_up(env, task, manager, lost_node)
    finally:
        env.stop()
