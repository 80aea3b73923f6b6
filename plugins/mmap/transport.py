"""The ``mmap`` transport: calls between processes of one host through shared-memory rings.

Server side (:class:`MmapListener`): each task gets a request ring named after
the service, the host pid and a random token. One listener thread drains it
in batches (``get_many``) and decides, per request, where it runs:

- *inline*, in the listener thread, when the method has been observed to take
  less than ``mmap.inline_limit`` seconds and nothing this listener handed to
  the worker pool is still running on a one-at-a-time service. This costs no
  thread wake-up (~20-40 µs saved per call).
- on the task's worker pool otherwise: unknown methods (their first call),
  methods observed slow, and everything while a serial service is busy.

A method that overruns the limit while running inline is moved to the pool
from its next call on, so one slow method stalls the listener at most once
until its measured cost decays below the limit again. The cost is the task's
own estimate (``task.method_cost``), fed by every run: in this listener, in
the pool (its running time, its wait in the pool's queue excluded) and in
in-process callers' threads. A task declared not thread-safe still runs one request at a
time: both paths go through ``task.execute``, which holds its serial lock.

Client side (:class:`MmapConnection`): a synchronous ``call`` puts the request
and waits on the calling thread's own response ring (created on the thread's
first call, reused, closed at thread exit, when the last connection of the
process closes, at process exit, or after an idle minute), so no other thread
is woken. ``send`` (async) uses one per-process response ring drained by one
dispatcher thread, ``kservice-mmap-responses``, which completes the replies.
While waiting, callers check every half second that the service's host is
alive: a host killed mid-call yields ServiceUnavailableError within about a
second, not a hang until the timeout.

Errors: an argument that cannot be pickled is a ``TypeError`` raised to the
caller (nothing is sent); a result that cannot be pickled reaches the caller
as a ServiceCallError naming the problem; a full request ring makes a sync
caller wait up to the service's ``local.queue_timeout`` (never past the
deadline), then ServiceOverloadedError, and an async caller not at all (the
connection's sender thread waits for it, see :meth:`MmapConnection.send`). A
request the host cannot decode is answered at once with a ServiceCallError that
is also a TypeError ("could not decode the arguments ... on the host"; the
method did not run); a response the caller cannot decode fails that call at
once the same way ("could not be decoded in the caller"; the call ran). Both
are marked not retryable. A record whose request id or reply address cannot be
read is logged and skipped. No room in the shared-memory filesystem is a
ServiceUnavailableError naming the directory and the size.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kservice import (
    MAY_HAVE_RUN,
    Connection,
    Listener,
    ServiceAddress,
    ServiceOverloadedError,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
    Transport,
    idempotent_methods,
    timeout_response,
)
from kservice import __version__ as kservice_version
from kservice._transport import BLOCKED_COMPLETION, blocked_completion
from kservice.keys import ADDRESS_IDEMPOTENT, CONNECTION_CLOSED, RETRYABLE

from . import codec, registry
from .ring import (
    QueueClosed,
    QueueEmpty,
    QueueError,
    QueueFull,
    QueueLayoutError,
    QueueWedged,
    SharedMemoryFull,
    ShmQueue,
    attach_queue,
    create_queue,
)

if TYPE_CHECKING:
    import logging
    from types import ModuleType

    from kservice import BaseServiceTask

    from .streams import MmapStreamSource

__all__ = ["MmapConnection", "MmapListener", "MmapTransport"]


class _Log:
    """The ``kservice.mmap`` logger, looked up at its first message: a caller's start need not import logging.

    The first attribute read replaces this module's ``log`` with the logger itself.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        import logging

        global log
        log = logging.getLogger("kservice.mmap")
        return getattr(log, name)


log: logging.Logger = _Log()  # type: ignore[assignment]

#: Seconds between liveness checks of the host while a caller waits.
LIVENESS_INTERVAL = 0.5
#: Data capacity of a calling thread's response ring, and of the process's async one.
SYNC_RESPONSE_CAPACITY = 1 << 20
ASYNC_RESPONSE_CAPACITY = 8 << 20
#: Spin budget of the dispatcher thread's ring (seconds).
ASYNC_SPIN = 0.0
#: A thread ring unused this long is closed by the next sweep.
IDLE_RING_SECONDS = 60.0
#: Most caller rings a listener keeps mapped; past it, it drops them all (a later answer maps its ring anew).
MAX_CALLER_RINGS = 1024
#: Longest a server waits for room in a caller's response ring before dropping the response.
RESPONSE_PUT_TIMEOUT = 2.0
#: Cancel notices a listener remembers for requests it has not seen (older ones are forgotten).
CANCELLED_EARLY_LIMIT = 4096
#: Key of an address's info (and of a host's status) saying its listener runs chunk records (``codec.KIND_CHUNK``).
#: A host without it would drop such a record unanswered, so callers send it only to hosts that say so.
#: Its value is the chunk records the host runs: 1, ``KIND_CHUNK``; 2, ``KIND_CHUNK_SINGLE`` too.
CHUNK_RECORDS = "chunk_records"
#: The ``CHUNK_RECORDS`` this listener announces.
CHUNK_RECORDS_VERSION = 2
#: Key of a host's status: how many calls of chunk records its listener ran in one loop (``task.run_many``).
CHUNK_CALLS_IN_LOOP = "chunk_calls_in_loop"


def _chunk_records(value: Any) -> int:
    """A host's ``CHUNK_RECORDS`` as a version (0: none): an older host says True or 1, a garbled one nothing."""
    if value is True:
        return 1
    return value if type(value) is int and value > 0 else 0


DEFAULT_OPTIONS: dict[str, Any] = {
    "request_queue_capacity": 4 << 20,
    "inline_limit": 0.0002,
    "publish": None,
    "start_timeout": 60.0,
    "caller_ring_check": 5.0,
}

#: A pattern, compiled (and cached by re) on its first use, not at import.
_SAFE = r"[^A-Za-z0-9_-]"


def _inline_limit(queue: ShmQueue) -> int:
    """Records larger than this travel through a segment, so one record never hogs a ring."""
    return queue.max_record // 4


def _runtime_error(request_id: str, error: BaseException, may_have_run: bool | None = None) -> ServiceResponse:
    response = ServiceResponse.from_exception(request_id, error, origin="runtime").for_wire()
    if may_have_run is not None:
        response.metadata = {MAY_HAVE_RUN: may_have_run}
    return response


#: Response metadata key the retry policy reads: False means re-sending cannot help.


def _undecodable_response(request_id: str, call: str, exc: codec.DecodeError) -> ServiceResponse:
    """The failure a caller gets for a response it received but cannot decode: the call ran."""
    error = TypeError(
        f"the result of {call} could not be decoded in the caller (pid {os.getpid()}): {exc}; the call ran in the "
        "service, its result is lost here. The result's class must be importable by the caller under the same module name"
    )
    response = ServiceResponse.from_exception(request_id, error, origin="service", with_traceback=False)
    response.metadata = {RETRYABLE: False}
    return response


_timed_out = timeout_response


_status_ids = itertools.count(1)
_perf_counter = time.perf_counter
_time = time.time


# =========================================================================== server side


