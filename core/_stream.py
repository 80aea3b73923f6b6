"""Streams: a generator method's items delivered to the caller as they are produced.

Three parts, each transport-neutral:

- :class:`StreamSink`, the producer's end, which a transport subclasses to
  carry items (``_emit``) and the end of the stream (``_finish``). It owns the
  *window*: at most ``window`` items sent and not yet taken by the consumer;
  the producer waits for room (never past the deadline), and a consumer that
  gave up (``cancel``) stops it.
- the runners, which serve one stream request on a task: a generator in one
  of the task's stream threads, an async generator on the task's event loop.
  The generator is always closed (its ``finally`` runs) however the stream
  ends: exhausted, failed, consumer gone, deadline.
- :class:`ItemStream`, the caller's iterator (sync and async), which a
  transport feeds through a :class:`StreamSource`.
"""

from __future__ import annotations

import collections
import collections.abc
import contextvars
import functools
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from ._context import _current_request
from ._errors import MethodNotFoundError, ServiceError, ServiceTimeoutError, ServiceUnavailableError
from ._fork import renew_after_fork
from ._messages import ServiceRequest, ServiceResponse, _monotonic_deadline, _reanchor
from ._middleware import MiddlewareError
from ._transport import deadline_response
from .keys import STREAM_ITEMS

if TYPE_CHECKING:
    import asyncio

    from ._manager import ServiceManager, _Route
    from ._task import BaseServiceTask

__all__ = ["ItemStream", "SinkBusy", "StreamSink", "StreamSource"]

#: Items a producer may have sent and the consumer not yet taken, when the caller names no window.
DEFAULT_WINDOW = 64
#: The response metadata key carrying how many items a stream delivered (middleware observers read it).
ITEMS_KEY = STREAM_ITEMS
#: The response metadata key marking a stream its consumer closed before the end.
CLOSED_KEY = "kservice.stream.closed"


def _ended_early(request: ServiceRequest, why: str) -> ServiceResponse:
    return ServiceResponse(True, None, None, request.request_id, metadata={CLOSED_KEY: why})


# =========================================================================== producer side


class SinkBusy(Exception):
    """Raised by a sink's ``_emit`` in place (``sink.in_place``) when the item cannot leave without waiting.

    The item was not sent; the stream goes on in a stream thread, which sends
    it first.
    """


_NOTHING: Any = object()


class StreamSink(ABC):
    """The producer's end of one stream; a transport subclasses it (see the module docstring).

    ``send`` and ``asend`` return False when the stream must stop: the
    consumer cancelled, or the deadline passed while waiting for room. ``end``
    is called exactly once, last.
    """

    def __init__(self, window: int) -> None:
        self.window = max(1, window)
        self._lock = threading.Lock()
        # Made on the first wait only (under ``_lock``): most streams never wait for room, and a
        # Condition costs microseconds to make (first-item latency).
        self._room: threading.Condition | None = None
        self._unacknowledged = 0
        self.cancelled = False
        self.stop_reason: ServiceResponse | None = None
        self._async_room: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    # ---- what the transport implements

    @abstractmethod
    def _emit(self, item: Any) -> None:
        """Carry one item to the consumer (raises when it cannot: the stream then ends with that error)."""

    @abstractmethod
    def _finish(self, response: ServiceResponse) -> None:
        """Carry the end of the stream (a success without result, or the error)."""

    #: seconds between :meth:`consumer_alive` checks while the producer waits for room (None: never checked)
    liveness_interval: float | None = None
    #: True while the stream is made in a thread that must not wait (a listener's): ``_emit`` may raise SinkBusy
    in_place = False
    #: False for a sink whose only reader is the thread that opens the stream: its items would wait for
    #: the whole pass made in place (a step that never returns would keep them), so none is made there
    in_place_allowed = True

    def consumer_alive(self) -> bool:
        """Whether the consumer can still read (transports whose consumer may die override it)."""
        return True

    def left_place(self) -> None:
        """The pass made in place (``in_place``) is over and the stream goes on in a stream thread.

        A transport that held back an item made in place (to send it with the
        next item or with the end) sends it now, without waiting; one that
        cannot leave at once goes first from the stream thread.
        """

    # ---- what the transport calls

    def acknowledge(self, count: int) -> None:
        """The consumer took ``count`` more items: room for as many."""
        with self._lock:
            self._unacknowledged -= count
            if self._room is not None:
                self._room.notify()
            self._wake_async()

    def cancel(self, reason: ServiceResponse | None = None) -> None:
        """The consumer gave up (or, with ``reason``, the service stops): the producer stops at its next item.

        Its generator is closed. ``reason`` is the end the consumer gets
        instead of a normal end (the service stopping mid-stream).
        """
        with self._lock:
            self.cancelled = True
            if reason is not None:
                self.stop_reason = reason
            if self._room is not None:
                self._room.notify_all()
            self._wake_async()

    def _wake_async(self) -> None:
        waiting = self._async_room
        if waiting is not None:
            self._async_room = None
            loop, future = waiting
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass  # the loop closed: its producer is gone

    # ---- what the runners call

    def send(self, item: Any, deadline: float | None) -> bool:
        """Send ``item`` once there is room in the window; False: stop (consumer gone, or deadline passed)."""
        with self._lock:
            interval = self.liveness_interval
            while self._unacknowledged >= self.window and not self.cancelled:
                wait = None if deadline is None else deadline - time.time()
                if wait is not None and wait <= 0:
                    return False
                if interval is not None:
                    wait = interval if wait is None else min(wait, interval)
                room = self._room
                if room is None:
                    room = self._room = threading.Condition(self._lock)
                if not room.wait(wait) and interval is not None and not self.consumer_alive():
                    self.cancelled = True  # the consumer died: nobody will take the rest
            if self.cancelled:
                return False
            self._unacknowledged += 1
        try:
            self._emit(item)
        except SinkBusy:
            with self._lock:
                self._unacknowledged -= 1
            raise
        return True

    async def asend(self, item: Any) -> bool:
        """:meth:`send` for a producer on an event loop (the deadline is the caller's ``asyncio.timeout``)."""
        import asyncio

        while True:
            with self._lock:
                if self.cancelled:
                    return False
                if self._unacknowledged < self.window:
                    self._unacknowledged += 1
                    break
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._async_room = (loop, future)
            interval = self.liveness_interval
            if interval is None:
                await future
            else:
                await asyncio.wait([future], timeout=interval)
                if not future.done() and not self.consumer_alive():
                    self.cancel()
        self._emit(item)
        return True

    def end(self, response: ServiceResponse) -> None:
        try:
            self._finish(response)
        except Exception:  # noqa: BLE001 - a consumer gone meanwhile cannot be told
            pass


async def _wait(future: asyncio.Future[None]) -> None:
    await future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_kinds_of: Callable[[type], Any] | None = None


def _method_kinds(cls: type) -> Any:
    """``_aio.method_kinds``, imported on first use (host side only: a caller's process need not load asyncio).

    Kept once imported: an import statement in a function costs about a microsecond per call.
    """
    global _kinds_of
    if _kinds_of is None:
        from ._aio import method_kinds

        _kinds_of = method_kinds
    return _kinds_of(cls)


def stream_method(task: BaseServiceTask, request: ServiceRequest) -> tuple[Callable[..., Any], bool]:
    """The generator method ``request`` names and whether it is an async generator.

    Raises MethodNotFoundError for unknown or private names, TypeError for a
    method that is not a generator (call it with call_service_sync instead).
    """
    name = request.method_name
    if type(name) is str:
        bound = task._generator_methods.get(name)
        if bound is not None:
            return bound, False  # the common case, found in one lookup
    if name[:1] in ("_", "") or task.service is None:
        raise task._method_not_found(name)
    method = getattr(task.service, name, None)
    if method is None or not callable(method):
        raise task._method_not_found(name)
    kinds = _method_kinds(type(task.service))
    if name in kinds.async_generators:
        return method, True
    if name in kinds.generators:
        return method, False
    raise TypeError(
        f"{task.service_name}.{name} is not a streaming method (it returns one result, it is not a generator): "
        f"call it with call_service_sync/call_service_async instead of stream (from a shell: kservice call without --stream)"
    )


