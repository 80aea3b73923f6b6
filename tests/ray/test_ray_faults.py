"""Faults of the ray transport: replica kills, planned scale-downs and stops, cancellation, at most once.

Every test counts executions with a ledger the service itself writes
(:class:`ray_services.LedgerService`, one line per run), so "ran exactly once"
and "never ran" are facts, not inferences from what the caller saw.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest
import ray
from kservice import (
    ServiceEnvironment,
    ServiceManager,
    ServiceRequest,
    ServiceResponse,
    ServiceStoppedError,
    ServiceTimeoutError,
    ServiceUnavailableError,
)
from kservice.plugins.ray import RayConnection, RayServiceTask
from kservice.testing import wait_for
from ray_services import without_breaker

from tests.blocking_callbacks import check_a_blocking_done_callback_is_named

#: calls one replica runs at once in these tests
CONCURRENCY = 4


def ledger_config(
    name: str,
    path: Path,
    *,
    replicas: int,
    max_restarts: int = 0,
    concurrency: int = CONCURRENCY,
    breaker: bool = False,
    max_retries: int | None = 0,
    **ray_options: Any,
) -> dict[str, Any]:
    """An environment with one LedgerService of kind ray (``max_retries`` None: the default retry policy's settings)."""
    service = {
        "class": "ray_services:LedgerService",
        "args": [str(path)],
        "kind": "ray",
        "replicas": replicas,
        "ray": {"max_restarts": max_restarts, "max_concurrency": concurrency, **ray_options},
        **({} if breaker else without_breaker()),
    }
    config: dict[str, Any] = {"services": {name: service}, "health": {"enabled": False}}
    if max_retries is not None:
        config["service_call"] = {"max_retries": max_retries}
    return config


def ledger(path: Path) -> collections.Counter[str]:
    """How many times each token really ran on the service side."""
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


def settle(futures: dict[str, Future[Any]], timeout: float = 60) -> tuple[set[str], dict[str, BaseException]]:
    """(tokens answered with their own result, errors by token); every call must be answered."""
    _, not_done = wait(futures.values(), timeout=timeout)
    assert not not_done, f"{len(not_done)} calls never answered"
    ok: set[str] = set()
    failed: dict[str, BaseException] = {}
    for token, future in futures.items():
        error = future.exception()
        if error is None:
            assert future.result() == token
            ok.add(token)
        else:
            failed[token] = error
    return ok, failed


def assert_at_most_once(path: Path, ok: set[str], failed: dict[str, BaseException]) -> collections.Counter[str]:
    runs = ledger(path)
    assert not [token for token, count in runs.items() if count > 1], f"ran twice: {runs.most_common(3)}"
    assert all(runs[token] == 1 for token in ok), "a call answered with its result did not run exactly once"
    assert set(runs) <= ok | set(failed), "the ledger holds a call nobody made"
    return runs


def _task(env: ServiceEnvironment, name: str) -> RayServiceTask:
    task = env.get_task(name)
    assert isinstance(task, RayServiceTask) and task.replica_set is not None
    return task


def _connection(manager: ServiceManager, name: str) -> RayConnection:
    connection = manager.get_service_queue(name)
    assert isinstance(connection, RayConnection)
    return connection


# ---------------------------------------------------------------------------
# A replica killed under load fails only the calls running in it
# ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_killing_one_of_two_replicas_fails_only_the_calls_running_in_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-kill-bound", ledger_config("bound", path, replicas=2)) as env,
        env.manager() as manager,
    ):
        task = _task(env, "bound")
        futures = {
            f"c{i}": manager.call_service_async("bound", "record", (f"c{i}", 0.005), timeout=60) for i in range(300)
        }
        wait_for(lambda: sum(f.done() for f in futures.values()) >= 100, timeout=30, what="100 calls to finish")
        victim = task.replica_set.snapshot()[0]  # type: ignore[union-attr]
        ray.kill(victim.handle, no_restart=True)
        ok, failed = settle(futures)
        runs = assert_at_most_once(path, ok, failed)
        # Only calls handed to the killed replica may fail: at most the CONCURRENCY running in it.
        assert len(failed) <= CONCURRENCY, f"{len(failed)} calls failed: {sorted(failed)[:10]}"
        for token, error in failed.items():
            assert isinstance(error, ServiceUnavailableError) and "may or may not have run" in str(error), (
                token,
                error,
            )
        assert len(ok) == 300 - len(failed)
        assert sum(runs.values()) >= len(ok)
        # The survivor serves on; the dead replica is out of rotation.
        assert manager.call_service_sync("bound", "where")["actor"] != victim.name


