"""Replicas: spreading calls, scaling at run time, and what callers see when a replica dies."""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest
import ray
from kservice import ServiceEnvironment, ServiceFactory, ServiceTimeoutError, ServiceUnavailableError
from kservice.plugins.ray import RayServiceTask
from kservice.testing import WaitTimeoutError, wait_for
from ray_services import EchoService, without_breaker


def fault_config(
    name: str, class_name: str, args: list[Any], *, replicas: int, max_restarts: int, breaker: bool = False
) -> dict[str, Any]:
    """An environment config with one ray service (caller-side options live in the environment's config)."""
    entry = {"class": f"ray_services:{class_name}", "args": args, "kind": "ray", "replicas": replicas}
    extra = {} if breaker else without_breaker()
    return {"services": {name: {**entry, "ray": {"max_restarts": max_restarts}, **extra}}}


def ledger(path: Path) -> collections.Counter[str]:
    """How many times each token really ran on the service side."""
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


def outcomes(futures: dict[str, Future[Any]]) -> tuple[set[str], set[str]]:
    """(tokens answered with their result, tokens answered with ServiceUnavailableError); anything else fails."""
    _, not_done = wait(futures.values(), timeout=30)
    assert not not_done, f"{len(not_done)} calls never answered"
    ok, unavailable = set(), set()
    for token, future in futures.items():
        error = future.exception()
        if error is None:
            assert future.result() == token
            ok.add(token)
        else:
            assert isinstance(error, ServiceUnavailableError), f"{token}: {error!r}"
            assert not isinstance(error, ServiceTimeoutError)
            unavailable.add(token)
    return ok, unavailable


@pytest.mark.timeout(90)
def test_calls_spread_over_replicas_and_scale_changes_reach_callers() -> None:
    with ServiceEnvironment("ray-scale") as env:
        task = env.register_service(
            "spread", ServiceFactory("spread", EchoService), kind="ray", replicas=2, ray={"balancer": "round_robin"}
        )
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            seen = [manager.call_service_sync("spread", "where")["actor"] for _ in range(6)]
            assert len(set(seen)) == 2 and all(a != b for a, b in itertools.pairwise(seen))
            # power of two choices (the default) also reaches both, on an async burst
            task.scale(3)
            assert task.replica_count == 3
            grown = {manager.call_service_sync("spread", "where")["actor"] for _ in range(9)}
            assert len(grown) == 3
            names = [r.name for r in task.replica_set.snapshot()]  # type: ignore[union-attr]
            task.set_replicas(1)
            for gone in names[1:]:
                with pytest.raises(ValueError):
                    ray.get_actor(gone, namespace="kservice")
            shrunk = {manager.call_service_sync("spread", "where")["actor"] for _ in range(6)}
            assert shrunk == {names[0]}
            assert len(task.get_service_status().extra["replicas"]) == 1
            with pytest.raises(ValueError, match="at least 1 replica"):
                task.scale(0)


@pytest.mark.timeout(120)
def test_scale_refuses_a_count_or_timeout_that_is_no_number_and_drains_without_limit_for_an_infinite_one() -> None:
    with ServiceEnvironment("ray-scale-timeout") as env:
        task = env.register_service("stretch", ServiceFactory("stretch", EchoService), kind="ray", replicas=3)
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            for bad in (float("nan"), "5", True):
                with pytest.raises((TypeError, ValueError), match="timeout"):
                    task.scale(1, timeout=bad)  # type: ignore[arg-type]
                # Refused before anything changed: every replica is still in rotation.
                assert task.replica_count == 3 and len(task.replica_set.snapshot()) == 3  # type: ignore[union-attr]
            for count in ("2", None, 2.5, True):
                with pytest.raises(TypeError, match="scale takes a number of replicas, an int of at least 1"):
                    task.scale(count)  # type: ignore[arg-type]
                assert task.replica_count == 3 and len(task.replica_set.snapshot()) == 3  # type: ignore[union-attr]
            assert len({manager.call_service_sync("stretch", "where")["actor"] for _ in range(9)}) >= 2
            task.scale(2, timeout=float("inf"))
            task.scale(1, timeout=1e10)
            assert task.replica_count == 1 and len(task.replica_set.snapshot()) == 1  # type: ignore[union-attr]
            assert manager.call_service_sync("stretch", "echo", ("still",)) == "still"