def run_here(task: BaseServiceTask, request: ServiceRequest, sink: StreamSink) -> SyncStreamRun | None:
    """A stream ``request`` whose generator the caller steps (``pump``) in its own thread; see ``task.run_stream_here``."""
    if task.state != "running" or task.service is None:
        sink.end(task._not_running(request))
        return None
    try:
        method, is_async = stream_method(task, request)
    except MethodNotFoundError as exc:
        sink.end(ServiceResponse.from_exception(request.request_id, exc, origin="runtime"))
        return None
    except TypeError as exc:
        sink.end(ServiceResponse.from_exception(request.request_id, exc, origin="service", with_traceback=False))
        return None
    if is_async:
        open_on_task(task, request, sink)
        return None
    run = SyncStreamRun(task, request, method, sink)
    return None if run.ended else run


def open_on_task(task: BaseServiceTask, request: ServiceRequest, sink: StreamSink) -> None:
    """Start serving stream ``request`` on ``task`` into ``sink`` (returns at once; ``sink.end`` is called once).

    A generator runs in one of the task's stream threads (at most
    ``max_workers`` at once; more wait for one), an async generator on the
    task's event loop. A task that is not running, an unknown method or one
    that is not a generator ends the stream at once with the error.
    """
    if task.state != "running" or task.service is None:
        sink.end(task._not_running(request))
        return
    try:
        method, is_async = stream_method(task, request)
    except MethodNotFoundError as exc:
        sink.end(ServiceResponse.from_exception(request.request_id, exc, origin="runtime"))
        return
    except TypeError as exc:
        sink.end(ServiceResponse.from_exception(request.request_id, exc, origin="service", with_traceback=False))
        return
    if is_async:
        loop = task.event_loop
        assert loop is not None  # a service with async generators always has one
        loop.spawn(
            request.request_id,
            serve_async_stream(task, request, method, sink),
            lambda: sink.end(task._unavailable(request, "it stopped")),
        )
        return
    cost_key = "stream:" + request.method_name
    first_cost = task._method_cost.get(cost_key)
    inline_limit = task.inline_limit
    if task._serial_lock is None and first_cost is not None and first_cost < inline_limit and sink.in_place_allowed:
        # Its first item has been quick to make: made here, it reaches the caller without a thread
        # hand-off (first-item latency). Items keep being made here while they come fast and fit
        # the window (so this thread never waits for the consumer): a short stream ends here
        # entirely; the rest of a long one is made in a stream thread.
        _serve_in_place(task, request, method, sink, cost_key, inline_limit)
        return
    run = SyncStreamRun(task, request, method, sink)
    if run.ended:
        return
    try:
        _stream_threads(task).submit(functools.partial(_pump_timed, run, cost_key))
    except RuntimeError:
        run.abandon(task._unavailable(request, "it stopped"))


def _serve_in_place(
    task: BaseServiceTask,
    request: ServiceRequest,
    method: Callable[..., Any],
    sink: StreamSink,
    cost_key: str,
    inline_limit: float,
) -> None:
    """:func:`open_on_task`'s pass in the calling thread: what ``SyncStreamRun.pump(sink.window, inline_limit)``
    does (``sink.in_place`` set), with a SyncStreamRun made only when the stream goes on in a stream thread.

    One pass (each costs a context entry): the cost observed is the pass's time per item, which is the
    first item's alone when that one took the whole budget; only a slow pass is recorded (the cost is
    known under the limit, else the stream would not be made here, and a quick pass keeps it there).
    """
    context = contextvars.copy_context()
    task._open_streams[sink] = request.deadline
    if task._server_chain is None and (request.deadline is None or time.time() <= request.deadline):
        # _begin without a chain to run, inline: no before-hook can make anything current.
        next(task._started)
        served, limit, began = request, 0, 0.0
    else:
        served, refusal, limit, began = context.run(_begin, task, request)
        if refusal is not None:
            task._open_streams.pop(sink, None)
            sink.end(context.run(_conclude, task, served, refusal, limit, began, 0))
            return
    started = perf_counter()
    sink.in_place = True
    try:
        generator, count, pending, ended = context.run(
            _pass_in_place, task, served, method, sink, limit, began, perf_counter() + inline_limit
        )
    finally:
        sink.in_place = False
    if not ended:
        sink.left_place()
    took = (perf_counter() - started) / max(1, count)
    if took > inline_limit:
        task.observe_cost(cost_key, took)
    if ended:
        return
    run = SyncStreamRun.resumed(task, served, method, sink, context, generator, count, limit, began)
    run.pending = pending
    try:
        _stream_threads(task).submit(run.pump)
    except RuntimeError:
        run.abandon(task._unavailable(served, "it stopped"))


def _pass_in_place(
    task: BaseServiceTask,
    request: ServiceRequest,
    method: Callable[..., Any],
    sink: StreamSink,
    limit: int,
    began: float,
    stop_at: float,
) -> tuple[Any, int, Any, bool]:
    """Make items into ``sink`` (in the stream's context) until the stream ends, the window is full or ``stop_at``.

    Returns (generator, items sent, item that could not leave in place or _NOTHING, ended). An ended
    stream is finished here: its generator closed, the server chain's end run, ``sink.end`` called.
    """
    token = _current_request.set(request)
    deadline = request.deadline
    window = sink.window
    generator: Any = None
    count = 0
    pending: Any = _NOTHING
    response: ServiceResponse | None = None
    try:
        generator = method(*request.args, **request.kwargs)
        while count < window:
            try:
                item = next(generator)
            except StopIteration:
                generator = None  # exhausted: closing it would do nothing
                response = ServiceResponse(True, None, None, request.request_id)
                break
            try:
                if not sink.send(item, deadline):
                    response = _stopped_response(request, sink)
                    break
            except SinkBusy:
                pending = item  # made in place, it could not leave without waiting: the stream thread sends it
                break
            count += 1
            if deadline is not None and time.time() > deadline and not sink.cancelled:
                response = deadline_response(request, started=True)
                break
            if perf_counter() > stop_at:
                break
    except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the generator's outcome, not the thread's end
        response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
    finally:
        _current_request.reset(token)
    if response is None:
        return generator, count, pending, False
    if generator is not None:
        _close_generator(generator, request)
    task._open_streams.pop(sink, None)
    sink.end(_conclude(task, request, response, limit, began, count))
    return None, count, _NOTHING, True


def _pump_timed(run: SyncStreamRun, cost_key: str) -> None:
    """Run a stream in a stream thread, timing its first item (for :func:`open_on_task`'s choice)."""
    began = perf_counter()
    if run.pump(1):
        return
    run.task.observe_cost(cost_key, perf_counter() - began)
    run.pump()


_executors_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_executors_lock")


def _stream_threads(task: BaseServiceTask) -> ThreadPoolExecutor:
    """The task's threads for generator streams, created on its first stream and shut down with the task."""
    executor: ThreadPoolExecutor | None = getattr(task, "_stream_executor", None)
    if executor is None:
        with _executors_lock:
            executor = getattr(task, "_stream_executor", None)
            if executor is None:
                executor = ThreadPoolExecutor(
                    task.max_workers, thread_name_prefix=f"kservice-{task.service_name}-stream"
                )
                task._stream_executor = executor  # type: ignore[attr-defined]
    return executor