@pytest.mark.timeout(120)
def test_calls_beyond_max_concurrency_wait_in_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-wait", ledger_config("waits", path, replicas=2, concurrency=2)) as env,
        env.manager() as manager,
    ):
        connection = _connection(manager, "waits")
        futures = {
            f"w{i}": manager.call_service_async("waits", "record", (f"w{i}", 0.2), timeout=60) for i in range(20)
        }

        def sent_to_replicas() -> dict[str, int] | None:
            counts = {replica.name: replica.in_flight for replica in connection.replicas.snapshot()}
            return counts if sum(counts.values()) >= 4 else None

        # Two replicas, two slots each: four calls in the replicas, sixteen waiting here.
        sent = wait_for(sent_to_replicas, timeout=10, what="four calls to be sent to the replicas")
        assert all(count <= 2 for count in sent.values()), sent
        assert connection.replicas.waiting_count() == 20 - sum(sent.values())
        ok, failed = settle(futures)
        assert not failed and len(ok) == 20
        assert connection.replicas.waiting_count() == 0
        assert all(replica.in_flight == 0 for replica in connection.replicas.snapshot())


# ---------------------------------------------------------------------------
# Planned changes fail nothing
# ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_scale_down_under_load_fails_nothing_and_keeps_the_breaker_closed(tmp_path: Path) -> None:
    from kservice.plugins.breaker import breaker_state

    path = tmp_path / "ledger.txt"
    config = ledger_config("shrink", path, replicas=3, concurrency=2, breaker=True)
    with ServiceEnvironment("ray-shrink", config) as env, env.manager() as manager:
        task = _task(env, "shrink")
        names = [replica.name for replica in task.replica_set.snapshot()]  # type: ignore[union-attr]
        futures = {
            f"s{i}": manager.call_service_async("shrink", "record", (f"s{i}", 0.05), timeout=60) for i in range(100)
        }
        wait_for(lambda: sum(f.done() for f in futures.values()) >= 10, timeout=30, what="10 calls to finish")
        task.scale(1)
        ok, failed = settle(futures)
        assert not failed, {token: repr(error) for token, error in list(failed.items())[:5]}
        assert_at_most_once(path, ok, failed)
        assert breaker_state("shrink") in (None, "closed")
        for gone in names[1:]:
            with pytest.raises(ValueError):
                ray.get_actor(gone, namespace="kservice")
        assert manager.call_service_sync("shrink", "record", ("after", 0.0)) == "after"


@pytest.mark.timeout(120)
def test_stop_under_load_finishes_every_accepted_call_then_refuses_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-stop-drain", ledger_config("drain", path, replicas=2, concurrency=2)) as env,
        env.manager() as manager,
    ):
        task = _task(env, "drain")
        futures = {
            f"d{i}": manager.call_service_async("drain", "record", (f"d{i}", 0.05), timeout=60) for i in range(60)
        }
        wait_for(lambda: sum(f.done() for f in futures.values()) >= 5, timeout=30, what="5 calls to finish")
        task.stop_service(timeout=60)
        ok, failed = settle(futures, timeout=5)
        assert not failed, {token: repr(error) for token, error in list(failed.items())[:5]}
        assert_at_most_once(path, ok, failed)
        with pytest.raises(ServiceStoppedError):
            manager.call_service_sync("drain", "record", ("late", 0.0))
        assert "late" not in ledger(path)


@pytest.mark.timeout(120)
def test_calls_a_stop_leaves_waiting_are_refused_saying_they_did_not_run(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-stop-refuse", ledger_config("refuse", path, replicas=1, concurrency=1)) as env,
        env.manager() as manager,
    ):
        task = _task(env, "refuse")
        futures = {
            f"w{i}": manager.call_service_async("refuse", "record", (f"w{i}", 1.0), timeout=60) for i in range(4)
        }
        wait_for(lambda: ledger(path), timeout=30, what="the first call to run")
        task.stop_service(timeout=0.5)  # the call running finishes; those waiting here are refused
        ok, failed = settle(futures, timeout=30)
        runs = assert_at_most_once(path, ok, failed)
        never_ran = {token: error for token, error in failed.items() if token not in runs}
        assert never_ran, "the stop left calls waiting"
        # (The call running when the stop's 0.5 s ran out was cut off: it may have run, and says so.)
        assert all(isinstance(error, ServiceStoppedError) for error in never_ran.values()), never_ran
        assert all(error.may_have_run is False for error in never_ran.values()), {  # type: ignore[attr-defined]
            token: error.may_have_run  # type: ignore[attr-defined]
            for token, error in never_ran.items()
        }


