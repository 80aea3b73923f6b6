"""A client middleware hook that hangs (a log shipper whose endpoint stopped answering): async calls still end by their deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import kservice
import pytest
from kservice import (
    MAY_HAVE_RUN,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceResponse,
    ServiceTimeoutError,
    ServiceUnavailableError,
)

from tests.core.services import KeyValue, Recorder

pytestmark = pytest.mark.timeout(60)


class HangsOn(ServiceMiddleware):
    """``after_call`` blocks, for the calls of ``method``, until the test lets it go (a hook waiting on a dead endpoint)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.release = threading.Event()
        self.entered = threading.Event()

    def after_call(self, response: Any, request: Any) -> Any:
        if request.method_name == self.method:
            self.entered.set()
            self.release.wait(30)
        return None


@pytest.fixture(params=["local", "process"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def _environment(name: str, hook: ServiceMiddleware, kind: str, **services: Any) -> ServiceEnvironment:
    """An environment (the default configuration: retries on) hosting ``services`` (name: class or factory) of
    ``kind``, with ``hook`` as middleware."""
    environment = ServiceEnvironment(name)
    for service_name, target in services.items():
        factory = target if isinstance(target, ServiceFactory) else ServiceFactory(service_name, target, ())
        environment.register_service(service_name, factory, kind=kind)
    environment.add_middleware(hook)
    return environment


def _ended_within(future: Any, seconds: float) -> BaseException | None:
    began = time.monotonic()
    error = future.exception(timeout=seconds + 5)
    assert time.monotonic() - began < seconds, f"the future ended {time.monotonic() - began:.2f} s after it was asked"
    return error  # type: ignore[no-any-return]


def _held_then_ended_within(hook: Any, future: Any, seconds: float) -> BaseException | None:
    """Wait for ``hook`` to hold ``future``'s call, then for the future to end within ``seconds``; its exception."""
    assert hook.entered.wait(5)
    return _ended_within(future, seconds)


def test_an_after_hook_hanging_on_an_answer_leaves_the_call_its_timeout_error_at_its_deadline(kind: str) -> None:
    hook = HangsOn("get")
    environment = _environment("hung-hooks", hook, kind, kv=ServiceFactory("kv", dict, ({"a": 1},)))
    try:
        with environment, ServiceManager(environment) as manager:
            # Before: the answer's after-hook held the call's claim, and the manager's timer looked at it
            # every 5 ms for good: the future never completed.
            began = time.monotonic()
            hung = manager.call_service_async("kv", "get", ("a",), timeout=1.0)
            error = _held_then_ended_within(hook, hung, 4)
            assert isinstance(error, ServiceTimeoutError), error
            assert time.monotonic() - began >= 1.0
            assert "HangsOn.after_call" in str(error), error
            assert error.may_have_run is True
            # An async call answered after it: in process, by another worker thread, so its result; over
            # mmap its answer waits behind the hook in the one response thread, so its timeout at its
            # deadline (the warning says so). Either way, no later than its deadline.
            behind = manager.call_service_async("kv", "copy", timeout=1.0)
            if kind == "local":
                assert behind.result(timeout=3) == {"a": 1}
            else:
                assert isinstance(_ended_within(behind, 3), ServiceTimeoutError)
            # The service keeps serving: a sync call, whose answer its own thread takes.
            assert manager.call_service_sync("kv", "copy", timeout=5) == {"a": 1}
            hook.release.set()
    finally:
        hook.release.set()


def test_after_hooks_hanging_on_timeouts_do_not_stop_the_other_calls_deadlines() -> None:
    hook = HangsOn("sleepy")

    class Slow:
        def sleepy(self) -> None:
            time.sleep(1.2)

        def quick(self) -> int:
            return 1

    environment = _environment("hung-timeouts", hook, "local", slow=Slow)
    try:
        with environment, ServiceManager(environment) as manager:
            # The first call times out; its after-hook, run for the timeout, hangs. Before: in the
            # manager's timer thread, so no other call ended at its deadline any more.
            first = manager.call_service_async("slow", "sleepy", timeout=0.3)
            assert hook.entered.wait(5)
            second = manager.call_service_async("slow", "sleepy", timeout=0.5)
            assert isinstance(_ended_within(second, 3), ServiceTimeoutError)
            assert isinstance(_ended_within(first, 3), ServiceTimeoutError)
            assert manager.call_service_sync("slow", "quick", timeout=5) == 1
            hook.release.set()
    finally:
        hook.release.set()


def test_a_maps_timeouts_meeting_a_hung_hook_do_not_stop_the_other_calls_deadlines(kind: str) -> None:
    hook = HangsOn("sleep")
    environment = _environment("hung-map", hook, kind, kv=KeyValue, rec=Recorder)
    try:
        with environment, ServiceManager(environment) as manager:
            # A map whose calls time out: their after-hooks, run for the timeouts, hang. Before: in
            # the manager's timer thread, so no later call of the manager ended at its deadline.
            results = manager.map("kv", "sleep", [(1.2,)] * 2, timeout=0.3)
            outcome: list[BaseException] = []

            def consume() -> None:
                try:
                    list(results)
                except ServiceTimeoutError as exc:
                    outcome.append(exc)

            consumer = threading.Thread(target=consume, daemon=True)
            consumer.start()
            assert hook.entered.wait(5)
            late = manager.call_service_async("rec", "work", ("late", 1.2), timeout=0.3)
            assert isinstance(_ended_within(late, 3), ServiceTimeoutError)
            assert manager.call_service_sync("kv", "get", ("a",), timeout=5) is None
            # The map's own consumer: its calls' timeouts, by the deadline and the hooks' grace, the
            # hook still running (before: it waited for the hook as long as it hung).
            consumer.join(3)
            assert not consumer.is_alive()
            assert len(outcome) == 1 and "HangsOn.after_call" in str(outcome[0]), outcome
            assert "of a map" in str(outcome[0])
            hook.release.set()
    finally:
        hook.release.set()


class HangsOnBatches(ServiceMiddleware):
    """A batch-aware observer (the map's chunks travel compact) whose ``after_batch`` blocks until let go."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def after_batch(self, batch: Any) -> None:
        self.entered.set()
        self.release.wait(30)


def test_a_map_whose_batch_hook_hangs_on_its_answer_ends_by_its_deadline() -> None:
    hook = HangsOnBatches()
    environment = _environment("hung-batch", hook, "process", kv=KeyValue)
    try:
        with environment, ServiceManager(environment) as manager:
            began = time.monotonic()
            # The chunk is answered at once; its after_batch, in the response thread, hangs.
            with pytest.raises(ServiceTimeoutError, match=r"HangsOnBatches\.after_batch") as raised:
                list(manager.map("kv", "get", [("a",)] * 4, timeout=0.5))
            assert time.monotonic() - began < 3
            assert raised.value.may_have_run is True
            assert hook.entered.is_set()
            hook.release.set()
    finally:
        hook.release.set()


def test_an_amap_and_an_acall_held_by_a_hung_hook_end_by_their_deadline() -> None:
    import asyncio

    hook = HangsOn("get")
    environment = _environment("hung-async", hook, "process", kv=KeyValue)

    async def main(manager: ServiceManager) -> tuple[BaseException, BaseException]:
        with pytest.raises(ServiceTimeoutError) as by_acall:
            await manager.acall("kv", "get", ("a",), timeout=0.5)
        with pytest.raises(ServiceTimeoutError) as by_amap:
            async for _ in manager.amap("kv", "get", [("a",)] * 3, timeout=0.5):
                pass
        return by_acall.value, by_amap.value

    try:
        with environment, ServiceManager(environment) as manager:
            began = time.monotonic()
            # The event loop is never blocked, and each call form ends at its deadline and grace.
            acall_error, amap_error = asyncio.run(asyncio.wait_for(main(manager), 10))
            assert time.monotonic() - began < 4
            assert "HangsOn.after_call" in str(acall_error), acall_error
            assert "HangsOn.after_call" in str(amap_error) and "of a map" in str(amap_error), amap_error
            hook.release.set()
    finally:
        hook.release.set()


class RetryOnce:
    """A plugin whose policy retries every failure once, at once (the retry runs in one of the timer's workers)."""

    def should_retry(self, request: Any, response: Any, attempt: int, idempotent: bool) -> float | None:
        return 0.01 if attempt == 0 and request.service_name == "flaky" else None

    @kservice.hookimpl
    def kservice_retry_policy(self, service_name: str, options: Any) -> Any:
        return self if service_name == "flaky" else None


def test_hooks_hung_on_more_timeouts_than_the_timers_workers_do_not_hold_up_another_calls_retry() -> None:
    from tests.policies.services import Flaky

    hook = HangsOn("sleepy")

    class Slow:
        def sleepy(self) -> None:
            time.sleep(1.2)

    flaky = Flaky()
    environment = _environment("hung-workers", hook, "local", slow=Slow, flaky=ServiceFactory("flaky", lambda: flaky))
    plugins = kservice.get_plugin_manager()
    plugins.register(RetryOnce(), name="test-retry-once")
    try:
        with environment, ServiceManager(environment) as manager:
            # Six timeouts whose after-hooks hang: more than the timer's four workers.
            held = [manager.call_service_async("slow", "sleepy", timeout=0.2) for _ in range(6)]
            assert hook.entered.wait(5)
            time.sleep(1.5)  # the workers have been stuck longer than _Workers.STUCK_AFTER
            # A retry runs in a worker too. Before: it waited behind the stuck ones to its deadline.
            began = time.monotonic()
            error = manager.call_service_async("flaky", "fail", timeout=3).exception(timeout=10)
            assert isinstance(error, ConnectionError), error
            assert flaky.calls["fail"] == 2, flaky.calls  # retried once, in time
            assert time.monotonic() - began < 2.5
            for future in held:
                assert isinstance(_ended_within(future, 3), ServiceTimeoutError)
            hook.release.set()
    finally:
        hook.release.set()
        plugins.unregister(name="test-retry-once")


class HangsThenRefuses(ServiceMiddleware):
    """``after_call`` of ``work`` blocks until let go, then turns the answer into a refusal that says the call
    never ran: what the default retry policy re-sends, if the call were still waiting for it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def after_call(self, response: Any, request: Any) -> Any:
        if request.method_name != "work":
            return None
        self.entered.set()
        self.release.wait(30)
        refused = ServiceResponse.from_exception(
            request.request_id, ServiceUnavailableError("refused on purpose; nothing was sent"), origin="runtime"
        )
        refused.metadata[MAY_HAVE_RUN] = False
        return refused


@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_call_held_by_a_hook_with_retries_on_ends_by_its_deadline_and_runs_once(kind: str) -> None:
    hook = HangsThenRefuses()
    environment = _environment("hung-once", hook, kind, rec=Recorder)  # the default configuration: retries on
    try:
        with environment, ServiceManager(environment) as manager:
            began = time.monotonic()
            held = manager.call_service_async("rec", "work", ("once",), timeout=0.5)
            error = _held_then_ended_within(hook, held, 3)
            assert isinstance(error, ServiceTimeoutError) and error.may_have_run is True, error
            assert time.monotonic() - began < 0.5 + 1.0  # its deadline, the hooks' grace and some slack
            # The hook returns now, with an answer the retry policy would re-send: the call is over, so
            # nothing is sent again.
            hook.release.set()
            time.sleep(0.5)
            ran = manager.call_service_sync("rec", "ran", timeout=5)
            assert ran.count("start once") == 1, ran
    finally:
        hook.release.set()
