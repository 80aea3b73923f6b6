"""ServiceManager.map over mmap: a chunk travels as one ring record, each call keeps its own outcome.

The host is a real child process (``kind="process"``) reached over shared memory.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import (
    Config,
    ServiceCallError,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
)
from kservice.plugins.mmap import codec
from kservice.plugins.mmap.transport import MmapConnection

from tests.cli.helpers import KV_TARGET, start_host, stop_host
from tests.core.faulty import Counter
from tests.mmap.services import KV, SerialLedger

pytestmark = pytest.mark.timeout(120)

QUIET: dict[str, Any] = {
    "service_call": {"max_retries": 0},
    "breaker": {"enabled": False},
    "health": {"enabled": False},
    "tracing": {"enabled": False},  # as by default with no OpenTelemetry provider (other tests may configure one)
}


class PerCallObserver(ServiceMiddleware):
    """Client middleware with a per-call hook and no batch form: it keeps a map on the per-call path."""

    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        pass


#: Without client middleware a chunk travels as one compact record (the fast path), and so it does with
#: the default plugins, whose middleware implements the batch hooks ("batch hooks"); a middleware
#: without them gives each call its own request (the per-call path). All must behave alike.
PATHS = {"fast": {**QUIET, "metrics": {"enabled": False}}, "batch hooks": QUIET, "per-call": QUIET}


@pytest.fixture(params=sorted(PATHS))
def host(request: pytest.FixtureRequest) -> Iterator[tuple[ServiceEnvironment, ServiceManager]]:
    env = ServiceEnvironment("map-mmap", PATHS[request.param])
    if request.param == "per-call":
        env.add_middleware(PerCallObserver())
    env.register_service("kv", ServiceFactory("kv", KV), kind="process")
    env.register_service("one", ServiceFactory("one", Counter), kind="process", local={"max_workers": 1})
    env.register_service("ledger", ServiceFactory("ledger", SerialLedger), kind="process")
    with env:
        manager = env.manager()
        yield env, manager


def test_a_chunk_leaves_as_one_record_and_every_call_gets_its_own_answer(
    host: tuple[ServiceEnvironment, ServiceManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manager = host
    assert manager.call_service_sync("kv", "pid") != os.getpid()
    records: list[int] = []
    chunks: list[int] = []
    encode, encode_chunk = codec.encode_request_batch, codec.encode_chunk

    def counting(requests: Any, *args: Any) -> bytes | None:
        records.append(len(requests))
        return encode(requests, *args)

    def counting_chunks(chunk_id: str, service: str, method: str, args: Any, *rest: Any) -> bytes | None:
        chunks.append(len(args))
        return encode_chunk(chunk_id, service, method, args, *rest)

    monkeypatch.setattr(codec, "encode_request_batch", counting)
    monkeypatch.setattr(codec, "encode_chunk", counting_chunks)
    assert list(manager.map("kv", "add", [(i, 1) for i in range(1000)], chunk_size=100)) == [i + 1 for i in range(1000)]
    if _fast(manager, "kv"):
        assert (chunks, records) == ([100] * 10, [])  # ten compact records carried the thousand calls
    else:
        assert (chunks, records) == ([], [100] * 10)  # ten request batches: client middleware sees each call
    assert sorted(manager.map("kv", "echo", range(3000), ordered=False)) == list(range(3000))


def test_an_item_that_cannot_be_pickled_fails_alone_with_a_type_error_naming_it(
    host: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    _, manager = host
    lock = threading.Lock()
    results = list(manager.map("kv", "echo", [1, lock, 3], return_exceptions=True))
    assert results[0] == 1 and results[2] == 3
    error = results[1]
    assert isinstance(error, TypeError)
    assert "not picklable" in str(error) and "kv.echo" in str(error)
    assert "item 1 of map over kv.echo" in " ".join(error.__notes__)
    with pytest.raises(TypeError, match="not picklable"):
        list(manager.map("kv", "echo", [1, lock]))
    assert manager.call_service_sync("kv", "echo", ("still serving",)) == "still serving"


def test_a_chunk_sent_call_by_call_keeps_the_answers_in_time_and_times_out_the_others(
    host: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    """An unpicklable argument sends the chunk call by call (admitted whole when batch hooks are on)."""
    _, manager = host
    began = time.monotonic()
    results = list(manager.map("kv", "sleep", [threading.Lock(), 0.0, 2.0, 2.0], timeout=0.5, return_exceptions=True))
    assert isinstance(results[0], TypeError) and results[1] == 0.0, results
    assert all(type(r).__name__ == "ServiceTimeoutError" for r in results[2:]), results
    assert time.monotonic() - began < 1.8  # answered at the deadline, not when the slow calls end (2 s)
    assert manager.call_service_sync("kv", "echo", ("still serving",), timeout=10) == "still serving"


def test_an_item_the_host_cannot_decode_fails_alone_and_the_others_run(
    host: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    _, manager = host
    module = types.ModuleType("kservice_test_only_in_the_caller")
    exec("class OnlyHere:\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        results = list(manager.map("kv", "echo", [1, module.OnlyHere(), 3], return_exceptions=True))
    finally:
        del sys.modules[module.__name__]
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ServiceCallError) and isinstance(results[1], TypeError), results
    assert "could not decode the arguments" in str(results[1]) and "did not run" in str(results[1])
    assert manager.call_service_sync("kv", "echo", (4,)) == 4


def test_closing_early_cancels_the_calls_the_host_has_not_started(
    host: tuple[ServiceEnvironment, ServiceManager], tmp_path: Any
) -> None:
    _, manager = host
    ledger = tmp_path / "ledger"
    results = manager.map(
        "ledger", "record", [(str(ledger), str(i), 0.05) for i in range(100)], chunk_size=10, max_in_flight=40
    )
    assert next(results) > 0
    results.close()
    ran = len(ledger.read_text().splitlines())
    time.sleep(0.6)  # deliberate: time for the cancelled calls to run, which they must not
    after = len(ledger.read_text().splitlines())
    # One at a time, 50 ms each: without the cancel notices the 40-odd calls sent would run for 2 s more.
    assert after <= ran + 2, (ran, after)
    assert after < 40
    assert manager.call_service_sync("ledger", "pid") > 0


def test_a_slow_item_times_out_on_its_own_and_is_never_started_late(
    host: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    _, manager = host
    started = time.monotonic()
    results = list(manager.map("one", "sleep", [0.0, 1.0, 0.0, 0.0], timeout=0.4, return_exceptions=True))
    assert results[0] == 0.0
    assert all(type(r).__name__ == "ServiceTimeoutError" for r in results[1:]), results  # queued behind the slow one
    assert time.monotonic() - started < 5
    connection = manager.get_service_queue("one")
    assert isinstance(connection, MmapConnection)
    assert manager.call_service_sync("one", "echo", (1,), timeout=10) == 1


def _fast(manager: ServiceManager, service: str) -> bool:
    """Whether maps over ``service`` take the compact chunk path (no client middleware, or only batch hooks)."""
    chain = manager._route(service).chain
    return chain is None or chain.batch


def test_each_item_fails_alone_with_its_own_typed_error(host: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = host
    manager.call_service_sync("kv", "put", ("a", 1))
    for _ in range(
        2
    ):  # the first map runs on the pool (the method's cost is not known yet), the second in the listener's loop
        results = list(manager.map("kv", "get", ["a", "missing", "a", "gone"], return_exceptions=True))
        assert results[0] == 1 and results[2] == 1
        for index in (1, 3):
            error = results[index]
            assert isinstance(error, ServiceCallError) and isinstance(error, KeyError), results
            assert error.remote_type == "KeyError" and ("missing" in str(error) or "gone" in str(error))
            assert "Traceback" in (error.remote_traceback or "")  # built as a single call's error is
            assert f"item {index} of map over kv.get" in " ".join(error.__notes__)
    with pytest.raises(KeyError):
        list(manager.map("kv", "get", ["a", "missing"]))
    assert manager.call_service_sync("kv", "get", ("a",)) == 1


def test_items_past_the_deadline_mid_chunk_never_start(
    host: tuple[ServiceEnvironment, ServiceManager], tmp_path: Any
) -> None:
    _, manager = host
    ledger = tmp_path / "ledger"
    manager.call_service_sync(
        "ledger", "record", (str(tmp_path / "warm"), "w", 0.0)
    )  # known fast: run in the listener's loop
    count = 3000
    results = list(
        manager.map(
            "ledger",
            "record",
            [(str(ledger), str(i), 0.0) for i in range(count)],
            chunk_size=count,
            timeout=0.05,
            return_exceptions=True,
        )
    )
    from tests.faults.ledger import never_ran, runs

    timed_out = [i for i, r in enumerate(results) if type(r).__name__ == "ServiceTimeoutError"]
    assert timed_out and all(isinstance(r, int) for i, r in enumerate(results) if i not in timed_out), results[:3]
    time.sleep(0.5)  # deliberate: time for a late item to start, which it must not
    ran = runs(ledger)
    time.sleep(0.5)  # deliberate: the ledger must not grow any more
    # 3000 file appends take far longer than 50 ms on this machine: those whose turn came late never started.
    assert runs(ledger) == ran and len(ran) < count, (len(ran), count)
    for index, result in enumerate(results):
        if isinstance(result, int):
            assert ran[str(index)] == 1, index  # an answer in time: it ran, once
        elif never_ran(result):
            assert str(index) not in ran, index  # "never started" is true
    assert manager.call_service_sync("ledger", "pid") > 0


@pytest.mark.parametrize("retries", [0, 3])
def test_a_host_killed_mid_chunk_says_which_may_have_run_and_runs_none_twice(tmp_path: Any, retries: int) -> None:
    import signal

    from tests.faults.ledger import never_ran, runs

    # The chunks travel compact either way (the retry budget's middleware has the batch hook); with
    # retries, the calls that failed are re-sent one by one under the retry policy, which must not
    # re-send one that may have run.
    config = {**PATHS["fast"], "service_call": {"max_retries": retries}}
    env = ServiceEnvironment("map-mmap-kill", config)
    env.register_service("ledger", ServiceFactory("ledger", SerialLedger), kind="process")
    ledger = tmp_path / "ledger"
    with env:
        manager = env.manager()
        pid = manager.call_service_sync("ledger", "pid")
        assert _fast(manager, "ledger")
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:
            items = [(str(ledger), str(i), 0.02) for i in range(100)]
            results = list(manager.map("ledger", "record", items, chunk_size=50, timeout=30, return_exceptions=True))
        finally:
            killer.join()
    started = runs(ledger)
    assert started and len(started) < 100, len(started)
    assert max(started.values()) == 1, started.most_common(
        3
    )  # not idempotent: nothing that may have run was sent again
    for index, result in enumerate(results):
        if isinstance(result, int):
            assert started[str(index)] == 1, index  # answered before the kill: it ran, once
            continue
        assert type(result).__name__ == "ServiceUnavailableError", (index, result)
        if str(index) in started:  # it ran: its caller must not be told it never did
            assert not never_ran(result), (index, result)


def test_a_host_that_does_not_say_it_runs_chunks_gets_each_call_on_its_own(
    host: tuple[ServiceEnvironment, ServiceManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older host drops a record kind it does not know: the caller asks first, and goes per call on no."""
    _, manager = host
    asked: list[int] = []
    status = MmapConnection.remote_status

    def older_host(self: MmapConnection, timeout: float = 10.0) -> dict[str, Any]:
        asked.append(1)
        answer = status(self, timeout)
        answer.pop("chunk_records", None)  # what a host of an earlier version answers
        return answer

    monkeypatch.setattr(MmapConnection, "remote_status", older_host)
    monkeypatch.setattr(
        codec, "encode_chunk", lambda *args: pytest.fail("a chunk record went to a host that cannot run it")
    )
    connection = manager.get_service_queue("kv")
    assert isinstance(connection, MmapConnection)
    connection._chunks = None  # as a fresh connection to a `process` host: its address does not say
    started = time.monotonic()
    assert list(manager.map("kv", "add", [(i, 1) for i in range(500)], chunk_size=100)) == [i + 1 for i in range(500)]
    assert time.monotonic() - started < 5  # nothing waited for an answer that would never come
    assert asked == ([1] if _fast(manager, "kv") else [])  # asked once, only when the compact form was possible