class _StreamDeadlines:
    """A task's thread that ends, at their deadline, the streams its consumers step (:class:`_PulledRun`).

    A pulled stream's generator runs only while its consumer reads; one
    whose consumer stops reading would stay paused past the deadline (its
    ``finally`` run only at the next read), where a stream thread's or a
    host's producer is closed at the deadline. Each pulled stream is
    watched here (a weak reference: one dropped unclosed is still collected,
    and closed then); every :data:`TICK` seconds while any is watched, the
    thread ends those past their deadline and forgets those that ended.
    Started with the task's first pulled stream, stopped with the task.

    ``lock`` orders the ends made past the deadline (here, or by the
    consumer). The consumer's steps before the deadline take no lock: a
    consumer sets ``_stepping`` before it reads the clock, and this thread
    reads the clock before it looks at ``_stepping``, so whenever it sees a
    consumer not stepping, that consumer's next look at the clock finds the
    deadline passed too, and it ends the stream under ``lock`` instead of
    stepping it.
    """

    #: seconds between two looks at the watched streams: the latest a paused stream ends after its deadline
    TICK = 0.05

    def __init__(self, name: str) -> None:
        self.entries: collections.deque[weakref.ref[_PulledRun]] = collections.deque()
        # Reentrant: a stream collected (closed) inside another's end, in the same thread, takes it again.
        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, run: _PulledRun) -> None:
        entries = self.entries
        entries.append(weakref.ref(run))
        if len(entries) == 1:
            self._wake.set()

    def _run(self) -> None:
        entries = self.entries
        while not self._stop.is_set():
            if not entries:
                self._wake.clear()
                if not entries:  # looked at again after the clear: a stream watched meanwhile set it
                    self._wake.wait()
                continue
            if self._stop.wait(self.TICK):
                return
            now = time.time()  # before any look at a stream's _stepping (see the class docstring)
            for _ in range(len(entries)):
                ref = entries.popleft()
                run = ref()
                if run is None or run._response is not None or run._handed_off():
                    continue
                try:
                    ended = run._deadline_passed(now, self.lock)
                except Exception:  # noqa: BLE001 - one stream's failing end must not stop the others'
                    ended = True
                if not ended:
                    entries.append(ref)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _stream_deadlines(task: BaseServiceTask) -> _StreamDeadlines | None:
    """The task's :class:`_StreamDeadlines`, started on first use; None once the task is not running."""
    deadlines = task._stream_deadlines
    if deadlines is None:
        with _executors_lock:
            deadlines = task._stream_deadlines
            if deadlines is None:
                if task._state != "running":
                    return None
                deadlines = task._stream_deadlines = _StreamDeadlines(f"kservice-{task.service_name}-stream-deadlines")
    return deadlines


#: seconds a stream may stay unread while a stop drains it (its producer waiting for room, or a stream its
#: consumer steps not stepped) before the stop stops waiting for it
DRAIN_UNREAD = 1.0
#: why a stream the stop did not wait for ended (its consumer's ServiceUnavailableError says it)
_STOPPED_WHY = "the service stopped"


def shutdown_stream_threads(task: BaseServiceTask, deadline: float) -> None:
    """Let the task's streams finish (until ``deadline``) while their consumers read them, cancel the rest
    (their consumers get ServiceUnavailableError after the items sent), and join its stream threads.

    ``deadline`` is a ``time.monotonic()`` time, the stop's drain deadline; a
    stream whose consumer does not read for :data:`DRAIN_UNREAD` seconds is
    not waited for. A thread still inside a generator's step at ``deadline``
    is left to finish on its own (it is a daemon).
    """
    _drain_streams(task, deadline)
    with _executors_lock:
        deadlines, task._stream_deadlines = task._stream_deadlines, None
    if deadlines is not None:
        deadlines.close()  # a stream still paused ends at its next read: the stop cancelled it
    executor: ThreadPoolExecutor | None = getattr(task, "_stream_executor", None)
    stopped = unavailable_mid_stream(ServiceRequest("", task.service_name, "?"), _STOPPED_WHY)
    for sink in list(task._open_streams):
        sink.cancel(stopped)  # named for each stream where its end is made (_named)
    if executor is not None:
        task._stream_executor = None  # type: ignore[attr-defined]
        executor.shutdown(wait=False, cancel_futures=True)
        # A generator stuck inside a step cannot be interrupted: wait for it up to the stop deadline only.
        for thread in list(getattr(executor, "_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))


def _drain_streams(task: BaseServiceTask, deadline: float) -> None:
    """Wait until the task's open streams have ended, or ``deadline``, or every one left is unread.

    Unread: a producer waiting for room in its window (the consumer is not
    taking items), or a stream its consumer steps (:class:`_PulledRun`) not
    stepped, for :data:`DRAIN_UNREAD` seconds. A producer inside a long step
    is waited for (until ``deadline``). Polled: a stop is rare, and streams
    end in many places.
    """
    unread_since: dict[int, tuple[Any, float]] = {}
    while True:
        now = time.monotonic()
        streams = list(task._open_streams)
        if not streams or now >= deadline:
            return
        waiting = False
        for stream in streams:
            if isinstance(stream, StreamSink):
                unread = stream._unacknowledged >= stream.window  # the producer waits for the consumer
                mark: Any = stream._unacknowledged if unread else None
            else:
                unread, mark = True, getattr(stream, "_count", None)
            if not unread:
                waiting = True
                unread_since.pop(id(stream), None)
                continue
            seen = unread_since.get(id(stream))
            if seen is None or seen[0] != mark:
                unread_since[id(stream)] = (mark, now)
                waiting = True
            elif now - seen[1] < DRAIN_UNREAD:
                waiting = True
        if not waiting:
            return
        time.sleep(min(0.01, max(0.0, deadline - now)))


def _named(reason: ServiceResponse, request: ServiceRequest) -> ServiceResponse:
    """A stop's reason made for every stream of a task (request id ""), named for stream ``request``."""
    if reason.request_id:
        return reason
    return unavailable_mid_stream(request, _STOPPED_WHY)


def _track(task: BaseServiceTask, sink: StreamSink, request: ServiceRequest | None) -> None:
    """Count ``sink`` among the task's open streams until its ``request``'s deadline (None: no longer open)."""
    if request is not None:
        task._open_streams[sink] = request.deadline
    else:
        task._open_streams.pop(sink, None)


def _begin(task: BaseServiceTask, request: ServiceRequest) -> tuple[ServiceRequest, ServiceResponse | None, int, float]:
    """Deadline check and the server chain's before-hooks: (request, refusal or None, after-hook limit, start time)."""
    if request.deadline is not None and time.time() > request.deadline:
        next(task._expired)
        return request, deadline_response(request, started=False), -1, 0.0
    next(task._started)
    chain = task._server_chain
    began = perf_counter()
    if chain is None:
        return request, None, 0, began
    if chain.has_before:
        try:
            request, response, limit = chain.run_before(request)
        except MiddlewareError as exc:
            return (
                exc.request,
                ServiceResponse.from_exception(request.request_id, exc.error, origin="service"),
                exc.index,
                began,
            )
        return request, response, limit, began
    return request, None, chain.size, began


def _conclude(
    task: BaseServiceTask, request: ServiceRequest, response: ServiceResponse, limit: int, began: float, count: int
) -> ServiceResponse:
    """Record the item count, run the server chain's after-hooks and observers (they see the whole stream)."""
    if limit < 0:
        return response  # expired before it started: never counted as started
    chain = task._server_chain
    if chain is not None:
        # The count is for the chain's observers; a caller counts the items it received itself.
        response.metadata = {**response.metadata, ITEMS_KEY: count}
        response = chain.run_after(request, response, limit, began)
    next(task._finished)
    if not response.success:
        next(task._failed)
    return response


def _stopped_response(request: ServiceRequest, sink: StreamSink) -> ServiceResponse:
    if sink.stop_reason is not None:
        return _named(sink.stop_reason, request)
    if sink.cancelled:
        return _ended_early(request, "the consumer closed the stream")
    return deadline_response(request, started=True)


class SyncStreamRun:
    """One generator stream on a task, resumable from any thread (one thread at a time).

    :meth:`pump` steps the generator and sends its items into the sink until
    the stream ends (or ``limit`` items were sent); the generator is closed
    and the sink ended exactly once, by whichever call sees the end.
    """

    __slots__ = (
        "began",
        "context",
        "count",
        "generator",
        "limit",
        "method",
        "pending",
        "request",
        "response",
        "sink",
        "task",
    )

    def __init__(
        self, task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], sink: StreamSink
    ) -> None:
        self.task = task
        self.method = method
        self.sink = sink
        self.count = 0
        self.generator: Any = None
        #: an item made in place that could not leave without waiting (sent first by the next pump)
        self.pending: Any = _NOTHING
        # The stream's own context, entered by every step whatever thread makes it: what the server
        # middleware's before-hook makes current (a tracing span) stays current for the generator and
        # never leaks into the thread that opened the stream; the after-hook finds it there too.
        self.context = context = contextvars.copy_context()
        task._open_streams[sink] = request.deadline
        if task._server_chain is None and (request.deadline is None or time.time() <= request.deadline):
            # _begin without a chain to run, inline: no before-hook can make anything current.
            next(task._started)
            self.request, self.response, self.limit, self.began = request, None, 0, 0.0
            return
        self.request, self.response, self.limit, self.began = context.run(_begin, task, request)
        if self.response is not None:
            self._end()

    @classmethod
    def resumed(
        cls,
        task: BaseServiceTask,
        request: ServiceRequest,
        method: Callable[..., Any],
        sink: StreamSink,
        context: contextvars.Context,
        generator: Any,
        count: int,
        limit: int,
        began: float,
    ) -> SyncStreamRun:
        """A run that goes on with a stream begun elsewhere (a :class:`PulledStream` moving to a thread).

        ``generator`` (None: not made yet), ``count`` items sent, and the
        begin's ``limit`` and ``began`` are taken over; nothing is begun again.
        """
        run = cls.__new__(cls)
        run.task, run.method, run.sink, run.context = task, method, sink, context
        run.request, run.generator, run.count, run.limit, run.began = request, generator, count, limit, began
        run.pending = _NOTHING
        run.response = None
        _track(task, sink, request)
        return run

    @property
    def ended(self) -> bool:
        return self.response is not None

    def pump(self, limit: int | None = None, budget: float | None = None) -> bool:
        """Send items until the stream ends (True), or ``limit`` items were sent, or ``budget`` seconds passed (False)."""
        if self.response is not None:
            return True
        return self.context.run(self._pump, limit, budget)

    def _pump(self, limit: int | None, budget: float | None) -> bool:
        request, sink, task = self.request, self.sink, self.task
        token = _current_request.set(request)
        serial = task._serial_lock
        deadline = request.deadline
        sent = 0
        stop_at = None if budget is None else perf_counter() + budget
        try:
            if self.generator is None:
                self.generator = self.method(*request.args, **request.kwargs)
            generator = self.generator
            while limit is None or sent < limit:
                item = self.pending
                if item is _NOTHING:
                    if serial is not None:
                        serial.acquire()
                    try:
                        item = next(generator)
                    except StopIteration:
                        self.generator = None  # exhausted: closing it would do nothing (and costs a context switch-in)
                        self.response = ServiceResponse(True, None, None, request.request_id)
                        break
                    finally:
                        if serial is not None:
                            serial.release()
                else:
                    self.pending = _NOTHING
                try:
                    if not sink.send(item, deadline):
                        self.response = _stopped_response(request, sink)
                        break
                except SinkBusy:
                    self.pending = item  # made in place, it could not leave without waiting: a thread sends it
                    break
                self.count += 1
                sent += 1
                if deadline is not None and time.time() > deadline and not sink.cancelled:
                    self.response = deadline_response(request, started=True)
                    break
                if stop_at is not None and perf_counter() > stop_at:
                    break
        except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the generator's outcome, not the thread's end
            self.response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
        finally:
            _current_request.reset(token)
        if self.response is None:
            return False
        self._finish()  # in this stream's context already
        return True

    def abandon(self, response: ServiceResponse) -> None:
        """End the stream with ``response`` without stepping it again (its generator is closed)."""
        if self.response is None:
            self.response = response
            self._end()

    def _end(self) -> None:
        self.context.run(self._finish)

    def _finish(self) -> None:
        generator, self.generator = self.generator, None
        if generator is not None:
            token = _current_request.set(self.request)
            try:
                generator.close()  # its finally runs, here, now
            except BaseException:  # noqa: BLE001 - the stream's outcome is decided already
                pass
            finally:
                _current_request.reset(token)
        self.task._open_streams.pop(self.sink, None)
        assert self.response is not None
        self.sink.end(_conclude(self.task, self.request, self.response, self.limit, self.began, self.count))


def serve_sync_stream(
    task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], sink: StreamSink
) -> None:
    """Run generator ``method`` for ``request``, sending each item into ``sink``; always ends the sink."""
    SyncStreamRun(task, request, method, sink).pump()


