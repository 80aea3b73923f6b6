"""The transport contract: how a request reaches a task and its response comes back.

A transport has a server side (``listen``: make a task reachable) and a client
side (``connect``: a :class:`Connection` to a reachable task). The core never
names a concrete transport; transports arrive through the
``kservice_register_transports`` hook.
"""

from __future__ import annotations

import math
import time
from _thread import allocate_lock as _allocate_lock
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from reprlib import recursive_repr
from typing import TYPE_CHECKING, Any

from ._errors import ServiceTimeoutError
from ._messages import FACTORY, MAY_HAVE_RUN, ServiceRequest, ServiceResponse

if TYPE_CHECKING:
    from ._manager import ServiceManager, _Route
    from ._stream import ItemStream, StreamSource
    from ._task import BaseServiceTask

__all__ = ["Connection", "Listener", "ServiceAddress", "Transport"]

Reply = Callable[[ServiceResponse], None]


@dataclass(frozen=True, init=False, repr=False, eq=False)  # the methods written out: see _messages.FACTORY
class ServiceAddress:
    """Where one service instance can be reached through one transport.

    ``target`` is transport-specific: the task object (``inproc``), the
    request-queue name (``mmap``), actor names (``ray``). ``info`` holds what
    listings show (pid, host, start time).
    """

    transport: str
    service_name: str
    target: Any
    instance: str = ""
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __init__(
        self, transport: str, service_name: str, target: Any, instance: str = "", info: dict[str, Any] = FACTORY
    ) -> None:
        setattr = object.__setattr__  # frozen: the field is set past __setattr__, as dataclass's __init__ does
        setattr(self, "transport", transport)
        setattr(self, "service_name", service_name)
        setattr(self, "target", target)
        setattr(self, "instance", instance)
        setattr(self, "info", {} if info is FACTORY else info)

    @recursive_repr()
    def __repr__(self) -> str:
        return (
            f"{self.__class__.__qualname__}(transport={self.transport!r}, service_name={self.service_name!r}, "
            f"target={self.target!r}, instance={self.instance!r}, info={self.info!r})"
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return (self.transport, self.service_name, self.target, self.instance) == (
                other.transport,
                other.service_name,
                other.target,
                other.instance,
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.transport, self.service_name, self.target, self.instance))