def test_a_chunk_of_single_arguments_travels_without_a_tuple_per_call(
    host: tuple[ServiceEnvironment, ServiceManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items that are not tuples go as they are (``KIND_CHUNK_SINGLE``); an older host gets a tuple per call."""
    _, manager = host
    sent: list[tuple[int, Any]] = []
    encode_chunk = codec.encode_chunk

    def recording(chunk_id: str, service: str, method: str, args: Any, *rest: Any) -> bytes | None:
        sent.append((rest[-1] if len(rest) == 6 else codec.KIND_CHUNK, args[0]))
        return encode_chunk(chunk_id, service, method, args, *rest)

    monkeypatch.setattr(codec, "encode_chunk", recording)
    items: list[Any] = [1, "two", b"three", None, [4], {"five": 5}]
    assert list(manager.map("kv", "echo", items, chunk_size=3)) == items
    # Each item still fails alone, with its own typed error; the others are answered.
    results = list(manager.map("kv", "size", [b"ab", 3, "xyz"], return_exceptions=True))
    assert results[0] == 2 and results[2] == 3 and isinstance(results[1], ServiceCallError), results
    assert isinstance(results[1], TypeError)
    if not _fast(manager, "kv"):
        assert sent == []  # the per-call path: a request per call, as before
        return
    assert sent[:2] == [(codec.KIND_CHUNK_SINGLE, 1), (codec.KIND_CHUNK_SINGLE, None)]  # before: (1,) in a KIND_CHUNK
    # A tuple item is a call's argument tuple: such a chunk keeps the tuple form.
    sent.clear()
    assert list(manager.map("kv", "add", [(1, 2), (3, 4)])) == [3, 7]
    assert sent == [(codec.KIND_CHUNK, (1, 2))]
    # A host of an earlier version (chunk records, not this kind) gets one argument tuple per call.
    connection = manager.get_service_queue("kv")
    assert isinstance(connection, MmapConnection)
    monkeypatch.setattr(connection, "_chunks", 1)
    sent.clear()
    assert list(manager.map("kv", "echo", [7, 8])) == [7, 8]
    assert sent == [(codec.KIND_CHUNK, (7,))]


def test_a_single_argument_chunk_the_pool_runs_keeps_each_argument_whole(
    host: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    """A chunk's calls that leave the listener's loop (a method not known to be fast) run each on the pool."""
    _, manager = host
    assert list(manager.map("kv", "sleep", [0.0] * 3, chunk_size=3)) == [0.0, 0.0, 0.0]
    assert list(manager.map("kv", "echo", [[1, 2], "ab", b""], chunk_size=3)) == [[1, 2], "ab", b""]


# ------------------------------------------------------------------ batch hooks


class _Seen(ServiceMiddleware):
    """Counts what a third-party middleware is shown: calls one by one, or chunks (no lock: it is sent to hosts)."""

    def __init__(self) -> None:
        self.on = True
        self.calls: list[int] = []  # list.append is atomic: calls complete in several threads
        self.chunks: list[int] = []

    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        self.calls.append(1)


class _SeenInChunks(_Seen):
    def observe_batch(self, batch: Any) -> None:
        self.chunks.append(batch.count)


def _host_with(middleware: ServiceMiddleware, server: ServiceMiddleware | None = None) -> ServiceEnvironment:
    # Every other plugin at its defaults; a generous inline limit, so a loaded machine keeps chunks in the loop.
    # Tracing off, as by default in a process with no OpenTelemetry provider (other tests may configure one).
    env = ServiceEnvironment(
        "map-mmap-hooks", {"health": {"enabled": False}, "tracing": {"enabled": False}, "mmap": {"inline_limit": 0.05}}
    )
    env.add_middleware(middleware)
    if server is not None:
        env.add_middleware(server)
    env.register_service("items", ServiceFactory("items", "tests.mmap.batch_services:Items"), kind="process")
    return env


def _loop_calls(manager: ServiceManager) -> int:
    from kservice.plugins.mmap.transport import CHUNK_CALLS_IN_LOOP

    return int(manager._route("items").connection.remote_status()[CHUNK_CALLS_IN_LOOP])  # type: ignore[attr-defined]


def test_a_middleware_without_batch_hooks_keeps_the_per_call_path_and_sees_every_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _Seen()
    monkeypatch.setattr(codec, "encode_chunk", lambda *args: pytest.fail("a compact chunk skipped a per-call hook"))
    with _host_with(seen) as env:
        manager = env.manager()
        manager.call_service_sync("items", "check", (1,))
        assert not manager._route("items").chain.batch  # type: ignore[union-attr]
        assert list(manager.map("items", "check", range(600), chunk_size=100)) == list(range(600))
        assert len(seen.calls) == 1 + 600
        assert _loop_calls(manager) == 0


def test_a_middleware_with_batch_hooks_sees_each_chunk_once() -> None:
    seen = _SeenInChunks()
    with _host_with(seen) as env:
        manager = env.manager()
        manager.call_service_sync("items", "check", (1,))
        assert list(manager.map("items", "check", range(600), chunk_size=100)) == list(range(600))
        assert (len(seen.calls), seen.chunks) == (1, [100] * 6)
        assert _loop_calls(manager) > 0


class _RaisingAdmit(_SeenInChunks):
    def before_call(self, request: ServiceRequest) -> None:
        if self.on:
            raise PermissionError("refused by policy")

    def admit_batch(self, batch: Any) -> None:
        if self.on:
            raise PermissionError("refused by policy")


class _RaisingAfter(_SeenInChunks):
    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if self.on:
            raise PermissionError("answer withheld")

    def after_batch(self, batch: Any) -> None:
        if self.on:
            raise PermissionError("answer withheld")


class _RaisingObserver(_SeenInChunks):
    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        raise PermissionError("observer bug")

    def observe_batch(self, batch: Any) -> None:
        raise PermissionError("observer bug")


@pytest.mark.parametrize(
    ("middleware", "runs", "fails"),
    [(_RaisingAdmit, 0, True), (_RaisingAfter, 300, True), (_RaisingObserver, 300, False)],
    ids=["admit_batch", "after_batch", "observe_batch"],
)
def test_a_raising_batch_hook_does_what_its_per_call_hook_does(middleware: type, runs: int, fails: bool) -> None:
    hook = middleware()
    with _host_with(hook) as env:
        manager = env.manager()
        try:
            single: Any = manager.call_service_sync("items", "check", (1,))
        except PermissionError as error:
            single = error
        results = list(manager.map("items", "check", range(300), chunk_size=100, return_exceptions=True))
        hook.on = False
        ran = manager.call_service_sync("items", "count")
    if fails:
        assert isinstance(single, PermissionError)
        assert all(type(r) is PermissionError and str(r) == str(single) for r in results), results[:3]
        assert len({id(r) for r in results}) == 300  # each item its own exception, with its own note
        assert results[7].__notes__ == ["(item 7 of map over items.check)"]
    else:
        assert single == 1 and results == list(range(300))
    # The service ran every call (after_batch, observe_batch) or none (admit_batch refused each chunk).
    assert ran == (1 if single == 1 or middleware is _RaisingAfter else 0) + runs


def test_a_raising_server_batch_hook_fails_each_call_as_its_per_call_hook_does() -> None:
    from tests.mmap.batch_services import RaisingHandleBatch

    with _host_with(_SeenInChunks(), server=RaisingHandleBatch()) as env:
        manager = env.manager()
        with pytest.raises(RuntimeError) as single:
            manager.call_service_sync("items", "check", (1,))
        for _ in range(2):  # the host learns the method's cost from the first, and runs the second in its loop
            results = list(manager.map("items", "check", range(200), chunk_size=100, return_exceptions=True))
            for result in results:
                assert type(result) is type(single.value) and str(result) == str(single.value), result
        assert _loop_calls(manager) > 0
        assert manager.call_service_sync("items", "count") == 1 + 400  # every call ran once; the hook failed them


@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", ["sync", "async", "map"])
@pytest.mark.parametrize("retries", ["off", "default"])
def test_calls_refused_by_a_host_that_was_replaced_are_delivered_to_the_new_host_at_once(
    form: str, retries: str
) -> None:
    """A caller outside the host's environment keeps its route to a ``kservice serve`` host until a call fails
    on it. Calls sent there after the host was restarted are refused by the old queue ("nothing was sent"):
    they are delivered to the new host at once, once each, retries off or not, without spending the retry
    budget. Before, each waited the policy's pause (or failed with retries off), and a burst or a map of
    200 calls mostly failed on the budget although the new host served."""
    name = f"moved{form}{retries}{os.getpid()}"
    settings = {"max_retries": 0} if retries == "off" else {"retry_interval": 60.0}
    config = Config.load({"service_call": settings})
    first = start_host(f"{name}={KV_TARGET}")
    second = None
    try:
        with ServiceManager(config=config) as manager:
            assert manager.call_service_sync(name, "echo", ("route",)) == "route"  # the route is kept
            stop_host(first)
            second = start_host(f"{name}={KV_TARGET}")
            began = time.monotonic()
            items = [(i, 1) for i in range(200)]
            if form == "sync":
                results = [manager.call_service_sync(name, "add", item, timeout=120) for item in items]
            elif form == "async":
                futures = [manager.call_service_async(name, "add", item, timeout=120) for item in items]
                results = [future.result(120) for future in futures]
            else:
                results = list(manager.map(name, "add", items, timeout=120))
            assert results == list(range(1, 201))
            assert time.monotonic() - began < 30  # well under the 60 s pause a retry waits
    finally:
        for host in (first, second):
            if host is not None and host.poll() is None:
                stop_host(host)
