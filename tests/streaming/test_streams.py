"""Streaming generator methods in-process: order, back-pressure, early exit, errors, middleware."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import kservice
import pytest
from kservice.testing import wait_for

from tests.streaming.services import TokenModel

pytestmark = pytest.mark.timeout(60)


class StreamObserver(kservice.ServiceMiddleware):
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, Any, float]] = []
        self.handles: list[tuple[str, bool, Any, float]] = []

    def observe_call(
        self, request: kservice.ServiceRequest, response: kservice.ServiceResponse, seconds: float
    ) -> None:
        self.calls.append(
            (request.method_name, response.success, response.metadata.get("kservice.stream.items"), seconds)
        )

    def observe_handle(
        self, request: kservice.ServiceRequest, response: kservice.ServiceResponse, seconds: float
    ) -> None:
        self.handles.append(
            (request.method_name, response.success, response.metadata.get("kservice.stream.items"), seconds)
        )


@pytest.fixture
def env() -> Iterator[kservice.ServiceEnvironment]:
    environment = kservice.ServiceEnvironment(
        "streams",
        {
            "services": {"model": {"class": "tests.streaming.services:TokenModel", "idempotent": ["broken"]}},
            "service_call": {"retry_interval": 0.01},
        },
    )
    with environment:
        yield environment


@pytest.fixture
def manager(env: kservice.ServiceEnvironment) -> Iterator[kservice.ServiceManager]:
    with kservice.ServiceManager(env) as m:
        yield m


def _model(env: kservice.ServiceEnvironment) -> TokenModel:
    task = env.get_task("model")
    assert task is not None
    return task.service  # type: ignore[no-any-return]


def _wait_for(check: Any, timeout: float = 5.0) -> None:
    wait_for(check, timeout=timeout, what="the condition", interval=0.01)


def test_items_arrive_in_order_complete_and_once(manager: kservice.ServiceManager) -> None:
    assert list(manager.stream("model", "count", (5000,))) == list(range(5000))
    assert list(manager.proxy("model").count.stream(3)) == [0, 1, 2]
    assert list(manager.stream("model", "acount", (300,))) == list(range(300))


def test_async_for_over_generators_and_async_generators(manager: kservice.ServiceManager) -> None:
    async def consume() -> tuple[list[int], list[int]]:
        sync_items = [i async for i in manager.astream("model", "count", (200,))]
        async_items = [i async for i in manager.proxy("model").acount.astream(50, delay=0.001)]
        return sync_items, async_items

    assert asyncio.run(consume()) == (list(range(200)), list(range(50)))


def test_a_plain_call_of_a_streaming_method_names_stream_and_the_service_keeps_serving(
    manager: kservice.ServiceManager,
) -> None:
    with pytest.raises(TypeError, match=r"streaming method.*manager\.stream"):
        manager.call_service_sync("model", "count", (3,))
    with pytest.raises(TypeError, match=r"streaming method.*stream"):
        manager.call_service_sync("model", "acount", (3,))
    with pytest.raises(TypeError, match="stream"):
        manager.call_service_async("model", "acount", (3,)).result(5)
    assert manager.call_service_sync("model", "echo", (7,)) == 7


def test_streaming_a_plain_method_names_call_service_sync(manager: kservice.ServiceManager) -> None:
    with pytest.raises(TypeError, match="call_service_sync"):
        list(manager.stream("model", "echo", (1,)))
    with pytest.raises(kservice.MethodNotFoundError):
        list(manager.stream("model", "nothing_here"))
    assert list(manager.stream("model", "count", (2,))) == [0, 1]


@pytest.mark.parametrize(
    ("window", "error", "says"),
    [
        (0, ValueError, "window must be a positive int, got 0"),  # was the default window, silently
        (-1, ValueError, "got -1"),  # was sent to the producer as is
        (1.5, TypeError, "got float 1.5"),
        ("a", TypeError, "got str 'a'"),  # was "unsupported operand type(s) for //"
    ],
)
def test_a_window_that_is_not_a_positive_int_is_refused_when_the_stream_opens(
    manager: kservice.ServiceManager, window: Any, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        manager.stream("model", "count", (3,), window=window)
    with pytest.raises(TypeError, match=r"items must be an iterable .* not int 5"):
        manager.map("model", "echo", 5)  # type: ignore[arg-type]
    assert list(manager.stream("model", "count", (3,), window=1)) == [0, 1, 2]


def test_back_pressure_bounds_what_the_producer_runs_ahead(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    model = _model(env)
    stream = manager.stream("model", "count", (10_000, "bp"), window=4)
    first = [next(stream) for _ in range(3)]
    time.sleep(0.3)  # a slow consumer: the producer must be waiting, not running ahead
    produced = model.produced["bp"]
    assert produced <= 3 + 4 + 1, produced
    assert first == [0, 1, 2]
    assert list(stream) == list(range(3, 10_000))


@pytest.mark.parametrize("method", ["count", "acount"])
def test_breaking_out_closes_the_generator_in_the_service(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment, method: str
) -> None:
    model = _model(env)
    for item in manager.stream("model", method, (1_000_000, f"break-{method}"), window=8):
        if item == 10:
            break
    gc.collect()  # the abandoned iterator closes when collected
    _wait_for(lambda: f"break-{method}" in model.closed)
    with manager.stream("model", method, (1_000_000, f"with-{method}")) as stream:
        assert next(stream) == 0
    _wait_for(lambda: f"with-{method}" in model.closed)
    assert model.produced[f"with-{method}"] < 1000
    assert manager.call_service_sync("model", "echo", ("still serving",)) == "still serving"


def test_the_deadline_ends_a_stream_mid_way_and_closes_the_generator(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    model = _model(env)
    got: list[int] = []
    with pytest.raises(kservice.ServiceTimeoutError):
        for item in manager.stream("model", "slow", (1000, 0.05, "deadline"), timeout=0.5):
            got.append(item)
    assert 2 <= len(got) < 20 and got == list(range(len(got)))
    _wait_for(lambda: "deadline" in model.closed)


def test_the_deadline_cancels_an_async_generator_mid_stream(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    model = _model(env)
    got: list[int] = []
    with pytest.raises(kservice.ServiceTimeoutError):
        for item in manager.stream("model", "acount", (10**6, "adeadline", 0.05), timeout=0.5):
            got.append(item)
    assert 2 <= len(got) < 20 and got == list(range(len(got)))
    _wait_for(lambda: "adeadline" in model.closed)


def test_a_consumer_that_never_reads_bounds_the_producer_until_the_deadline(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    model = _model(env)
    stream = manager.stream("model", "count", (1_000_000, "idle"), timeout=0.5, window=5)
    time.sleep(0.2)  # deliberate: room for the producer to run ahead, if the window did not stop it
    assert model.produced["idle"] <= 6
    _wait_for(lambda: "idle" in model.closed, timeout=3)  # the producer gave up at the deadline
    with pytest.raises(kservice.ServiceTimeoutError):
        list(stream)


def test_an_error_mid_stream_arrives_after_the_items_typed_and_is_not_retried(manager: kservice.ServiceManager) -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="broke after 3") as caught:
        for item in manager.stream("model", "broken", (3,)):
            got.append(item)
    assert got == [0, 1, 2]  # once each: the idempotent method was not re-run after yielding
    assert isinstance(caught.value, kservice.ServiceCallError)


def test_cancelling_an_async_consumer_closes_the_generator(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    model = _model(env)

    async def consume() -> None:
        async for _ in manager.astream("model", "acount", (1_000_000, "cancelled", 0.001)):
            pass

    async def main() -> None:
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _wait_for(lambda: "cancelled" in model.closed)


def test_middleware_sees_a_stream_once_with_its_item_count_and_duration() -> None:
    observer = StreamObserver()
    environment = kservice.ServiceEnvironment("streams-mw")
    environment.add_middleware(observer)
    environment.register_service("model", TokenModel)
    with environment, kservice.ServiceManager(environment) as manager:
        assert len(list(manager.stream("model", "slow", (5, 0.02)))) == 5
        with pytest.raises(ValueError):
            list(manager.stream("model", "broken", (2,)))
    assert [(m, ok, n) for m, ok, n, _ in observer.calls] == [("slow", True, 5), ("broken", False, 2)]
    assert [(m, ok, n) for m, ok, n, _ in observer.handles] == [("slow", True, 5), ("broken", False, 2)]
    assert observer.calls[0][3] >= 0.09 and observer.handles[0][3] >= 0.09  # the whole stream's duration


def test_a_thousand_abandoned_streams_leave_nothing_behind(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    model = _model(env)
    threads_before = threading.active_count()
    for i in range(1000):
        stream = manager.stream("model", "count" if i % 2 else "acount", (1_000_000, f"a{i}"), window=2)
        next(stream)
        if i % 3 == 0:
            stream.close()
        del stream
    gc.collect()
    _wait_for(lambda: len(model.closed) >= 1000, timeout=20)
    task = env.get_task("model")
    assert task is not None
    _wait_for(lambda: not getattr(task, "_open_streams", set()))
    loop = task.event_loop
    assert loop is not None
    _wait_for(lambda: loop.in_flight == 0)
    assert threading.active_count() <= threads_before + task.max_workers
    assert manager.call_service_sync("model", "echo", (1,)) == 1


@pytest.mark.parametrize("stepped_here", [False, True])
def test_a_stream_reaching_a_stopped_task_ends_stopped_at_once_and_never_ran(stepped_here: bool) -> None:
    """As a call reaching it does: ServiceStoppedError (never retried), not "unavailable" (retried for seconds)."""
    environment = kservice.ServiceEnvironment("stopped-stream")
    task = environment.register_service("model", kservice.ServiceFactory("model", TokenModel))
    with environment:
        task.stop_service()
        request = kservice.ServiceRequest("r-1", "model", "count", (2,), {}, "", time.time() + 10, {})
        ended: list[kservice.ServiceResponse] = []
        sink: Any = type("Sink", (), {"end": lambda self, response: ended.append(response)})()
        if stepped_here:
            assert task.run_stream_here(request, sink) is None
        else:
            task.open_stream(request, sink)
        [response] = ended
        assert response.error_type == "ServiceStoppedError", response.error
        assert "'model' is stopped" in str(response.error)
        assert response.metadata[kservice.MAY_HAVE_RUN] is False
        task.start_service()
        with kservice.ServiceManager(environment) as manager:
            assert list(manager.stream("model", "count", (2,))) == [0, 1]


def test_stopping_the_service_mid_stream_ends_it_unavailable() -> None:
    environment = kservice.ServiceEnvironment("streams-stop")
    environment.register_service("model", TokenModel)
    environment.start()
    with kservice.ServiceManager(environment) as manager:
        stream = manager.stream("model", "slow", (1000, 0.02, "stopped"), timeout=30)
        assert next(stream) == 0
        environment.stop(timeout=1.0)
        with pytest.raises(kservice.ServiceUnavailableError, match=r"stream model\.slow broke: the service stopped"):
            list(stream)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_stream_in_flight_when_the_service_stops_finishes_within_the_drain(kind: str) -> None:
    # A stop lets calls in flight finish until its timeout: streams too (they were cut at once).
    environment = kservice.ServiceEnvironment("streams-drain")
    environment.register_service("model", kservice.ServiceFactory("model", TokenModel), kind=kind)
    environment.start()
    with kservice.ServiceManager(environment) as manager:
        stream = manager.stream("model", "slow", (15, 0.05, "drained"), timeout=30)
        assert next(stream) == 0
        stopping = threading.Thread(target=environment.stop, kwargs={"timeout": 20.0})
        began = time.monotonic()
        stopping.start()
        try:
            assert list(stream) == list(range(1, 15))  # every item, then the stream's own end
        finally:
            stopping.join(30)
        assert not stopping.is_alive()
        assert time.monotonic() - began < 10  # the stop waited for the stream, not for its whole timeout


def test_metrics_count_streams_and_items() -> None:
    from kservice.middleware import metrics

    environment = kservice.ServiceEnvironment("streams-metrics")
    environment.register_service("model-metrics", TokenModel)
    with environment, kservice.ServiceManager(environment) as manager:
        for _ in range(3):
            assert len(list(manager.stream("model-metrics", "count", (7,)))) == 7
        manager.call_service_sync("model-metrics", "echo", (1,))
    for side in ("client", "server"):
        summary = metrics.snapshot()[side]["model-metrics"]
        assert summary["methods"]["count"]["streams"] == 3
        assert summary["methods"]["count"]["stream_items"] == 21
        assert summary["methods"]["echo"]["streams"] == 0


def test_a_stream_dropped_unfinished_is_seen_ending_by_client_middleware() -> None:
    observer = StreamObserver()
    environment = kservice.ServiceEnvironment("streams-dropped")
    environment.add_middleware(observer)
    environment.register_service("model", TokenModel)
    with environment, kservice.ServiceManager(environment) as manager:
        for item in manager.stream("model", "count", (1000,), window=4):
            if item == 2:
                break
        gc.collect()
    assert [(m, ok, n) for m, ok, n, _ in observer.calls] == [("count", True, 3)]


def test_an_item_that_cannot_leave_in_place_is_sent_first_by_the_stream_thread(
    manager: kservice.ServiceManager, env: kservice.ServiceEnvironment
) -> None:
    task = env.get_task("model")
    assert task is not None
    assert list(manager.stream("model", "count", (3,))) == [0, 1, 2]  # now known quick: later streams start in place
    in_place: list[bool] = []

    class BusyInPlace(kservice.LocalStream):
        def _emit(self, item: Any) -> None:
            in_place.append(self.in_place)
            if self.in_place and item == 1:
                raise kservice.SinkBusy  # as the mmap sink does when the caller's ring is full
            super()._emit(item)

    sink = BusyInPlace(64)
    task.open_stream(kservice.ServiceRequest("busy-1", "model", "count", (10,), {}, "", time.time() + 10, {}), sink)
    received: list[int] = []
    end = None
    while end is None:
        items, end = sink.receive(5)
        received += items
        sink.consumed(len(items))
    assert received == list(range(10)) and end.success
    assert in_place[:2] == [True, True] and not any(in_place[2:])  # item 1 left from the stream thread


# ---- a generator known quick runs in the consumer's thread (no thread hand-off: first-item latency)


#: "quick" up to 50 ms here (0.2 ms by default): a loaded machine must not make these tests take the thread path
QUICK = {"local": {"inline_limit": 0.05}}


#: No client middleware and no retry policy: a pulled stream is then one object (PulledItems), not an
#: ItemStream reading a PulledStream.
BARE: dict[str, Any] = {
    "metrics": {"enabled": False},
    "tracing": {"enabled": False},  # else on once another test configured an OpenTelemetry provider
    "breaker": {"enabled": False},
    "service_call": {"max_retries": 0},
}


@pytest.fixture(params=["with-middleware", "bare"])
def quick_env(request: pytest.FixtureRequest) -> Iterator[kservice.ServiceEnvironment]:
    environment = kservice.ServiceEnvironment("streams-quick")
    options = QUICK if request.param == "with-middleware" else {**QUICK, **BARE}
    environment.register_service("model", kservice.ServiceFactory("model", TokenModel), **options)
    with environment:
        yield environment


def _learn_quick(manager: kservice.ServiceManager, env: kservice.ServiceEnvironment) -> None:
    assert len(list(manager.stream("model", "threads", (3,)))) == 3  # the first stream's first item is timed
    task = env.get_task("model")
    assert task is not None
    cost = task.method_cost("stream:threads")
    assert cost is not None and cost < task.inline_limit


def test_a_quick_generator_is_stepped_in_the_consumers_thread_and_closed_there_at_once(
    quick_env: kservice.ServiceEnvironment,
) -> None:
    env = quick_env
    manager = env.manager()
    _learn_quick(manager, env)
    here = threading.get_ident()
    assert set(manager.stream("model", "threads", (200,), window=8)) == {here}
    stream = manager.stream("model", "threads", (1000,), {"tag": "early"})
    assert next(stream) == here
    stream.close()
    assert "early" in _model(env).closed  # its finally ran in close(), not later in another thread
    assert list(manager.stream("model", "count", (3,))) == [0, 1, 2]  # the service keeps serving


def test_a_pulled_stream_that_turns_slow_moves_to_a_stream_thread(quick_env: kservice.ServiceEnvironment) -> None:
    manager = quick_env.manager()
    _learn_quick(manager, quick_env)
    here = threading.get_ident()
    made = list(manager.stream("model", "threads", (40,), {"slow_from": 5, "delay": 0.2}, window=4))
    assert len(made) == 40
    assert made[0] == here and made[-1] != here  # the slow batch moved the rest to a stream thread


def test_async_for_over_a_quick_generator_does_not_step_it_on_the_event_loop(
    quick_env: kservice.ServiceEnvironment,
) -> None:
    manager = quick_env.manager()
    _learn_quick(manager, quick_env)

    async def consume() -> tuple[int, list[int]]:
        return threading.get_ident(), [i async for i in manager.astream("model", "threads", (50,))]

    loop_thread, made = asyncio.run(consume())
    assert len(made) == 50 and loop_thread not in made


def _model_of(environment: kservice.ServiceEnvironment) -> TokenModel:
    task = environment.get_task("model")
    assert task is not None
    return task.service  # type: ignore[no-any-return]


@pytest.mark.parametrize("options", [QUICK, {**QUICK, **BARE}], ids=["with-middleware", "bare"])
def test_stopping_the_service_ends_a_pulled_stream_unavailable(options: dict[str, Any]) -> None:
    environment = kservice.ServiceEnvironment("streams-pulled-stop")
    environment.register_service("model", kservice.ServiceFactory("model", TokenModel), **options)
    environment.start()
    with kservice.ServiceManager(environment) as manager:
        _learn_quick(manager, environment)
        stream = manager.stream("model", "threads", (10_000,), {"tag": "stopped"}, window=4, timeout=30)
        next(stream)
        model = _model_of(environment)
        environment.stop(timeout=1.0)
        with pytest.raises(kservice.ServiceUnavailableError):
            list(stream)
        assert "stopped" in model.closed


#: What a server middleware makes current for a stream (as a tracing span would).
HANDLING: contextvars.ContextVar[str] = contextvars.ContextVar("handling", default="")


class HandlingObserver(StreamObserver):
    def before_handle(self, request: kservice.ServiceRequest) -> None:
        HANDLING.set(request.request_id)


class ServerHandlingObserver(kservice.ServiceMiddleware):
    """HandlingObserver's server side alone: the client has no middleware to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, Any, float]] = []
        self.handles: list[tuple[str, bool, Any, float]] = []

    def before_handle(self, request: kservice.ServiceRequest) -> None:
        HANDLING.set(request.request_id)

    observe_handle = StreamObserver.observe_handle