@pytest.mark.timeout(90)
def test_power_of_two_choices_prefers_the_idle_replica() -> None:
    with ServiceEnvironment("ray-p2c") as env:
        task = env.register_service(
            "p2c", ServiceFactory("p2c", EchoService), kind="ray", replicas=2, ray={"max_concurrency": 1}
        )
        with env.manager() as manager:
            busy = manager.call_service_async("p2c", "sleep", (1.0,))
            wait_for(lambda: task.get_service_status().in_flight == 1, timeout=10, what="the long call to run")
            # With one replica busy, every new call goes to the idle one (two replicas: both are always the choices).
            started = time.monotonic()
            for i in range(5):
                assert manager.call_service_sync("p2c", "echo", (i,)) == i
            assert time.monotonic() - started < 0.9
            assert busy.result(20) == 1.0


@pytest.mark.timeout(120)
def test_killing_one_of_two_replicas_under_load_loses_no_call_and_runs_none_twice(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    # The circuit breaker stays on: one replica dying while the other serves must not open it.
    config = fault_config("ledger", "LedgerService", [str(path)], replicas=2, max_restarts=1, breaker=True)
    with ServiceEnvironment("ray-kill", config) as env:
        task = env.get_task("ledger")
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            futures = {
                f"a{i}": manager.call_service_async("ledger", "record", (f"a{i}", 0.05), timeout=30) for i in range(60)
            }
            # The kill lands under load: once the first wave of calls is running in the replicas.
            # A bounded look, not a wait that must succeed: on a machine loaded by the rest of the suite the
            # first wave may start late; the kill then lands earlier, and every assertion below still holds.
            with contextlib.suppress(WaitTimeoutError):
                wait_for(lambda: sum(ledger(path).values()) >= 20, timeout=20, what="20 calls to start")
            victim = task.replica_set.snapshot()[0]  # type: ignore[union-attr]
            ray.kill(victim.handle, no_restart=False)
            futures.update(
                {
                    f"b{i}": manager.call_service_async("ledger", "record", (f"b{i}", 0.01), timeout=30)
                    for i in range(60)
                }
            )
            ok, unavailable = outcomes(futures)
            runs = ledger(path)
            # Non-idempotent calls run at most once, and a call answered with its result ran exactly once.
            assert max(runs.values()) == 1
            assert all(runs[token] == 1 for token in ok)
            assert all(runs[token] <= 1 for token in unavailable)
            assert set(runs) <= set(futures)
            assert len(ok) >= 60, f"only {len(ok)} of 120 calls succeeded"
            # The restarted replica rejoins and serves again.
            wait_for(lambda: victim.up, timeout=30, what="the killed replica to rejoin")
            actors = {manager.call_service_sync("ledger", "where")["actor"] for _ in range(20)}
            assert victim.name in actors and len(actors) == 2
            status = task.get_service_status()
            assert status.healthy and status.restarts >= 0
            if without_breaker():  # the breaker plugin is installed: it saw the failures and stayed closed
                assert status.extra["breaker"]["state"] == "closed", status.extra["breaker"]


@pytest.mark.timeout(90)
def test_killing_the_only_replica_without_restarts_fails_calls_fast() -> None:
    with ServiceEnvironment("ray-only", fault_config("only", "EchoService", [], replicas=1, max_restarts=0)) as env:
        task = env.get_task("only")
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            in_flight = manager.call_service_async("only", "sleep", (20.0,), timeout=60)
            wait_for(lambda: task.get_service_status().in_flight == 1, timeout=10, what="the long call to run")
            ray.kill(task.replica_set.snapshot()[0].handle, no_restart=True)  # type: ignore[union-attr]
            started = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="may or may not have run"):
                in_flight.result(60)
            assert time.monotonic() - started < 10
            started = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="no live replica"):
                manager.call_service_sync("only", "echo", (1,), timeout=60)
            assert time.monotonic() - started < 2
            status = task.get_service_status()
            assert not status.healthy and status.extra["replicas"][0]["healthy"] is False


@pytest.mark.timeout(90)
def test_idempotent_call_completes_through_the_replica_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with ServiceEnvironment(
        "ray-idem", fault_config("idem", "LedgerService", [str(path)], replicas=1, max_restarts=1)
    ) as env:
        task = env.get_task("idem")
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            retried = manager.call_service_async("idem", "record_idempotent", ("i1", 1.0), timeout=60)
            once = manager.call_service_async("idem", "record", ("n1", 1.0), timeout=60)
            wait_for(
                lambda: ledger(path)["i1"] == 1 and ledger(path)["n1"] == 1, timeout=20, what="both calls to start"
            )
            ray.kill(task.replica_set.snapshot()[0].handle, no_restart=False)  # type: ignore[union-attr]
            assert retried.result(60) == "i1"
            with pytest.raises(ServiceUnavailableError):
                once.result(60)
            runs = ledger(path)
            assert runs["i1"] == 2 and runs["n1"] == 1