class MmapListener(Listener):
    """Makes one task reachable through its request ring (see the module docstring)."""

    def __init__(self, task: BaseServiceTask) -> None:
        self._task = task
        options = {**DEFAULT_OPTIONS, **(task.options.get("mmap") or {})}
        self._limit = float(options["inline_limit"])
        self._concurrent = task.max_workers > 1
        name = f"svc.{re.sub(_SAFE, '_', task.service_name)[:80]}.{os.getpid()}.{os.urandom(3).hex()}"
        self.queue = create_queue(name, int(options["request_queue_capacity"]))
        self._published = bool(options["publish"] is None or options["publish"])
        # Callers that find the service through the registry do not import its class: they learn from here
        # which methods their retry policy may re-send after a fault.
        declared = sorted(idempotent_methods(task.service_factory.service_class, task.options.get("idempotent", ())))
        info = {
            "pid": os.getpid(),
            "queue_timeout": task.queue_timeout,
            "started_at": time.time(),
            "class": task.service_factory.class_path,
            CHUNK_RECORDS: CHUNK_RECORDS_VERSION,
            ADDRESS_IDEMPOTENT: declared,
        }
        self.address = ServiceAddress("mmap", task.service_name, name, instance=name, info=info)
        try:
            if self._published:
                registry.publish(
                    task.service_name,
                    name,
                    queue_timeout=task.queue_timeout,
                    instance=name,
                    cls=info["class"],
                    **{CHUNK_RECORDS: CHUNK_RECORDS_VERSION, ADDRESS_IDEMPOTENT: declared},
                )
        except BaseException:
            self.queue.close()
            self.queue.unlink()
            raise
        self._outstanding = 0
        self._outstanding_lock = threading.Lock()
        self._responders: dict[str, ShmQueue] = {}
        self._responders_lock = threading.Lock()
        self._caller_check = float(options["caller_ring_check"])
        self._next_caller_check = time.monotonic() + self._caller_check
        #: a caller ring was mapped since the last look for gone callers (the loop looks only then, or when idle)
        self._callers_added = False
        #: caller rings that stayed full for RESPONSE_PUT_TIMEOUT: answers to them are not waited for until
        #: one fits again (see _send_to_caller)
        self._full_callers: set[str] = set()
        #: requests handed to the task's pool and not answered yet (a cancel notice finds them here)
        self._pooled: dict[str, ServiceRequest] = {}
        #: the calls of each chunk handed to the pool, by chunk id (a cancel notice for the chunk finds them here)
        self._pooled_chunks: dict[str, list[ServiceRequest]] = {}
        #: cancel notices of requests not seen yet (see _cancel)
        self._cancelled_early: set[str] = set()
        #: calls of chunk records run in the listener's loop (the compact path end to end; in its status)
        self._chunk_calls_in_loop = 0
        #: the start and run time of the request this thread runs inline (see _answer_inline)
        self._inline_began = 0.0
        self._inline_ran = 0.0
        self._closed = False
        self._accepting = True
        _pool_user(1)
        self._thread = threading.Thread(target=self._serve, name=f"kservice-mmap-{task.service_name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ lifecycle

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def restart(self) -> None:
        if not self._closed and not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name=self._thread.name, daemon=True)
            self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new requests (callers get ServiceUnavailableError at once) and unpublish; idempotent.

        Requests already in the ring are still answered.
        """
        if not self._accepting:
            return
        self._accepting = False
        if self._published:
            registry.withdraw(self._task.service_name, self.queue.name)
        with contextlib.suppress(QueueError):
            self.queue.mark_closed()

    def close(self) -> None:
        """Stop accepting, answer what is left with ServiceUnavailableError, unlink the ring; idempotent."""
        if self._closed:
            return
        self.stop_accepting()
        self._thread.join(10.0)
        self._closed = True
        while True:
            try:
                records = self.queue.get_many(256, 0)
            except QueueError:
                break
            for record in records:
                self._refuse(record, "the service stopped before the request could run")
        self.queue.close()
        self.queue.unlink()
        with self._responders_lock:
            self._responders.clear()
        _pool_user(-1)

    # -------------------------------------------------------------- serving

    def _serve(self) -> None:
        get_many = self.queue.get_many
        handle = self._handle
        check_every = self._caller_check
        while True:
            # Per record batch: the clock first (one C call); the codec is asked only once a look is due.
            if time.monotonic() >= self._next_caller_check and (self._callers_added or codec.mapped_segments()):
                self._let_go_of_gone_callers()
            try:
                records = get_many(64, check_every)
            except QueueClosed:
                return
            except QueueEmpty:  # idle for a while: a moment to look for callers gone
                if self._responders or codec.mapped_segments():
                    self._let_go_of_gone_callers()
                continue
            except QueueError as exc:  # QueueCorrupted: the ring dropped bad bytes and carries on
                if isinstance(exc, QueueWedged):
                    log.error(
                        "mmap listener of %r: its request ring %s cannot be used: %s",
                        self._task.service_name,
                        self.queue.name,
                        exc,
                    )
                else:
                    log.warning("mmap listener of %r: %s", self._task.service_name, exc)
                if not self._accepting:
                    return  # stopping: a damaged ring must not keep the host from it
                continue
            except Exception:  # keep serving whatever happens
                log.exception("mmap listener of %r: receiving failed", self._task.service_name)
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            if len(records) == 1:
                # One request (a sync caller's, or a quiet moment's): its answer leaves as soon as it ran.
                try:
                    handle(records[0], None)
                except Exception:  # one bad request must not stop the listener
                    log.exception("mmap listener of %r: handling a request failed", self._task.service_name)
                continue
            # Responses of requests run inline here, by caller's ring: a caller with
            # several requests in this batch gets them back in one record.
            answered: dict[str, list[tuple[ServiceRequest, ServiceResponse]]] = {}
            for record in records:
                try:
                    handle(record, answered)
                except Exception:  # one bad request must not stop the listener
                    log.exception("mmap listener of %r: handling a request failed", self._task.service_name)
            self._reply_all(answered)

    def _handle(
        self,
        record: bytes,
        answered: dict[str, list[tuple[ServiceRequest, ServiceResponse]]] | None,
        decoded: ServiceRequest | None = None,
    ) -> None:
        """Run or queue one request (``decoded``: one call of a request batch, already decoded).

        Inline responses go to ``answered``, or straight back when it is None.
        """
        if decoded is None:
            try:
                kind, request = codec.decode_request(record)
            except codec.DecodeError as exc:
                self._undecodable_request(exc)
                return
            if kind != codec.KIND_CALL:
                if kind == codec.KIND_STATUS:
                    self._reply_status(request)
                elif kind == codec.KIND_CANCEL:
                    self._cancel(request.request_id)
                elif kind == codec.KIND_BATCH:
                    self._handle_batch(request, answered)  # type: ignore[arg-type]
                elif kind == codec.KIND_CHUNK:
                    self._handle_chunk(request)
                elif kind == codec.KIND_CHUNK_SINGLE:
                    self._handle_chunk(request, single=True)
                elif kind in (codec.KIND_STREAM_CREDIT, codec.KIND_STREAM_CANCEL):
                    _streams().control(self, kind, request)
                else:
                    self._unknown_kind(kind, request)
                return
            if request.metadata and codec.STREAM_KEY in request.metadata:
                _streams().open_stream(self, request)
                return
        else:
            request = decoded
        if self._cancelled_early and request.request_id in self._cancelled_early:
            self._cancelled_early.discard(request.request_id)
            return  # its caller gave up before it arrived: never started, never answered
        task = self._task
        name = request.method_name
        if name[:1] == "_" or not name:
            # Refused by the task before any lookup; cheap enough to answer here.
            self._reply(request, task.execute(request))
            return
        cost = task.method_cost(name)
        if (
            cost is not None
            and cost < self._limit
            and task._state == "running"
            and (self._concurrent or not self._outstanding)
        ):
            if answered is None:
                # Answered first, the server observers and the bookkeeping after: the caller waits, they do not.
                # This thread runs them before it reads its next record, so a status read after the answer
                # (which this thread serves) sees the call observed.
                self._inline_began = _perf_counter()
                task.execute(request, answer=self._answer_inline)
                task.observe_cost(name, self._inline_ran)
                return
            started = _perf_counter()
            response = task.execute(request)
            task.observe_cost(name, _perf_counter() - started)
            replies = answered.get(request.response_queue_name)
            if replies is None:
                answered[request.response_queue_name] = [(request, response)]
            else:
                replies.append((request, response))
            return
        with self._outstanding_lock:
            self._outstanding += 1
        pooled = self._pooled
        request_id = request.request_id
        pooled[request_id] = request

        def reply(response: ServiceResponse) -> None:
            # The pool feeds task.method_cost with the run alone, not the wait in its queue.
            pooled.pop(request_id, None)
            with self._outstanding_lock:
                self._outstanding -= 1
            self._reply(request, response)

        task.submit(request, reply)

    def _answer_inline(self, request: ServiceRequest, response: ServiceResponse) -> None:
        """``task.execute``'s answer for a request run on this thread: the run's cost (observers excluded), the reply."""
        self._inline_ran = _perf_counter() - self._inline_began
        self._reply(request, response)

    def _handle_batch(
        self, messages: list[Any], answered: dict[str, list[tuple[ServiceRequest, ServiceResponse]]] | None
    ) -> None:
        """Run or queue each call of a request batch record (``ServiceManager.map``), each as if it came alone.

        The answers of those run inline leave together, one record per caller.
        A call the host cannot decode is answered with its own error; the
        others run.
        """
        try:
            requests = codec.decode_request_batch(messages)
            bad: codec.DecodeError | None = None
        except codec.DecodeError as exc:
            requests, bad = exc.requests, exc  # type: ignore[attr-defined]
        own: dict[str, list[tuple[ServiceRequest, ServiceResponse]]] = {} if answered is None else answered
        handle = self._handle
        for request in requests:
            handle(b"", own, request)
        if bad is not None:
            self._undecodable_request(bad)
        if answered is None:
            self._reply_all(own)

    def _handle_chunk(
        self, request: ServiceRequest, undecodable: dict[int, tuple[Any, ...]] | None = None, *, single: bool = False
    ) -> None:
        """Run a chunk record (``ServiceManager.map``'s compact form) and answer it with one record.

        ``request.args`` holds one argument tuple per call. When the method is
        known to be fast and the task has no server middleware, the listener
        runs the calls in a tight loop (``task.run_many``), checking the
        deadline before each: calls not started by then are answered timed
        out and never start. Otherwise (method slow or not known yet, server
        middleware present, the loop stopped because a call overran the inline
        limit) the calls not run yet go to the task's pool, each as its own
        request through ``task.execute`` (server middleware sees each), and the
        answer leaves when the last is done; a cancel notice for the chunk
        keeps those not started from starting. ``undecodable``: calls already
        answered (arguments the host could not decode), not run. ``single``: a
        ``KIND_CHUNK_SINGLE`` record, ``request.args`` holds each call's one
        positional argument.
        """
        if self._cancelled_early and request.request_id in self._cancelled_early:
            self._cancelled_early.discard(request.request_id)
            return  # its caller gave up before it arrived: none started, none answered
        calls = request.args
        count = len(calls)
        results: list[Any] = [None] * count
        errors: dict[int, tuple[Any, ...]] = dict(undecodable) if undecodable else {}
        task = self._task
        name = request.method_name
        start = 0
        cost = task.method_cost(name) if not undecodable else None
        if (
            cost is not None
            and cost < self._limit
            and task._state == "running"
            and (self._concurrent or not self._outstanding)
        ):
            began = _perf_counter()
            ran = task.run_many(request, calls, self._limit, single=single)
            if ran is not None:
                done, failures = ran
                start = len(done)
                self._chunk_calls_in_loop += start
                if start:
                    results[:start] = done
                    task.observe_cost(name, (_perf_counter() - began) / start)
                for index, failure in failures.items():
                    errors[index] = _error_fields(failure)
        if start < count and request.deadline is not None and _time() > request.deadline:
            for index in range(start, count):  # never started: the caller may send them again
                errors.setdefault(index, _NOT_STARTED_IN_TIME)
            start = count
        if start < count and any(index not in errors for index in range(start, count)):
            self._pool_chunk(request, results, errors, start, single)
            return
        self._reply_chunk(request, results, errors)

    def _pool_chunk(
        self,
        request: ServiceRequest,
        results: list[Any],
        errors: dict[int, tuple[Any, ...]],
        start: int,
        single: bool = False,
    ) -> None:
        """Hand the calls of a chunk from ``start`` on (those not answered yet) to the pool; the last one done answers.

        ``single``: each entry of ``request.args`` is a call's one argument.
        """
        chunk_id = request.request_id
        calls = [
            ServiceRequest(
                f"{chunk_id}#{index}",
                request.service_name,
                request.method_name,
                args if type(args) is tuple and not single else (args,),
                request.kwargs,
                request.response_queue_name,
                request.deadline,
                request.metadata,
            )
            for index, args in enumerate(request.args)
            if index >= start and index not in errors
        ]
        left = [len(calls)]
        lock = threading.Lock()
        answered = [False]
        finished: set[int] = set()
        self._pooled_chunks[chunk_id] = calls

        def answer() -> None:
            self._pooled_chunks.pop(chunk_id, None)
            self._reply_chunk(request, results, errors)

        def done(index: int, response: ServiceResponse) -> None:
            with self._outstanding_lock:
                self._outstanding -= 1
            with lock:
                if answered[0]:
                    return  # answered at the deadline already: this late outcome is dropped
                if response.success:
                    results[index] = response.result
                else:
                    fields = _error_fields(response)
                    if response.error_type == "ServiceTimeoutError" and response.error_origin == "runtime":
                        fields = (*fields[:4], {**fields[4], MAY_HAVE_RUN: False})  # execute() never started it
                    errors[index] = fields
                finished.add(index)
                left[0] -= 1
                if left[0]:
                    return
                answered[0] = True
            if deadline_timer is not None:
                deadline_timer.cancel()
            answer()

        def at_deadline() -> None:
            # The deadline passed with calls unfinished: the caller gets the outcomes there are now; calls
            # still queued never start (their deadline passed), running ones are answered timed out.
            with lock:
                if answered[0]:
                    return
                answered[0] = True
                for call in calls:
                    index = int(call.request_id.rpartition("#")[2])
                    if index not in finished:
                        errors[index] = _ran_past_deadline(request)
            answer()

        deadline_timer: threading.Timer | None = None
        if request.deadline is not None and calls:
            deadline_timer = threading.Timer(max(0.0, request.deadline - _time()), at_deadline)
            deadline_timer.daemon = True
            deadline_timer.start()

        submit = self._task.submit
        for call in calls:
            index = int(call.request_id.rpartition("#")[2])
            with self._outstanding_lock:
                self._outstanding += 1
            submit(call, lambda response, index=index: done(index, response))  # type: ignore[misc]

    def _reply_chunk(self, request: ServiceRequest, results: list[Any], errors: dict[int, tuple[Any, ...]]) -> None:
        """Send a chunk's one answer record to its caller; a gone or stuck caller loses it (logged)."""
        name = request.response_queue_name
        queue = self._responders.get(name) or (self._responder(name) if name else None)
        if queue is None:
            return
        try:
            record, segment = codec.encode_chunk_answer(
                request.request_id, results, errors, queue.owner_pid, _inline_limit(queue)
            )
        except (
            SharedMemoryFull
        ) as exc:  # no room for its out-of-band segment: every call ran, none can be told its result
            failed = _error_fields(_unsendable_result(request, exc))
            errors = {index: errors.get(index, failed) for index in range(len(results))}
            record, segment = codec.encode_chunk_answer(
                request.request_id, [None] * len(results), errors, queue.owner_pid, 1 << 30
            )
        except BaseException:  # noqa: BLE001 - some result (or error) cannot be pickled: those calls say so, the others keep theirs
            record, segment = self._encode_chunk_answer_apart(request, results, errors, queue)
        self._send_to_caller(queue, name, record, segment, "the answer to chunk", request.request_id)

    @staticmethod
    def _encode_chunk_answer_apart(
        request: ServiceRequest, results: list[Any], errors: dict[int, tuple[Any, ...]], queue: ShmQueue
    ) -> tuple[bytes, str | None]:
        """The answer of a chunk some of whose outcomes cannot be pickled: each of those fails alone (TypeError)."""
        import pickle

        results = list(results)
        errors = dict(errors)
        for index in range(len(results)):
            try:
                pickle.dumps((results[index], errors.get(index)), 5)
            except BaseException as exc:  # noqa: BLE001 - whatever pickling raises
                outcome = ServiceResponse(index not in errors, results[index])
                errors[index] = _error_fields(_unpicklable_result(request, outcome, exc))
                results[index] = None
        return codec.encode_chunk_answer(request.request_id, results, errors, queue.owner_pid, 1 << 30)

    def _reply_all(self, answered: dict[str, list[tuple[ServiceRequest, ServiceResponse]]]) -> None:
        for replies in answered.values():
            try:
                if len(replies) == 1:
                    self._reply(*replies[0])
                else:
                    self._reply_batch(replies)
            except Exception:
                log.exception("mmap listener of %r: replying failed", self._task.service_name)

    def _cancel(self, request_id: str) -> None:
        """Its caller gave up on ``request_id``: a request still queued for the pool never starts.

        Its deadline moves to the past, so the worker that takes it answers
        ServiceTimeoutError without running it (the caller drops that answer);
        it counts as expired in the task's status. A request already running
        runs to its end (a thread cannot be interrupted), and calls it makes
        from then on fail at once; a coroutine method (``async def``) is
        cancelled (``asyncio.CancelledError`` inside it). A notice that arrives
        before its request (a caller whose send waited for room in the ring) is
        remembered, boundedly.
        """
        request = self._pooled.get(request_id)
        if request is not None:
            request.deadline = 0.0
            self._task.cancel_request(request_id)
            return
        calls = self._pooled_chunks.get(request_id)
        if calls is not None:  # a chunk: its calls not started yet never start
            for call in calls:
                call.deadline = 0.0
            return
        early = self._cancelled_early
        if len(early) >= CANCELLED_EARLY_LIMIT:
            early.clear()  # notices of requests answered before their notice came: forget them
        early.add(request_id)

    def _reply_status(self, request: ServiceRequest) -> None:
        try:
            status = self._task.get_service_status().to_dict()
            status["pid"] = os.getpid()
            status[CHUNK_RECORDS] = CHUNK_RECORDS_VERSION
            status[CHUNK_CALLS_IN_LOOP] = self._chunk_calls_in_loop
            response = ServiceResponse.ok(request.request_id, status)
        except Exception as exc:  # the caller gets the error instead
            response = _runtime_error(request.request_id, ServiceUnavailableError(f"status failed: {exc}"))
        self._reply(request, response)

    def _undecodable_request(self, exc: codec.DecodeError) -> None:
        """Answer a request the host cannot decode at once, when its id and reply address could be read.

        The method did not run. The answer is a ServiceCallError that is also a
        TypeError, marked not retryable (the same bytes would fail the same way).
        A record without a readable reply address (garbage) is logged and dropped.
        """
        service = self._task.service_name
        envelope = exc.envelope
        if (
            type(envelope) is tuple
            and len(envelope) == 9
            and envelope[0] in (codec.KIND_CHUNK, codec.KIND_CHUNK_SINGLE)
            and exc.response_queue
        ):
            self._undecodable_chunk(exc)
            return
        if type(exc.envelope) is list:  # a request batch: each call is run or answered on its own
            answered: dict[str, list[tuple[ServiceRequest, ServiceResponse]]] = {}
            for request, undecodable in codec.batch_envelope_calls(exc):
                if request is not None:
                    self._handle(b"", answered, request)
                elif undecodable is not None:
                    self._undecodable_request(undecodable)
            self._reply_all(answered)
            return
        if exc.request_id is None or not exc.response_queue:
            log.warning(
                "mmap listener of %r: skipped an undecodable record (no request id or reply address): %s", service, exc
            )
            return
        method = exc.method_name if exc.method_name is not None else "?"
        log.warning(
            "mmap listener of %r: answered an undecodable request %s (%s) with an error: %s",
            service,
            exc.request_id,
            method,
            exc,
        )
        error = TypeError(
            f"could not decode the arguments of {service}.{method} on the host (pid {os.getpid()}): {exc}; "
            "the method did not run. Every argument's class must be importable by the host under the same "
            "module name (a class defined in the caller's __main__ is not)"
        )
        self._answer_unrun(
            ServiceRequest(exc.request_id, service, method, response_queue_name=exc.response_queue), error
        )

    def _answer_unrun(self, request: ServiceRequest, error: TypeError) -> None:
        """Answer ``request``, which nothing ran, with ``error``: not retryable (this host would refuse it again)."""
        response = ServiceResponse.from_exception(request.request_id, error, origin="service", with_traceback=False)
        response.metadata = {RETRYABLE: False}
        self._reply(request, response)

    def _unknown_kind(self, kind: int, request: ServiceRequest) -> None:
        """Answer a record of a kind this host does not know (sent by a newer kservice) instead of dropping it.

        Its caller would otherwise wait for its whole timeout. The answer is a
        ServiceCallError that is also a TypeError, not retryable (this host
        would refuse it again); nothing ran.
        """
        service = self._task.service_name
        log.warning(
            "mmap listener of %r: answered a record of unknown kind %r (request %s) with an error",
            service,
            kind,
            request.request_id,
        )
        if not request.response_queue_name:
            return
        error = TypeError(
            f"the host of {service!r} (pid {os.getpid()}, kservice {kservice_version}) does not know record kind "
            f"{kind!r} (request {request.request_id}, method {request.method_name!r}): the caller runs a kservice "
            "the host does not understand; nothing ran. Run the same kservice version in both"
        )
        self._answer_unrun(request, error)

    def _undecodable_chunk(self, exc: codec.DecodeError) -> None:
        """A chunk record the host cannot decode whole: the calls whose arguments it could rebuild run, the others fail alone."""
        envelope = exc.envelope
        service, method = self._task.service_name, exc.method_name if exc.method_name is not None else "?"
        error = TypeError(
            f"could not decode the arguments of {service}.{method} on the host (pid {os.getpid()}): {exc}; "
            "the method did not run. Every argument's class must be importable by the host under the same "
            "module name (a class defined in the caller's __main__ is not)"
        )
        failed = ServiceResponse.from_exception(exc.request_id or "", error, origin="service", with_traceback=False)
        fields = _error_fields(failed)
        fields = (*fields[:4], {RETRYABLE: False})
        calls = envelope[4] if type(envelope[4]) is tuple else ()
        shared_ok = exc.exact and not codec.holds_placeholder((envelope[5], envelope[8]))
        undecodable = {
            index: fields for index, args in enumerate(calls) if not shared_ok or codec.holds_placeholder(args)
        }
        log.warning(
            "mmap listener of %r: %d call(s) of chunk %s (%s) cannot be decoded, answered with an error: %s",
            service,
            len(undecodable),
            exc.request_id,
            method,
            exc,
        )
        try:
            request = codec.request_from_message(envelope)
        except codec.DecodeError:
            request = ServiceRequest(
                exc.request_id or "", service, method, calls, response_queue_name=exc.response_queue or ""
            )
            undecodable = dict.fromkeys(range(len(calls)), fields)
        self._handle_chunk(request, undecodable or None, single=envelope[0] == codec.KIND_CHUNK_SINGLE)

    def _refuse(self, record: bytes, why: str) -> None:
        try:
            kind, request = codec.decode_request(record)
            if kind == codec.KIND_BATCH:
                for message in request:  # type: ignore[attr-defined]
                    with contextlib.suppress(Exception):
                        self._refuse_request(codec.request_from_message(message), why)
                return
        except codec.DecodeError as exc:  # its segment is released already; answer when the caller can be told
            if exc.request_id is None or not exc.response_queue:
                return
            request = ServiceRequest(
                exc.request_id, self._task.service_name, "", response_queue_name=exc.response_queue
            )
        except Exception:  # noqa: BLE001 - nothing readable to answer
            return
        self._refuse_request(request, why)

    def _refuse_request(self, request: ServiceRequest, why: str) -> None:
        error = ServiceUnavailableError(f"service {self._task.service_name!r} is unavailable: {why}")
        self._reply(request, _runtime_error(request.request_id, error, may_have_run=False))

    # -------------------------------------------------------------- replying

    def _responder(self, name: str) -> ShmQueue | None:
        queue = self._responders.get(name)
        if queue is not None:
            return queue
        with self._responders_lock:
            queue = self._responders.get(name)
            if queue is None:
                try:
                    queue = attach_queue(name)
                except (OSError, QueueError, ValueError) as exc:
                    log.info(
                        "mmap listener of %r: caller's response queue %s is gone: %s",
                        self._task.service_name,
                        name,
                        exc,
                    )
                    return None
                if len(self._responders) >= MAX_CALLER_RINGS:
                    # Handles are dropped, not closed: a worker may still be writing through one.
                    self._responders.clear()
                self._responders[name] = queue
                self._callers_added = True
        return queue

    def _let_go_of_gone_callers(self) -> None:
        """Unmap the rings and pooled segments of callers that are gone: the caller process ended, or removed them.

        Why: a caller removes its rings and pooled segments when its threads or
        its process end, but the shared memory of a removed file lives on as
        long as a process maps it, and this host maps the ring of every caller
        it answered (1 MiB each; one per ``kservice call`` run) and keeps up to
        8 of the segments that carried large arguments (up to 64 MiB each).
        Runs in the listener thread, at most every ``mmap.caller_ring_check``
        seconds while rings were added or segments are mapped, and whenever the
        ring stayed empty that long; a look costs a ``stat`` and a ``/proc``
        read per ring and per segment. A pool worker still answering through a
        ring closed here loses that answer, logged, as for any caller gone.
        """
        self._next_caller_check = time.monotonic() + self._caller_check
        self._callers_added = False
        codec.unmap_gone_senders()
        with self._responders_lock:
            mapped = list(self._responders.items())
        gone = [(name, queue) for name, queue in mapped if not (queue.linked and queue.owner_alive)]
        if not gone:
            return
        with self._responders_lock:
            for name, queue in gone:
                self._full_callers.discard(name)
                if self._responders.get(name) is queue:
                    del self._responders[name]
        for _, queue in gone:
            try:
                queue.close()
            except BufferError:  # a thread is inside a put through it: unmapped once that thread lets go
                pass

    def _reply(self, request: ServiceRequest, response: ServiceResponse) -> None:
        """Send ``response`` to the caller's ring; a gone or stuck caller loses it (logged)."""
        name = request.response_queue_name
        queue = self._responders.get(name) or (self._responder(name) if name else None)
        if queue is None:
            return
        if response.exception is not None:
            response = response.for_wire()
        try:
            record, segment = codec.encode_response(response, queue.owner_pid, _inline_limit(queue))
        except SharedMemoryFull as exc:  # no room for its out-of-band segment: the caller learns why
            record, segment = codec.encode_response(_unsendable_result(request, exc), queue.owner_pid, 1 << 30)
        except BaseException as exc:  # noqa: BLE001 - the result (or error) cannot be pickled
            record, segment = codec.encode_response(
                _unpicklable_result(request, response, exc), queue.owner_pid, 1 << 30
            )
        put = queue._compiled_put
        if put is not None and not put(record):
            if self._full_callers:
                self._full_callers.discard(name)  # it reads again
            return
        self._send_to_caller(queue, name, record, segment, "the response to", request.request_id)

    def _reply_batch(self, replies: list[tuple[ServiceRequest, ServiceResponse]]) -> None:
        """Answer several requests of one caller with one record (each alone when they do not fit one)."""
        name = replies[0][0].response_queue_name
        queue = self._responder(name) if name else None
        if queue is None:
            return
        try:
            record = codec.encode_response_batch([response for _, response in replies], _inline_limit(queue))
        except BaseException:  # noqa: BLE001 - big or unpicklable results: each goes its own way
            record = None
        if record is None:
            for request, response in replies:
                self._reply(request, response)
            return
        self._send_to_caller(queue, name, record, None, "the batch of responses, count", len(replies))

    def _send_to_caller(
        self, queue: ShmQueue, name: str, record: bytes, segment: str | None, what: str, which: object
    ) -> None:
        """Put one answer record into caller queue ``name``; a caller gone or stuck loses it, and is forgotten.

        The put waits up to ``RESPONSE_PUT_TIMEOUT`` for room, once: a ring that
        stays full that long is marked, and answers to it are put without
        waiting (dropped when they do not fit) until one fits again. Why: a
        caller that stopped reading (Ctrl-Z, a debugger, a paused container)
        with many answers due made every answer wait 2 s in turn, holding the
        pool's workers and, behind them, every other caller. Its calls end at
        their deadlines instead; a caller that reads again gets answers again.
        On failure the record's out-of-band segment is unlinked, the cached
        handle of that queue dropped (a later answer attaches anew or finds it
        gone), and the loss logged (``what`` and ``which`` say which answer;
        the answers dropped while a ring is marked at debug level).
        """
        marked = name in self._full_callers
        try:
            queue.put(record, 0 if marked else RESPONSE_PUT_TIMEOUT)
        except (QueueError, ValueError, OSError) as exc:
            # (ValueError, OSError: the handle was closed under a put waiting for room, because its
            # caller is gone; see _let_go_of_gone_callers.)
            codec.unlink_segment(segment)
            with self._responders_lock:
                if self._responders.get(name) is queue:
                    del self._responders[name]
            if isinstance(exc, QueueFull) and not marked:
                self._full_callers.add(name)
                why = f"it stayed full for {RESPONSE_PUT_TIMEOUT:g} s; answers to it are dropped until one fits"
            else:
                why = str(exc)
            import logging  # a host's rare path: a caller's start does not import it

            log.log(
                logging.DEBUG if marked else logging.INFO,
                "mmap listener of %r: dropped %s %s (caller's queue %s: %s)",
                self._task.service_name,
                what,
                which,
                name,
                why,
            )
            return
        if marked:
            self._full_callers.discard(name)


def _error_fields(response: ServiceResponse) -> tuple[Any, ...]:
    """What a chunk answer carries for one failed call (see ``codec.encode_chunk_answer``)."""
    response = response.for_wire()  # a method's exception leaves its arguments and attributes in the metadata
    return (
        response.error,
        response.error_type,
        response.error_origin,
        response.remote_traceback,
        response.metadata or {},
    )


def _ran_past_deadline(request: ServiceRequest) -> tuple[Any, ...]:
    """What a chunk answer carries for a call still running at the chunk's deadline (it may have run)."""
    return (
        f"call {request.service_name}.{request.method_name} timed out: still running at its deadline",
        "ServiceTimeoutError",
        "runtime",
        "",
        {},
    )


#: A chunk's call whose turn came after the deadline: answered timed out, never started.
_NOT_STARTED_IN_TIME = (
    "the call's deadline passed before its turn in its chunk; it never started",
    "ServiceTimeoutError",
    "runtime",
    "",
    {MAY_HAVE_RUN: False},
)


def _unsendable_result(request: ServiceRequest, exc: SharedMemoryFull) -> ServiceResponse:
    error = ServiceUnavailableError(
        f"the response of {request.service_name}.{request.method_name} could not be sent back: {exc}; the call ran"
    )
    failed = _runtime_error(request.request_id, error)
    failed.metadata = {RETRYABLE: False}  # it ran: re-sending would run it again
    return failed


def _unpicklable_result(request: ServiceRequest, response: ServiceResponse, exc: BaseException) -> ServiceResponse:
    what = "result" if response.success else "error"
    error = TypeError(
        f"the {what} of {request.service_name}.{request.method_name} cannot be sent back to the caller: "
        f"it is not picklable ({type(exc).__name__}: {exc})"
    )
    failed = ServiceResponse.from_exception(request.request_id, error, origin="service", with_traceback=False)
    return failed.for_wire()


# =========================================================================== client side


_users_lock = threading.Lock()
_users = 0


def _streams() -> ModuleType:
    """The stream machinery (``streams.py``), imported with a process's first stream: plain calls never load it."""
    from . import streams

    return streams


def _stream_rings_unused() -> None:
    """This process's last mmap connection closed: its idle stream rings go, if it ever opened a stream."""
    streams = sys.modules.get(f"{__package__}.streams")
    pool = getattr(streams, "pool", None)
    if pool is not None:
        pool.shutdown()


def _pool_user(delta: int) -> None:
    """Count this process's connections and listeners; the last one out releases the segment pool."""
    global _users
    with _users_lock:
        _users += delta
        last = _users <= 0
        if last:
            _users = 0
    if last:
        codec.release_pool()


class _ThreadRing:
    """A calling thread's own response ring."""

    __slots__ = ("busy", "closed", "last_used", "queue")

    def __init__(self, queue: ShmQueue) -> None:
        self.queue = queue
        self.busy = False
        self.closed = False
        self.last_used = time.monotonic()


class _ClientRings:
    """This process's response rings: one per calling thread, one for async calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._rings: list[_ThreadRing] = []
        self._connections = 0
        self._async_queue: ShmQueue | None = None
        self._dispatcher: threading.Thread | None = None
        # Async requests waiting for their response: the reply, and the connection that sent
        # it, by request id. Two plain tables rather than an entry object per call: with
        # thousands of calls in flight, every object the garbage collector tracks costs.
        self.pending: dict[str, Callable[[ServiceResponse], None]] = {}
        self.senders: dict[str, MmapConnection] = {}

    # ---------------------------------------------------------- thread rings

    def acquire(self) -> _ThreadRing:
        """The calling thread's ring, marked busy (creates it on first use)."""
        ring: _ThreadRing | None = getattr(self._local, "ring", None)
        if ring is not None:
            # Without the lock: mark busy, then look at closed. A sweep marks closed, then looks
            # at busy (see _sweep_locked); bytecodes run one at a time, so one of the two sees
            # the other's mark, and a ring is never closed under its thread.
            ring.busy = True
            if not ring.closed:
                return ring
            ring.busy = False
            with self._lock:
                if not ring.closed:
                    ring.busy = True
                    return ring
        queue = create_queue(
            f"rsp.{os.getpid()}.{threading.get_ident() & 0xFFFFFFFF:x}.{os.urandom(3).hex()}", SYNC_RESPONSE_CAPACITY
        )
        ring = _ThreadRing(queue)
        ring.busy = True
        # The sentinel dies with the thread's locals, closing the ring when the thread exits.
        sentinel = _Sentinel()
        weakref.finalize(sentinel, self._release_ring, ring)
        self._local.ring = ring
        self._local.sentinel = sentinel
        with self._lock:
            self._rings.append(ring)
            self._sweep_locked(idle_only=True)
        return ring

    def _release_ring(self, ring: _ThreadRing) -> None:
        with self._lock:
            self._close_ring_locked(ring)
            with contextlib.suppress(ValueError):
                self._rings.remove(ring)

    @staticmethod
    def _close_ring_locked(ring: _ThreadRing) -> None:
        if ring.closed:
            return
        ring.closed = True
        _ClientRings._remove_queue(ring)

    @staticmethod
    def _remove_queue(ring: _ThreadRing) -> None:
        with contextlib.suppress(Exception):
            ring.queue.unlink()
            ring.queue.close()

    def _sweep_locked(self, idle_only: bool) -> None:
        now = time.monotonic()
        keep = []
        for ring in self._rings:
            if not ring.closed and not ring.busy and (not idle_only or now - ring.last_used > IDLE_RING_SECONDS):
                ring.closed = True  # first, then busy: the other half of acquire's handshake
                if ring.busy:
                    ring.closed = False  # its thread took it meanwhile
                else:
                    self._remove_queue(ring)
            if not ring.closed:
                keep.append(ring)
        self._rings = keep

    # ------------------------------------------------------------ connections

    @property
    def open_connections(self) -> int:
        """How many mmap connections of this process are open."""
        return self._connections

    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1

    def connection_closed(self) -> None:
        """One connection closed. With the last one, the rings go; the async ring once no call awaits an answer."""
        with self._lock:
            self._connections -= 1
            last = self._connections <= 0
            if last:
                self._connections = 0
                self._sweep_locked(idle_only=False)
        if last and not self.pending:
            self.stop_dispatcher()
        # Otherwise the dispatcher keeps delivering the answers of calls already sent (a draining
        # host's included) and retires by itself once none is awaited (see _retire_if_idle).

    # ------------------------------------------------------------- async ring

    def async_queue(self) -> ShmQueue:
        queue = self._async_queue
        if queue is not None:
            return queue
        with self._lock:
            if self._async_queue is None:
                queue = create_queue(f"rsp.{os.getpid()}.async.{os.urandom(3).hex()}", ASYNC_RESPONSE_CAPACITY)
                # Sleep at once: spinning would hold the GIL the threads making the calls need.
                queue.set_spin_limit(ASYNC_SPIN)
                thread = threading.Thread(
                    target=self._dispatch, args=(queue,), name="kservice-mmap-responses", daemon=True
                )
                self._async_queue, self._dispatcher = queue, thread
                thread.start()
            return self._async_queue

    def stop_dispatcher(self) -> None:
        """Stop the dispatcher and remove the async ring; calls still awaiting an answer fail (may have run)."""
        with self._lock:
            queue, thread = self._async_queue, self._dispatcher
            self._async_queue = self._dispatcher = None
        if queue is None or thread is None:
            return
        with contextlib.suppress(QueueError):
            queue.mark_closed()
        if thread is not threading.current_thread():
            thread.join(5.0)
        self._fail_pending(lambda p: True, "this process stopped receiving responses")
        with contextlib.suppress(Exception):
            queue.unlink()
            queue.close()

    def _retire_if_idle(self, queue: ShmQueue) -> bool:
        """In the dispatcher: stop (True) when no connection is open and no call awaits an answer."""
        with self._lock:
            if self._connections or self.pending or self._async_queue is not queue:
                return False
            self._async_queue = self._dispatcher = None
        with contextlib.suppress(Exception):
            queue.mark_closed()
            queue.unlink()
            queue.close()
        return True

    def _dispatch(self, queue: ShmQueue) -> None:
        deliver = self._deliver
        next_check = time.monotonic() + LIVENESS_INTERVAL
        while True:
            try:
                records = queue.get_many(256, LIVENESS_INTERVAL)
            except QueueEmpty:
                records = []
            except QueueClosed:
                return
            except QueueError as exc:
                log.warning("mmap async responses: %s", exc)
                records = []
            if records:
                began = time.monotonic()
                deliver(records)
                now = time.monotonic()
                if now - began > BLOCKED_COMPLETION:
                    thread = "this process's response thread"
                    log.warning("mmap async responses: %s", blocked_completion(thread, len(records), now - began))
            else:
                now = time.monotonic()
            if now >= next_check:
                next_check = now + LIVENESS_INTERVAL
                self._check_pending(queue)
                if self._retire_if_idle(queue):
                    return

    def _fail_undecodable(self, exc: codec.DecodeError) -> None:
        """Fail, at once, the async calls whose responses arrived but cannot be decoded."""
        if not exc.request_ids:
            log.warning("mmap async responses: skipped an undecodable response (no request id readable): %s", exc)
        for request_id in exc.request_ids:
            conn = self.senders.pop(request_id, None)
            reply = self.pending.pop(request_id, None)
            if reply is None:
                continue  # its caller already gave up
            call = f"a call to {conn._service_name!r}" if conn is not None else "an async call"
            log.warning("mmap async responses: the response to %s (%s) cannot be decoded: %s", request_id, call, exc)
            try:
                reply(_undecodable_response(request_id, call, exc))
            except BaseException:  # noqa: BLE001 - a failing callback (SystemExit included) must not stop the dispatcher
                log.exception("mmap async responses: completing %s failed", request_id)

    def _deliver(self, records: list[bytes]) -> None:
        """Complete the calls these response records answer (the dispatcher's work)."""
        pop = self.pending.pop
        forget = self.senders.pop
        response_from_message = codec.response_from_message
        response = ServiceResponse
        for record in records:
            try:
                messages = codec.decode_many(record)
            except codec.DecodeError as exc:
                messages = exc.messages  # the readable ones of a batch are delivered
                self._fail_undecodable(exc)
            for message in messages:
                request_id = message[0]
                reply = pop(request_id, None)
                if reply is None:
                    continue  # its caller already gave up
                forget(request_id, None)
                try:
                    if len(message) == 2:  # a plain success, most answers: codec.response_from_message inline
                        reply(response(True, message[1], None, request_id))
                    else:
                        # A chunk's answer (see MmapConnection.send_chunk) goes to its callback as it came.
                        reply(message if len(message) == 3 else response_from_message(message))  # type: ignore[arg-type]
                except BaseException:  # noqa: BLE001 - a failing callback (SystemExit included) must not stop the dispatcher
                    log.exception("mmap async responses: completing %s failed", request_id)

    def _check_pending(self, queue: ShmQueue) -> None:
        """Fail the requests whose host died, and only those (a caller that gave up dropped its own)."""
        if not self.senders:
            return
        connections = {id(conn): conn for conn in list(self.senders.values())}
        dead = {key: conn for key, conn in connections.items() if not conn.host_alive()}
        if not dead:
            return
        # A host may answer and then exit between two looks: what it wrote is in the ring now.
        with contextlib.suppress(QueueError):
            while True:
                self._deliver(queue.get_many(256, 0))
        never_read: set[str] = set()
        for conn in dead.values():
            conn.host_died()
            never_read |= conn.unread_requests([rid for rid, sender in list(self.senders.items()) if sender is conn])
        self._fail_pending(lambda conn: id(conn) in dead, "its host process died", never_read)

    def _fail_pending(
        self, which: Callable[[MmapConnection], bool], why: str, never_read: set[str] | frozenset[str] = frozenset()
    ) -> None:
        """Fail the async requests sent on the connections ``which`` selects.

        They were written, so they may have run, except those in ``never_read``
        (still unread in the ring of a host that died: they never ran).
        """
        for request_id, conn in list(self.senders.items()):
            if not which(conn):
                continue
            self.senders.pop(request_id, None)
            reply = self.pending.pop(request_id, None)
            if reply is not None:
                may_have_run = request_id not in never_read
                outcome = (
                    "during the call; the call may have run"
                    if may_have_run
                    else "before it read the request; it never ran"
                )
                message = f"service {conn.service_name!r} is unavailable: {why} {outcome}"
                response = _runtime_error(request_id, ServiceUnavailableError(message), may_have_run)
                if not may_have_run:
                    response.metadata[CONNECTION_CLOSED] = True  # the dead host's ring will never be read
                with contextlib.suppress(BaseException):  # a failing callback must not stop the dispatcher
                    reply(response)

    def forget(self, request_id: str) -> bool:
        """Drop an async request whose caller gave up; its response, if it comes, is ignored.

        Returns whether it was still awaiting its response.
        """
        if self.pending.pop(request_id, None) is None:
            return False
        self.senders.pop(request_id, None)
        return True

    # -------------------------------------------------------------- process

    def shutdown(self) -> None:
        """Close and unlink every ring of this process (at exit)."""
        self.stop_dispatcher()
        with self._lock:
            for ring in self._rings:
                self._close_ring_locked(ring)
            self._rings = []

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's rings belong to the parent; start afresh.

        They are marked closed in the child's copy first, so that the
        finalizers of the parent's thread rings, which the child inherits
        (they run when the child drops the parent's thread-local records, and
        at its exit), find nothing to remove: removing them would take the
        parent's sync calls' rings from under it.
        """
        for ring in self._rings:
            ring.closed = True
        self._lock = threading.Lock()
        self._local = threading.local()
        self._rings = []
        self._connections = 0
        self._async_queue = None
        self._dispatcher = None
        self.pending = {}
        self.senders = {}


class _Sentinel:
    __slots__ = ("__weakref__",)


_client = _ClientRings()
atexit.register(_client.shutdown)
os.register_at_fork(after_in_child=_client.forget_after_fork)


def _reset_users_after_fork() -> None:
    global _users, _users_lock
    _users = 0
    _users_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_users_after_fork)

#: Every connection of this process, for a child forked from it (see ``MmapConnection._forget_backlog``).
_connections: weakref.WeakSet[MmapConnection] = weakref.WeakSet()


def _forget_backlogs_after_fork() -> None:
    for connection in list(_connections):
        connection._forget_backlog()


os.register_at_fork(after_in_child=_forget_backlogs_after_fork)


class MmapConnection(Connection):
    """A caller's channel to one service's request ring."""

    def __init__(self, address: ServiceAddress) -> None:
        self.queue_name = str(address.target)
        self._service_name = address.service_name
        try:
            ring = attach_queue(self.queue_name)
        except FileNotFoundError:
            raise ServiceUnavailableError(
                f"service {address.service_name!r} is not reachable: its request queue {self.queue_name} "
                "does not exist (the host stopped?)"
            ) from None
        except QueueLayoutError as exc:
            raise ServiceUnavailableError(
                f"service {address.service_name!r} cannot be reached: its request queue was made by an "
                f"incompatible kservice version ({exc}); run the same kservice version on both sides"
            ) from exc
        except (PermissionError, ValueError) as exc:
            raise ServiceUnavailableError(f"service {address.service_name!r} cannot be reached: {exc}") from exc
        if not ring.owner_alive:
            ring.close()
            raise ServiceUnavailableError(
                f"service {address.service_name!r} is not reachable: its host (pid {ring.owner_pid}) is gone"
            )
        #: where requests go; None once the connection is closed or its host is known dead (``_refusal`` says which)
        self._ring: ShmQueue | None = ring
        #: the same ring, kept after close: answers of requests already sent are still awaited, and cancelled
        self._host = ring
        self._refusal = ""
        self._closed = False
        self._owner_pid = ring.owner_pid
        self._inline_limit = _inline_limit(ring)
        self._queue_timeout = float(address.info.get("queue_timeout", 30.0))
        #: the chunk records the host runs (CHUNK_RECORDS; 0: none): from the address when it says, else
        #: asked once (see send_chunk)
        self._chunks: int | None = _chunk_records(address.info.get(CHUNK_RECORDS)) or None
        # Async requests that met a full ring (or a busy lock), oldest first, with the monotonic
        # time at which each gives up; sent by the connection's sender thread (see send).
        self._backlog: collections.deque[tuple[ServiceRequest, bytes, str | None, float, float]] = collections.deque()
        self._backlog_lock = threading.Lock()
        self._sender: threading.Thread | None = None
        _connections.add(self)
        _client.connection_opened()
        _pool_user(1)

    @property
    def service_name(self) -> str:
        return self._service_name

    def host_alive(self) -> bool:
        return self._host.owner_alive

    def unread_requests(self, request_ids: list[str]) -> set[str]:
        """Those of ``request_ids`` still unread in the host's ring: a dead host never ran them.

        Only records written inline are recognised; a request carried in a
        segment counts as read (so as possibly run).
        """
        if not request_ids:
            return set()
        try:
            unread = b"\0".join(self._host.unread())
        except Exception:  # noqa: BLE001 - a ring that cannot be read proves nothing
            return set()
        if not unread:
            return set()
        marker = codec.request_id_marker
        return {request_id for request_id in request_ids if marker(request_id) in unread}

    def host_died(self) -> None:
        """The host is gone: later calls are refused before anything is written (so they may be retried)."""
        self._refusal = self._refusal or f"its host process (pid {self._owner_pid}) is gone"
        self._ring = None

    def _refused(self, request: ServiceRequest) -> ServiceResponse:
        return self._closed_refusal(request, self._refusal)

    def _closed_refusal(self, request: ServiceRequest, why: str) -> ServiceResponse:
        """The refusal of a request this connection cannot send, ever: ``CONNECTION_CLOSED``, nothing was sent."""
        response = self._unavailable(request, f"{why}; nothing was sent", may_have_run=False)
        response.metadata[CONNECTION_CLOSED] = True
        return response

    def _unavailable(self, request: ServiceRequest, why: str, *, may_have_run: bool) -> ServiceResponse:
        return _runtime_error(
            request.request_id,
            ServiceUnavailableError(f"service {self._service_name!r} is unavailable: {why}"),
            may_have_run,
        )

    def _put(
        self, ring: ShmQueue, request: ServiceRequest, record: bytes, segment: str | None
    ) -> ServiceResponse | None:
        """Queue one record, waiting for room up to the queue timeout (never past the deadline).

        Returns a failed response when it could not be queued (its segment unlinked then).
        """
        deadline = request.deadline
        wait = self._queue_timeout if deadline is None else min(self._queue_timeout, deadline - _time())
        wait = wait if wait > 0 else 0
        try:
            ring.put(record, wait)
            return None
        except QueueFull:
            codec.unlink_segment(segment)
            return self._overloaded(request, wait)
        except QueueClosed:
            codec.unlink_segment(segment)
            return self._closed_refusal(request, "it is stopping or its host is gone")
        except BaseException:
            codec.unlink_segment(segment)
            raise

    def _overloaded(self, request: ServiceRequest, waited: float) -> ServiceResponse:
        return _runtime_error(
            request.request_id,
            ServiceOverloadedError(
                f"service {self._service_name!r} is overloaded: its request queue stayed full for "
                f"{waited:.3f}s (service.local.queue_timeout={self._queue_timeout}); the request was never sent"
            ),
            may_have_run=False,
        )

    def _encode(self, request: ServiceRequest, response_queue: str) -> tuple[bytes, str | None] | ServiceResponse:
        try:
            return codec.encode_request(request, response_queue, self._owner_pid, self._inline_limit)
        except SharedMemoryFull as exc:
            return self._no_room(request, exc)
        except BaseException as exc:  # noqa: BLE001 - whatever pickling raises
            return self._not_picklable(request, exc)

    def _no_room(self, request: ServiceRequest, exc: SharedMemoryFull) -> ServiceResponse:
        return self._unavailable(request, f"{exc}; nothing was sent", may_have_run=False)

    @staticmethod
    def _not_picklable(request: ServiceRequest, exc: BaseException) -> ServiceResponse:
        error = TypeError(
            f"cannot call {request.service_name}.{request.method_name} in another process: its arguments "
            f"are not picklable ({type(exc).__name__}: {exc}); nothing was sent"
        )
        error.__cause__ = exc
        return ServiceResponse.from_exception(request.request_id, error, origin="client")

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        """Send and wait on this thread's own response ring (no thread hand-off).

        Returns a failed response: ServiceTimeoutError when ``timeout`` passes,
        ServiceUnavailableError when the host dies or stops, ServiceOverloadedError
        when the request ring stays full; a client-side TypeError for arguments
        that cannot be pickled.
        """
        ring = self._ring
        if ring is None:
            return self._refused(request)
        try:
            holder = _client.acquire()
        except SharedMemoryFull as exc:  # no room for this thread's response ring
            return self._no_room(request, exc)
        try:
            queue = holder.queue
            encoded = self._encode(request, queue.name)
            if type(encoded) is not tuple:
                return encoded  # type: ignore[return-value]
            put = ring._compiled_put  # as in send: the compiled put first, which needs no timeout
            if put is None or put(encoded[0]):
                failed = self._put(ring, request, *encoded)
                if failed is not None:
                    return failed
            try:
                return self._wait(ring, queue, request, timeout)
            except BaseException:
                # The caller gave up (Ctrl-C): a request still queued must not run after it.
                self._tell_host_cancelled(request.request_id)
                raise
        finally:
            holder.last_used = time.monotonic()
            holder.busy = False

    def _wait(self, ring: ShmQueue, queue: ShmQueue, request: ServiceRequest, timeout: float) -> ServiceResponse:
        monotonic = time.monotonic
        end = monotonic() + timeout
        request_id = request.request_id
        get = queue.get
        host_gone = False
        while True:
            remaining = end - monotonic()
            if remaining <= 0:
                return _timed_out(request, timeout)
            try:
                # Once the host is gone, one last look without waiting: it may have answered just before.
                record = get(0 if host_gone else remaining if remaining < LIVENESS_INTERVAL else LIVENESS_INTERVAL)
            except QueueEmpty:
                if host_gone:
                    self.host_died()
                    if self.unread_requests([request_id]):
                        why = f"its host process (pid {ring.owner_pid}) died before it read the request; it never ran"
                        refused = self._unavailable(request, why, may_have_run=False)
                        refused.metadata[CONNECTION_CLOSED] = True  # the dead host's ring will never be read
                        return refused
                    why = f"its host process (pid {ring.owner_pid}) died during the call; the call may have run"
                    return self._unavailable(request, why, may_have_run=True)
                host_gone = not ring.owner_alive
                continue
            except QueueError as exc:  # corrupted response ring: it dropped the bad bytes
                log.warning("mmap response queue %s: %s", queue.name, exc)
                continue
            try:
                messages = codec.decode_many(record)
            except codec.DecodeError as exc:
                if request_id in exc.request_ids:
                    call = f"{request.service_name}.{request.method_name}"
                    return _undecodable_response(request_id, call, exc)
                if not exc.messages:
                    log.warning("mmap response queue %s: skipped an undecodable response: %s", queue.name, exc)
                messages = exc.messages
            for message in messages:
                if message[0] == request_id:
                    return codec.response_from_message(message)
            # Late responses of earlier calls of this thread that timed out: dropped.

    def send(self, request: ServiceRequest, reply: Callable[[ServiceResponse], None]) -> None:
        """Queue ``request`` without ever waiting; the dispatcher (or sender) thread calls ``reply`` exactly once.

        A full request ring does not block the caller: the request waits in the
        connection's sender thread (see :meth:`_defer`), and fails with
        ServiceOverloadedError, never sent, when no room came within the
        service's queue timeout.
        """
        ring = self._ring
        if ring is None:
            reply(self._refused(request))
            return
        try:
            queue = _client._async_queue or _client.async_queue()
            record, segment = codec.encode_request(request, queue.name, self._owner_pid, self._inline_limit)
        except SharedMemoryFull as exc:  # no room for the async response ring or an out-of-band segment
            reply(self._no_room(request, exc))
            return
        except BaseException as exc:  # noqa: BLE001 - whatever pickling raises
            reply(self._not_picklable(request, exc))
            return
        request_id = request.request_id
        _client.pending[request_id] = reply
        _client.senders[request_id] = self
        if not self._backlog:  # nothing of this connection waits for room: the request may go first
            # Every pipelined call takes this path: the compiled put first, which needs no timeout.
            put = ring._compiled_put
            if put is not None and not put(record):
                return
            try:
                ring.put(record, 0)  # never waits: a full ring (or a busy lock) raises QueueFull at once
                return
            except QueueFull:
                pass
            except QueueClosed:
                codec.unlink_segment(segment)
                self._fail_unsent(
                    request_id,
                    self._closed_refusal(request, "it is stopping or its host is gone"),
                )
                return
            except BaseException:
                codec.unlink_segment(segment)
                self.cancel(request)
                raise
        self._defer(request, record, segment)

    def send_many(self, requests: Sequence[ServiceRequest], reply: Callable[[ServiceResponse], None]) -> None:
        """Queue several requests as one ring record (a request batch, see ``codec.encode_request_batch``).

        Never waits. Requests that do not fit one inline record together (large
        or out-of-band arguments), or that cannot all be pickled, or that meet
        a full ring, go one by one through :meth:`send`, so each still gets its
        own outcome (an argument that cannot be pickled fails its call only).
        """
        ring = self._ring
        if ring is None or len(requests) < 2 or self._backlog:
            for request in requests:
                self.send(request, reply)
            return
        try:
            queue = _client._async_queue or _client.async_queue()
            record = codec.encode_request_batch(requests, queue.name, self._inline_limit)
        except BaseException:  # noqa: BLE001 - an argument that cannot be pickled (or no room): one by one says which
            record = None
        if record is None:
            for request in requests:
                self.send(request, reply)
            return
        pending, senders = _client.pending, _client.senders
        for request in requests:
            pending[request.request_id] = reply
            senders[request.request_id] = self
        put = ring._compiled_put
        if put is not None and not put(record):
            return
        try:
            ring.put(record, 0)
            return
        except QueueFull:
            pass
        except QueueClosed:
            for request in requests:
                self._fail_unsent(
                    request.request_id,
                    self._closed_refusal(request, "it is stopping or its host is gone"),
                )
            return
        except BaseException:
            self.cancel_many(requests)
            raise
        # A full ring: one by one, behind each other in the sender thread (see _defer).
        for request in requests:
            if pending.pop(request.request_id, None) is not None:
                senders.pop(request.request_id, None)
                self.send(request, reply)

    def send_chunk(
        self,
        chunk_id: str,
        method_name: str,
        args: tuple[tuple[Any, ...], ...],
        kwargs: dict[str, Any],
        deadline: float | None,
        metadata: dict[str, Any],
        reply: Callable[[Any], None],
    ) -> bool:
        """Send many calls of one method as one compact chunk record (``codec.encode_chunk``); never waits.

        Returns False, having sent nothing, when the chunk cannot go this way:
        the host does not run chunk records (an older kservice: it would drop
        the record unanswered), the chunk does not fit one inline record (large
        or out-of-band arguments), an argument cannot be pickled, the ring is
        full or requests of this connection wait for room, or the connection is
        closed. The caller then sends the calls one by one (``send_many``).

        Once True, ``reply`` is called exactly once (possibly before this
        returns, in the dispatcher thread), with the host's answer tuple
        ``(chunk_id, results, errors)`` (see ``codec.encode_chunk_answer``), or
        with one failed ServiceResponse that stands for every call of the
        chunk: the host died (``MAY_HAVE_RUN`` False only when it never read
        the record), or its answer could not be decoded. Not if the caller
        gives up first (:meth:`cancel_chunk`). The first chunk sent to a host
        whose address does not say whether it runs chunks asks it once (a
        status round trip of at most a second).
        """
        return self._send_chunk_record(chunk_id, method_name, args, kwargs, deadline, metadata, reply, False)

    def send_chunk_single(
        self,
        chunk_id: str,
        method_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
        metadata: dict[str, Any],
        reply: Callable[[Any], None],
    ) -> bool:
        """:meth:`send_chunk` for calls that each take one positional argument: ``args`` holds the arguments.

        The record carries them as they are (``codec.KIND_CHUNK_SINGLE``: no
        tuple per call to build, pickle and unpickle), to a host that runs such
        records; an older host gets the usual chunk record.
        """
        return self._send_chunk_record(chunk_id, method_name, args, kwargs, deadline, metadata, reply, True)

    def _send_chunk_record(
        self,
        chunk_id: str,
        method_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
        metadata: dict[str, Any],
        reply: Callable[[Any], None],
        single: bool,
    ) -> bool:
        ring = self._ring
        if ring is None or self._backlog or not (self._chunks or (self._chunks is None and self._ask_chunks())):
            return False
        kind = codec.KIND_CHUNK
        if single:
            if self._chunks >= 2:  # type: ignore[operator]  # set by the test above
                kind = codec.KIND_CHUNK_SINGLE
            else:
                args = tuple(zip(args))  # an older host: one argument tuple per call
        try:
            queue = _client._async_queue or _client.async_queue()
            record = codec.encode_chunk(
                chunk_id,
                self._service_name,
                method_name,
                args,
                kwargs,
                queue.name,
                deadline,
                metadata,
                self._inline_limit,
                kind,
            )
        except BaseException:  # noqa: BLE001 - an argument that cannot be pickled (or no room): call by call says which
            return False
        if record is None:
            return False
        _client.pending[chunk_id] = reply
        _client.senders[chunk_id] = self
        put = ring._compiled_put
        if put is not None and not put(record):
            return True
        try:
            ring.put(record, 0)
            return True
        except (QueueFull, QueueClosed):
            pass
        except BaseException:
            _client.forget(chunk_id)
            raise
        _client.forget(chunk_id)
        return False

    def _ask_chunks(self) -> int:
        """Ask the host once which chunk records it runs (its status says; 0: none); a host that does not answer is taken as none."""
        try:
            self._chunks = _chunk_records(self.remote_status(timeout=1.0).get(CHUNK_RECORDS))
        except Exception:  # noqa: BLE001 - no answer: the per-call path works with any host
            self._chunks = 0
        return self._chunks

    def cancel_chunk(self, chunk_id: str) -> None:
        """The caller gave up on a chunk: forget it and tell the host, which starts none of its calls not started yet.

        Never blocks: when the host's ring is full or closed the notice is
        dropped (the calls still never start past their deadline).
        """
        if not _client.forget(chunk_id):
            return
        self._tell_host_cancelled(chunk_id)

    def cancel_many(self, requests: Sequence[ServiceRequest]) -> None:
        """:meth:`cancel` for several requests: one notice record per request still awaited (never blocks)."""
        for request in requests:
            self.cancel(request)

    def _defer(self, request: ServiceRequest, record: bytes, segment: str | None) -> None:
        """Queue an async request that met a full ring; the sender thread puts it (the caller never waits).

        It waits there up to the service's queue timeout from now (never past
        its deadline), in order behind this connection's earlier deferred
        requests, then fails with ServiceOverloadedError: it was never sent.
        A request whose caller gave up meanwhile (timeout, cancel) is dropped
        unsent.
        """
        deadline = request.deadline
        wait = self._queue_timeout if deadline is None else min(self._queue_timeout, deadline - _time())
        wait = wait if wait > 0 else 0.0
        with self._backlog_lock:
            self._backlog.append((request, record, segment, time.monotonic() + wait, wait))
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_backlog, name=f"kservice-mmap-sender-{self._service_name}", daemon=True
                )
                self._sender.start()

    def _forget_backlog(self) -> None:
        """In a forked child: the requests waiting for room are the parent's (its sender thread puts them)."""
        self._backlog = collections.deque()
        self._backlog_lock = threading.Lock()
        self._sender = None

    def _send_backlog(self) -> None:
        backlog = self._backlog
        while True:
            with self._backlog_lock:
                if not backlog:
                    self._sender = None
                    return
                request, record, segment, give_up_at, allowed = backlog[0]
            request_id = request.request_id
            failed: ServiceResponse | None = None
            ring = self._ring
            if request_id not in _client.pending:
                codec.unlink_segment(segment)  # its caller gave up: never sent
            elif ring is None:
                codec.unlink_segment(segment)
                failed = self._unavailable(
                    request, "the connection was closed before the request was sent", may_have_run=False
                )
            else:
                wait = give_up_at - time.monotonic()
                try:
                    ring.put(record, wait if wait > 0 else 0)
                except QueueFull:
                    codec.unlink_segment(segment)
                    failed = self._overloaded(request, allowed)
                except QueueClosed:
                    codec.unlink_segment(segment)
                    failed = self._closed_refusal(request, "it is stopping or its host is gone")
                except BaseException as exc:  # noqa: BLE001 - fails this request, the sender goes on
                    codec.unlink_segment(segment)
                    failed = _runtime_error(
                        request_id,
                        ServiceUnavailableError(f"cannot send the request: {exc}; nothing was sent"),
                        may_have_run=False,
                    )
            with self._backlog_lock:
                backlog.popleft()
            if failed is not None:
                self._fail_unsent(request_id, failed)

    @staticmethod
    def _fail_unsent(request_id: str, failed: ServiceResponse) -> None:
        reply = _client.pending.pop(request_id, None)
        if reply is not None:
            _client.senders.pop(request_id, None)
            try:
                reply(failed)
            except BaseException:  # noqa: BLE001 - a failing callback (SystemExit included) must not stop the sender
                log.exception("mmap: completing %s failed", request_id)

    def cancel(self, request: ServiceRequest) -> None:
        """The caller gave up: forget the request, and tell the host, which never starts it if it has not yet.

        Never blocks: when the host's ring is full or closed the notice is
        dropped (the request still never starts past its deadline).
        """
        if not _client.forget(request.request_id):
            return  # answered already, or not an async request of this process
        self._tell_host_cancelled(request.request_id)

    def _tell_host_cancelled(self, request_id: str) -> None:
        """Send the host the cancel notice of ``request_id`` (never blocks: dropped when its ring is full or closed)."""
        with contextlib.suppress(QueueError, ValueError):
            self._host.put(codec.encode_cancel_request(request_id, self._service_name), 0)

    def open_stream(self, request: ServiceRequest, window: int) -> MmapStreamSource:
        """Stream ``request``'s items through a stream ring of this process (see ``kservice.plugins.mmap.streams``)."""
        ring = self._ring
        if ring is None:
            raise ServiceUnavailableError(f"service {self._service_name!r} is unavailable: the connection is closed")
        from .streams import MmapStreamSource

        return MmapStreamSource(self, ring, request, window)

    def remote_status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The service's status as its host reports it (a dict of ServiceStatus fields plus ``pid``).

        Returns or raises within about ``timeout`` seconds. Raises
        ServiceUnavailableError when the host does not answer within
        ``timeout`` (its message names the host's pid, the timeout and what to
        do), when it died, or when the connection is closed.
        """
        ring = self._ring
        if ring is None:
            raise ServiceUnavailableError(f"cannot get the status of {self._service_name!r}: {self._refusal}")
        request_id = f"{os.getpid():x}-status-{next(_status_ids)}"
        deadline = time.time() + timeout
        request = ServiceRequest(request_id, self._service_name, "", deadline=deadline)
        holder = _client.acquire()
        try:
            record = codec.encode_status_request(request.request_id, self._service_name, holder.queue.name, deadline)
            failed = self._put(ring, request, record, None)
            response = failed or self._wait(ring, holder.queue, request, timeout)
        finally:
            holder.busy = False
        if not response.success:
            if response.error_type == "ServiceTimeoutError":
                raise ServiceUnavailableError(
                    f"service {self._service_name!r} did not answer a status request within {timeout:g}s "
                    f"(host pid {ring.owner_pid}): the host is alive but paused, overloaded or hung; "
                    "try again with a longer --timeout, or look at that process"
                )
            raise ServiceUnavailableError(f"cannot get the status of {self._service_name!r}: {response.error}")
        return response.result  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release the connection; idempotent. The ring handle is unmapped once no call uses it.

        Fails no call: async calls already sent still get their answers (the
        dispatcher runs until none is awaited), and are failed only if the
        host dies. Later calls are refused (ServiceUnavailableError, nothing sent).
        """
        if self._closed:
            return
        self._closed = True
        self._refusal = "the connection is closed"
        # Dropped, not closed: a thread still inside call() holds its own reference.
        self._ring = None
        _client.connection_closed()
        if not _client.open_connections:
            _stream_rings_unused()
        _pool_user(-1)


class MmapTransport(Transport):
    """Calls to services in other processes of this host, by request-queue name."""

    name = "mmap"
    # shared-memory rings between two processes: ~8-12 µs for 90 bytes (README, Performance)
    cost = 10.0
    crosses_processes = True

    def listen(self, task: BaseServiceTask) -> Listener:
        return MmapListener(task)

    def connect(self, address: ServiceAddress) -> Connection:
        return MmapConnection(address)

    def close(self) -> None:
        _client.shutdown()
