"""The transport contract: how a request reaches a task and its response comes back.

A transport has a server side (``listen``: make a task reachable) and a client
side (``connect``: a :class:`Connection` to a reachable task). The core never
names a concrete transport; transports arrive through the
``kservice_register_transports`` hook.
"""

from __future__ import annotations

from _thread import allocate_lock as _allocate_lock
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import ServiceTimeoutError
from ._messages import ServiceRequest, ServiceResponse

if TYPE_CHECKING:
    from ._stream import StreamSource
    from ._task import BaseServiceTask

__all__ = ["Connection", "Listener", "ServiceAddress", "Transport"]

Reply = Callable[[ServiceResponse], None]


@dataclass(frozen=True)
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


class Connection(ABC):
    """A caller's channel to one service.

    ``send`` guarantees ``reply`` is called exactly once per request, from any
    thread, unless the connection is closed first (then pending requests are
    answered with ServiceUnavailableError). A reply that arrives after the
    caller gave up is dropped by the caller.
    """

    #: the name of the queue requests go to, when the transport has one
    queue_name: str = ""

    @abstractmethod
    def send(self, request: ServiceRequest, reply: Reply) -> None:
        """Hand ``request`` to the service; never blocks longer than the request's deadline."""

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        """Send and wait for the response in this thread.

        Returns a failed response carrying ServiceTimeoutError when ``timeout``
        passes first; the service will not start a request past its deadline.
        Transports override this when they can answer without a thread hand-off.
        """
        waiter = _ReplyWaiter()
        self.send(request, waiter)
        response = waiter.wait(timeout)
        if response is None:
            self.cancel(request)
            return timeout_response(request, timeout)
        return response

    def cancel(self, request: ServiceRequest) -> None:
        """Best effort: stop work on ``request``, whose caller timed out (the default does nothing).

        Called after the caller already has its ServiceTimeoutError, from the
        manager's timer thread; must not block. A service never starts a
        request past its deadline whatever this does; transports that can
        interrupt work already sent (Ray's ``ray.cancel``) override it.
        """

    def open_stream(self, request: ServiceRequest, window: int) -> StreamSource:
        """Start streaming call ``request``: the consumer's end, fed as the service's generator yields.

        At most ``window`` items are in flight (sent and not yet received);
        the producer waits for room. Transports that can stream override this;
        the default raises ServiceError naming the transport.
        """
        from ._errors import ServiceError

        raise ServiceError(f"the {type(self).__name__} transport cannot stream calls (use a transport that can: inproc, mmap, ray)")

    def close(self) -> None:
        """Release the connection; idempotent."""


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
    #: whether callers in other processes can use it (listings prefer local ones in-process). Such a
    #: transport gives the service a copy of each request, never the caller's object, and does not
    #: change the request it sends: requests to it made without kwargs or metadata may share
    #: read-only empty dicts.
    crosses_processes: bool = True

    @abstractmethod
    def listen(self, task: BaseServiceTask) -> Listener:
        """Make ``task`` reachable; called by the task when it starts."""

    @abstractmethod
    def connect(self, address: ServiceAddress) -> Connection:
        """A connection to the service at ``address``; ServiceUnavailableError if it cannot be reached."""

    def close(self) -> None:
        """Release process-wide resources (response queues, pools); idempotent."""
