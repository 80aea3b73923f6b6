"""Batch calls: ``ServiceManager.map`` and ``ServiceManager.amap``.

A map makes one call per item of an iterable, like ``concurrent.futures.Executor.map``,
but ships them in *chunks*: the items of a chunk are built together, share one
deadline check on the manager's timer, and go to the transport in one
``Connection.send_many`` (the ``mmap`` transport writes a chunk as one ring record,
Ray as a few ``handle_batch`` actor calls; in-process, fast methods run in the
caller's thread). Each item is still its own call: its own request, its own
outcome, its own retries.

Memory is bounded: the iterable is read one chunk at a time, and at most
``max_in_flight`` calls (rounded up to whole chunks) are sent and not yet
consumed, whatever the iterable's length.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._context import _current_request
from ._errors import ServiceStoppedError, ServiceTimeoutError
from ._fork import renew_after_fork
from ._messages import CONNECTION_CLOSED, MAY_HAVE_RUN, ServiceRequest, ServiceResponse, _reanchor
from ._messages import new_request_id as _new_request_id
from ._middleware import CallBatch, MiddlewareChain, MiddlewareError, running_hooks
from ._transport import HOOK_GRACE, held_response, timeout_response

if TYPE_CHECKING:
    import asyncio

    from ._manager import ServiceManager, _Route

__all__ = ["AsyncCallMap", "CallMap"]

#: Items per chunk, and calls in flight, unless the caller says otherwise.
DEFAULT_CHUNK_SIZE = 256
DEFAULT_MAX_IN_FLIGHT = 2048
#: Guards ``_Chunk._woken`` (see :meth:`_Batch.chunk_done`): held for two bytecodes once per chunk.
_waking = threading.Lock()
renew_after_fork(sys.modules[__name__], "_waking")

#: Seconds past a compact chunk's deadline its caller waits for the host's answer (which leaves at the deadline).
CHUNK_ANSWER_GRACE = 0.25

_time = time.time
_monotonic = time.monotonic


def _checked_count(name: str, value: Any) -> int:
    """``value`` when it is an int of at least 1; TypeError (not an int) or ValueError naming it otherwise."""
    if type(value) is not int:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _Chunk:
    """Up to ``chunk_size`` calls sent together; their outcomes, in item order.

    ``open`` maps the request id of every call not settled yet to its index:
    popping it is the claim (a reply, the deadline, a cancel: exactly one wins,
    ``dict.pop`` being atomic). A claimed call is settled once its after-hooks
    and retries are done; ``settle`` counts it, and the last one completes the
    chunk. The manager's timer watches the chunk's one deadline (``_expire``).
    """

    __slots__ = (
        "_expires_at",
        "_state",
        "_woken",
        "batch",
        "began",
        "counted",
        "first",
        "give_up_at",
        "limits",
        "open",
        "outcomes",
        "requests",
        "retrying",
        "sent",
        "timeout",
        "waiter",
    )

    def __init__(self, batch: _Batch, first: int, requests: list[ServiceRequest], timeout: float) -> None:
        self.batch = batch
        self.first = first
        self.requests = requests
        self.sent = requests
        self.limits: list[int] | None = None
        self.began = 0.0
        self.timeout = timeout
        self.give_up_at = _monotonic() + timeout  # the calls' deadline, for their retries (see _for_retry)
        self.outcomes: list[Any] = [None] * len(requests)
        self.open: dict[str, int] = {request.request_id: index for index, request in enumerate(requests)}
        self.counted = itertools.count(1).__next__
        self.retrying: dict[int, Any] = {}
        self._expires_at = 0.0
        self._state = "PENDING"
        self._woken = False  # whether chunk_done ran for it (once only: see _end_if_held)
        #: the consumer's wake-up: a held lock (sync, ordered), None (sync, unordered), an asyncio future
        self.waiter: Any = None

    # ---------------------------------------------------------------- replies

    def __call__(self, response: ServiceResponse) -> None:
        """The transport's reply callback for every call of the chunk."""
        index = self.open.pop(response.request_id, None)
        if index is None:
            return  # late (the deadline settled it), cancelled, or not ours
        if response.success and self.limits is None and self.batch.route.chain is None:
            # The common case in one step (settle, inline): no after-hooks, no retry to consider.
            outcomes = self.outcomes
            outcomes[index] = response
            if self.counted() == len(outcomes):
                self._state = "FINISHED"
                self.batch.chunk_done(self)
            return
        self._after(index, response)

    def _after(self, index: int, response: ServiceResponse) -> None:
        batch = self.batch
        route = batch.route
        chain = route.chain
        if chain is not None:
            assert self.limits is not None
            response = chain.run_after(self.sent[index], response, self.limits[index], self.began)
        if not response.success and batch.state == "running" and not batch.manager._closed:
            if response.metadata.get(CONNECTION_CLOSED):
                self.retrying[index] = None
                batch.manager.timer().call_later(0.0, lambda: self._reroute(index, response), may_block=True)
                return
            if route.retry is not None:
                delay = route.retry_delay(self._for_retry(index), response, 0)
                if delay is not None:
                    self.retrying[index] = None
                    batch.manager.timer().call_later(delay, lambda: self._retry(index, response), may_block=True)
                    return
        self.settle(index, response)

    def _request(self, index: int) -> ServiceRequest:
        return self.requests[index]

    def _for_retry(self, index: int) -> ServiceRequest:
        """Call ``index``'s request, its deadline re-read from the monotonic clock before a retry is decided (see
        ``_messages._reanchor``): a step of the wall clock neither gives up its retry nor sends it past the deadline."""
        request = self._request(index)
        _reanchor(request, self.give_up_at)
        return request

    def _reroute(self, index: int, refused: ServiceResponse) -> None:
        """A call a closed connection refused (nothing was sent): delivered on the name's new route at once.

        When the name leads nowhere new, the route's retry policy decides as
        for any failure (see ``ServiceManager._rerouted``).
        """
        batch = self.batch
        if batch.state != "running" or index not in self.retrying:
            return
        route = batch.route
        if batch.manager._rerouted(route, refused, self._request(index).deadline) is not None:
            self._resend(index, refused, rerouted=True)
            return
        delay = None if route.retry is None else route.retry_delay(self._for_retry(index), refused, 0)
        if delay is None:
            if self.retrying.pop(index, False) is not False:
                self.settle(index, refused)
            return
        batch.manager.timer().call_later(delay, lambda: self._retry(index, refused), may_block=True)

    def _retry(self, index: int, failed: ServiceResponse) -> None:
        """Send a failed call again as an ordinary async call (attempt 1 on): it follows the single-call rules."""
        batch = self.batch
        if batch.state != "running" or index not in self.retrying:
            return
        manager = batch.manager
        route = manager._refresh_route(batch.route, failed, self._request(index).deadline)
        task = route.awaiting_host
        if task is not None:
            # The service's host is being replaced: send the retry once the new one is in place (the
            # callback only schedules: it may run in the thread replacing the host).
            timer = manager.timer()
            task.call_when_host_ready(
                lambda: timer.call_later(0.0, lambda: self._resend(index, failed), may_block=True)
            )
            return
        self._resend(index, failed)

    def _resend(self, index: int, failed: ServiceResponse, *, rerouted: bool = False) -> None:
        """Send the retry (or, ``rerouted``, the delivery) of call ``index`` on the service's current route."""
        from ._asynccall import _AsyncCall

        batch = self.batch
        if batch.state != "running" or index not in self.retrying:
            return
        manager = batch.manager
        request = self._for_retry(index)
        route = manager._refresh_route(batch.route, failed, request.deadline)
        call = _AsyncCall(manager, route, request, self.timeout, attempt=1, rerouted=rerouted)
        self.retrying[index] = call
        call.add_done_callback(lambda future: self._retried(index, future))
        if batch.state != "running":
            call.cancel()

    def _retried(self, index: int, future: Any) -> None:
        if self.retrying.pop(index, False) is False:
            return  # cancelled with the batch
        if future.cancelled():
            return
        error = future.exception()
        self.settle(index, error if error is not None else ServiceResponse(True, future.result()))

    def settle(self, index: int, outcome: ServiceResponse | BaseException) -> None:
        """Record one call's final outcome; the last one completes the chunk."""
        self.outcomes[index] = outcome
        if self.counted() == len(self.outcomes):
            self._state = "FINISHED"
            self.batch.chunk_done(self)

    # ------------------------------------------------------- deadline, cancel

    def _finished(self) -> bool:
        return self._state != "PENDING"

    def _claim_open(self) -> list[tuple[int, ServiceRequest]]:
        """Claim every call not settled yet (those a reply is settling right now are left to it)."""
        claimed = []
        pop = self.open.pop
        for request_id in list(self.open):
            index = pop(request_id, None)
            if index is not None:
                claimed.append((index, self.sent[index]))
        return claimed

    def _expire(self) -> None:
        """The chunk's deadline passed: its unanswered calls fail with ServiceTimeoutError and are cancelled."""
        claimed = self._claim_open()
        if claimed:
            self._cancel_sent([sent for _, sent in claimed])

            def settle() -> None:
                for index, sent in claimed:
                    self._after(index, timeout_response(sent, self.timeout))

            self._off_the_timer(settle)
        self._watch_hooks()

    def _off_the_timer(self, settle: Callable[[], None]) -> None:
        """Run ``settle`` (it runs the route's middleware or retry policy, if any) where it may block.

        The deadline is the manager's timer thread's, which ends every other
        call on time as well: the application's hooks and policy, which may
        block, run in one of the timer's workers instead (see ``_Timer.hand_over``).
        """
        route = self.batch.route
        if route.chain is None and route.retry is None:
            settle()
        else:
            self.batch.manager.timer().hand_over(settle)

    def _watch_hooks(self) -> None:
        """At the deadline, with middleware or a retry policy: end the chunk :data:`HOOK_GRACE` later if they still hold it."""
        route = self.batch.route
        if self._state == "PENDING" and (route.chain is not None or route.retry is not None):
            self.batch.manager.timer().call_later(HOOK_GRACE, self._end_if_held)

    def _end_if_held(self) -> None:
        """The chunk's hooks or policy hold it past its deadline and grace: its calls not settled end without them.

        In the timer thread (it runs no hook). Each such call fails with the
        ServiceTimeoutError of :func:`held_response`; what the hooks return
        afterwards is dropped (the consumer has the chunk: ``chunk_done`` runs once).
        """
        if self._state != "PENDING":
            return
        outcomes = self.outcomes
        held = self._held(len(outcomes))
        for index, outcome in enumerate(outcomes):
            if outcome is None:
                outcomes[index] = held
        self._state = "FINISHED"
        self.batch.chunk_done(self)

    def _held(self, count: int) -> ServiceResponse:
        """The failed outcome of this chunk's ``count`` calls held by its hooks (see :func:`held_response`)."""
        batch = self.batch
        last = self.first + count - 1
        return held_response(
            "",
            f"{batch.service_name}.{batch.method} (items {self.first} to {last} of a map)",
            running_hooks(self, batch.route.hook_methods()),
        )

    def _abandon(self) -> None:
        """The manager closed: unanswered calls fail with ServiceStoppedError (they may have run) and are cancelled."""
        claimed = self._claim_open()
        self._cancel_sent([sent for _, sent in claimed])
        for index, sent in claimed:
            error = ServiceStoppedError(
                f"call {sent.service_name}.{sent.method_name} (item {self.first + index} of a map) was abandoned: "
                "its ServiceManager was closed while the call was in flight (it may have run)"
            )
            response = ServiceResponse.from_exception(sent.request_id, error, origin="runtime")
            response.metadata[MAY_HAVE_RUN] = True
            self.settle(index, response)

    def cancel(self) -> None:
        """Drop every call not finished: not started, it never starts; running, its answer is dropped."""
        claimed = self._claim_open()
        self._state = "CANCELLED"
        self._cancel_sent([sent for _, sent in claimed])
        retrying, self.retrying = self.retrying, {}
        for call in retrying.values():
            if call is not None:
                call.cancel()

    def _cancel_sent(self, sent: list[ServiceRequest]) -> None:
        if not sent:
            return
        try:
            self.batch.route.connection.cancel_many(sent)
        except Exception:  # noqa: BLE001 - cancelling is best effort; the caller has its answer
            pass


