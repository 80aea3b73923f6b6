"""The two messages every transport carries: a request and its response."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from reprlib import recursive_repr
from typing import Any, Literal

from ._errors import (
    RUNTIME_ERRORS,
    ServiceCallError,
    ServiceError,
    exception_state,
    loaded_state,
    make_call_error,
    portable_state,
    restore_state,
)

__all__ = ["MAY_HAVE_RUN", "ServiceRequest", "ServiceResponse", "new_request_id"]


class _Factory:
    """The default of a field a factory fills, as the ``__init__`` dataclass generates spells it (``<factory>``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


#: Written-out dataclass methods: a ``__init__`` parameter left at this default gets a fresh value from
#: the field's factory (an explicit None stays None, as with the ``__init__`` dataclass generates).
#:
#: Why the public dataclasses (these two, ``ServiceAddress``, ``Setting``) write out the ``__init__``,
#: ``__repr__``, ``__eq__`` (and ``__hash__``) that ``dataclass`` would generate, with ``init``, ``repr``
#: and ``eq`` off: on Python 3.11 ``dataclass`` compiles each generated method from source when the
#: class is made, about 0.35 ms per class, 1.4 ms of every caller's start. Written out, they are in the
#: module's bytecode cache. They stay dataclasses (``fields``, ``replace``, ``asdict``, slots and
#: frozenness are dataclass's own), and ``tests/core/test_messages.py`` checks each written-out
#: method against the one ``dataclass`` generates for the same fields.
FACTORY: Any = _Factory()

#: Response metadata key: whether a request that failed in the runtime may have reached the service.
#: ``False``: it provably never did (refused before it was written, its queue full or closed, the
#: task not running, a breaker open), so any retry policy may send it again, idempotent method or not.
#: ``True``: it may have run (its host died or the connection was lost after it was sent); only an
#: idempotent method may be sent again. Absent: unknown, which retry policies treat as ``True``.
#: The caller's exception carries it as ``may_have_run`` (see :meth:`ServiceResponse.to_exception`).
MAY_HAVE_RUN = "kservice.may_have_run"
#: True on a ServiceUnavailableError a transport gave a request it could not send because its connection is
#: closed for good (the host's request queue closed: the host stopped, is stopping or died): nothing was
#: sent (``MAY_HAVE_RUN`` is False). The manager resolves the name again and, when it now leads to another
#: address (a host restarted or moved under the name), sends the request there at once, once per call,
#: as delivery rather than a retry (the retry policy and its budget are not asked). A circuit breaker does
#: not count it (neither a failure nor a success): it says where the service is not, not how it serves.
CONNECTION_CLOSED = "kservice.connection_closed"
#: Response metadata of a method's error that crossed a process: its exception's arguments and attributes,
#: each pickled (``(args, attributes or None)`` as bytes; see ServiceResponse.for_wire); the caller's error gets
#: back what loads there.
ERROR_STATE = "kservice.error_state"


_request_counter = itertools.count(1)
_request_prefix = f"{os.getpid():x}-{time.time_ns() & 0xFFFFFF:x}-"


def new_request_id() -> str:
    """A request id unique across processes of this host (pid, start time, counter).

    Cheaper than uuid4 on the per-call path; ``fork`` children reset the prefix.
    """
    return _request_prefix + str(next(_request_counter))


def _reset_after_fork() -> None:
    global _request_counter, _request_prefix
    _request_counter = itertools.count(1)
    _request_prefix = f"{os.getpid():x}-{time.time_ns() & 0xFFFFFF:x}-"


os.register_at_fork(after_in_child=_reset_after_fork)


def _unprintable(type_name: str, what: str, failure: BaseException) -> str:
    """The message of an exception that cannot describe itself (names only types: nothing here may raise)."""
    return f"<{type_name or 'exception'} could not be formatted: its {what} raised {type(failure).__name__}>"


def _bare_traceback(exc: BaseException, type_name: str, failure: BaseException) -> str:
    """The frames of ``exc`` without any text of its own, for an exception whose formatting raises."""
    try:
        from traceback import format_tb

        frames = "".join(format_tb(exc.__traceback__))
    except BaseException:  # noqa: BLE001
        frames = ""
    return f"Traceback (most recent call last):\n{frames}{_unprintable(type_name, 'formatting', failure)}\n"


@dataclass(slots=True, init=False, repr=False, eq=False)  # the methods written out: see FACTORY
class ServiceRequest:
    """One call of ``service_name.method_name(*args, **kwargs)``.

    ``deadline`` is an absolute ``time.time()`` after which the service must
    not start the work (None: no deadline). The caller's own waits count by
    the monotonic clock, and it sets ``deadline`` afresh from that clock
    before each retry, so a step of the wall clock (NTP, a virtual machine
    resumed) neither lengthens nor shortens a call. ``metadata`` carries
    cross-cutting context (trace ids, caller identity) and is never passed
    to the method.
    ``response_queue_name`` names where a queue-based transport sends the
    response; in-process calls leave it empty.
    """

    request_id: str
    service_name: str
    method_name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    response_queue_name: str = ""
    deadline: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        request_id: str,
        service_name: str,
        method_name: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] = FACTORY,
        response_queue_name: str = "",
        deadline: float | None = None,
        metadata: dict[str, Any] = FACTORY,
    ) -> None:
        self.request_id = request_id
        self.service_name = service_name
        self.method_name = method_name
        self.args = args
        self.kwargs = {} if kwargs is FACTORY else kwargs
        self.response_queue_name = response_queue_name
        self.deadline = deadline
        self.metadata = {} if metadata is FACTORY else metadata

    @recursive_repr()
    def __repr__(self) -> str:
        return (
            f"{self.__class__.__qualname__}(request_id={self.request_id!r}, service_name={self.service_name!r}, "
            f"method_name={self.method_name!r}, args={self.args!r}, kwargs={self.kwargs!r}, "
            f"response_queue_name={self.response_queue_name!r}, deadline={self.deadline!r}, "
            f"metadata={self.metadata!r})"
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return (
                self.request_id,
                self.service_name,
                self.method_name,
                self.args,
                self.kwargs,
                self.response_queue_name,
                self.deadline,
                self.metadata,
            ) == (
                other.request_id,
                other.service_name,
                other.method_name,
                other.args,
                other.kwargs,
                other.response_queue_name,
                other.deadline,
                other.metadata,
            )
        return NotImplemented

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once past), None without a deadline."""
        return None if self.deadline is None else self.deadline - time.time()


ErrorOrigin = Literal["", "service", "runtime", "client"]


@dataclass(slots=True, init=False, repr=False, eq=False)  # the methods written out: see FACTORY
class ServiceResponse:
    """The outcome of one request: a result, or an error described by type.

    ``error_origin`` is ``"service"`` when the method raised (the caller gets
    a :class:`ServiceCallError`) and ``"runtime"`` when kservice refused or
    failed the call (the caller gets the named kservice error). ``exception``
    holds the live exception object on transports that do not serialize; it is
    never sent across processes. ``degraded`` marks a response produced by a
    fallback instead of the service. ``"client"`` marks an error raised by
    caller-side middleware, which the caller gets exactly as raised.
    ``metadata[MAY_HAVE_RUN]`` says whether a runtime error's request may have
    reached the service (see :data:`MAY_HAVE_RUN`).
    """

    success: bool
    result: Any = None
    error: str | None = None
    request_id: str = ""
    error_type: str = ""
    error_origin: ErrorOrigin = ""
    remote_traceback: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    degraded: bool = False
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def __init__(
        self,
        success: bool,
        result: Any = None,
        error: str | None = None,
        request_id: str = "",
        error_type: str = "",
        error_origin: ErrorOrigin = "",
        remote_traceback: str = "",
        metadata: dict[str, Any] = FACTORY,
        degraded: bool = False,
        exception: BaseException | None = None,
    ) -> None:
        self.success = success
        self.result = result
        self.error = error
        self.request_id = request_id
        self.error_type = error_type
        self.error_origin = error_origin
        self.remote_traceback = remote_traceback
        self.metadata = {} if metadata is FACTORY else metadata
        self.degraded = degraded
        self.exception = exception

    @recursive_repr()
    def __repr__(self) -> str:
        return (
            f"{self.__class__.__qualname__}(success={self.success!r}, result={self.result!r}, error={self.error!r}, "
            f"request_id={self.request_id!r}, error_type={self.error_type!r}, error_origin={self.error_origin!r}, "
            f"remote_traceback={self.remote_traceback!r}, metadata={self.metadata!r}, degraded={self.degraded!r})"
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return (
                self.success,
                self.result,
                self.error,
                self.request_id,
                self.error_type,
                self.error_origin,
                self.remote_traceback,
                self.metadata,
                self.degraded,
            ) == (
                other.success,
                other.result,
                other.error,
                other.request_id,
                other.error_type,
                other.error_origin,
                other.remote_traceback,
                other.metadata,
                other.degraded,
            )
        return NotImplemented

    @classmethod
    def ok(cls, request_id: str, result: Any) -> ServiceResponse:
        return cls(True, result, None, request_id)

    @classmethod
    def refusal(cls, request_id: str, exc: BaseException) -> ServiceResponse:
        """The runtime's answer to a request refused before it started: ``exc`` described, ``MAY_HAVE_RUN``
        False (it never ran, so any retry policy may send it again)."""
        response = cls.from_exception(request_id, exc, origin="runtime")
        response.metadata[MAY_HAVE_RUN] = False
        return response

    @classmethod
    def from_exception(
        cls,
        request_id: str,
        exc: BaseException,
        *,
        origin: ErrorOrigin,
        with_traceback: bool = True,
    ) -> ServiceResponse:
        """Describe ``exc`` so any caller, in any process, can rebuild a typed error.

        Never raises, whatever ``exc`` is: an exception whose ``__str__`` (or
        ``__repr__``, or anything its traceback formatting calls) raises is
        described by a message naming its type and what failed instead.
        """
        exc_type = type(exc)
        if origin == "runtime" or isinstance(exc, ServiceCallError):
            type_name = exc_type.__name__ if origin == "runtime" else getattr(exc, "remote_type", "")
        else:
            module = exc_type.__module__
            type_name = exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"
        tb = ""
        if with_traceback and origin == "service":
            try:
                from traceback import format_exception  # failure path only: a caller's start does not import it

                tb = "".join(format_exception(exc))
            except BaseException as failure:  # noqa: BLE001 - a description must not fail the call
                tb = _bare_traceback(exc, type_name, failure)
        try:
            message = str(exc)
        except BaseException as failure:  # noqa: BLE001 - e.g. a __str__ that raises
            message = _unprintable(type_name, "__str__", failure)
        return cls(
            False,
            None,
            message,
            request_id,
            error_type=type_name,
            error_origin=origin,
            remote_traceback=tb,
            exception=exc,
        )

    def to_exception(self, service_name: str = "", method_name: str = "") -> BaseException:
        """The typed error a caller raises for this failed response; never raises itself (an error that cannot
        be rebuilt as its type is a ServiceCallError saying so)."""
        if self.error_origin == "client" and self.exception is not None:
            return self.exception
        if self.error_origin == "runtime":
            runtime_cls = RUNTIME_ERRORS.get(self.error_type, ServiceError)
            if isinstance(self.exception, runtime_cls):
                error = self.exception
            else:
                error = runtime_cls.__new__(runtime_cls)
                Exception.__init__(error, self.error or self.error_type)
            may_have_run = self.metadata.get(MAY_HAVE_RUN) if self.metadata else None
            if may_have_run is not None:
                error.may_have_run = may_have_run  # type: ignore[attr-defined]
            return error
        if isinstance(self.exception, ServiceCallError):
            return self.exception
        try:
            return self._call_error(service_name, method_name)
        except Exception as failure:  # noqa: BLE001 - the caller must get its answer: the error as its message
            return make_call_error(
                f"{self.error or ''} (the {self.error_type} could not be rebuilt here: {failure!r})",
                remote_type=self.error_type,
                remote_traceback=self.remote_traceback,
                service_name=service_name,
                method_name=method_name,
            )

    def _call_error(self, service_name: str, method_name: str) -> ServiceCallError:
        """The typed ServiceCallError of a method's exception (see :func:`make_call_error`)."""
        original = type(self.exception) if self.exception is not None else None
        state: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        if self.exception is not None:
            state = exception_state(self.exception)
        elif self.metadata and ERROR_STATE in self.metadata:
            state = loaded_state(self.metadata[ERROR_STATE])
        call_error = make_call_error(
            self.error or "",
            remote_type=self.error_type,
            remote_traceback=self.remote_traceback,
            service_name=service_name,
            method_name=method_name,
            original_class=original,
            # The live exception (same process) is chained below and prints the traceback itself.
            note=self.exception is None,
            original_args=None if state is None else state[0],
        )
        if self.exception is not None:
            call_error.__cause__ = self.exception
        if state is not None:
            restore_state(call_error, *state)
        return call_error

    def unwrap(self, service_name: str = "", method_name: str = "") -> Any:
        """The result, or raise the typed error."""
        if self.success:
            return self.result
        raise self.to_exception(service_name, method_name)

    def for_wire(self) -> ServiceResponse:
        """A copy without the live exception object, safe to pickle to another process.

        A method's exception leaves its arguments and attributes behind in
        ``metadata[ERROR_STATE]`` (pickled, at most 64 KiB, else its
        arguments alone; an attribute that does not pickle is left out, and
        nothing travels when the arguments do not pickle), from which the
        caller's error gets them (``e.args``, ``e.code``).
        """
        if self.exception is None:
            return self
        metadata = self.metadata
        if self.error_origin == "service":
            state = portable_state(self.exception)
            if state is not None:
                metadata = {**metadata, ERROR_STATE: state}
        return ServiceResponse(
            self.success,
            self.result,
            self.error,
            self.request_id,
            self.error_type,
            self.error_origin,
            self.remote_traceback,
            metadata,
            self.degraded,
        )


def _monotonic_deadline(request: ServiceRequest) -> float | None:
    """``request.deadline`` on the monotonic clock, which a caller waits by (see :func:`_reanchor`)."""
    deadline = request.deadline
    return None if deadline is None else time.monotonic() + (deadline - time.time())


def _reanchor(request: ServiceRequest, give_up_at: float) -> None:
    """Set ``request.deadline`` (wall clock) to ``give_up_at`` (monotonic), as the wall clock reads now.

    A call's deadline travels as a wall-clock time, but the caller's own
    waits count by the monotonic clock: after a step of the wall clock (NTP,
    a virtual machine resumed) the wall-clock deadline no longer says how
    long is left. Re-read before a call's next attempt is decided and sent,
    the retry policy, the re-route and the service see the time truly left,
    and no caller waits past its timeout or gives up before it.
    """
    request.deadline = time.time() + (give_up_at - time.monotonic())
