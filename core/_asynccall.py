"""Asynchronous calls (``ServiceManager.call_service_async``): the Future a caller holds, and its attempts.

Imported with a process's first async call, not with the manager: a process
that only makes sync calls does not load ``concurrent.futures`` (nor the
``logging`` it imports), about 3 ms of its start.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, InvalidStateError
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._errors import ServiceStoppedError
from ._fork import renew_after_fork
from ._future import CallFuture, future_lock
from ._manager import _monotonic, _time
from ._messages import MAY_HAVE_RUN, ServiceRequest, ServiceResponse, _reanchor
from ._middleware import MiddlewareError, running_hooks
from ._transport import HOOK_GRACE, held_response, timeout_response
from .keys import CONNECTION_CLOSED

if TYPE_CHECKING:
    from ._manager import ServiceManager, _Route

__all__ = ["_AsyncCall"]


#: What a finished call holds instead of its request (see ``_AsyncCall._complete``).
_RELEASED = ServiceRequest("", "", "")
#: Guards the claim of an attempt (``_AsyncCall._claim``): one lock for every call, held for a few
#: bytecodes, rather than an object per call that the garbage collector would have to count. It is
#: the futures' own lock, so a first reply can claim its attempt and complete the future at once.
_claiming = future_lock
renew_after_fork(sys.modules[__name__], "_claiming")  # the same new lock as future_lock's in a forked child


class _AsyncCall(CallFuture[Any]):
    """One asynchronous call, and the Future its caller holds (one object per call in flight).

    Each attempt runs the whole chain, as a sync call does. An attempt is
    settled exactly once, by its response or by the deadline, whichever
    claims it first (``_open_attempt`` is the attempt not settled yet, -1 when
    none is); after-hooks run for the attempt that settles it, then the retry
    policy decides between another attempt (after a delay on the manager's
    timer) and completing the future.

    The first attempt's reply callback is the call itself (``__call__``), so a
    call in flight costs no separate callback object; later attempts get an
    :class:`_AttemptReply`. A finished call drops its request.
    """

    #: whether the call was re-routed once already (set on the instance when it is: most calls never are)
    _rerouted = False
    #: the attempt being made, and the one not settled yet (-1: none); set on the instance from the first change
    _attempt = 0
    _open_attempt = 0
    #: the after-hooks' limit and the chain's clock at the attempt's start (set by _send when a chain runs)
    _limit = 0
    _began = 0.0
    #: the monotonic deadline of a call whose timeout is on the timer's heap (``_expires_at`` is 0.0 then)
    _give_up_at = 0.0

    def __init__(
        self,
        manager: ServiceManager,
        route: _Route,
        request: ServiceRequest,
        nominal_timeout: float,
        attempt: int = 0,
        rerouted: bool = False,
    ) -> None:
        """Arm the deadline and send attempt ``attempt`` (a retry of a batched call starts at 1).

        ``nominal_timeout`` is the caller's (or the default) timeout. ``rerouted``:
        the call is a batched call's delivery on a new route (not a retry; no second re-route).
        """
        # CallFuture's state starts as its class attributes, and so do the attempt counters and the
        # chain's limit and clock: a new call stores only what differs from them.
        if rerouted:
            self._rerouted = True
        self._manager = manager
        self._route = route
        self._request = request
        if attempt:
            self._attempt = self._open_attempt = attempt
        self._sent = request
        self._timeout = timeout = request.deadline - _time()  # type: ignore[operator]
        timer = manager._timer or manager.timer()
        if timeout < nominal_timeout - 0.001:
            # An inherited, earlier deadline breaks the FIFO order of its timeout: use the heap.
            self._expires_at = 0.0
            self._give_up_at = _monotonic() + timeout
            timer.call_later(timeout, self._expire)
        else:
            self._expires_at = _monotonic() + timeout
            # Timer.expire_at's common case without its frame: its timeout's FIFO holds earlier calls,
            # so the timer thread knows of it already (a new or empty FIFO takes expire_at, which wakes it).
            fifo = timer._fifos.get(nominal_timeout)
            if fifo:
                fifo.append(self)
            else:
                timer.expire_at(nominal_timeout, self)
        self._send()

    def _claim(self, attempt: int) -> bool:
        """Whether ``attempt`` was still open; it is settled by this caller then (exactly one claim wins)."""
        with _claiming:
            if self._open_attempt != attempt:
                return False
            self._open_attempt = -1
        return True

    def __call__(self, response: ServiceResponse) -> None:
        """The first attempt's reply callback, called by the transport."""
        if not response.success:
            self._settle(response, 0)
            return
        # A success, the common case, in one step: claimed here and its after-hooks run here
        # (a retry is considered only if one of them turns it into a failure).
        chain = self._route.chain
        with _claiming:
            if self._open_attempt != 0:
                return  # late: the deadline settled the attempt already
            self._open_attempt = -1
            if chain is None:
                try:
                    finished = self._finish_locked(response.result, None)
                except InvalidStateError:
                    finished = True  # cancelled by the caller
        if chain is None:
            if finished:
                self._request = self._sent = _RELEASED
            else:
                self._complete(response)  # something waits on the future: the standard path
            return
        if self._state != "PENDING":
            return  # cancelled by the caller
        response = chain.run_after(self._sent, response, self._limit, self._began)
        if not response.success:
            self._conclude(response)  # an after-hook turned it into a failure: the retry policy decides
            return
        # Still a success: no retry to consider, so the future is completed here, as _complete does
        # (two frames less per call with middleware).
        try:
            with _claiming:
                finished = self._finish_locked(response.result, None)
            if not finished:
                Future.set_result(self, response.result)  # something waits on the future: the standard path
        except InvalidStateError:
            pass  # cancelled by the caller meanwhile
        self._request = self._sent = _RELEASED

    def _finished(self) -> bool:
        """Whether the caller has its outcome (or gave up): no further reply matters."""
        return self._state != "PENDING"  # read without the future's lock: a stale answer only delays a prune

    def cancel(self) -> bool:
        """Cancel the call: the future is cancelled at once, and the transport is asked to drop the request.

        Returns False when the call had finished already. No reply or deadline
        settles the call afterwards. A request that has not started never
        starts; one already running runs to its end, and its answer is dropped
        (see :meth:`ServiceManager.call_service_async`).
        """
        if not Future.cancel(self):
            return False
        with _claiming:
            self._open_attempt = -1
        self._cancel_sent(self._sent)
        return True

    def _cancel_sent(self, sent: ServiceRequest) -> None:
        """Ask the transport to drop ``sent`` (best effort, never raises)."""
        if sent is _RELEASED:
            return
        try:
            self._route.connection.cancel(sent)
        except Exception:  # noqa: BLE001 - cancelling is best effort; the caller has its answer
            pass

    def _abandon(self) -> None:
        """Fail the call with ServiceStoppedError now (its manager closed) and cancel it at the transport."""
        if not self._claim(self._attempt):
            return  # a response is being settled right now: it completes the call (no retry once closed)
        request = self._request
        error = ServiceStoppedError(
            f"call {request.service_name}.{request.method_name} was abandoned: its ServiceManager was closed "
            "while the call was in flight (it may have run)"
        )
        response = ServiceResponse.from_exception(request.request_id, error, origin="runtime")
        response.metadata[MAY_HAVE_RUN] = True
        sent = self._sent
        self._complete(self._after(response))
        self._cancel_sent(sent)

    def _expire(self) -> None:
        """The deadline passed: settle the current attempt with ServiceTimeoutError, unless its response got there first.

        Called in the manager's timer thread, which must end every other call
        on time as well. So the timeout's after-hooks (the application's code,
        which may block) run in one of the timer's workers, and a call whose
        answer or timeout is still in its middleware or retry policy
        :data:`HOOK_GRACE` after its deadline ends without them (:meth:`_hooks_hung`).
        """
        if self._claim(self._attempt):
            # Withdrawn at the transport first: once the caller sees the timeout, the request is out of
            # any queue of the transport (one not started never starts).
            self._cancel_sent(self._sent)
            response = timeout_response(self._request, self._timeout)
            if self._route.chain is None:
                self._complete(response)
            else:
                timer = self._manager.timer()
                timer.hand_over(lambda: self._complete(self._after(response)))
                timer.call_later(HOOK_GRACE, self._expire)
        elif not self._finished():
            # A response is being settled right now and may yet schedule a retry: look again shortly,
            # and end the call if a hook or the policy still holds it once the grace has passed.
            if _monotonic() >= (self._expires_at or self._give_up_at) + HOOK_GRACE:  # not the wall clock: it steps
                self._hooks_hung()
            else:
                self._manager.timer().call_later(0.005, self._expire)

    def _hooks_hung(self) -> None:
        """End the call with ServiceTimeoutError: its middleware or retry policy has held it past its deadline and grace.

        The hook goes on in its thread; what it returns is dropped (the
        future is complete). The error names the hooks found running for
        this call (see :func:`held_response`).
        """
        request = self._request
        running = running_hooks(self, self._route.hook_methods())
        self._complete(held_response(request.request_id, f"{request.service_name}.{request.method_name}", running))

    def _send(self) -> None:
        route = self._route
        chain = route.chain
        request = self._request
        self._sent = request
        attempt = self._attempt
        if chain is not None:
            self._limit = chain.size
            self._began = perf_counter()
            try:
                self._sent, response, self._limit = chain.run_before(request)
            except MiddlewareError as exc:
                self._sent, self._limit = exc.request, exc.index
                response = ServiceResponse.from_exception(request.request_id, exc.error, origin="client")
            if response is not None:
                self._settle(response, attempt)
                return
        try:
            route.connection.send(self._sent, self if attempt == 0 else _AttemptReply(self, attempt))
        except Exception as exc:  # noqa: BLE001 - a transport failing to send fails this attempt only
            self._settle(ServiceResponse.from_exception(request.request_id, exc, origin="client"), attempt)

    def _after(self, response: ServiceResponse) -> ServiceResponse:
        chain = self._route.chain
        return response if chain is None else chain.run_after(self._sent, response, self._limit, self._began)

    def _settle(self, response: ServiceResponse, attempt: int) -> None:
        if not self._claim(attempt):
            return  # late: the deadline settled this attempt already
        if self._state != "PENDING":
            return  # cancelled by the caller
        self._conclude(self._after(response))

    def _conclude(self, response: ServiceResponse) -> None:
        """A claimed attempt's final response (its after-hooks run): re-route, retry, or complete the call.

        Never leaves the call pending: what deciding raises completes the call with that error.
        """
        try:
            self._decide(response)
        except Exception as exc:  # noqa: BLE001 - a bug on this path must not leave the caller's future pending
            self._complete(ServiceResponse.from_exception(self._request.request_id, exc, origin="client"))

    def _decide(self, response: ServiceResponse) -> None:
        if not response.success:
            manager = self._manager
            if not manager._closed:
                _reanchor(self._request, self._expires_at or self._give_up_at)
                if not self._rerouted and response.metadata.get(CONNECTION_CLOSED):
                    # Nothing was sent: resolve the name again (in the timer thread: it may connect).
                    self._rerouted = True
                    self._attempt += 1
                    self._open_attempt = self._attempt
                    manager.timer().call_later(0.0, lambda: self._reroute(response), may_block=True)
                    return
                # A re-route is no retry: the policy counts the attempts after it.
                delay = self._route.retry_delay(self._request, response, self._attempt - self._rerouted)
                if delay is not None:
                    self._attempt += 1
                    self._open_attempt = self._attempt
                    # In the timer thread, not this reply thread: resolving may connect.
                    manager.timer().call_later(0.0, lambda: self._retry_moved(response, delay), may_block=True)
                    return
            if response.error_type == "ServiceUnavailableError" and response.error_origin == "runtime":
                # As a sync call does: the next call resolves the service again (it may have moved).
                manager._drop_route(self._route)
        self._complete(response)

    def _reroute(self, refused: ServiceResponse) -> None:
        """Send the request refused by a closed connection on the name's new route, or decide as for any failure."""
        if self._finished():
            return
        fresh = self._manager._rerouted(self._route, refused, self._request.deadline)
        if fresh is None:
            if self._claim(self._attempt):  # the attempt opened for the re-route, never sent
                self._conclude(refused)
            return
        self._route = fresh
        self._resend()

    def _retry_moved(self, failed: ServiceResponse, delay: float) -> None:
        """Send the retry now if the service now resolves elsewhere, else after ``delay`` (see ``_retry_route``)."""
        if self._finished():
            return
        self._route, moved = self._manager._reresolve(self._route, failed, self._request.deadline)
        task = self._route.awaiting_host
        if task is not None:
            # Its host is being replaced: retry once the new one is in place (the deadline timer still
            # ends the call if that comes too late). The callback only schedules: it may run in the
            # thread replacing the host.
            timer = self._manager.timer()
            task.call_when_host_ready(lambda: timer.call_later(0.0, lambda: self._retry(failed), may_block=True))
            return
        if not moved:
            self._manager.timer().call_later(delay, lambda: self._retry(failed), may_block=True)
            return
        self._resend()

    def _retry(self, failed: ServiceResponse) -> None:
        if self._finished():
            return
        self._route = self._manager._refresh_route(self._route, failed, self._request.deadline)
        self._resend()

    def _resend(self) -> None:
        self._send()
        if self.cancelled():
            self._cancel_sent(self._sent)  # cancelled while this attempt was being sent

    def _complete(self, response: ServiceResponse) -> None:
        try:
            if response.success:
                if not self._finish_unobserved(response.result, None):  # CallFuture.set_result, inline
                    Future.set_result(self, response.result)
            else:
                self.set_exception(response.to_exception(self._request.service_name, self._request.method_name))
        except InvalidStateError:
            pass  # cancelled by the caller meanwhile
        # A finished call no longer needs its request: callers often keep thousands of
        # finished futures, and each request is one more object for the garbage collector.
        self._request = self._sent = _RELEASED


class _AttemptReply:
    """The reply callback of a later attempt: settles that attempt (one object, not a closure)."""

    __slots__ = ("attempt", "call")

    def __init__(self, call: _AsyncCall, attempt: int) -> None:
        self.call = call
        self.attempt = attempt

    def __call__(self, response: ServiceResponse) -> None:
        self.call._settle(response, self.attempt)