#: In a fast chunk's outcomes: this item's result is in ``chunk.outcomes``.
_RESULT: Any = object()


class _FastChunk(_Chunk):
    """A chunk sent as one compact record: no request, response or claim per call on the success path.

    Used when the transport offers ``send_chunk`` (mmap) and the route has no
    client middleware, or only middleware that implements the batch hooks
    (``MiddlewareChain.batch``): then ``calls`` is the chunk's CallBatch, asked
    ``admit_batch`` before the chunk is sent and told its outcome once
    (``after_batch``/``observe_batch``), when the answer, the deadline or the
    host's death decides it, before any retry. The host answers with
    one record of per-call outcomes; ``outcomes`` becomes its list of results
    and ``failures`` maps the index of each failed call to its outcome (a
    ServiceResponse, or after a retry its final one). The claim is the chunk's
    one id: the answer, the deadline, a cancel or the manager closing, whichever
    pops it first, decides every call of the chunk at once. A failed call is
    retried under the route's policy like any call (a ServiceRequest is built
    for it then).
    """

    __slots__ = ("apart", "args", "calls", "chunk_id", "deadline", "failures", "left", "single")

    def __init__(
        self,
        batch: _Batch,
        first: int,
        args: tuple[Any, ...],
        deadline: float,
        timeout: float,
        single: bool = False,
    ) -> None:
        self.batch = batch
        self.first = first
        #: each call's argument tuple, or with ``single`` each call's one argument (see call_args)
        self.args = args
        self.single = single
        self.deadline = deadline
        self.timeout = timeout
        self.give_up_at = _monotonic() + timeout
        self.chunk_id = _new_request_id()
        self.open = {self.chunk_id: 0}
        self.outcomes = []
        self.failures: dict[int, Any] = {}
        self.requests: Any = {}  # index -> the ServiceRequest of a call being retried (built on demand)
        self.sent = self.requests  # type: ignore[assignment]
        self.limits = None
        self.began = 0.0
        self.retrying = {}
        self.counted = itertools.count(1).__next__
        self.left = 0
        self._expires_at = 0.0
        self._state = "PENDING"
        self._woken = False
        self.waiter = None
        #: the batch hooks' view of this chunk (None: the route has no client middleware)
        self.calls: CallBatch | None = None
        #: the per-call answers of an admitted chunk the transport could not send compact (see _Batch._send_apart)
        self.apart: _ApartAnswer | None = None

    def __call__(self, answer: Any) -> None:
        """The transport's one callback: the host's answer tuple, or one failed response for every call."""
        if self.open.pop(self.chunk_id, None) is None:
            return  # late (the deadline settled it), or cancelled
        self._answered(answer)

    def _answered(self, answer: Any) -> None:
        if type(answer) is tuple:
            _, results, errors = answer
            self.outcomes = results
            if not errors:
                if self.calls is None or not self._report({}):
                    self._state = "FINISHED"
                    self.batch.chunk_done(self)
                    return
                failed = self.calls.failures
            else:
                chunk_id = self.chunk_id
                failed = {
                    index: error
                    if type(error) is ServiceResponse
                    else ServiceResponse(False, None, error[0], chunk_id, error[1], error[2], error[3], error[4])
                    for index, error in errors.items()
                }
        else:  # the host died, or its answer cannot be decoded: the same outcome for every call
            self.outcomes = [None] * len(self.args)
            failed = dict.fromkeys(range(len(self.args)), answer.for_wire())
        if self.calls is not None:
            self._report(failed)
            failed = self.calls.failures
        self._fail(failed)

    def _report(self, failed: dict[int, ServiceResponse]) -> bool:
        """Tell the batch hooks the chunk's outcome; whether any call failed after them (a hook that raised fails every call)."""
        calls = self.calls
        assert calls is not None
        calls.failures = failed
        calls.seconds = perf_counter() - self.began
        chain: MiddlewareChain = self.batch.route.chain  # type: ignore[assignment]  # calls exist only with a chain
        chain.after_batch(calls)
        return bool(calls.failures)

    def _request(self, index: int) -> ServiceRequest:
        request: ServiceRequest | None = self.requests.get(index)
        if request is None:
            batch = self.batch
            request = self.requests[index] = ServiceRequest(
                _new_request_id(),
                batch.service_name,
                batch.method,
                self.call_args(index),
                dict(batch.kwargs) if batch.kwargs else {},
                "",
                self.deadline,
                dict(batch.metadata) if batch.metadata else {},
            )
        return request

    def call_args(self, index: int) -> tuple[Any, ...]:
        """The argument tuple of call ``index``."""
        return (self.args[index],) if self.single else self.args[index]

    def _fail(self, failed: dict[int, ServiceResponse]) -> None:
        """Record failed calls; those the route's retry policy sends again complete the chunk later."""
        batch = self.batch
        route = batch.route
        retries: list[tuple[int, ServiceResponse, float | None]] = []  # delay None: a re-route, at once
        if batch.state == "running" and not batch.manager._closed:
            for index, response in failed.items():
                if response.metadata.get(CONNECTION_CLOSED):
                    retries.append((index, response, None))
                elif route.retry is not None:
                    delay = route.retry_delay(self._for_retry(index), response, 0)
                    if delay is not None:
                        retries.append((index, response, delay))
        for index, response in failed.items():
            self.failures[index] = response
        if not retries:
            self._state = "FINISHED"
            batch.chunk_done(self)
            return
        self.left = len(retries)
        timer = batch.manager.timer()
        for index, _response, _delay in retries:
            self.retrying[index] = None
        for index, response, delay in retries:
            if delay is None:
                timer.call_later(
                    0.0,
                    lambda index=index, response=response: self._reroute(index, response),  # type: ignore[misc]
                    may_block=True,
                )
            else:
                timer.call_later(
                    delay,
                    lambda index=index, response=response: self._retry(index, response),  # type: ignore[misc]
                    may_block=True,
                )

    def settle(self, index: int, outcome: ServiceResponse | BaseException) -> None:
        """A retried call's final outcome; the last one completes the chunk."""
        self.failures[index] = outcome
        if self.counted() == self.left:
            self._state = "FINISHED"
            self.batch.chunk_done(self)

    def _claim(self) -> bool:
        if self.open.pop(self.chunk_id, None) is None:
            return False
        with contextlib.suppress(Exception):  # best effort: the caller has its answer
            if self.apart is not None:
                self.batch.route.connection.cancel_many(self.apart.unanswered())
            else:
                self.batch.route.connection.cancel_chunk(self.chunk_id)  # type: ignore[attr-defined]  # it has send_chunk
        return True

    def _expire(self) -> None:
        """The deadline passed before the answer: every call fails with ServiceTimeoutError; those not started never start.

        A chunk sent call by call (``apart``) keeps the outcomes that came in time; the others time out.
        """
        if not self._claim():
            self._watch_hooks()  # the answer came, and is being settled right now
            return
        if self.apart is not None:
            answer: Any = self.apart.at_deadline(self.timeout)
        else:
            batch = self.batch
            error = ServiceTimeoutError(
                f"call {batch.service_name}.{batch.method} timed out after {max(self.timeout, 0):.3f}s"
            )
            answer = ServiceResponse.from_exception(self.chunk_id, error, origin="runtime")
        self._off_the_timer(lambda: self._answered(answer))
        self._watch_hooks()

    def _end_if_held(self) -> None:
        """As :meth:`_Chunk._end_if_held`: every call of the chunk fails (its one answer is what the hooks hold)."""
        if self._state != "PENDING":
            return
        count = len(self.args)
        held = self._held(count)
        self.open.pop(self.chunk_id, None)
        self.outcomes = [None] * count
        self.failures = dict.fromkeys(range(count), held)
        self._state = "FINISHED"
        self.batch.chunk_done(self)

    def _abandon(self) -> None:
        """The manager closed: every call fails with ServiceStoppedError (they may have run)."""
        if not self._claim():
            return
        batch = self.batch
        error = ServiceStoppedError(
            f"call {batch.service_name}.{batch.method} (items {self.first} to {self.first + len(self.args) - 1} of a map) "
            "was abandoned: its ServiceManager was closed while the call was in flight (it may have run)"
        )
        response = ServiceResponse.from_exception(self.chunk_id, error, origin="runtime").for_wire()
        response.metadata[MAY_HAVE_RUN] = True
        self.outcomes = [None] * len(self.args)
        self.failures = dict.fromkeys(range(len(self.args)), response)
        self._state = "FINISHED"
        batch.chunk_done(self)

    def cancel(self) -> None:
        """Drop the chunk: calls the host has not started never start; a running one's answer is dropped."""
        self._claim()
        self._state = "CANCELLED"
        retrying, self.retrying = self.retrying, {}
        for call in retrying.values():
            if call is not None:
                call.cancel()


