"""Workers never die, method names are checked, per-name state is bounded, overload never blocks.

Each test is a reproduction: it failed before the fix (a caller waiting its
whole timeout, a wedged pool reported healthy, a poisoned status, a stalled
submitter) and asserts the error type, a bounded time to it, and that the
service serves its next call with its state intact.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import pytest
from kservice import (
    LocalServiceTask,
    MethodNotFoundError,
    ServiceCallError,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceOverloadedError,
    ServiceRequest,
    ServiceResponse,
    ServiceTimeoutError,
    ServiceUnavailableError,
    _task,
)
from kservice._context import _current_request
from kservice.testing import wait_for

from tests.core.faulty import Counter, ExitsInAsyncSetup, ExitsInSetup, InterruptedInAsyncCleanup, Raisers

#: the task's cap on remembered method names
MAX_TRACKED_METHODS: int = getattr(_task, "MAX_TRACKED_METHODS", 1024)

pytestmark = pytest.mark.timeout(60)

#: Errors must reach the caller, not be retried away; no health rounds unless a test asks.
CONFIG: dict[str, Any] = {
    "service": {"local": {"max_workers": 4}},
    "service_call": {"max_retries": 0},
    "health": {"enabled": False},
    "breaker": {"enabled": False},  # overload must reach the caller, not open a breaker
}

THREAD_KILLERS = [
    ("raise_system_exit", "SystemExit"),
    ("raise_keyboard_interrupt", "KeyboardInterrupt"),
    ("raise_generator_exit", "GeneratorExit"),
    ("raise_unprintable", "tests.core.faulty.UnprintableError"),
    ("raise_unprintable_exit", "tests.core.faulty.UnprintableExit"),
]


def _worker_threads(service: str) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(f"kservice-{service}-") and t.name[len(service) + 10 :].isdigit()
    ]


@pytest.mark.parametrize(("method", "remote_type"), THREAD_KILLERS)
def test_a_method_raising_what_kills_threads_is_an_error_response_and_the_pool_stays_whole(
    method: str, remote_type: str
) -> None:
    with ServiceEnvironment("faults", CONFIG) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        manager.call_service_sync("counter", "add", (5,))
        instance = task.service
        # More such calls than workers, from several threads at once: before, each killed a worker
        # and its caller waited its whole timeout; the fifth call then found no worker at all.
        errors: list[BaseException] = []
        took: list[float] = []

        def call() -> None:
            started = time.monotonic()
            try:
                manager.call_service_sync("counter", method, timeout=5)
            except BaseException as exc:  # noqa: BLE001 - what the caller gets is the subject
                errors.append(exc)
            took.append(time.monotonic() - started)

        callers = [threading.Thread(target=call) for _ in range(6)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        assert len(errors) == 6
        for error in errors:
            assert isinstance(error, ServiceCallError), repr(error)
            assert error.remote_type == remote_type
        assert max(took) < 3.0, f"a caller waited {max(took):.1f}s for an answer"
        status = task.get_service_status()
        assert (status.healthy, status.workers_alive, status.in_flight) == (True, 4, 0), status
        assert len(_worker_threads("counter")) == 4
        # The instance and its state are intact, and the service serves the next calls.
        assert task.service is instance
        assert manager.call_service_sync("counter", "add", (1,)) == 6
        assert [manager.call_service_sync("counter", "echo", (i,)) for i in range(8)] == list(range(8))


@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_coroutine_method_or_a_generator_raising_what_kills_threads_is_an_error_and_the_task_serves_on(
    kind: str,
) -> None:
    """The coroutine and generator twins of the test above, in-process and in a ``process`` host.

    Before: an ``async def`` method or async generator raising SystemExit or KeyboardInterrupt ended
    the task's event loop (asyncio re-raises both out of the loop), so that call and every later
    coroutine call or async stream of the service waited out its timeout; a generator raising any
    of them ended its stream with a timeout instead of the error.
    """
    with ServiceEnvironment("faults", CONFIG) as env:
        env.register_service("raisers", ServiceFactory("raisers", Raisers), kind=kind)
        manager = env.manager()
        for _, remote_type in THREAD_KILLERS:
            started = time.monotonic()
            with pytest.raises(ServiceCallError) as raised:
                manager.call_service_async("raisers", "araise", (remote_type,), timeout=5).result(10)
            assert raised.value.remote_type == remote_type
            for method in ("stream_raise", "astream_raise"):
                stream = manager.stream("raisers", method, (remote_type,), timeout=5)
                assert next(stream) == "before"
                with pytest.raises(ServiceCallError) as raised:
                    next(stream)
                assert raised.value.remote_type == remote_type, method
            assert time.monotonic() - started < 3.0, f"{remote_type}: a caller waited for its timeout"
            # The event loop serves on: a coroutine call and an async stream right after.
            assert manager.call_service_sync("raisers", "aecho", (remote_type,), timeout=5) == remote_type
            assert list(manager.stream("raisers", "acount", (3,), timeout=5)) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["local", "process"])
def test_with_the_default_configuration_a_coroutine_raising_system_exit_runs_once_and_ends_at_once(kind: str) -> None:
    """Retries on (the default): the call's SystemExit is the method's own error, never re-sent, well before its
    deadline. Before: the call waited out its deadline (ServiceTimeoutError), and so did the next one."""
    with ServiceEnvironment("faults-default") as env:
        env.register_service("raisers", ServiceFactory("raisers", Raisers), kind=kind)
        with ServiceManager(env) as manager:
            for attempt in range(2):
                began = time.monotonic()
                with pytest.raises(ServiceCallError) as raised:
                    manager.call_service_async("raisers", "araise", ("SystemExit",), timeout=5).result(10)
                assert raised.value.remote_type == "SystemExit"
                assert time.monotonic() - began < 3.0, "the call waited for its deadline"
                assert manager.call_service_sync("raisers", "ran", timeout=5) == attempt + 1, "it ran more than once"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_setup_or_cleanup_raising_what_ends_threads_fails_the_start_or_ends_the_stop_at_once(kind: str) -> None:
    """Before: an ``async def setup()`` raising SystemExit ended the task's event loop, and the start
    waited for it for good in-process (60 s, ``mmap.start_timeout``, in a host); a plain ``setup()``
    raising it escaped ``start()`` and left the task ``starting`` for good; an ``async def cleanup()``
    raising KeyboardInterrupt held the stop 30 s."""
    for cls in (ExitsInSetup, ExitsInAsyncSetup):
        environment = ServiceEnvironment("faults", CONFIG)
        task = environment.register_service("x", ServiceFactory("x", cls), kind=kind)
        began = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match=r"failed to start: .*SystemExit: .*setup gave up"):
            environment.start()
        assert time.monotonic() - began < 10, f"{cls.__name__}: the start took {time.monotonic() - began:.1f} s"
        assert task.state == "failed", cls
        environment.stop()
    environment = ServiceEnvironment("faults", CONFIG)
    environment.register_service("x", ServiceFactory("x", InterruptedInAsyncCleanup), kind=kind)
    with environment:
        with ServiceManager(environment) as manager:
            assert manager.call_service_sync("x", "echo", ("up",)) == "up"
        began = time.monotonic()
    assert time.monotonic() - began < 10, f"the stop took {time.monotonic() - began:.1f} s"


def test_an_unprintable_exception_is_described_by_its_type() -> None:
    with ServiceEnvironment("faults", CONFIG) as env:
        env.register_service("counter", Counter)
        manager = env.manager()
        with pytest.raises(ServiceCallError) as raised:
            manager.call_service_sync("counter", "raise_unprintable", timeout=5)
        assert "UnprintableError could not be formatted: its __str__ raised RuntimeError" in str(raised.value)
        assert "Traceback" in raised.value.remote_traceback
        assert manager.call_service_sync("counter", "add", (2,)) == 2


def test_from_exception_never_raises_even_when_the_message_raises_a_base_exception() -> None:
    from tests.core.faulty import UnprintableExit

    response = ServiceResponse.from_exception("r1", UnprintableExit(1), origin="service")
    assert response.error_type == "tests.core.faulty.UnprintableExit"
    assert "could not be formatted: its __str__ raised KeyboardInterrupt" in (response.error or "")
    assert "UnprintableExit" in response.remote_traceback


def _kill_thread(thread: threading.Thread) -> None:
    """Raise SystemExit in ``thread`` at its next bytecode: a death no request caused."""
    assert thread.ident is not None
    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc
    assert set_async(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_worker_that_dies_anyway_is_replaced_and_counted() -> None:
    config = {**CONFIG, "service": {"local": {"max_workers": 2}}}
    with ServiceEnvironment("faults", config) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        assert manager.call_service_sync("counter", "add", (7,)) == 7
        for victim in _worker_threads("counter"):
            _kill_thread(victim)  # idle in the queue's get(): it dies when it next takes a request
        # The request a dying worker took is lost with it (its caller times out); the others are answered.
        outcomes = [manager.call_service_async("counter", "sleep", (0.05,), timeout=1.5) for _ in range(6)]
        answered = 0
        for future in outcomes:
            try:
                assert future.result(5) == 0.05
                answered += 1
            except ServiceTimeoutError:
                pass
        assert answered >= 4
        wait_for(
            lambda: task.get_service_status().workers_replaced >= 2, timeout=5, what="both dead workers to be replaced"
        )
        status = task.get_service_status()
        assert (status.workers_replaced, status.workers_alive, status.healthy) == (2, 2, True), status
        assert manager.call_service_sync("counter", "add", (1,)) == 8


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_workers_make_the_task_unhealthy_and_recovery_replaces_them_keeping_the_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = {**CONFIG, "service": {"local": {"max_workers": 2}}}
    with ServiceEnvironment("faults", config) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        assert manager.call_service_sync("counter", "add", (3,)) == 3
        instance = task.service
        real_start = threading.Thread.start

        def no_more_threads(thread: threading.Thread) -> None:
            if thread.name.startswith("kservice-counter-"):
                raise RuntimeError("can't start new thread")
            real_start(thread)

        # The boundary we do not own: the system refusing new threads, so the pool cannot replace its dead.
        monkeypatch.setattr(threading.Thread, "start", no_more_threads)
        victim = _worker_threads("counter")[0]
        _kill_thread(victim)
        # Two slow calls at once: each worker must take one, the victim included.
        manager.call_service_async("counter", "sleep", (0.3,), timeout=1.0)
        manager.call_service_async("counter", "sleep", (0.3,), timeout=1.0)
        victim.join(5)
        assert not victim.is_alive()
        status = task.get_service_status()
        assert not status.healthy and status.workers_alive == 1
        assert "1 of 2 worker thread(s) are dead" in status.health_reason
        assert task.recover("test") == "could not replace 1 dead worker thread(s); will try again"
        assert task.service is instance
        monkeypatch.undo()
        assert task.recover("test") == "replaced 1 dead worker thread(s)"
        assert task.service is instance, "recovery replaced the threads, not the instance"
        status = task.get_service_status()
        assert (status.healthy, status.workers_alive) == (True, 2)
        assert manager.call_service_sync("counter", "add", (1,)) == 4


# ---------------------------------------------------------------- method names (issue item 5)


@pytest.mark.parametrize(
    ("bad", "error"), [(None, TypeError), (42, TypeError), (b"add", TypeError), ("", MethodNotFoundError)]
)
def test_method_names_are_checked_at_the_call_and_nothing_is_sent(bad: Any, error: type[Exception]) -> None:
    with ServiceEnvironment("names", CONFIG) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        assert manager.call_service_sync("counter", "add", (1,)) == 1
        before = task.get_service_status().requests_total
        for call in (manager.call_service_sync, manager.call_service_async):
            started = time.monotonic()
            with pytest.raises(error, match=r"method name must be a non-empty str") as raised:
                call("counter", bad)
            assert repr(bad) in str(raised.value)
            assert time.monotonic() - started < 1.0
        assert task.get_service_status().requests_total == before, "nothing was sent"
        assert manager.call_service_sync("counter", "add", (1,)) == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "says"),
    [
        ("12", None, r"args must be a tuple .* not str '12'.*\('12',\)"),  # was add('1', '2')
        (b"5", None, r"args must be a tuple .* not bytes"),
        ({"n": 1}, None, r"args must be a tuple .* not dict.*kwargs="),
        ({1, 2}, None, r"args must be a tuple .* not set"),
        (5, None, r"args must be a tuple .* not int 5.*\(5,\)"),
        ((1,), [("n", 1)], r"kwargs must be a dict .* not list"),
    ],
)
def test_arguments_that_are_not_a_sequence_and_a_dict_are_refused_at_the_call_and_nothing_is_sent(
    args: Any, kwargs: Any, says: str
) -> None:
    with ServiceEnvironment("arguments", CONFIG) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        assert manager.call_service_sync("counter", "add", [2]) == 2  # a list is a sequence of arguments
        before = task.get_service_status().requests_total
        for call in (manager.call_service_sync, manager.call_service_async, manager.stream):
            with pytest.raises(TypeError, match=says):
                call("counter", "add", args, kwargs)
        assert task.get_service_status().requests_total == before, "nothing was sent"
        assert manager.call_service_sync("counter", "add", (1,)) == 3


def test_a_service_name_that_is_not_a_str_and_metadata_that_is_not_a_dict_are_refused_at_the_call() -> None:
    with ServiceEnvironment("names-and-metadata", CONFIG) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        assert manager.call_service_sync("counter", "add", (1,)) == 1
        before = task.get_service_status().requests_total
        for call in (manager.call_service_sync, manager.call_service_async, manager.stream):
            with pytest.raises(TypeError, match=r"service name must be a non-empty str, not int 5"):
                call(5, "add", (1,))  # was "quote_from_bytes() expected bytes"
            with pytest.raises(TypeError, match=r"metadata must be a dict .* not list \['x'\]"):
                call("counter", "add", (1,), metadata=["x"])  # was sent in process, "not picklable" over mmap
        # Made while serving a request with metadata (which a call inherits): refused the same way.
        token = _current_request.set(ServiceRequest("parent", "counter", "add", metadata={"trace": "t"}))
        try:
            with pytest.raises(TypeError, match=r"metadata must be a dict .* not list"):
                manager.call_service_sync("counter", "add", (1,), metadata=["x"])
        finally:
            _current_request.reset(token)
        with pytest.raises(TypeError, match=r"metadata must be a dict .* not list"):
            manager.map("counter", "add", [1], metadata=["x"])  # type: ignore[arg-type]
        assert task.get_service_status().requests_total == before, "nothing was sent"
        assert manager.call_service_sync("counter", "add", (1,), metadata={"k": "v"}) == 2


def test_a_request_with_a_bad_method_name_is_refused_by_the_task_and_its_status_stays_readable() -> None:
    task = LocalServiceTask(ServiceFactory("counter", Counter), _context())
    task.start_service()
    try:
        for bad in (None, ["add"], 7):
            answered: list[ServiceResponse] = []
            done = threading.Event()

            def reply(
                response: ServiceResponse, answered: list[ServiceResponse] = answered, done: threading.Event = done
            ) -> None:
                answered.append(response)
                done.set()

            task.submit(ServiceRequest("r", "counter", bad, deadline=time.time() + 5), reply)  # type: ignore[arg-type]
            assert done.wait(2), "a request with a bad name got no answer"
            assert answered[0].error_type == "MethodNotFoundError"
            assert "a method name must be a non-empty str" in (answered[0].error or "")
            inline = task.execute(ServiceRequest("r", "counter", bad))  # type: ignore[arg-type]
            assert inline.error_type == "MethodNotFoundError"
        status = task.get_service_status()  # before: TypeError from then on
        assert status.healthy and status.errors_total == 6
        assert task.execute(ServiceRequest("ok", "counter", "add", (4,))).result == 4
    finally:
        task.stop_service()


def _context() -> Any:
    from kservice import Config
    from kservice._task import TaskContext

    return TaskContext("names", Config.load(CONFIG))


@pytest.mark.timeout(120)
def test_per_method_name_state_is_bounded() -> None:
    from kservice.middleware import metrics

    names = MAX_TRACKED_METHODS + 500
    with ServiceEnvironment("names", CONFIG) as env:
        task = env.register_service("bounded", Counter)
        manager = env.manager()
        manager.call_service_sync("bounded", "add", (1,))
        for i in range(names):
            with pytest.raises(MethodNotFoundError):
                manager.call_service_sync("bounded", f"no_such_method_{i}")
        assert len(task._method_cost) <= 2, sorted(task._method_cost)[:5]
        started = time.monotonic()
        status = task.get_service_status()
        assert time.monotonic() - started < 1.0
        assert status.healthy and status.errors_total == names
        snap = metrics.snapshot()
        for side in ("client", "server"):
            methods = snap[side]["bounded"]["methods"]
            assert set(methods) == {"add", metrics.OTHER_METHODS}, (side, sorted(methods)[:5])
            assert methods[metrics.OTHER_METHODS]["errors_by_type"]["MethodNotFoundError"] == names
        load = status.extra["load"]
        assert set(load["methods"]) <= {"add", metrics.OTHER_METHODS}
        assert manager.call_service_sync("bounded", "add", (1,)) == 2


def test_metrics_track_at_most_the_cap_of_distinct_names() -> None:
    from kservice.middleware import metrics

    recorder = metrics.ServiceRecorder("server", "capped")
    for i in range(metrics.MAX_TRACKED_METHODS + 10):
        recorder.record(f"m{i}", 0.001)
    methods = recorder.summary()["methods"]
    assert len(methods) == metrics.MAX_TRACKED_METHODS + 1
    assert methods[metrics.OTHER_METHODS]["calls"] == 10


# ---------------------------------------------------------------- overload never blocks (issue item 6)


def test_submit_never_blocks_a_full_queue_answers_overloaded_after_queue_timeout() -> None:
    config = {
        **CONFIG,
        "service": {"local": {"max_workers": 1, "request_queue_size": 2, "queue_timeout": 0.3, "inline_limit": 0}},
    }
    with ServiceEnvironment("full", config) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        running = manager.call_service_async("counter", "sleep", (1.0,))
        wait_for(lambda: task.get_service_status().in_flight == 1, timeout=5, what="the first call to run")
        queued = [manager.call_service_async("counter", "add", (1,)) for _ in range(2)]
        started = time.monotonic()
        # Before: each of these blocked the submitting thread for queue_timeout (an "async" call).
        overflow = [manager.call_service_async("counter", "add", (100,)) for _ in range(5)]
        assert time.monotonic() - started < 0.2, "async submission blocked on the full queue"
        assert task.get_service_status().queue_depth == 7
        for future in overflow:
            with pytest.raises(ServiceOverloadedError, match=r"queue_timeout=0\.3"):
                future.result(5)
        assert 0.25 < time.monotonic() - started < 2.0
        assert running.result(5) == 1.0
        assert sorted(f.result(5) for f in queued) == [1, 2]
        assert manager.call_service_sync("counter", "value") == 2, "the overloaded calls never ran"


def test_requests_waiting_for_room_enter_in_arrival_order_when_room_frees() -> None:
    config = {**CONFIG, "service": {"local": {"max_workers": 1, "request_queue_size": 1, "queue_timeout": 5.0}}}
    with ServiceEnvironment("full", config) as env:
        task = env.register_service("counter", Counter)
        manager = env.manager()
        running = manager.call_service_async("counter", "sleep", (0.3,))
        wait_for(lambda: task.get_service_status().in_flight == 1, timeout=5, what="the first call to run")
        futures = [manager.call_service_async("counter", "echo", (i,)) for i in range(5)]
        assert [f.result(5) for f in futures] == list(range(5))
        assert running.result(5) == 0.3


def test_stopping_answers_requests_waiting_for_room_at_once() -> None:
    config = {**CONFIG, "service": {"local": {"max_workers": 1, "request_queue_size": 1, "queue_timeout": 30.0}}}
    env = ServiceEnvironment("full", config)
    task = env.register_service("counter", Counter)
    env.start()
    manager = ServiceManager(env)
    try:
        running = manager.call_service_async("counter", "sleep", (0.5,))
        wait_for(lambda: task.get_service_status().in_flight == 1, timeout=5, what="the first call to run")
        manager.call_service_async("counter", "echo", (0,))
        waiting = manager.call_service_async("counter", "echo", (1,))
        started = time.monotonic()
        task.stop_service(5)
        assert time.monotonic() - started < 3.0
        from kservice import ServiceUnavailableError

        with pytest.raises(ServiceUnavailableError, match="stopped before the request could run"):
            waiting.result(1)
        assert running.result(1) == 0.5
    finally:
        manager.close()
        env.stop()