class Connection(ABC):
    """A caller's channel to one service.

    ``send`` guarantees ``reply`` is called exactly once per request, from any
    thread (unless the request is cancelled: then its reply may never come).
    A reply that arrives after the caller gave up is dropped by the caller.

    A failed response made by the runtime says in ``metadata[MAY_HAVE_RUN]``
    whether the request may have reached the service: ``False`` only when it
    provably did not (refused before it was written, its queue full or
    closed, the task not running), ``True`` when it may have (the host died or
    the link was lost after it was sent). Retry policies re-send a method not
    declared idempotent only on ``False``; leaving the key out counts as ``True``.
    """

    #: the name of the queue requests go to, when the transport has one
    queue_name: str = ""

    @abstractmethod
    def send(self, request: ServiceRequest, reply: Reply) -> None:
        """Hand ``request`` to the service; never blocks longer than the request's deadline."""

    def send_many(self, requests: Sequence[ServiceRequest], reply: Reply) -> None:
        """Hand several requests to the service at once (``ServiceManager.map``); never blocks.

        ``reply`` is called exactly once per request (unless it is cancelled),
        from any thread, with a response whose ``request_id`` names its
        request: one callback serves the whole batch. Each request keeps its
        own outcome: one that fails (cannot be encoded, refused) fails alone.
        The default sends them one by one; transports that can carry several
        calls per message (``mmap``: one ring record, Ray: one actor call)
        override it.
        """
        send = self.send
        for request in requests:
            try:
                send(request, reply)
            except Exception as exc:  # noqa: BLE001 - one request failing to send fails that request only
                reply(ServiceResponse.from_exception(request.request_id, exc, origin="client"))

    def cancel_many(self, requests: Sequence[ServiceRequest]) -> None:
        """:meth:`cancel` for several requests at once (the default cancels them one by one); never raises."""
        for request in requests:
            try:
                self.cancel(request)
            except Exception:  # noqa: BLE001 - cancelling is best effort
                pass

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        """Send and wait for the response in this thread.

        Returns a failed response carrying ServiceTimeoutError when ``timeout``
        passes first; the service will not start a request past its deadline.
        A wait interrupted by an exception (``KeyboardInterrupt`` at Ctrl-C)
        cancels the request as :meth:`cancel` does, then lets the exception
        go on: a request not started yet never starts. Transports override
        this when they can answer without a thread hand-off (and cancel the
        same way).
        """
        waiter = _ReplyWaiter()
        self.send(request, waiter)
        try:
            response = waiter.wait(timeout)
        except BaseException:
            self.cancel(request)  # the caller gave up (Ctrl-C): a request still queued must not run after
            raise
        if response is None:
            self.cancel(request)
            return timeout_response(request, timeout)
        return response

    def cancel(self, request: ServiceRequest) -> None:
        """Drop ``request``, whose caller gave up (timed out, cancelled its future, or closed its manager).

        Called after the caller already has its outcome, from any thread; must
        not block and should not raise. A request that has not started must
        never start; one already running may run to its end (a thread cannot be
        interrupted), and its reply, if it comes, is dropped. A service never
        starts a request past its deadline, so the default (nothing) is enough
        for a timeout; transports that can do better override it (in-process:
        the request's deadline is moved to the past; ``mmap``: the host is told;
        Ray: ``ray.cancel``).
        """

    def open_stream(self, request: ServiceRequest, window: int) -> StreamSource:
        """Start streaming call ``request``: the consumer's end, fed as the service's generator yields.

        At most ``window`` items are in flight (sent and not yet received);
        the producer waits for room. Transports that can stream override this;
        the default raises ServiceError naming the transport.
        """
        from ._errors import ServiceError

        raise ServiceError(
            f"the {type(self).__name__} transport cannot stream calls (use a transport that can: inproc, mmap, ray)"
        )

    def pull_items(
        self, manager: ServiceManager, route: _Route, request: ServiceRequest, window: int
    ) -> ItemStream | None:
        """Streaming call ``request`` as the caller's iterator whose items the caller's own thread makes, or None.

        For in-process transports: the manager asks (instead of
        :meth:`open_stream`, under an ItemStream of its own) only for calls
        with no client middleware and no retry policy, and only of transports
        that override this. None: the manager uses :meth:`open_stream`.
        """
        return None

    def close(self) -> None:
        """Release the connection; idempotent.

        Closing never fails a request already sent: its reply still comes (a
        draining service's answers reach their callers), or the transport fails
        it when the service itself is found gone. Later sends are answered with
        ServiceUnavailableError (``MAY_HAVE_RUN`` False).
        """


class _ReplyWaiter:
    """One sync call's reply slot: a bare lock the replying thread releases.

    The cheapest hand-off between two threads in CPython (no Condition, no
    waiter list, no Future): the replier stores the response and releases the
    lock; the caller's ``acquire`` returns. A reply after the caller gave up
    only releases a lock nobody waits on.
    """

    __slots__ = ("_ready", "response")

    def __init__(self) -> None:
        self.response: ServiceResponse | None = None
        self._ready = _allocate_lock()
        self._ready.acquire()

    def __call__(self, response: ServiceResponse) -> None:
        if self.response is None:
            self.response = response
            self._ready.release()

    def wait(self, timeout: float) -> ServiceResponse | None:
        """The response, or None when ``timeout`` seconds pass first."""
        if self._ready.acquire(True, timeout if timeout > 0 else 0):
            return self.response
        return None


def timeout_response(request: ServiceRequest, timeout: float) -> ServiceResponse:
    """The failed response a caller sees when ``request`` is not answered within ``timeout``."""
    error = ServiceTimeoutError(
        f"call {request.service_name}.{request.method_name} timed out after {max(timeout, 0):.3f}s"
    )
    return ServiceResponse.from_exception(request.request_id, error, origin="runtime")


#: Seconds completing one batch of answers may hold a transport's completing thread before it warns
#: (see :func:`blocked_completion`).
BLOCKED_COMPLETION = 1.0


def blocked_completion(thread: str, count: int, seconds: float) -> str:
    """The warning a transport logs when completing ``count`` calls held its completing ``thread`` ``seconds``.

    A future's done callbacks (and a client middleware's after-hooks) run in
    the thread that completes the call, as Python runs a future's callbacks:
    one that blocks holds up the answers of every other async call that
    thread completes, to their deadlines.
    """
    return (
        f"completing {count} call(s) took {seconds:.1f}s: a done callback of a call's future (or a client "
        f"middleware's after_call) blocked {thread}, and the answers of the process's other async calls waited "
        "behind it (those past their deadline timed out). Keep done callbacks quick: hand slow work to an executor"
    )