# ---------------------------------------------------------------------------
# Cancellation
# ---------------------------------------------------------------------------


def _request(name: str, token: str, seconds: float, timeout: float = 60) -> ServiceRequest:
    return ServiceRequest(f"req-{token}", name, "record", (token, seconds), {}, "", time.time() + timeout, {})


class _Replies:
    """Collects ``reply`` calls, counting them per request id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: dict[str, list[ServiceResponse]] = collections.defaultdict(list)

    def __call__(self, response: ServiceResponse) -> None:
        with self.lock:
            self.answers[response.request_id].append(response)

    def count(self) -> int:
        with self.lock:
            return sum(len(answers) for answers in self.answers.values())


@pytest.mark.timeout(90)
def test_a_cancelled_call_still_waiting_in_the_caller_never_starts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-cancel", ledger_config("cancel", path, replicas=1, concurrency=1)) as env,
        env.manager() as manager,
    ):
        connection = _connection(manager, "cancel")
        replies = _Replies()
        busy = _request("cancel", "busy", 1.0)
        connection.send(busy, replies)
        wait_for(lambda: ledger(path)["busy"] == 1, timeout=20, what="the busy call to start")
        queued = [_request("cancel", f"q{i}", 0.0) for i in range(6)]
        for request in queued:
            connection.send(request, replies)
        for request in queued[::2]:
            connection.cancel(request)
        wait_for(lambda: replies.count() == 7, timeout=20, what="every call to be answered")
        runs = ledger(path)
        assert all(runs[r.args[0]] == 0 for r in queued[::2]), runs
        assert all(runs[r.args[0]] == 1 for r in queued[1::2]), runs
        # Every send got exactly one reply; the cancelled ones say so without claiming they may have run.
        assert all(len(replies.answers[r.request_id]) == 1 for r in [busy, *queued])
        for request in queued[::2]:
            answer = replies.answers[request.request_id][0]
            assert not answer.success and "cancelled" in (answer.error or "")
        assert all(replies.answers[r.request_id][0].success for r in [busy, *queued[1::2]])
        assert manager.call_service_sync("cancel", "record", ("next", 0.0)) == "next"


@pytest.mark.timeout(90)
def test_an_async_call_that_times_out_while_waiting_in_the_caller_never_runs(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-late", ledger_config("late", path, replicas=1, concurrency=1)) as env,
        env.manager() as manager,
    ):
        connection = _connection(manager, "late")
        busy = manager.call_service_async("late", "record", ("busy", 1.0))
        wait_for(lambda: ledger(path)["busy"] == 1, timeout=20, what="the busy call to start")
        started = time.monotonic()
        late = manager.call_service_async("late", "record", ("late", 0.0), timeout=0.3)
        with pytest.raises(ServiceTimeoutError):
            late.result(10)
        assert time.monotonic() - started < 0.9
        assert connection.replicas.waiting_count() == 0  # taken out at its deadline, not when a slot freed
        assert busy.result(20) == "busy"
        assert manager.call_service_sync("late", "record", ("after", 0.0)) == "after"
        assert ledger(path)["late"] == 0


@pytest.mark.timeout(90)
def test_cancelling_a_running_call_lets_it_finish_and_answers_its_caller_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-running", ledger_config("running", path, replicas=1, concurrency=1)) as env,
        env.manager() as manager,
    ):
        connection = _connection(manager, "running")
        replies = _Replies()
        running = _request("running", "r1", 0.5)
        connection.send(running, replies)
        wait_for(lambda: ledger(path)["r1"] == 1, timeout=20, what="the call to start")
        connection.cancel(running)
        wait_for(lambda: replies.count() == 1, timeout=20, what="the cancelled call to be answered")
        time.sleep(0.2)  # deliberate: room for a second answer to arrive, had the cancel and Ray's reply both answered
        assert replies.count() == 1
        assert ledger(path)["r1"] == 1  # Ray does not interrupt a running method of a threaded actor
        # Its slot is free again: the next call runs at once.
        assert manager.call_service_sync("running", "record", ("next", 0.0), timeout=5) == "next"
        assert replies.count() == 1  # the cancelled method has finished now, and still answered no one twice


@pytest.mark.timeout(120)
def test_cancelling_a_running_call_of_an_idempotent_method_never_sends_it_to_another_replica(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-cancel-idem", ledger_config("cidem", path, replicas=2, concurrency=1)) as env,
        env.manager() as manager,
    ):
        future = manager.call_service_async("cidem", "record_idempotent", ("c1", 1.0), timeout=60)
        wait_for(lambda: ledger(path)["c1"] == 1, timeout=20, what="the call to start")
        assert future.cancel()
        # The cancelled method runs to its end in its replica; nothing else may run it.
        time.sleep(2.0)  # deliberate: room for a re-sent copy to run, had the cancel sent it elsewhere
        assert ledger(path)["c1"] == 1
        # Both replicas serve on.
        tokens = [f"n{i}" for i in range(4)]
        assert [manager.call_service_sync("cidem", "record_idempotent", (t, 0.0), timeout=10) for t in tokens] == tokens


# ---------------------------------------------------------------------------
# At most once under the default retry policy
# ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_default_retries_never_resend_a_call_that_may_have_run_but_resend_calls_that_never_left(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    # The default policy (3 retries), with a short first interval so the test does not wait for seconds.
    config = ledger_config("retried", path, replicas=1, concurrency=1, max_restarts=1, max_retries=None)
    config["service_call"] = {"retry_interval": 0.5}
    with ServiceEnvironment("ray-retries", config) as env, env.manager() as manager:
        task = _task(env, "retried")
        running = manager.call_service_async("retried", "record", ("running", 5.0), timeout=60)
        wait_for(lambda: ledger(path)["running"] == 1, timeout=20, what="the first call to start")
        waiting = {
            f"w{i}": manager.call_service_async("retried", "record", (f"w{i}", 0.0), timeout=60) for i in range(4)
        }
        # The others wait in the caller, not in Ray's queue.
        wait_for(
            lambda: task.get_service_status().extra["waiting_in_caller"] == 4,
            timeout=10,
            what="the four calls to wait in the caller",
        )
        assert ledger(path).keys() == {"running"}
        ray.kill(task.replica_set.snapshot()[0].handle, no_restart=False)  # type: ignore[union-attr]
        with pytest.raises(ServiceUnavailableError, match="may or may not have run") as caught:
            running.result(30)
        assert getattr(caught.value, "attempts", 1) == 1  # never re-sent
        ok, failed = settle(waiting)
        # The waiting calls never reached the replica: re-sending them after its restart is safe, and they succeed.
        assert not failed, {token: repr(error) for token, error in failed.items()}
        runs = assert_at_most_once(path, ok | {"running"}, failed)
        assert runs["running"] == 1


@pytest.mark.timeout(90)
def test_a_cancelled_call_of_a_batch_in_flight_is_skipped_by_the_replica(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    # Calls of 50 ms count as fast here: twenty of them leave as one batch that runs for a second.
    config = ledger_config("skips", path, replicas=1, concurrency=1, batch_cost_limit=1.0, batch_max=20)
    with ServiceEnvironment("ray-skip", config) as env, env.manager() as manager:
        connection = _connection(manager, "skips")
        manager.call_service_sync("skips", "record", ("warm", 0.05))
        replies = _Replies()
        busy = _request("skips", "busy", 0.3)
        connection.send(busy, replies)
        batch = [_request("skips", f"k{i}", 0.05) for i in range(20)]
        for request in batch:
            connection.send(request, replies)
        wait_for(
            lambda: connection.replicas.batched_calls >= 20 and ledger(path)["k0"] == 1,
            timeout=20,
            what="the batch to start",
        )
        for request in batch[10:]:
            connection.cancel(request)
        wait_for(lambda: replies.count() == 21, timeout=20, what="every call to be answered")
        runs = ledger(path)
        assert all(runs[r.args[0]] == 1 for r in batch[:10]), runs
        assert all(runs[r.args[0]] == 0 for r in batch[10:]), runs
        for request in batch[10:]:
            answer = replies.answers[request.request_id][0]
            assert not answer.success and "cancelled before it started" in (answer.error or "")
        assert manager.call_service_sync("skips", "record", ("next", 0.0)) == "next"


@pytest.mark.timeout(90)
def test_sync_calls_wait_in_the_caller_for_a_slot_and_time_out_there_unrun(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with (
        ServiceEnvironment("ray-sync-wait", ledger_config("syncwait", path, replicas=1, concurrency=1)) as env,
        env.manager() as manager,
    ):
        connection = _connection(manager, "syncwait")
        busy = manager.call_service_async("syncwait", "record", ("busy", 1.0))
        wait_for(lambda: ledger(path)["busy"] == 1, timeout=20, what="the busy call to start")
        started = time.monotonic()
        with pytest.raises(ServiceTimeoutError):
            manager.call_service_sync("syncwait", "record", ("late", 0.0), timeout=0.3)
        assert time.monotonic() - started < 0.9
        assert connection.replicas.waiting_count() == 0
        # A sync call with time to spare waits for the slot and runs once.
        assert manager.call_service_sync("syncwait", "record", ("patient", 0.0), timeout=20) == "patient"
        assert busy.result(20) == "busy"
        runs = ledger(path)
        assert runs["late"] == 0 and runs["patient"] == 1
        assert all(replica.slots == 0 and replica.in_flight == 0 for replica in connection.replicas.snapshot())


@pytest.mark.timeout(120)
def test_a_caller_in_another_driver_sends_calls_refused_by_a_leaving_replica_elsewhere(tmp_path: Path) -> None:
    from kservice.plugins import ray as ray_plugin

    path = tmp_path / "ledger.txt"
    # Membership re-read only every 120 s: what the other driver's caller knows of the leaving replica comes from
    # its refusals alone, however slowly the machine runs the test (a re-read would drop the replica).
    config = ledger_config("remote", path, replicas=3, concurrency=2, membership_refresh=120.0)
    with (
        ServiceEnvironment("ray-remote-shrink", config) as env,
        env.manager() as manager,
    ):
        task = _task(env, "remote")
        # A connection as another driver makes it: found by name.
        addresses = ray_plugin.kservice_resolve_service("remote", manager.config.for_service("remote"))
        assert addresses
        remote = ray_plugin.RayTransport().connect(addresses[0])
        assert isinstance(remote, RayConnection) and remote.replicas is not task.replica_set
        try:
            replies = _Replies()
            requests = [_request("remote", f"r{i}", 0.02) for i in range(150)]
            for request in requests:
                remote.send(request, replies)
            wait_for(lambda: replies.count() >= 10, timeout=30, what="10 calls to finish")
            task.scale(1)
            wait_for(lambda: replies.count() == 150, timeout=60, what="every call to be answered")
            failed = {
                r.args[0]: replies.answers[r.request_id][0].error
                for r in requests
                if not replies.answers[r.request_id][0].success
            }
            ok = {r.args[0] for r in requests if replies.answers[r.request_id][0].success}
            runs = assert_at_most_once(path, ok, {token: RuntimeError(error) for token, error in failed.items()})
            # Calls sent to a replica that was already stopping were refused unrun and went to the survivor.
            assert all("may or may not have run" in (error or "") for error in failed.values()), failed
            assert len(failed) <= 2 * CONCURRENCY, failed
            assert sum(runs[token] for token in ok) == len(ok)
            assert any(r.leaving for r in remote.replicas.snapshot())
        finally:
            remote.close()


@pytest.mark.timeout(120)
def test_a_call_running_longer_than_stuck_after_within_its_deadline_is_not_a_stuck_replica() -> None:
    """A long call its caller still waits for (a batch job, a model run): the replica is busy, not stuck.

    Before, a threaded replica ran its calls in Ray's threads, outside the hosted task's pool, so its status
    never said until when they were awaited: after ``health.stuck_after`` without a completed call, the
    replica's monitor called it stuck and rebuilt the service's instance while the call ran (its state lost),
    although its caller had given the call 30 s. As in-process and over mmap
    (tests/mmap/test_recovery_window.py), only a call past its deadline makes a stuck pool."""
    health = {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "stuck_after": 0.5, "drain_timeout": 0.2}
    config = {"services": {"slow": {"class": "ray_services:EchoService", "kind": "ray", "health": health}}}
    with ServiceEnvironment("ray-busy-not-stuck", config) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("slow", "echo", ("warm",), timeout=60) == "warm"
        assert manager.call_service_sync("slow", "sleep", (3.0,), timeout=30) == 3.0
        status = _task(env, "slow").get_service_status()
        assert status.restarts == 0 and status.healthy, status


#: Work a call's answer does not bound, 3 s in all: (service class, what the caller does, what it gets).
LONG_WORK: dict[str, tuple[str, Any, Any]] = {
    "threaded-stream": (
        "aio_ray_services:StreamReplica",
        lambda manager: list(manager.stream("svc", "slow", (15, 0.2), timeout=30)),
        list(range(15)),
    ),
    "async-generator-stream": (
        "aio_ray_services:AsyncReplica",
        lambda manager: list(manager.stream("svc", "acount", (15, 0.2), timeout=30)),
        list(range(15)),
    ),
    "async-method": (
        "aio_ray_services:AsyncReplica",
        lambda manager: manager.call_service_sync("svc", "nap", (3.0, "done"), timeout=30),
        "done",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("work", sorted(LONG_WORK))
def test_a_stream_or_coroutine_running_longer_than_stuck_after_within_its_deadline_is_not_a_stuck_replica(
    work: str,
) -> None:
    """A stream (a threaded replica's, or an async generator's) or an ``async def`` call its caller still
    waits for: the replica is busy, not stuck. Before, its status never said until when they were awaited,
    and after ``health.stuck_after`` the replica's monitor rebuilt the service's instance under them."""
    class_path, run, expected = LONG_WORK[work]
    health = {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "stuck_after": 0.5, "drain_timeout": 0.2}
    config = {"services": {"svc": {"class": class_path, "kind": "ray", "health": health}}}
    with ServiceEnvironment("ray-busy-not-stuck", config) as env, ServiceManager(env) as manager:
        assert run(manager) == expected
        status = _task(env, "svc").get_service_status()
        assert status.restarts == 0 and status.healthy, status


@pytest.mark.timeout(120)
def test_a_call_still_running_past_its_deadline_is_a_stuck_replica_and_recovered() -> None:
    """Its caller gave up (Ray does not interrupt a running method): the thread is held for nothing, and the
    replica's monitor recovers it, as in-process and over mmap."""
    health = {"period": 0.2, "timeout": 2.0, "failure_threshold": 1, "stuck_after": 0.5, "drain_timeout": 0.2}
    config = {"services": {"slow": {"class": "ray_services:EchoService", "kind": "ray", "health": health}}}
    with ServiceEnvironment("ray-stuck-past-deadline", config) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("slow", "echo", ("warm",), timeout=60) == "warm"
        with pytest.raises(ServiceTimeoutError):
            manager.call_service_sync("slow", "sleep", (6.0,), timeout=1.0)
        task = _task(env, "slow")
        wait_for(lambda: task.get_service_status().restarts >= 1, timeout=30, what="the stuck replica's recovery")