async def serve_async_stream(
    task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], sink: StreamSink
) -> None:
    """Run async generator ``method`` for ``request`` on the running loop; always ends the sink.

    The deadline cancels the generator (``CancelledError`` inside it, then
    ``aclose()``); the caller gets ServiceTimeoutError after the items sent.
    """
    import asyncio

    from ._aio import _acquire_thread_lock, _within

    _track(task, sink, request)
    count = 0
    request, response, limit, began = _begin(task, request)
    _current_request.set(request)
    deadline = request.deadline
    try:
        if response is None:
            generator: Any = None

            serial = task._serial_lock

            async def pump() -> ServiceResponse:
                nonlocal count, generator
                generator = method(*request.args, **request.kwargs)
                step = generator.__anext__
                while True:
                    # A service declared not thread-safe: each step holds its serial lock, as its calls do.
                    if serial is not None and not await _acquire_thread_lock(serial, deadline):
                        return deadline_response(request, started=True)
                    try:
                        item = await step()
                    except StopAsyncIteration:
                        return ServiceResponse(True, None, None, request.request_id)
                    finally:
                        if serial is not None:
                            serial.release()
                    if not await sink.asend(item):
                        return _stopped_response(request, sink)
                    count += 1

            try:
                if deadline is None:
                    response = await pump()
                else:
                    response = await _within(pump(), max(0.0, deadline - time.time()))
            except TimeoutError:
                response = deadline_response(request, started=True)
            except asyncio.CancelledError:
                response = _stopped_response(request, sink)
                sink.end(_conclude(task, request, response, limit, began, count))
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the generator's outcome, not the loop's end
                response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
            finally:
                if generator is not None:
                    try:
                        await generator.aclose()
                    except BaseException:  # noqa: BLE001 - the stream's outcome is decided already
                        pass
    finally:
        _track(task, sink, None)
    sink.end(_conclude(task, request, response, limit, began, count))


# =========================================================================== consumer side


class StreamSource(ABC):
    """A transport's consumer end of one open stream."""

    @abstractmethod
    def receive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        """Items that arrived (waiting up to ``timeout`` for at least one) and the end response once it came.

        Returns ``([], None)`` when ``timeout`` passed with nothing new. Items
        returned still count against the window until :meth:`consumed`.
        """

    async def areceive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        """:meth:`receive` for asyncio code (the default waits in a thread; transports may do better)."""
        import asyncio

        loop = asyncio.get_running_loop()
        step = 0.25 if timeout is None else min(timeout, 0.25)
        return await loop.run_in_executor(None, self.receive, step)

    @abstractmethod
    def consumed(self, count: int) -> None:
        """The consumer has handed ``count`` more received items to its caller: the producer gets room for them."""

    @abstractmethod
    def close(self) -> None:
        """The consumer gives up: stop the producer, release what the stream holds; idempotent, never blocks long."""