#: Seconds past its deadline that a call (an async call, a map's chunk) waits for its middleware (the
#: after-hooks of its answer or of its timeout) and its retry policy; then it ends with
#: ServiceTimeoutError without them (:func:`held_response`). Hooks take microseconds: only one that
#: blocks (a log shipper whose endpoint stopped answering) reaches it.
HOOK_GRACE = 0.25


def held_response(request_id: str, call: str, running: list[str]) -> ServiceResponse:
    """The failed response of ``call`` ("S.m", "S.m (items 0 to 9 of a map)") held past its deadline and grace.

    ``running``: the hooks found running for it (see ``_middleware.running_hooks``).
    The error says the call may have run (``metadata[MAY_HAVE_RUN]`` True); a
    warning on ``kservice.calls`` says the same (one a second at most, counting
    the others), since the calls completed after it in that hook's thread wait
    for it too.
    """
    what = ", ".join(running) if running else "its client middleware or retry policy"
    error = ServiceTimeoutError(
        f"call {call} timed out: its answer or its timeout was still in {what} {HOOK_GRACE} s after its "
        "deadline (the call may have run; a hook that blocks also holds up the calls answered after it in "
        "the same thread)"
    )
    response = ServiceResponse.from_exception(request_id, error, origin="runtime")
    response.metadata[MAY_HAVE_RUN] = True
    # One warning a second at most: a hook that blocks on every call holds thousands of them at once.
    now = time.monotonic()
    if now >= _held_warned[0] + 1.0:
        import logging  # a rare path: not with every process's start

        more = f" ({_held_warned[1]} more calls held so since the last warning)" if _held_warned[1] else ""
        logging.getLogger("kservice.calls").warning("%s%s", error, more)
        _held_warned[:] = [now, 0]
    else:
        _held_warned[1] += 1
    return response


#: When :func:`held_response` last warned, and how many held calls it has not warned of since.
_held_warned: list[float] = [float("-inf"), 0]


def deadline_response(request: ServiceRequest, *, started: bool) -> ServiceResponse:
    """The failed response of ``request`` when the service's side finds its deadline passed.

    ``started``: whether the method had begun (a stream mid-way, a coroutine
    being awaited) or not (the request waited past its deadline: it never
    runs). The message says which and how late, never a timeout of 0 s, and
    ``metadata[MAY_HAVE_RUN]`` says it too (False: it never ran).
    """
    late = "" if request.deadline is None else f" ({max(0.0, time.time() - request.deadline):.3f}s ago)"
    when = "while it ran" if started else "before it started; it did not run"
    error = ServiceTimeoutError(f"call {request.service_name}.{request.method_name} passed its deadline{late} {when}")
    response = ServiceResponse.from_exception(request.request_id, error, origin="runtime")
    response.metadata[MAY_HAVE_RUN] = started
    return response


class Listener(ABC):
    """A task made reachable through one transport."""

    address: ServiceAddress

    @property
    def alive(self) -> bool:
        """Whether the listener still receives requests (health checks read this)."""
        return True

    def restart(self) -> None:
        """Start receiving again after a failure (health recovery calls this)."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release resources; idempotent."""


class Transport(ABC):
    """A way to carry calls: one instance per process, registered by a plugin."""

    #: the name services and addresses use for this transport
    name: str = ""
    #: What a call over this transport costs: the typical round trip of a small sync call between
    #: two processes of one host (or within one process, for in-process transports), in microseconds.
    #: A caller uses the cheapest transport a service offers (after those its ``service_call.transports``
    #: lists), whichever plugin registered it; a transport that declares no cost comes after every one
    #: that does, so installing a plugin never moves callers off a faster transport they already use.
    cost: float = math.inf
    #: whether callers in other processes can use it (listings prefer local ones in-process). Such a
    #: transport gives the service a copy of each request, never the caller's object, and does not
    #: change the request it sends.
    crosses_processes: bool = True

    @abstractmethod
    def listen(self, task: BaseServiceTask) -> Listener:
        """Make ``task`` reachable; called by the task when it starts."""

    @abstractmethod
    def connect(self, address: ServiceAddress) -> Connection:
        """A connection to the service at ``address``; ServiceUnavailableError if it cannot be reached."""

    def close(self) -> None:
        """Release process-wide resources (response queues, pools); idempotent."""