@pytest.mark.timeout(120)
def test_a_done_callback_that_blocks_the_completion_thread_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As over mmap (tests/mmap/test_call_faults.py): a future's done callback runs in the thread completing
    the call, here the process's Ray completion thread. One that blocks holds up the other async calls'
    answers: they end at their deadlines, never later, and a warning on ``kservice.ray`` now names the stall."""
    config = {"services": {"svc": {"class": "ray_services:EchoService", "kind": "ray"}}}
    with (
        ServiceEnvironment("ray-blocking-callback", config) as env,
        ServiceManager(env) as manager,
        caplog.at_level("WARNING", logger="kservice.ray"),
    ):
        assert manager.call_service_sync("svc", "echo", ("warm",), timeout=60) == "warm"
        check_a_blocking_done_callback_is_named(manager, "svc", caplog, "this process's Ray completion thread", 1.4)


@pytest.mark.timeout(120)
def test_an_async_check_health_of_a_replica_is_awaited_and_its_answer_counts() -> None:
    """An async replica's ``async def check_health()`` is awaited on its event loop. Before, the replica
    answered its health check with the coroutine, which Ray could not carry: every round failed with a
    TypeError, so a healthy replica counted as sick and was restarted until ``max_restarts``."""
    health = {"period": 0.2, "timeout": 2.0, "failure_threshold": 2, "max_restarts": 3}
    config = {"services": {"svc": {"class": "aio_ray_services:AsyncChecked", "kind": "ray", "health": health}}}
    with ServiceEnvironment("ray-async-check", config) as env, ServiceManager(env) as manager:
        assert manager.call_service_sync("svc", "is_poisoned", timeout=60) is False
        task = _task(env, "svc")
        time.sleep(1.5)  # several rounds
        status = task.get_service_status()
        assert status.restarts == 0 and status.healthy, status
        manager.call_service_sync("svc", "poison", timeout=30)
        wait_for(lambda: task.get_service_status().restarts >= 1, timeout=60, what="the sick replica's recovery")
        wait_for(
            lambda: manager.call_service_sync("svc", "is_poisoned", timeout=30) is False,
            timeout=60,
            what="calls to reach a healthy instance",
        )