class LocalStream(StreamSink, StreamSource):
    """Both ends of a stream within one process: a bounded deque between producer and consumer."""

    def __init__(self, window: int) -> None:
        StreamSink.__init__(self, window)
        self._items: collections.deque[Any] = collections.deque()
        self._arrived: threading.Condition | None = None  # made on the consumer's first wait (see _room)
        self._response: ServiceResponse | None = None
        self._async_arrival: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def _emit(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._arrived is not None:
                self._arrived.notify()
            self._wake_consumer()

    def _finish(self, response: ServiceResponse) -> None:
        with self._lock:
            self._response = response
            if self._arrived is not None:
                self._arrived.notify_all()
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        waiting = self._async_arrival
        if waiting is not None:
            self._async_arrival = None
            loop, future = waiting
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass

    def _take(self) -> tuple[list[Any], ServiceResponse | None]:
        items = list(self._items)
        self._items.clear()
        return items, self._response

    def receive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        with self._lock:
            if not self._items and self._response is None:
                self._wait_arrival(timeout)
            return self._take()

    def _wait_arrival(self, timeout: float | None) -> None:
        """Wait (holding ``_lock``) up to ``timeout`` for an item or the end."""
        arrived = self._arrived
        if arrived is None:
            arrived = self._arrived = threading.Condition(self._lock)
        arrived.wait(timeout)

    async def areceive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        import asyncio  # not at import time: a process that never awaits need not load it

        from ._aio import _within

        with self._lock:
            ready = bool(self._items) or self._response is not None
        if ready:
            # Yield to the loop once per batch: a fast producer must not starve the consumer's other tasks.
            await asyncio.sleep(0)
        with self._lock:
            if self._items or self._response is not None:
                return self._take()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            self._async_arrival = (loop, future)
        try:
            if timeout is None:
                await future
            else:
                await _within(_wait(future), timeout)  # not wait_for: on 3.11 it can swallow a cancellation
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._async_arrival = None
        with self._lock:
            return self._take()

    def consumed(self, count: int) -> None:
        self.acknowledge(count)

    def close(self) -> None:
        self.cancel()


class _Cancellable(Protocol):
    """What a task's stop cancels: a stream's sink, or a stream its consumer pulls."""

    def cancel(self, reason: ServiceResponse | None = None) -> None: ...


class _PulledRun:
    """The service side of a stream whose generator the consumer's thread steps (no thread hand-off).

    A consumer that stops reading leaves the generator paused; at the
    deadline the task's :class:`_StreamDeadlines` ends it (its generator is
    closed, its ``finally`` runs there), as a producer thread waiting for
    room would be: the consumer's next read raises ServiceTimeoutError.

    Shared by :class:`PulledStream` (a source under an ItemStream) and
    :class:`PulledItems` (the caller's iterator itself); each declares the
    slots. The stream has its own context, entered by every step as a
    :class:`SyncStreamRun`'s is; the task's stop cancels it (``cancel``):
    the next read ends it with the stop's reason (a :class:`PulledItems`,
    which the task does not hold, looks at the task's state instead).

    No ``__slots__`` here (each subclass declares the attributes below as
    its slots; typecheckers would refuse an empty tuple's assignments).
    """

    #: whether the task holds the stream in its open streams (its stop cancels it); one the caller's
    #: code holds directly must not be (a stream dropped unclosed must be collectable, to be closed)
    _tracked = True

    _task: BaseServiceTask
    _method: Callable[..., Any]
    _cost_key: str
    _context: contextvars.Context
    _generator: Any
    _count: int
    _served: ServiceRequest
    _response: ServiceResponse | None
    _server_limit: int
    _server_began: float
    cancelled: bool
    stop_reason: ServiceResponse | None
    #: whether the consumer is inside a step or a close (set before it reads the clock; see _StreamDeadlines)
    _stepping: bool
    #: whether the task's _StreamDeadlines ended the stream at its deadline
    _fired: bool
    #: the _StreamDeadlines watching the stream (None: not watched)
    _deadlines: _StreamDeadlines | None

    def _begin_run(self, task: BaseServiceTask, request: ServiceRequest) -> None:
        """The service side's begin: statistics, the server chain's before-hooks; a refusal ends it at once."""
        self._count = 0
        self._generator = None
        self._stepping = False
        self._fired = False
        self._deadlines = None
        self.cancelled = False
        self.stop_reason = None
        self._context = context = contextvars.copy_context()
        if self._tracked:
            task._open_streams[self] = request.deadline
        if task._server_chain is None and (request.deadline is None or time.time() <= request.deadline):
            # _begin without a chain to run: no before-hook can make anything current (no context.run).
            next(task._started)
            self._served, self._response, self._server_limit, self._server_began = request, None, 0, 0.0
            return
        self._served, self._response, self._server_limit, self._server_began = context.run(_begin, task, request)
        if self._response is not None:
            context.run(self._finish_run)

    def cancel(self, reason: ServiceResponse | None = None) -> None:
        """The service stops (``reason``: what the consumer gets): the next read ends the stream."""
        self.cancelled = True
        if reason is not None:
            self.stop_reason = reason

    def _handed_off(self) -> bool:
        """Whether a stream thread makes the items now (it closes the generator at the deadline itself)."""
        raise NotImplementedError

    def _watch_deadline(self) -> None:
        """Have the task's :class:`_StreamDeadlines` end the stream at its deadline if it is paused then."""
        if self._served.deadline is None or self._response is not None:
            return
        deadlines = self._task._stream_deadlines
        if deadlines is None:
            deadlines = _stream_deadlines(self._task)
            if deadlines is None:
                return  # the task stops: its stop ends the stream at the next read
        self._deadlines = deadlines
        deadlines.watch(self)

    def _deadline_passed(self, now: float, lock: threading.RLock) -> bool:
        """In the deadline thread, at time ``now``: end the stream if its deadline passed while it is paused.

        True when the stream needs no more watching (ended here or already).
        """
        deadline = self._served.deadline
        if deadline is None:
            return True
        if now <= deadline:
            return False
        if not lock.acquire(blocking=False):
            return False  # another stream's end is under way: next tick
        try:
            if self._stepping:
                return False  # its consumer is in a step or a close: it sees the deadline after it
            if self._response is None and not self._handed_off():
                self._fired = True
                self._abandon(deadline_response(self._served, started=True))
            return True
        finally:
            lock.release()

    def _end_once(self, response: ServiceResponse) -> None:
        """End the stream with ``response`` (as :meth:`_abandon`) unless the deadline thread ended it first."""
        deadlines = self._deadlines
        if deadlines is None:
            self._abandon(response)
            return
        with deadlines.lock:
            if self._response is None:
                self._abandon(response)

    def _stopped(self) -> ServiceResponse:
        if self.stop_reason is not None:
            return _named(self.stop_reason, self._served)
        return _ended_early(self._served, "the consumer closed the stream")

    def _make(self, wanted: int) -> tuple[list[Any], float]:
        """Make up to ``wanted`` items (at least one) within ``inline_limit`` seconds, in this stream's context.

        Sets ``_response`` when the stream ended (exhausted, failed, or the
        deadline passed while making them) and then finishes it. Returns the
        items made and the seconds they took.
        """
        task = self._task
        request = self._served
        items: list[Any] = []
        token = _current_request.set(request)
        began = perf_counter()
        try:
            generator = self._generator
            if generator is None:
                generator = self._generator = self._method(*request.args, **request.kwargs)
            deadline = request.deadline
            inline_limit = task.inline_limit
            while True:
                items.append(next(generator))
                if len(items) >= wanted or perf_counter() - began > inline_limit:
                    break
                if deadline is not None and time.time() > deadline:
                    self._response = deadline_response(request, started=True)
                    break
        except StopIteration:
            self._generator = None  # exhausted: closing it would do nothing
            self._response = ServiceResponse(True, None, None, request.request_id)
        except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the generator's outcome, not the thread's end
            self._response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
        finally:
            _current_request.reset(token)
        took = perf_counter() - began
        self._count += len(items)
        if self._response is not None:
            self._finish_run()
        return items, took

    def _abandon(self, response: ServiceResponse) -> None:
        """End the stream with ``response`` without stepping it again (its generator is closed)."""
        self._response = response
        self._context.run(self._finish_run)

    def _finish_run(self) -> None:
        """Close the generator (in this stream's context), run the server chain's end, count it."""
        generator, self._generator = self._generator, None
        if generator is not None:
            _close_generator(generator, self._served)
        self._task._open_streams.pop(self, None)
        assert self._response is not None
        self._response = _conclude(
            self._task, self._served, self._response, self._server_limit, self._server_began, self._count
        )

    def _close_run(self) -> None:
        """The consumer closed the stream before its end: the generator is closed here, now.

        The caller sets ``_stepping`` first (see :class:`_StreamDeadlines`).
        """
        deadline = self._served.deadline
        if deadline is not None and time.time() > deadline:
            # Closed by the consumer's deadline: the service side sees the timeout a stream thread's
            # producer would have ended with.
            self._end_once(deadline_response(self._served, started=True))
        elif self._task._server_chain is None:
            # No after-hook to show the end to: close the generator, count the stream as ended.
            self._response = _CLOSED_HERE
            generator, self._generator = self._generator, None
            if generator is not None:
                self._context.run(_close_generator, generator, self._served)
            self._task._open_streams.pop(self, None)
            next(self._task._finished)
        else:
            self._abandon(_ended_early(self._served, "the consumer closed the stream"))

    def _hand_off(self, window: int, unacknowledged: int) -> LocalStream:
        """Go on in one of the task's stream threads: the items from now on come through the LocalStream returned.

        ``unacknowledged``: items made here the consumer has not taken yet
        (they count against the window).
        """
        task = self._task
        local = LocalStream(window)
        local._unacknowledged = unacknowledged
        run = SyncStreamRun.resumed(
            task,
            self._served,
            self._method,
            local,
            self._context,
            self._generator,
            self._count,
            self._server_limit,
            self._server_began,
        )
        self._generator = None
        task._open_streams.pop(self, None)
        if self.cancelled:
            local.cancel(self.stop_reason)  # the task stopped meanwhile: the run ends at its first step
        try:
            _stream_threads(task).submit(run.pump)
        except RuntimeError:
            run.abandon(task._unavailable(self._served, "it stopped"))
        return local


class PulledStream(_PulledRun, StreamSource):
    """A stream whose generator the consumer steps in its own thread, for a generator known to be quick.

    The in-process counterpart of ``BaseServiceTask.run_inline``: no thread
    hand-off, so the first item costs about what a call does. ``receive``
    makes the next items (up to the window, for at most ``inline_limit``
    seconds) and returns them; the generator never runs ahead of the window,
    and a consumer that does not read leaves it paused. The stream moves to
    one of the task's stream threads (and from then on is a
    :class:`LocalStream` fed by a :class:`SyncStreamRun`) when a batch of
    items took longer than ``inline_limit`` or when it is read with ``async
    for`` (an event loop must not run a generator that may block). As with
    ``run_inline``, a step that turns slow cannot be abandoned at the
    deadline: the consumer waits for that one step, then gets
    ServiceTimeoutError. ``close()`` closes the generator in the closing
    thread (its ``finally`` runs there, at once).

    The source an ItemStream reads when the call has client middleware or a
    retry policy; without them the caller gets a :class:`PulledItems`.
    """

    __slots__ = (
        "_context",
        "_cost_key",
        "_count",
        "_deadlines",
        "_fired",
        "_generator",
        "_handoff",
        "_method",
        "_response",
        "_served",
        "_server_began",
        "_server_limit",
        "_stepping",
        "_task",
        "_unacknowledged",
        "_window",
        "cancelled",
        "stop_reason",
    )

    def __init__(
        self, task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], window: int, cost_key: str
    ) -> None:
        self._task = task
        self._method = method
        self._window = max(1, window)
        self._cost_key = cost_key
        self._unacknowledged = 0
        self._handoff: LocalStream | None = None
        self._begin_run(task, request)
        self._watch_deadline()

    def cancel(self, reason: ServiceResponse | None = None) -> None:
        _PulledRun.cancel(self, reason)
        handoff = self._handoff
        if handoff is not None:
            handoff.cancel(reason)

    def _handed_off(self) -> bool:
        return self._handoff is not None

    def receive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        handoff = self._handoff
        if handoff is not None:
            return handoff.receive(timeout)
        if self._response is not None:
            return [], self._response
        self._stepping = True  # before the clock is read: see _StreamDeadlines
        try:
            return self._receive()
        finally:
            self._stepping = False

    def _receive(self) -> tuple[list[Any], ServiceResponse | None]:
        if self.cancelled:
            self._end_once(self._stopped())
            return [], self._response
        deadline = self._served.deadline
        if deadline is not None and time.time() > deadline:
            self._end_once(deadline_response(self._served, started=True))
            return [], self._response
        first = self._generator is None
        items, took = self._context.run(self._make, 1 if first else max(1, self._window - self._unacknowledged))
        if first:
            self._task.observe_cost(self._cost_key, took)
        if self._response is not None:
            return items, self._response
        self._unacknowledged += len(items)
        if took > self._task.inline_limit:
            self._handoff = self._hand_off(self._window, self._unacknowledged)
        return items, None

    def consumed(self, count: int) -> None:
        handoff = self._handoff
        if handoff is not None:
            handoff.consumed(count)
        else:
            self._unacknowledged -= count

    async def areceive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        if self._handoff is None:
            if self._response is not None:
                return [], self._response
            self._stepping = True  # before the clock is read: see _StreamDeadlines
            try:
                deadline = self._served.deadline
                if deadline is not None and time.time() > deadline:
                    self._end_once(deadline_response(self._served, started=True))
                    return [], self._response
                self._handoff = self._hand_off(self._window, self._unacknowledged)
            finally:
                self._stepping = False
        return await self._handoff.areceive(timeout)

    def close(self) -> None:
        handoff = self._handoff
        if handoff is not None:
            handoff.close()
        elif self._response is None:
            self._stepping = True  # before the clock is read: see _StreamDeadlines
            try:
                self._close_run()
            finally:
                self._stepping = False


