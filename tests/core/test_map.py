"""ServiceManager.map / amap in one process: one outcome per item, bounded memory, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import (
    MAY_HAVE_RUN,
    ServiceCallError,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    ServiceStoppedError,
    ServiceTimeoutError,
    ServiceUnavailableError,
)
from kservice.testing import wait_for

pytestmark = pytest.mark.timeout(60)

QUIET: dict[str, Any] = {"breaker": {"enabled": False}, "health": {"enabled": False}}


class Work:
    """Records every call that ran."""

    def __init__(self) -> None:
        self.ran: list[Any] = []
        self._lock = threading.Lock()

    def square(self, x: int) -> int:
        with self._lock:
            self.ran.append(x)
        return x * x

    def add(self, a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    def fail_on(self, x: int, bad: int) -> int:
        if x % bad == 0:
            raise ValueError(f"item {x} is bad")
        return x

    def slow(self, x: int, seconds: float) -> int:
        with self._lock:
            self.ran.append(x)
        time.sleep(seconds)
        return x

    def count(self) -> int:
        return len(self.ran)


@pytest.fixture
def env() -> Iterator[ServiceEnvironment]:
    environment = ServiceEnvironment("map", QUIET)
    environment.register_service("work", Work)
    environment.register_service("serial", ServiceFactory("serial", Work), local={"max_workers": 1})
    with environment:
        yield environment


@pytest.fixture
def manager(env: ServiceEnvironment) -> Iterator[ServiceManager]:
    with ServiceManager(env) as m:
        yield m


def _instance(env: ServiceEnvironment, name: str) -> Work:
    task = env.get_task(name)
    assert task is not None
    return task._service  # type: ignore[no-any-return]


def test_results_come_in_item_order_with_tuples_spread_and_shared_kwargs(manager: ServiceManager) -> None:
    assert list(manager.map("work", "square", range(1000))) == [x * x for x in range(1000)]
    assert list(manager.map("work", "add", [(1, 2), (3, 4)], kwargs={"scale": 10})) == [30, 70]
    assert sorted(manager.map("work", "square", range(1000), ordered=False)) == sorted(x * x for x in range(1000))


def test_an_empty_iterable_gives_an_empty_result_and_sends_nothing(
    env: ServiceEnvironment, manager: ServiceManager
) -> None:
    assert list(manager.map("work", "square", [])) == []
    assert list(manager.map("work", "square", iter(()), ordered=False)) == []
    assert _instance(env, "work").ran == []


def test_bad_arguments_are_refused_at_once_with_nothing_sent(manager: ServiceManager) -> None:
    with pytest.raises(TypeError, match=r"map's items must be an iterable .* not int 42"):
        manager.map("work", "square", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        manager.map("work", "square", [1], chunk_size=0)
    with pytest.raises(ValueError, match="finite"):
        manager.map("work", "square", [1], timeout=float("nan"))
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        manager.map("work", "square", [1], kwargs=[1])  # type: ignore[arg-type]


def test_one_failure_fails_one_item_with_return_exceptions(manager: ServiceManager) -> None:
    results = list(manager.map("work", "fail_on", [(x, 5) for x in range(1, 13)], return_exceptions=True, chunk_size=4))
    for x, result in zip(range(1, 13), results, strict=True):
        if x % 5 == 0:
            assert isinstance(result, ServiceCallError) and isinstance(result, ValueError), result
            assert f"item {x} is bad" in str(result)
            assert f"item {x - 1} of map over work.fail_on" in " ".join(result.__notes__)
        else:
            assert result == x


def test_a_failed_item_raises_when_reached_and_ends_the_map(manager: ServiceManager) -> None:
    results = manager.map("work", "fail_on", [(x, 3) for x in range(1, 100)])
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(ValueError, match="item 3 is bad") as raised:
        next(results)
    assert "item 2 of map over work.fail_on" in " ".join(raised.value.__notes__)
    with pytest.raises(StopIteration):
        next(results)
    assert manager.call_service_sync("work", "square", (4,)) == 16  # the service keeps serving


def test_an_iterable_that_raises_fails_the_map_and_leaves_no_call_queued(
    env: ServiceEnvironment, manager: ServiceManager
) -> None:
    def items() -> Iterator[tuple[int, float]]:
        for x in range(40):
            yield (x, 0.05)
        raise RuntimeError("the source broke")

    serial = _instance(env, "serial")
    with pytest.raises(RuntimeError, match="the source broke"):
        list(manager.map("serial", "slow", items(), chunk_size=8, max_in_flight=64))
    # 40 calls were sent to a one-worker pool taking 50 ms each: most were still queued. They never start.
    ran = len(serial.ran)
    time.sleep(0.5)  # deliberate: ten 50 ms calls' time for a call that should not start to start
    assert len(serial.ran) <= ran + 1, (ran, len(serial.ran))  # at most the one running when it broke
    assert len(serial.ran) < 40
    assert manager.call_service_sync("serial", "square", (3,)) == 9


def test_ten_million_items_stream_through_a_bounded_window(manager: ServiceManager) -> None:
    produced = 0

    def items() -> Iterator[int]:
        nonlocal produced
        for x in range(10_000_000):
            produced += 1
            yield x

    chunk, window = 256, 1024
    consumed = 0
    worst = 0
    with manager.map("work", "square", items(), chunk_size=chunk, max_in_flight=window) as results:
        for x, result in enumerate(results):
            assert result == x * x
            consumed += 1
            worst = max(worst, produced - consumed)
            if consumed == 30_000:
                break
    # Never more than the window plus the chunk being read ahead of the consumer.
    assert worst <= window + chunk, worst
    stopped_at = produced
    time.sleep(0.1)  # deliberate: time for a read-ahead that must not happen
    assert produced == stopped_at  # closed: the generator is not read any further


def test_closing_early_cancels_the_calls_not_started(env: ServiceEnvironment, manager: ServiceManager) -> None:
    serial = _instance(env, "serial")
    results = manager.map("serial", "slow", [(x, 0.05) for x in range(200)], chunk_size=16, max_in_flight=64)
    assert next(results) == 0
    results.close()
    ran = len(serial.ran)
    time.sleep(0.5)  # deliberate: ten 50 ms calls' time for a call that should not start to start
    assert len(serial.ran) <= ran + 1, (ran, len(serial.ran))
    assert len(serial.ran) < 64
    with pytest.raises(StopIteration):
        next(results)


def test_closing_inside_a_for_loop_ends_the_loop(manager: ServiceManager) -> None:
    got = []
    results = manager.map("work", "square", [(x,) for x in range(1000)], chunk_size=100)
    for item in results:
        got.append(item)
        if len(got) == 5:
            results.close()
    assert got == [0, 1, 4, 9, 16]  # not the rest of the chunk the loop was reading
    with pytest.raises(StopIteration):
        next(results)


def test_each_item_has_its_own_deadline_from_when_it_was_sent(manager: ServiceManager) -> None:
    started = time.monotonic()
    results = list(
        manager.map(
            "work",
            "slow",
            [(x, 0.6 if x == 2 else 0.0) for x in range(4)],
            timeout=0.3,
            return_exceptions=True,
            chunk_size=1,
        )
    )
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ServiceTimeoutError), results
    assert time.monotonic() - started < 5  # each waited its own 0.3 s, not a multiple of the whole map


def test_client_middleware_observes_every_call(env: ServiceEnvironment) -> None:
    seen: list[tuple[str, bool]] = []

    class Observer(ServiceMiddleware):
        def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
            seen.append((request.method_name, response.success))

    env.add_middleware(Observer())
    with ServiceManager(env) as manager:
        assert (
            list(manager.map("work", "fail_on", [(x, 4) for x in range(1, 11)], return_exceptions=True))[3] is not None
        )
    assert len(seen) == 10
    assert [ok for _, ok in seen].count(False) == 2


class FailsFirstAttempt(ServiceMiddleware):
    """Answers the first attempt of every call with a runtime error whose MAY_HAVE_RUN is ``may_have_run``."""

    def __init__(self, may_have_run: bool) -> None:
        self.may_have_run = may_have_run
        self.attempts: dict[str, int] = {}

    def before_call(self, request: ServiceRequest) -> ServiceResponse | None:
        count = self.attempts[request.request_id] = self.attempts.get(request.request_id, 0) + 1
        if count > 1:
            return None
        error = ServiceUnavailableError("never sent" if not self.may_have_run else "link lost")
        response = ServiceResponse.from_exception(request.request_id, error, origin="runtime")
        response.metadata[MAY_HAVE_RUN] = self.may_have_run
        return response


@pytest.mark.parametrize("may_have_run", [False, True])
def test_retries_follow_the_single_call_rules_per_item(may_have_run: bool) -> None:
    # A retry budget of the test's own that cannot run out (the budget is the process's, per service and
    # settings: with the default settings, the other tests' retries to "work" would spend it).
    service_call = {"max_retries": 2, "retry_interval": 0.01, "retry_budget_min_per_second": 1000.0}
    config = {**QUIET, "service_call": service_call}
    environment = ServiceEnvironment("map-retry", config)
    environment.register_service("work", Work)
    middleware = FailsFirstAttempt(may_have_run)
    environment.add_middleware(middleware)
    with environment, ServiceManager(environment) as manager:
        results = list(manager.map("work", "square", range(20), return_exceptions=True, chunk_size=8))
        ran = list(_instance(environment, "work").ran)
    if not may_have_run:  # provably never ran: retried, every item gets its answer
        assert results == [x * x for x in range(20)]
        assert sorted(middleware.attempts.values()) == [2] * 20
        assert sorted(ran) == list(range(20))
    else:  # may have run and not idempotent: never sent again
        assert all(isinstance(r, ServiceUnavailableError) and r.may_have_run for r in results), results  # type: ignore[attr-defined]
        assert sorted(middleware.attempts.values()) == [1] * 20
        assert ran == []


def test_closing_the_manager_abandons_a_map_in_flight(env: ServiceEnvironment) -> None:
    manager = ServiceManager(env)
    serial = _instance(env, "serial")
    results = manager.map("serial", "slow", [(x, 0.2) for x in range(8)], chunk_size=8, return_exceptions=True)
    wait_for(lambda: serial.ran, timeout=5, what="the map's first call to run")
    manager.close()
    outcomes = list(results)
    assert len(outcomes) == 8
    assert any(isinstance(o, ServiceStoppedError) and o.may_have_run for o in outcomes), outcomes  # type: ignore[attr-defined]


def test_amap_yields_results_and_cancelling_its_consumer_cancels_the_calls(
    env: ServiceEnvironment, manager: ServiceManager
) -> None:
    async def collect(ordered: bool) -> list[Any]:
        return [x async for x in manager.amap("work", "square", range(700), ordered=ordered, chunk_size=64)]

    assert asyncio.run(collect(True)) == [x * x for x in range(700)]
    assert sorted(asyncio.run(collect(False))) == sorted(x * x for x in range(700))

    serial = _instance(env, "serial")

    async def consume_then_cancel() -> int:
        got = 0

        async def consume() -> None:
            nonlocal got
            async for _ in manager.amap(
                "serial", "slow", [(x, 0.05) for x in range(200)], chunk_size=16, max_in_flight=64
            ):
                got += 1

        task = asyncio.create_task(consume())
        while got < 1:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    asyncio.run(consume_then_cancel())
    ran = len(serial.ran)
    time.sleep(0.5)  # deliberate: ten 50 ms calls' time for a call that should not start to start
    assert len(serial.ran) <= ran + 1, (ran, len(serial.ran))
    assert len(serial.ran) < 64

    async def failing() -> None:
        async for _ in manager.amap("work", "fail_on", [(x, 2) for x in range(1, 5)]):
            pass

    with pytest.raises(ValueError, match="item 2 is bad"):
        asyncio.run(failing())


def test_a_chunk_runs_with_the_same_outcomes_on_the_plain_loop_and_the_general_one(env: ServiceEnvironment) -> None:
    # run_many takes a shorter loop for the common chunk (no keyword arguments, no serial lock); it
    # must give exactly the outcomes of the general loop: results, each failure typed, a non-tuple
    # entry failing its item only, the items past the deadline not started.
    task = env.get_task("work")
    assert task is not None
    chunk = ((1, 2), (3, "x"), [4, 5], (5, 6))

    def run(kwargs: dict[str, Any], deadline: float) -> tuple[list[Any], dict[int, str]]:
        request = ServiceRequest("chunk-1", "work", "add", (), kwargs, "", deadline, {})
        outcome = task.run_many(request, chunk, 1.0)  # type: ignore[arg-type]
        assert outcome is not None
        results, failures = outcome
        return results, {index: f"{r.error_type}: {r.error}" for index, r in failures.items()}

    plain = run({}, time.time() + 30)
    assert plain[0] == [3, None, None, 11]
    assert plain[1][1].startswith("TypeError: unsupported operand")
    assert plain[1][2] == "TypeError: item 2 of a chunk carries list arguments, not a tuple"
    assert set(plain[1]) == {1, 2}
    assert run({"scale": 1}, time.time() + 30) == plain  # the general loop: the same outcomes
    # Past its deadline nothing starts, on either loop.
    assert run({}, time.time() - 1) == ([], {}) == run({"scale": 1}, time.time() - 1)


def test_a_chunk_of_single_arguments_runs_each_argument_whole_on_either_loop(env: ServiceEnvironment) -> None:
    # ``single``: each entry is a call's one argument (a list or a tuple-like value stays whole); the
    # serial task takes the general loop, the other the plain one, with the same outcomes.
    for name in ("work", "serial"):
        task = env.get_task(name)
        assert task is not None
        request = ServiceRequest("chunk-1", name, "square", (), {}, "", time.time() + 30, {})
        outcome = task.run_many(request, (2, "x", 3), 1.0, single=True)
        assert outcome is not None
        results, failures = outcome
        assert results == [4, None, 9] and list(failures) == [1], name
        assert failures[1].error_type == "TypeError", name


@pytest.mark.parametrize("kind", ["local", "process"])
def test_closing_the_manager_under_a_map_ends_it_sends_nothing_more_and_leaves_no_thread(kind: str) -> None:
    """Before: the map's consumer, filling its window, sent the next chunk through the closed manager,
    which started a new timer thread for it that nothing ever stopped (a thread, and the manager, per
    map closed under way); the chunk's calls ran."""
    environment = ServiceEnvironment("map-close", QUIET)
    environment.register_service("work", ServiceFactory("work", Work), kind=kind)
    with environment:
        manager = ServiceManager(environment)
        outcome: list[BaseException] = []
        started = threading.Event()

        def consume() -> None:
            try:
                for _ in manager.map("work", "slow", ((i, 0.002) for i in range(1_000_000)), timeout=30):
                    started.set()
            except BaseException as exc:  # noqa: BLE001 - what the consumer gets is the subject
                outcome.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert started.wait(10)
        time.sleep(0.2)  # deliberate: the map under way, chunks in flight
        manager.close()
        consumer.join(10)
        assert not consumer.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], ServiceStoppedError), outcome
        assert not [t.name for t in threading.enumerate() if t.name.startswith("kservice-manager-timer")]
        # Nothing is sent after the close: what ran settles and stays.
        with ServiceManager(environment) as other:
            ran = other.call_service_sync("work", "count")
            time.sleep(0.3)  # deliberate: a chunk sent after the close would run meanwhile
            assert other.call_service_sync("work", "count") == ran
