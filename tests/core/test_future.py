"""CallFuture: a concurrent.futures.Future whose condition is created only when something waits."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, InvalidStateError, as_completed, wait

import pytest
from kservice import ServiceEnvironment
from kservice._future import CallFuture
from kservice.testing import wait_for


def test_completing_an_unobserved_future_builds_no_condition() -> None:
    future: CallFuture[int] = CallFuture()
    future.set_result(3)
    assert future.done() and future.result() == 3
    assert future._lazy_condition is None and future._lazy_waiters is None and future._lazy_callbacks is None


def test_a_waiting_thread_is_woken_by_the_result() -> None:
    future: CallFuture[str] = CallFuture()
    timer = threading.Timer(0.05, future.set_result, ("late",))
    timer.start()
    assert future.result(timeout=5) == "late"
    timer.join()
    assert future._lazy_condition is not None  # the waiter needed one


def test_result_times_out_while_pending() -> None:
    future: CallFuture[int] = CallFuture()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)


def test_exceptions_and_invalid_states_behave_as_the_standard_future() -> None:
    future: CallFuture[int] = CallFuture()
    future.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        future.result()
    assert isinstance(future.exception(), KeyError)
    with pytest.raises(InvalidStateError):
        future.set_result(1)

    cancelled: CallFuture[int] = CallFuture()
    assert cancelled.cancel() and cancelled.cancelled() and cancelled.done()
    with pytest.raises(CancelledError):
        cancelled.result()
    with pytest.raises(InvalidStateError):
        cancelled.set_result(1)


def test_callbacks_wait_as_completed_and_asyncio_work() -> None:
    futures: list[CallFuture[int]] = [CallFuture() for _ in range(4)]
    seen: list[int] = []
    futures[0].add_done_callback(lambda f: seen.append(f.result()))
    assert isinstance(futures[0], Future)

    def complete() -> None:
        for index, future in enumerate(futures):
            future.set_result(index)

    threading.Timer(0.05, complete).start()
    done, _ = wait(futures[:2], timeout=5, return_when=FIRST_COMPLETED)
    assert done
    assert sorted(f.result() for f in as_completed(futures, timeout=5)) == [0, 1, 2, 3]
    assert seen == [0]

    async def awaited() -> int:
        future: CallFuture[int] = CallFuture()
        threading.Timer(0.02, future.set_result, (7,)).start()
        return await asyncio.wrap_future(future)

    assert asyncio.run(awaited()) == 7


def test_completion_racing_with_waiters_never_loses_a_wakeup() -> None:
    """A completer thread and a waiter thread race on each future; every wait returns its result."""
    count = 3000
    futures: list[CallFuture[int]] = [CallFuture() for _ in range(count)]
    results: list[int] = []
    start = threading.Barrier(2)

    def complete() -> None:
        start.wait()
        for index, future in enumerate(futures):
            future.set_result(index)

    def collect() -> None:
        start.wait()
        results.extend(future.result(timeout=10) for future in futures)

    threads = [threading.Thread(target=complete), threading.Thread(target=collect)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == list(range(count))


def test_call_service_async_returns_a_call_future() -> None:
    class Echo:
        def echo(self, value: int) -> int:
            return value

    with ServiceEnvironment("future-test") as environment:
        environment.register_service("echo", Echo)
        future = environment.manager().call_service_async("echo", "echo", (5,))
        assert isinstance(future, CallFuture) and isinstance(future, Future)
        assert future.result(timeout=10) == 5


def test_finished_calls_keep_one_object_for_the_garbage_collector_each() -> None:
    """A finished call drops its request: a caller holding thousands of futures holds only them."""
    import gc

    class Echo:
        def echo(self, value: object) -> object:
            return value

    with ServiceEnvironment("future-gc-test") as environment:
        environment.register_service("echo", Echo)
        manager = environment.manager()
        futures = [manager.call_service_async("echo", "echo", ("x",)) for _ in range(2000)]
        # Polled, not waited on: a future someone waits on before it finishes builds its condition,
        # and that is what the caller asked for, not what a finished call keeps.
        wait_for(lambda: all(f.done() for f in futures), timeout=30, what="the 2,000 calls to finish")
        assert all(f.result(0) == "x" for f in futures)
        # Counted per future, not as a heap delta (other threads allocate meanwhile): what each
        # finished future still references and the collector tracks is shared by all of them
        # (the manager, the route), never a request, its arguments or its metadata.
        per_call = {
            id(referent) for future in futures for referent in gc.get_referents(future) if gc.is_tracked(referent)
        }
        assert len(per_call) < 20, len(per_call)
        assert all(gc.is_tracked(future) for future in futures[:10])


# --------------------------------------------------------------------------- the CPython internals it relies on


def test_this_pythons_future_has_the_internals_call_future_relies_on() -> None:
    from concurrent.futures import Future, _base

    from kservice._future import check_future_internals

    check_future_internals(Future, _base)  # also run when kservice is imported


def test_a_future_with_another_attribute_fails_the_check_loudly() -> None:
    from concurrent.futures import Future, _base

    from kservice._future import check_future_internals

    class NewerFuture(Future):  # type: ignore[type-arg]
        def __init__(self) -> None:
            super().__init__()
            self._cancel_message = None  # what a future Python release might add

    with pytest.raises(ImportError, match=r"CallFuture does not support.*_cancel_message"):
        check_future_internals(NewerFuture, _base)


def test_a_wait_helper_using_another_private_name_fails_the_check_loudly() -> None:
    import types
    from concurrent.futures import Future, _base

    from kservice._future import check_future_internals

    newer_base = types.ModuleType(_base.__name__)
    newer_base.__dict__.update(vars(_base))

    def wait(fs, timeout=None):  # type: ignore[no-untyped-def]
        return [f._loop for f in fs]  # a private attribute CallFuture does not have

    newer_base.wait = wait  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match=r"private names \['_loop'\]"):
        check_future_internals(Future, newer_base)


@pytest.mark.parametrize("timeout", [1e10, 1e300, float("inf")])
@pytest.mark.parametrize("wait", ["result", "exception"])
def test_a_wait_longer_than_a_wait_can_take_waits_without_limit(timeout: float, wait: str) -> None:
    """An oversized timeout (``threading.TIMEOUT_MAX`` is about 292 years) means "no limit", as None does;
    the standard Future raises OverflowError from inside the wait instead."""
    future: CallFuture[str] = CallFuture()
    timer = threading.Timer(0.05, future.set_result, ("late",))
    timer.start()
    answer = getattr(future, wait)(timeout)
    timer.join()
    assert answer == ("late" if wait == "result" else None)


@pytest.mark.parametrize(
    ("timeout", "error", "named"),
    [(float("nan"), ValueError, "nan"), (True, TypeError, "bool"), ("1", TypeError, "str")],
)
@pytest.mark.parametrize("done", [False, True])
def test_a_wait_given_no_number_of_seconds_is_refused_naming_it(
    timeout: object, error: type[Exception], named: str, done: bool
) -> None:
    """NaN used to time out at once, True waited a second and a str was ignored once the call was done."""
    future: CallFuture[int] = CallFuture()
    if done:
        future.set_result(1)
    for read in (future.result, future.exception):
        with pytest.raises(error, match=named):
            read(timeout)  # type: ignore[arg-type]
    assert not done or future.result() == 1