#: What a pulled stream its consumer closed ends with when no server middleware is to see the end.
_CLOSED_HERE = ServiceResponse(True, None, None, "")


def _close_generator(generator: Any, request: ServiceRequest) -> None:
    """Close ``generator`` (its ``finally`` runs, here, now) with ``request`` current; never raises an Exception."""
    token = _current_request.set(request)
    try:
        generator.close()
    except BaseException:  # noqa: BLE001 - the stream's outcome is decided already
        pass
    finally:
        _current_request.reset(token)


def _pulled_method(task: BaseServiceTask, name: str) -> tuple[Callable[..., Any], str] | None:
    """The generator method ``name`` and its cost key when a stream of it may be pulled (see :func:`pull_stream`)."""
    if task._serial_lock is not None or task._state != "running":
        return None
    try:
        method = task._generator_methods.get(name)
    except TypeError:  # an unhashable name: open_stream answers it
        return None
    if method is None:
        return None
    cost_key = "stream:" + name
    cost = task._method_cost.get(cost_key)
    if cost is None or cost >= task.inline_limit:
        return None
    return method, cost_key


def pull_stream(task: BaseServiceTask, request: ServiceRequest, window: int) -> PulledStream | None:
    """A :class:`PulledStream` for ``request`` when its generator may run in the consumer's thread; else None.

    It may when the task is running, the service is thread-safe, the method
    is a (sync) generator, and its first item has been observed to come in
    under ``inline_limit`` seconds. None: use ``task.open_stream`` (which
    also answers every refusal: unknown method, not a generator...).
    """
    found = _pulled_method(task, request.method_name)
    if found is None:
        return None
    return PulledStream(task, request, found[0], window, found[1])