class _ApartAnswer:
    """The per-call answers of an admitted chunk sent call by call, gathered into the host's one-answer form.

    A chunk that ``admit_batch`` let through must be reported to the batch
    hooks as one chunk whatever way it travels (the per-call hooks did not run
    for its calls); when the transport cannot send it compact (the ring full,
    an argument too large for one record or not picklable), its calls go one
    by one through ``send_many``, and this collects their answers into
    ``(id, results, errors)`` for :class:`_FastChunk`, errors as responses.
    """

    __slots__ = ("chunk", "errors", "left", "lock", "pending", "requests", "results")

    def __init__(self, chunk: _FastChunk, requests: list[ServiceRequest]) -> None:
        self.chunk = chunk
        self.requests = requests
        self.pending = {request.request_id: index for index, request in enumerate(requests)}
        self.results: list[Any] = [None] * len(requests)
        self.errors: dict[int, ServiceResponse] = {}
        self.left = len(requests)
        self.lock = threading.Lock()

    def __call__(self, response: ServiceResponse) -> None:
        with self.lock:
            index = self.pending.pop(response.request_id, None)
            if index is None:
                return  # late: the chunk's deadline settled it
            if response.success:
                self.results[index] = response.result
            else:
                self.errors[index] = response
            self.left -= 1
            if self.left:
                return
        self.chunk(("", self.results, self.errors))

    def unanswered(self) -> list[ServiceRequest]:
        with self.lock:
            return [self.requests[index] for index in self.pending.values()]

    def at_deadline(self, timeout: float) -> tuple[str, list[Any], dict[int, Any]]:
        """The answer at the chunk's deadline: calls answered keep their outcome, the others time out (late answers are dropped)."""
        with self.lock:
            for index in self.pending.values():
                self.errors[index] = timeout_response(self.requests[index], timeout)
            self.pending.clear()
        return "", self.results, self.errors