class ContextModel:
    """Reports, per item, what the server middleware made current and the thread that made it."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def seen(self, n: int, tag: str = "", fail_at: int = -1) -> Iterator[tuple[str, int]]:
        try:
            for i in range(n):
                if i == fail_at:
                    raise KeyError(f"failed at {i}")
                yield HANDLING.get(), threading.get_ident()
        finally:
            self.closed.append(tag)


@pytest.fixture(params=["client-and-server", "server-only"])
def observed_quick(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[kservice.ServiceManager, HandlingObserver, ContextModel]]:
    # server-only: no client middleware nor retries, so the caller's stream is one pulled object
    observer = HandlingObserver() if request.param == "client-and-server" else ServerHandlingObserver()
    environment = kservice.ServiceEnvironment("streams-pulled-observed")
    environment.add_middleware(observer)
    options = QUICK if request.param == "client-and-server" else {**QUICK, **BARE}
    environment.register_service("ctx", kservice.ServiceFactory("ctx", ContextModel), **options)
    with environment, kservice.ServiceManager(environment) as manager:
        assert len(list(manager.stream("ctx", "seen", (2,)))) == 2  # its first item is timed: quick
        assert (type(manager.stream("ctx", "seen", (1,))).__name__ == "PulledItems") is (request.param == "server-only")
        task = environment.get_task("ctx")
        assert task is not None
        service = task.service
        assert isinstance(service, ContextModel)
        observer.calls.clear()
        observer.handles.clear()
        yield manager, observer, service


def test_server_middleware_sees_a_pulled_stream_and_what_it_makes_current_stays_with_the_stream(
    observed_quick: tuple[kservice.ServiceManager, HandlingObserver, ContextModel],
) -> None:
    manager, observer, model = observed_quick
    here = threading.get_ident()
    made = list(manager.stream("ctx", "seen", (5,), window=2))
    assert [thread for _, thread in made] == [here] * 5  # pulled: stepped in this thread
    assert len({handling for handling, _ in made}) == 1 and made[0][0] != ""  # the before-hook's value, every step
    assert HANDLING.get() == ""  # and it never leaked into the consumer's context
    stream = manager.stream("ctx", "seen", (1000,), {"tag": "early"})
    assert next(stream)[1] == here
    stream.close()
    assert model.closed[-1] == "early"
    assert [(m, ok, n) for m, ok, n, _ in observer.handles] == [("seen", True, 5), ("seen", True, 1)]
    assert [(m, ok, n) for m, ok, n, _ in observer.calls] in ([], [("seen", True, 5), ("seen", True, 1)])


def test_a_pulled_stream_that_fails_ends_typed_after_its_items_and_middleware_sees_the_failure(
    observed_quick: tuple[kservice.ServiceManager, HandlingObserver, ContextModel],
) -> None:
    manager, observer, model = observed_quick
    received = []
    with pytest.raises(KeyError, match="failed at 3"):
        for item in manager.stream("ctx", "seen", (10,), {"tag": "failed", "fail_at": 3}, window=2):
            received.append(item)
    assert len(received) == 3 and model.closed[-1] == "failed"
    assert [(m, ok, n) for m, ok, n, _ in observer.handles] == [("seen", False, 3)]
    assert len(list(manager.stream("ctx", "seen", (2,)))) == 2  # the service keeps serving


def test_a_pulled_stream_past_its_deadline_ends_with_a_timeout_after_its_items(
    observed_quick: tuple[kservice.ServiceManager, HandlingObserver, ContextModel],
) -> None:
    manager, observer, model = observed_quick
    stream = manager.stream("ctx", "seen", (10_000,), {"tag": "late"}, window=2, timeout=0.3)
    received = [next(stream)]
    time.sleep(0.4)
    with pytest.raises(kservice.ServiceTimeoutError):
        for item in stream:
            received.append(item)
    assert len(received) >= 1 and model.closed[-1] == "late"
    assert observer.handles and observer.handles[-1][1] is False


def test_a_pulled_stream_moved_to_a_thread_keeps_its_context_and_middleware_sees_one_end(
    observed_quick: tuple[kservice.ServiceManager, HandlingObserver, ContextModel],
) -> None:
    manager, observer, _ = observed_quick

    async def consume() -> list[tuple[str, int]]:
        return [item async for item in manager.astream("ctx", "seen", (30,), window=4)]

    made = asyncio.run(consume())
    assert len(made) == 30 and threading.get_ident() not in {thread for _, thread in made}
    assert len({handling for handling, _ in made}) == 1 and made[0][0] != ""
    assert [(m, ok, n) for m, ok, n, _ in observer.handles] == [("seen", True, 30)]


def test_a_pulled_stream_dropped_unfinished_closes_its_generator_and_leaves_nothing_open(
    quick_env: kservice.ServiceEnvironment,
) -> None:
    manager = quick_env.manager()
    _learn_quick(manager, quick_env)
    stream = manager.stream("model", "threads", (1000,), {"tag": "dropped"})
    assert next(stream) == threading.get_ident()  # pulled: made in this thread
    del stream  # never closed
    gc.collect()
    assert "dropped" in _model(quick_env).closed  # its finally ran when the stream was collected
    task = quick_env.get_task("model")
    assert task is not None and not task._open_streams
    assert list(manager.stream("model", "count", (3,))) == [0, 1, 2]  # the service keeps serving


class AnswersCount(kservice.ServiceMiddleware):
    """Answers ``count`` in ``before_call`` with ``answer`` (a stub); ``None``: lets it through."""

    def __init__(self) -> None:
        self.answer: Any = None
        self.answering = False

    def before_call(self, request: kservice.ServiceRequest) -> kservice.ServiceResponse | None:
        if self.answering and request.method_name == "count":
            return kservice.ServiceResponse.ok(request.request_id, self.answer)
        return None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_before_call_answer_to_a_stream_is_its_items_and_one_that_is_not_items_is_a_clear_error(kind: str) -> None:
    # The answer was dropped: the stream ended at once as a success with no items.
    observer = StreamObserver()
    stub = AnswersCount()
    environment = kservice.ServiceEnvironment("streams-answered", {"service_call": {"max_retries": 0}})
    environment.add_middleware(observer)  # outermost: sees what the caller gets
    environment.add_middleware(stub)
    environment.register_service("model", kservice.ServiceFactory("model", TokenModel), kind=kind)
    with environment, kservice.ServiceManager(environment) as manager:
        stub.answering = True
        stub.answer = [7, 8, 9]
        assert list(manager.stream("model", "count", (3, "answered"))) == [7, 8, 9]
        stub.answer = (x * 2 for x in range(2))  # any iterable
        assert list(manager.stream("model", "count", (3, "answered"))) == [0, 2]
        stub.answer = []
        assert list(manager.stream("model", "count", (3, "answered"))) == []
        for wrong, named in ((None, "NoneType"), (5, "int"), ("abc", "str"), ({"a": 1}, "dict")):
            stub.answer = wrong
            with pytest.raises(TypeError, match=rf"answered stream model\.count with {named}.*list of its items"):
                list(manager.stream("model", "count", (3, "answered")))
        assert "answered" not in manager.call_service_sync("model", "report")["produced"]  # never reached it
        stub.answering = False
        assert list(manager.stream("model", "count", (3, "served"))) == [0, 1, 2]  # the service keeps serving
    assert [(m, ok, n) for m, ok, n, _ in observer.calls] == [
        ("count", True, 3),
        ("count", True, 2),
        ("count", True, 0),
        *[("count", False, 0)] * 4,
        ("report", True, None),
        ("count", True, 3),
    ]


class RescuesFailures(kservice.ServiceMiddleware):
    """Turns every failed end into a success answering ``["rescued"]`` (as a fallback would)."""

    def after_call(
        self, response: kservice.ServiceResponse, request: kservice.ServiceRequest
    ) -> kservice.ServiceResponse | None:
        return None if response.success else kservice.ServiceResponse.ok(request.request_id, ["rescued"])


def test_an_after_call_cannot_end_a_stream_that_yielded_items_as_a_success_but_may_answer_one_that_had_none() -> None:
    # A stream cut mid-way and answered by an after-hook ended quietly: the items so far looked like all of it.
    observer = StreamObserver()
    environment = kservice.ServiceEnvironment("streams-rescued", {"service_call": {"max_retries": 0}})
    environment.add_middleware(observer)
    environment.add_middleware(RescuesFailures())
    environment.register_service("model", TokenModel)
    with environment, kservice.ServiceManager(environment) as manager:
        got: list[Any] = []
        with pytest.raises(ValueError, match="broke after 2"):
            for item in manager.stream("model", "broken", (2,)):
                got.append(item)
        assert got == [0, 1]
        assert list(manager.stream("model", "broken", (0,))) == ["rescued"]
        assert list(manager.stream("model", "count", (2,))) == [0, 1]
    assert [(m, ok, n) for m, ok, n, _ in observer.calls] == [
        ("broken", False, 2),
        ("broken", True, 1),
        ("count", True, 2),
    ]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["local-pulled", "local-pulled-bare", "process"])
def test_a_consumer_idle_past_the_deadline_sees_the_same_end_in_process_and_over_mmap(where: str) -> None:
    # In-process, a generator stepped in the consumer's thread stayed paused past the deadline (its
    # ``finally`` ran only at the next read); over mmap the host closed it at the deadline.
    kind = "process" if where == "process" else "local"
    options: dict[str, Any] = {"kind": kind}
    if kind == "local":
        options.update(QUICK if where == "local-pulled" else {**QUICK, **BARE})
    environment = kservice.ServiceEnvironment("streams-idle", {"service_call": {"max_retries": 0}})
    environment.register_service("model", kservice.ServiceFactory("model", TokenModel), **options)
    with environment, kservice.ServiceManager(environment) as manager:
        assert list(manager.stream("model", "count", (3,))) == [0, 1, 2]  # the first stream's first item is timed
        stream = manager.stream("model", "count", (1_000_000, "idle"), timeout=1.0, window=1)
        if where == "local-pulled-bare":
            assert type(stream).__name__ == "PulledItems"  # the generator is stepped in this thread
        elif where == "local-pulled":
            assert type(stream._source).__name__ == "PulledStream"
        assert next(stream) == 0
        began = time.monotonic()
        assert "idle" not in manager.call_service_sync("model", "report")["closed"]  # paused, not closed, before it
        wait_for(  # the generator is closed at the deadline while nobody reads
            lambda: "idle" in manager.call_service_sync("model", "report")["closed"], timeout=10, what="its finally"
        )
        assert time.monotonic() - began < 5
        assert manager.call_service_sync("model", "report")["produced"]["idle"] <= 2  # held to the window
        with pytest.raises(
            kservice.ServiceTimeoutError, match=r"^stream model\.count passed its deadline after 1 item\(s\)$"
        ):
            next(stream)  # the next read: the timeout, at once
        with pytest.raises(StopIteration):
            next(stream)
        stream.close()
        assert list(manager.stream("model", "count", (3,))) == [0, 1, 2]  # the service keeps serving