class ItemStream(Iterator[Any], AsyncIterator[Any]):
    """The items of one streamed call, in order: ``for item in stream`` or ``async for item in stream``.

    Guarantees: items arrive in the order the method yielded them, each
    once. The stream ends after the last item, or raises the method's
    exception (typed, as for calls) after the items yielded before it;
    ServiceTimeoutError when the deadline (``timeout`` of the whole stream)
    passes; ServiceUnavailableError when the host or replica dies mid-stream.
    A failure before the first item may be retried by the retry policy; a
    stream that delivered anything never is.

    ``close()`` (also ``break`` out of a ``with`` block, ``aclose()``, or
    the stream being garbage-collected) stops the generator in the service:
    its ``finally`` runs and what the stream held is released. Client
    middleware sees the stream once: ``before_call`` when it opens,
    ``after_call``/``observe_call`` when it ends, with the item count in
    ``response.metadata["kservice.stream.items"]`` and the whole stream's
    duration.
    """

    __slots__ = (
        "_async",
        "_attempt",
        "_began",
        "_delivered",
        "_done",
        "_error",
        "_give_up_at",
        "_items",
        "_limit",
        "_manager",
        "_request",
        "_route",
        "_sent",
        "_source",
        "_unacknowledged",
        "_window",
    )

    def __init__(self, manager: ServiceManager, route: _Route, request: ServiceRequest, window: int) -> None:
        self._manager = manager
        self._route = route
        self._request = request
        self._give_up_at = _monotonic_deadline(request)
        self._window = window
        self._items: collections.deque[Any] = collections.deque()
        self._unacknowledged = 0
        self._delivered = 0
        self._attempt = 0
        self._done = False
        self._error: BaseException | None = None
        self._source: StreamSource | None = None
        self._sent = request
        self._limit = 0
        self._began = 0.0
        # Retries wait with time.sleep: only sync consumers retry (an event loop must not block).
        self._async = False
        if route.chain is not None:
            self._open()
            return
        # _open without a chain, inline (first-item latency): the transport opens the stream.
        try:
            self._source = route.connection.open_stream(request, window)
        except Exception as exc:  # noqa: BLE001 - this attempt fails (see _open_failed)
            self._open_failed(exc)

    @property
    def request(self) -> ServiceRequest:
        return self._request

    @property
    def delivered(self) -> int:
        """Items handed to the consumer so far."""
        return self._delivered

    # ---------------------------------------------------------------- opening

    def _open(self) -> None:
        route = self._route
        chain = route.chain
        self._sent = self._request
        if chain is not None:
            self._began = perf_counter()
            try:
                self._sent, refusal, self._limit = chain.run_before(self._request)
            except MiddlewareError as exc:
                self._sent, self._limit = exc.request, exc.index
                refusal = ServiceResponse.from_exception(self._request.request_id, exc.error, origin="client")
            if refusal is not None:
                if refusal.success:
                    # A middleware answered the stream (a stub, a cache): its result is the items.
                    self._end_without_retry(self._answer(refusal, "a before_call"))
                else:
                    self._end(refusal)
                return
        try:
            self._source = route.connection.open_stream(self._sent, self._window)
        except Exception as exc:  # noqa: BLE001 - this attempt fails (see _open_failed)
            self._open_failed(exc)

    def _open_failed(self, exc: Exception) -> None:
        """The transport could not open the stream: a runtime error (ServiceError) or a failure to send."""
        if isinstance(exc, ServiceError):
            self._end(ServiceResponse.from_exception(self._request.request_id, exc, origin="runtime"))
        else:
            self._end(ServiceResponse.from_exception(self._request.request_id, exc, origin="client"))

    def _end(self, response: ServiceResponse) -> bool:
        """The stream ended with ``response``; True when a retry reopened it instead."""
        source, self._source = self._source, None
        if source is not None:
            source.close()
        # As for calls, the retry policy sees the response the after-hooks made (a fallback's answer is final).
        final = self._after(response)
        if not final.success and self._delivered == 0 and not self._items and not self._async:
            if self._give_up_at is not None:
                _reanchor(self._request, self._give_up_at)
            delay = self._route.retry_delay(self._request, final, self._attempt)
            if delay is not None:
                self._attempt += 1
                self._route = self._manager._retry_route(self._route, response, delay, self._request.deadline)
                self._open()
                return True
        self._done = True
        if not final.success:
            self._error = final.to_exception(self._request.service_name, self._request.method_name)
        return False

    def _after(self, response: ServiceResponse) -> ServiceResponse:
        """Run the after-hooks and observers on the stream's end; the end the caller gets.

        An after-hook that turns a failed end into a success answers the
        stream only if no item reached the caller yet (its result is then the
        items, see :meth:`_answer`): a stream that delivered items and failed
        ends with its error, never as a success that would look complete.
        """
        chain = self._route.chain
        if chain is None:
            return response  # the item count is for middleware observers: none here
        if not response.success or CLOSED_KEY in response.metadata or ITEMS_KEY not in response.metadata:
            response.metadata = {**response.metadata, ITEMS_KEY: self._delivered + len(self._items)}
        final = chain.run_after_hooks(self._sent, response, self._limit)
        if final.success and not response.success:
            if self._delivered or self._items:
                final = response
            else:
                final = self._answer(final, "an after_call")
                final.metadata = {**final.metadata, ITEMS_KEY: len(self._items)}
        if chain.has_observers:
            chain.run_observers(self._sent, final, self._limit, perf_counter() - self._began)
        return final

    def _answer(self, response: ServiceResponse, hook: str) -> ServiceResponse:
        """Take the items of a middleware's successful answer to this stream (its result: an iterable).

        Returns ``response`` with its items queued for the consumer, or a
        failed response (TypeError naming the stream and the result's type)
        when the result is not a collection of items: None, a ``str``, bytes
        or a mapping (their items are not what an answer means), or anything
        not iterable.
        """
        result = response.result
        request = self._request
        if result is None or isinstance(result, (str, bytes, bytearray, memoryview, collections.abc.Mapping)):
            items = None
        else:
            try:
                iterator = iter(result)
            except TypeError:
                items = None
            else:
                try:
                    items = list(iterator)
                except Exception as exc:  # noqa: BLE001 - the answer's own iteration failed: the stream fails with it
                    return ServiceResponse.from_exception(request.request_id, exc, origin="client")
        if items is None:
            error = TypeError(
                f"{hook} answered stream {request.service_name}.{request.method_name} with "
                f"{type(result).__name__}, not a list of its items: answer a stream with an iterable "
                "of its items (a list; [] for none), or let it reach the service"
            )
            return ServiceResponse.from_exception(request.request_id, error, origin="client")
        self._items.extend(items)
        return response

    def _remaining(self) -> float | None:
        give_up_at = self._give_up_at
        return None if give_up_at is None else give_up_at - time.monotonic()

    def _end_without_retry(self, response: ServiceResponse) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.close()
        self._done = True
        response = self._after(response)
        if not response.success:
            self._error = response.to_exception(self._request.service_name, self._request.method_name)

    def _accept(self, items: list[Any], end: ServiceResponse | None) -> None:
        self._items.extend(items)
        self._unacknowledged += len(items)
        if end is not None:
            self._source = None  # ended by the producer: nothing to cancel
            self._end(end)

    # ---------------------------------------------------------------- sync

    def __iter__(self) -> ItemStream:
        return self

    def __next__(self) -> Any:
        items = self._items
        while True:
            if items:
                self._delivered += 1
                return items.popleft()
            source = self._source
            if source is None or self._done:
                self._raise_end()
            if self._unacknowledged:
                # Every received item is with the caller now: the producer gets room for them.
                source.consumed(self._unacknowledged)  # type: ignore[union-attr]
                self._unacknowledged = 0
            give_up_at = self._give_up_at  # _remaining(), inline (first-item latency)
            remaining = None if give_up_at is None else give_up_at - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._expire()
                continue
            received, end = source.receive(remaining)  # type: ignore[union-attr]
            if end is not None:
                self._accept(received, end)
                continue
            if received:
                self._unacknowledged += len(received)
                items.extend(received)

    def _expire(self) -> None:
        self._end_without_retry(
            ServiceResponse.from_exception(
                self._request.request_id,
                ServiceTimeoutError(
                    f"stream {self._request.service_name}.{self._request.method_name} passed its deadline "
                    f"after {self._delivered + len(self._items)} item(s)"
                ),
                origin="runtime",
            )
        )

    def _raise_end(self) -> Any:
        error = self._error
        if error is not None:
            self._error = None
            raise error
        raise StopIteration

    def close(self) -> None:
        """Stop the stream: the generator in the service is closed (its ``finally`` runs); idempotent."""
        if self._done:
            return
        if self._items:
            self._items.clear()
        if self._route.chain is None:
            # No middleware to see the end: nothing to build for it (first-item latency of short streams).
            self._done = True
            source, self._source = self._source, None
            if source is not None:
                source.close()
            return
        self._end_without_retry(_ended_early(self._request, "the consumer closed the stream"))
        self._error = None

    def __enter__(self) -> ItemStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A stream dropped unfinished (a ``break`` without ``with``) is closed when collected: the
        # generator in the service stops, and client middleware sees its end, as for close().
        try:
            if not self._done:
                self.close()
        except Exception:  # noqa: BLE001 - best effort at garbage collection
            pass

    # ---------------------------------------------------------------- async

    def __aiter__(self) -> ItemStream:
        return self

    async def __anext__(self) -> Any:
        import asyncio

        self._async = True
        while True:
            if self._items:
                self._delivered += 1
                return self._items.popleft()
            if self._done or self._source is None:
                break
            if self._unacknowledged:
                self._source.consumed(self._unacknowledged)
                self._unacknowledged = 0
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                self._expire()
                continue
            try:
                items, end = await self._source.areceive(remaining)
            except asyncio.CancelledError:
                self.close()  # the consuming task was cancelled: the producer stops too
                raise
            self._accept(items, end)
        error = self._error
        if error is not None:
            self._error = None
            raise error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """:meth:`close` for ``async`` code."""
        self.close()

    def __repr__(self) -> str:
        state = "done" if self._done else "open"
        return (
            f"<ItemStream {self._request.service_name}.{self._request.method_name} {state} delivered={self._delivered}>"
        )