class _Batch:
    """The state of one map: its route, its source, and the chunks in flight."""

    def __init__(
        self,
        manager: ServiceManager,
        service_name: str,
        method: str,
        iterable: Iterable[Any],
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        metadata: dict[str, Any] | None,
        ordered: bool,
        return_exceptions: bool,
        chunk_size: int,
        max_in_flight: int,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        from ._errors import _short_repr
        from ._manager import _checked_mapping, _checked_method_name, _checked_timeout

        if timeout is not None:
            timeout = _checked_timeout(timeout)
        if type(method) is not str or not method:
            method = _checked_method_name(method)
        self.chunk_size = _checked_count("chunk_size", chunk_size)
        self.window = max(1, -(-_checked_count("max_in_flight", max_in_flight) // self.chunk_size))
        # As a single call's (ServiceManager._request): a mapping is taken as a dict, anything else refused.
        if kwargs is not None and type(kwargs) is not dict:
            kwargs = _checked_mapping("kwargs", kwargs)
        if metadata is not None and type(metadata) is not dict:
            metadata = _checked_mapping("metadata", metadata)
        try:
            self.source = iter(iterable)
        except TypeError:
            raise TypeError(
                f"map's items must be an iterable of the calls' arguments, not {type(iterable).__name__} "
                f"{_short_repr(iterable)}"
            ) from None
        self.manager = manager
        self.service_name = service_name
        self.method = method
        self.route: _Route = manager._found(service_name, timeout)[0]  # finding it waits at most the timeout
        chain = self.route.chain
        #: the route's chain when a chunk goes through its batch hooks (every middleware implements them)
        self.batch_chain = chain if chain is not None and chain.batch else None
        #: the transport's compact chunk sender (see _FastChunk), when no client middleware needs a request per call
        self.send_fast: Any = (
            getattr(self.route.connection, "send_chunk", None) if chain is None or chain.batch else None
        )
        #: the same for a chunk of single arguments (the arguments themselves, not a tuple each), if offered
        self.send_single: Any = (
            getattr(self.route.connection, "send_chunk_single", None) if self.send_fast is not None else None
        )
        self.kwargs = kwargs
        self.nominal = self.route.default_timeout if timeout is None else timeout
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self.loop = loop
        # Calls made while serving a request inherit its deadline and metadata (as single calls do).
        parent = _current_request.get()
        self.parent_deadline = parent.deadline if parent is not None else None
        if parent is not None and parent.metadata:
            metadata = {**parent.metadata, **(metadata or {})}
        self.metadata = metadata
        self.state = "running"
        self.next_index = 0
        self.exhausted = False
        #: chunks sent and not yet handed to the consumer, in the order they were sent
        self.in_flight: deque[_Chunk] = deque()
        #: finished chunks, in completion order (unordered maps)
        self.finished: Any = None
        if not ordered:
            if loop is not None:
                import asyncio  # only an amap needs it: not at import time, for processes that never await

                self.finished = asyncio.Queue()
            else:
                self.finished = _SimpleQueue()
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- sending

    def fill(self) -> None:
        """Send chunks until the window is full or the source is exhausted; a source error cancels the map and is raised."""
        while not self.exhausted and len(self.in_flight) < self.window and self.state == "running":
            if self.manager._closed:
                # Nothing more goes through a closed manager (nor starts a timer thread for it again).
                self.cancel()
                raise ServiceStoppedError(
                    f"map {self.service_name}.{self.method} ended: its ServiceManager was closed "
                    f"(items from {self.next_index} on were not sent)"
                )
            try:
                items = list(itertools.islice(self.source, self.chunk_size))
            except BaseException:
                self.cancel()
                raise
            if len(items) < self.chunk_size:
                self.exhausted = True
            if items:
                self._send_chunk(items)

    def _send_chunk(self, items: list[Any]) -> None:
        route = self.route
        manager = self.manager
        nominal = self.nominal
        now = _time()
        deadline = now + nominal
        inherited = self.parent_deadline is not None and self.parent_deadline < deadline
        if inherited:
            deadline = self.parent_deadline  # type: ignore[assignment]
        if self.send_fast is not None and self._send_fast(items, deadline, now, inherited):
            return
        service_name, method = self.service_name, self.method
        kwargs, metadata = self.kwargs, self.metadata
        chain = route.chain
        if chain is None:
            shared_kwargs, shared_metadata = kwargs, metadata
        else:  # middleware may change a request: each gets its own dicts
            shared_kwargs = shared_metadata = None
        new_id = _new_request_id
        requests = [
            ServiceRequest(
                new_id(),
                service_name,
                method,
                item if type(item) is tuple else (item,),
                shared_kwargs if shared_kwargs is not None else dict(kwargs) if kwargs else {},
                "",
                deadline,
                shared_metadata if shared_metadata is not None else dict(metadata) if metadata else {},
            )
            for item in items
        ]
        first = self.next_index
        self.next_index += len(requests)
        chunk = _Chunk(self, first, requests, deadline - now)
        self._arm_waiter(chunk)
        self.in_flight.append(chunk)
        # The deadline is armed before anything is sent, so no reply can come unwatched.
        timer = manager._timer or manager.timer()
        if inherited:
            timer.call_later(deadline - now, chunk._expire)
        else:
            chunk._expires_at = _monotonic() + nominal
            timer.expire_at(nominal, chunk)
        to_send = requests
        refused: list[tuple[int, BaseException]] = []
        answered: list[tuple[int, ServiceResponse]] = []
        admit = route.admit
        if admit is not None or chain is not None:
            to_send = []
            sent = list(requests)
            limits = [0] * len(requests)
            chunk.sent, chunk.limits = sent, limits
            chunk.began = perf_counter()
            for index, request in enumerate(requests):
                if admit is not None:
                    refusal = admit(service_name, method)
                    if refusal is not None:
                        refused.append((index, refusal))
                        continue
                if chain is not None:
                    limits[index] = chain.size
                    try:
                        sent[index], response, limits[index] = chain.run_before(request)
                    except MiddlewareError as exc:
                        sent[index], limits[index] = exc.request, exc.index
                        response = ServiceResponse.from_exception(request.request_id, exc.error, origin="client")
                    if response is not None:
                        answered.append((index, response))
                        continue
                    if sent[index].request_id != request.request_id:  # a middleware that renamed the request
                        chunk.open[sent[index].request_id] = chunk.open.pop(request.request_id)
                to_send.append(sent[index])
        for index, refusal in refused:  # refused before it was built, as a single call is: no middleware saw it
            if chunk.open.pop(requests[index].request_id, None) is not None:
                chunk.settle(index, refusal)
        for index, response in answered:  # answered by a middleware: its after-hooks still run
            if chunk.open.pop(chunk.sent[index].request_id, None) is not None:
                chunk._after(index, response)
        if to_send:
            try:
                route.connection.send_many(to_send, chunk)
            except Exception as exc:  # noqa: BLE001 - a transport failing to send fails these calls only
                for request in to_send:
                    chunk(ServiceResponse.from_exception(request.request_id, exc, origin="client"))

    def _arm_waiter(self, chunk: _Chunk) -> None:
        """An ordered map's consumer waits on this for ``chunk``: a future of its loop, or a held lock."""
        if self.ordered:
            if self.loop is not None:
                chunk.waiter = self.loop.create_future()
            else:
                chunk.waiter = threading.Lock()
                chunk.waiter.acquire()

    def _send_fast(self, items: list[Any], deadline: float, now: float, inherited: bool) -> bool:
        """Send a chunk as one compact record (:class:`_FastChunk`); False when the transport cannot (nothing sent)."""
        # A chunk whose items are single arguments (no item is a tuple) travels as the items themselves
        # where the transport can (send_single): no tuple per call to build, pickle and unpickle.
        send = self.send_fast
        single = False
        if self.send_single is not None and tuple not in map(type, items):
            args: tuple[Any, ...] = tuple(items)
            send, single = self.send_single, True
        else:
            args = tuple([item if type(item) is tuple else (item,) for item in items])
        chunk = _FastChunk(self, self.next_index, args, deadline, deadline - now, single)
        self._arm_waiter(chunk)
        chain = self.batch_chain
        if chain is not None:
            chunk.calls = calls = CallBatch(self.service_name, self.method, len(args), chunk.chunk_id, self.metadata)
            chunk.began = perf_counter()
            if chain.admit_batch(calls) is not None:  # refused: nothing sent, each call fails with the refusal
                chunk.open.clear()
                chunk.outcomes = [None] * len(args)
                chunk.failures = calls.failures
                chunk._state = "FINISHED"
                self.next_index += len(args)
                self.in_flight.append(chunk)
                self.chunk_done(chunk)
                return True
            if not send(chunk.chunk_id, self.method, args, self.kwargs or {}, deadline, self.metadata or {}, chunk):
                self._send_apart(chunk)  # admitted as one chunk: reported as one, whatever way it travels
        elif not send(chunk.chunk_id, self.method, args, self.kwargs or {}, deadline, self.metadata or {}, chunk):
            return False
        self.next_index += len(args)
        self.in_flight.append(chunk)
        # Armed once sent (a chunk answered already is dropped by the timer at once). The host answers a
        # chunk at its deadline with the outcomes it has (see the mmap transport), so the caller gives that
        # answer a moment to arrive before failing the whole chunk itself (a host that stalls).
        timer = self.manager._timer or self.manager.timer()
        if inherited:
            timer.call_later(deadline - now + CHUNK_ANSWER_GRACE, chunk._expire)
        else:
            chunk._expires_at = _monotonic() + self.nominal + CHUNK_ANSWER_GRACE
            timer.expire_at(self.nominal + CHUNK_ANSWER_GRACE, chunk)
        return True

    def _send_apart(self, chunk: _FastChunk) -> None:
        """Send an admitted chunk's calls one by one (``send_many``); their answers complete it as one (:class:`_ApartAnswer`)."""
        kwargs, metadata = self.kwargs or {}, self.metadata or {}
        new_id = _new_request_id
        requests = [
            ServiceRequest(new_id(), self.service_name, self.method, args, kwargs, "", chunk.deadline, metadata)
            for args in (tuple(zip(chunk.args)) if chunk.single else chunk.args)
        ]
        chunk.apart = apart = _ApartAnswer(chunk, requests)
        try:
            self.route.connection.send_many(requests, apart)
        except Exception as exc:  # noqa: BLE001 - a transport failing to send fails these calls only
            for request in requests:
                apart(ServiceResponse.from_exception(request.request_id, exc, origin="client"))

    # ------------------------------------------------------------- consuming

    def chunk_done(self, chunk: _Chunk) -> None:
        """Wake the consumer (called by whichever thread settles a chunk's last call); once per chunk.

        Twice only when hooks held the chunk past its deadline and grace
        (``_Chunk._end_if_held``) and then returned: the second is dropped.
        """
        with _waking:
            if chunk._woken:
                return
            chunk._woken = True
        loop = self.loop
        if self.ordered:
            if loop is None:
                chunk.waiter.release()
            else:
                self._call_soon(self._resolve, chunk.waiter)
        elif loop is None:
            self.finished.put(chunk)
        else:
            self._call_soon(self.finished.put_nowait, chunk)

    def _call_soon(self, function: Any, argument: Any) -> None:
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(function, argument)
        except RuntimeError:  # the loop closed: nobody consumes any more
            pass

    @staticmethod
    def _resolve(future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)

    def outcomes(self, chunk: _Chunk) -> Iterator[Any]:
        """The results of a finished chunk in item order; a failure raises (or is yielded, with return_exceptions)."""
        return_exceptions = self.return_exceptions
        if type(chunk) is _FastChunk:
            failures = chunk.failures
            if not failures:  # the common case: every call succeeded
                yield from chunk.outcomes
                return
            outcomes: Iterable[Any] = (failures.get(index, _RESULT) for index in range(len(chunk.outcomes)))
        else:
            outcomes = chunk.outcomes
        for index, outcome in enumerate(outcomes):
            if outcome is _RESULT:
                yield chunk.outcomes[index]
                continue
            if type(outcome) is ServiceResponse:
                if outcome.success:
                    yield outcome.result
                    continue
                outcome = outcome.to_exception(self.service_name, self.method)
            outcome.add_note(f"(item {chunk.first + index} of map over {self.service_name}.{self.method})")
            if return_exceptions:
                yield outcome
                continue
            self.cancel()
            raise outcome

    def cancel(self) -> None:
        """End the map: calls not finished are cancelled at their transport (not started, they never start)."""
        with self.lock:
            if self.state != "running":
                return
            self.state = "closed"
        while self.in_flight:
            self.in_flight.popleft().cancel()


class _SimpleQueue:
    """A bare FIFO a consumer thread blocks on (``queue.SimpleQueue`` without its import cost)."""

    def __init__(self) -> None:
        from queue import SimpleQueue

        self._queue: SimpleQueue[_Chunk] = SimpleQueue()
        self.put = self._queue.put
        self.get = self._queue.get


class CallMap(Iterator[Any]):
    """The iterator :meth:`ServiceManager.map` returns; close it (or leave its ``with`` block) to cancel what is left."""

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch
        self._generator: Generator[Any, None, None] = self._results()
        self._next = self._generator.__next__

    def _results(self) -> Generator[Any, None, None]:
        batch = self._batch
        try:
            while True:
                batch.fill()
                if not batch.in_flight:
                    return
                if batch.ordered:
                    chunk = batch.in_flight[0]
                    chunk.waiter.acquire()
                    batch.in_flight.popleft()
                else:
                    chunk = batch.finished.get()
                    batch.in_flight.remove(chunk)
                batch.fill()  # keep the window full while the consumer reads this chunk
                if type(chunk) is _FastChunk and not chunk.failures:
                    yield from chunk.outcomes  # the common case, without a generator level per item
                else:
                    yield from batch.outcomes(chunk)
        finally:
            batch.cancel()

    def __iter__(self) -> Iterator[Any]:
        # A ``for`` loop iterates the results generator itself: no Python frame of this class per
        # item (a third of the caller's cost of a trivial call). ``next(map)`` and ``close()`` act
        # on the same generator, so both ways of reading share one position.
        return self._generator

    def __next__(self) -> Any:
        return self._next()

    def close(self) -> None:
        """Stop: every call not finished is cancelled (one not started never starts); idempotent."""
        self._batch.cancel()
        self._next = iter(()).__next__
        try:
            self._generator.close()  # a ``for`` loop over this map ends too
        except ValueError:
            pass  # running in another thread: it ends at its next chunk (the batch is cancelled)

    def __enter__(self) -> CallMap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            batch.cancel()


class AsyncCallMap(AsyncIterator[Any]):
    """The async iterator :meth:`ServiceManager.amap` returns; ``aclose()`` or cancelling its consumer cancels what is left."""

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch
        self._current: Iterator[Any] = iter(())

    def __aiter__(self) -> AsyncCallMap:
        return self

    async def __anext__(self) -> Any:
        batch = self._batch
        try:
            while True:
                for result in self._current:
                    return result
                batch.fill()
                if not batch.in_flight or batch.state != "running":
                    batch.cancel()
                    raise StopAsyncIteration
                if batch.ordered:
                    chunk = batch.in_flight[0]
                    await chunk.waiter
                    batch.in_flight.popleft()
                else:
                    chunk = await batch.finished.get()
                    batch.in_flight.remove(chunk)
                batch.fill()
                self._current = batch.outcomes(chunk)
        except StopAsyncIteration:
            raise
        except BaseException:  # a failed item (raised), a source error, or the consumer cancelled
            batch.cancel()
            raise

    async def aclose(self) -> None:
        """Stop: every call not finished is cancelled (one not started never starts); idempotent."""
        self._batch.cancel()
        self._current = iter(())

    def close(self) -> None:
        """:meth:`aclose` without awaiting."""
        self._batch.cancel()
        self._current = iter(())

    async def __aenter__(self) -> AsyncCallMap:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            batch.cancel()