class PulledItems(_PulledRun, ItemStream):
    """The caller's iterator of a pulled stream with no client middleware and no retry policy: one object.

    What an ItemStream over a :class:`PulledStream` does, without the layers
    between them (first-item latency): ``next()`` steps the generator in the
    caller's thread (the first item alone, then up to the window per read,
    for at most ``inline_limit`` seconds), ``close()`` closes it there. The
    same guarantees: order, the deadline (ServiceTimeoutError after the
    items made in time), the method's error raised typed after the items
    before it, the task's stop (ServiceUnavailableError), server middleware
    seeing the whole stream. It goes on as a plain ItemStream over a
    :class:`LocalStream` fed by a stream thread when a batch took longer than
    ``inline_limit`` or when it is read with ``async for``.
    """

    __slots__ = (
        "_context",
        "_cost_key",
        "_count",
        "_deadlines",
        "_fired",
        "_generator",
        "_method",
        "_pulling",
        "_response",
        "_served",
        "_server_began",
        "_server_limit",
        "_stepping",
        "_task",
        "cancelled",
        "stop_reason",
    )

    def __init__(
        self,
        manager: ServiceManager,
        route: _Route,
        request: ServiceRequest,
        window: int,
        task: BaseServiceTask,
        method: Callable[..., Any],
        cost_key: str,
    ) -> None:
        # ItemStream's state for a stream opened without middleware (the rest is set when it leaves: _leave).
        self._manager = manager
        self._route = route
        self._request = request
        self._window = max(1, window)
        self._give_up_at = _monotonic_deadline(request)
        self._items: collections.deque[Any] = collections.deque()
        self._delivered = 0
        self._done = False
        self._error: BaseException | None = None
        self._source: StreamSource | None = None
        self._pulling = True
        self._task = task
        self._method = method
        self._cost_key = cost_key
        if task._server_chain is not None or (request.deadline is not None and time.time() > request.deadline):
            self._begin_run(task, request)
            self._watch_deadline()
            return
        # _begin_run's common case, inline (first-item latency): nothing to run, nothing made current.
        self._count = 0
        self._generator = None
        self._stepping = False
        self._fired = False
        self.cancelled = False
        self.stop_reason = None
        self._context = contextvars.copy_context()
        self._served = request
        self._response = None
        self._server_limit = 0
        self._server_began = 0.0
        next(task._started)
        # _watch_deadline and _StreamDeadlines.watch, inline (first-item latency); a deadline is set here.
        deadlines = self._deadlines = task._stream_deadlines or _stream_deadlines(task)
        if deadlines is not None:
            entries = deadlines.entries
            entries.append(weakref.ref(self))
            if len(entries) == 1:
                deadlines._wake.set()

    def __next__(self) -> Any:
        items = self._items
        if items:
            self._delivered += 1
            return items.popleft()
        if not self._pulling:
            return ItemStream.__next__(self)
        if self._done:
            self._raise_end()
        if self._response is None:  # the service side goes on
            self._stepping = True  # before the clock is read: see _StreamDeadlines
            try:
                if self.cancelled or self._task._state != "running":
                    self._end_once(self._stopped())  # the task stopped (or is stopping): the stream ends unavailable
                else:
                    deadline = self._request.deadline
                    if deadline is not None and time.time() > deadline:
                        self._pulled_expired()
                        self._raise_end()
                    task = self._task
                    if self._generator is None:  # the first read: the first item alone
                        item, took = self._context.run(self._make_first)
                        if took > task.inline_limit:
                            # Only a slow first item is recorded: the method's cost is already known under the
                            # limit (else it would not be pulled), and a quick one keeps it there, so recording
                            # it would change no decision (first-item latency).
                            task.observe_cost(self._cost_key, took)
                            if item is not _NOTHING:
                                self._leave(1)  # it was slow: the rest is made in a stream thread
                        if item is not _NOTHING:
                            self._delivered = 1
                            return item
                    else:
                        made, took = self._context.run(self._make, self._window)
                        if self._response is None:  # made at least one item, and more may come
                            if took > task.inline_limit:
                                self._leave(len(made))  # it turned slow: the rest is made in a stream thread
                            self._delivered += 1
                            if len(made) == 1:
                                return made[0]
                            items.extend(made)
                            return items.popleft()
                        items.extend(made)
            finally:
                self._stepping = False
        if self._fired:
            # Ended at its deadline by the task's deadline thread while nobody read: the timeout, as if read then.
            self._pulled_expired()
            self._raise_end()
        self._pulled_ended(self._response)  # type: ignore[arg-type]
        return self.__next__()  # the items made before the end, then the end

    def _make_first(self) -> tuple[Any, float]:
        """:meth:`_make` of the first item alone: (the item, or _NOTHING when the stream ended; seconds taken)."""
        request = self._served
        token = _current_request.set(request)
        began = perf_counter()
        try:
            generator = self._generator = self._method(*request.args, **request.kwargs)
            item = next(generator)
        except StopIteration:
            self._generator = None  # exhausted: closing it would do nothing
            self._response = ServiceResponse(True, None, None, request.request_id)
        except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the generator's outcome, not the thread's end
            self._response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
        else:
            self._count = 1
            return item, perf_counter() - began
        finally:
            _current_request.reset(token)
        took = perf_counter() - began
        self._finish_run()
        return _NOTHING, took

    def _pulled_ended(self, response: ServiceResponse) -> None:
        """The service side ended (``response``, after its middleware): what the caller sees after the items."""
        self._done = True
        if not response.success:
            self._error = response.to_exception(self._request.service_name, self._request.method_name)

    def _pulled_expired(self) -> None:
        if self._response is None:  # else the task's deadline thread ended it already
            self._end_once(deadline_response(self._served, started=True))
        self._done = True
        self._error = ServiceTimeoutError(
            f"stream {self._request.service_name}.{self._request.method_name} passed its deadline "
            f"after {self._delivered + len(self._items)} item(s)"
        )

    def _leave(self, pending: int) -> None:
        """Go on as a plain ItemStream over a LocalStream a stream thread feeds (see the class docstring).

        ``pending``: items made here the caller has not taken yet (they count against the window).
        """
        self._source = self._hand_off(self._window, pending)
        self._unacknowledged = pending
        self._attempt = 0
        self._sent = self._request
        self._limit = 0
        self._began = 0.0
        self._async = False
        self._pulling = False

    async def __anext__(self) -> Any:
        if self._pulling:
            deadline = self._request.deadline
            self._stepping = True  # before the clock is read: see _StreamDeadlines
            try:
                leave = (
                    self._response is None
                    and not self._done
                    and (deadline is None or time.time() <= deadline)  # past it: __next__ raises the timeout
                )
                if leave:
                    self._leave(len(self._items))  # an event loop must not step a generator that may block
            finally:
                self._stepping = False
            if not leave:
                try:
                    return self.__next__()  # nothing left to make: the items made, then the end
                except StopIteration:
                    raise StopAsyncIteration from None
        return await ItemStream.__anext__(self)

    def close(self, *_exc_info: object) -> None:
        """Stop the stream: the generator is closed here, now (its ``finally`` runs); idempotent."""
        if not self._pulling:
            ItemStream.close(self)
            return
        if self._done:
            return
        self._done = True
        if self._items:
            self._items.clear()
        self._error = None
        if self._response is not None:
            return
        task = self._task
        deadline = self._served.deadline
        self._stepping = True  # before the clock is read: see _StreamDeadlines
        if task._server_chain is None and (deadline is None or time.time() <= deadline):
            # _close_run's common case, inline (first-item latency): close the generator, count the end.
            self._response = _CLOSED_HERE
            generator, self._generator = self._generator, None
            self._stepping = False  # ended: the deadline thread lets it be
            if generator is not None:
                self._context.run(_close_generator, generator, self._served)
            next(task._finished)  # (never in the task's open streams: see _tracked)
            return
        try:
            self._close_run()
        finally:
            self._stepping = False

    #: leaving a ``with`` block closes the stream (close itself, one call fewer: first-item latency)
    __exit__ = close

    #: not held by the task (a stream dropped unclosed is collected, and closed then): each read looks
    #: at the task's state instead, so its stop still ends the stream with ServiceUnavailableError
    _tracked = False

    def _handed_off(self) -> bool:
        return not self._pulling

    def _stopped(self) -> ServiceResponse:
        if self.stop_reason is None and self._task._state != "running":
            return unavailable_mid_stream(self._request, "the service stopped")
        return _PulledRun._stopped(self)


def pull_items(
    task: BaseServiceTask, manager: ServiceManager, route: _Route, request: ServiceRequest, window: int
) -> PulledItems | None:
    """A :class:`PulledItems` for ``request`` when its generator may run in the caller's thread (as
    :func:`pull_stream` decides); else None."""
    pulled = _pulled_method(task, request.method_name)
    if pulled is None:
        return None
    return PulledItems(manager, route, request, window, task, *pulled)


def unavailable_mid_stream(request: ServiceRequest, why: str) -> ServiceResponse:
    """The end a consumer gets when the producer's host or replica died mid-stream (never retried once items came)."""
    return ServiceResponse.from_exception(
        request.request_id,
        ServiceUnavailableError(f"stream {request.service_name}.{request.method_name} broke: {why}"),
        origin="runtime",
    )
