"""The error hierarchy every transport raises.

Each error is a :class:`ServiceError` and, where a standard exception means the
same thing, that standard exception too, so callers can write ``except
TimeoutError`` or ``except LookupError`` without knowing kservice.
"""

from __future__ import annotations

import builtins
import importlib
import os
import threading
import types
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ConfigError",
    "MethodNotFoundError",
    "PluginError",
    "ServiceCallError",
    "ServiceError",
    "ServiceNotFoundError",
    "ServiceOverloadedError",
    "ServiceStoppedError",
    "ServiceTimeoutError",
    "ServiceUnavailableError",
]


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises."""
    try:
        text = repr(value)
    except BaseException:  # noqa: BLE001 - a __repr__ that raises
        return f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ServiceError(Exception):
    """Base class of every error kservice raises on a call."""


class ServiceNotFoundError(ServiceError, LookupError):
    """No service of that name is known to the manager, its environment or any resolver."""

    def __init__(self, service_name: str, known: Iterable[str] = ()) -> None:
        known_names = sorted(set(known))
        self.service_name = service_name
        self.known_services = known_names
        message = f"no service named {service_name!r}"
        from difflib import get_close_matches  # error path only: a caller's start does not import it

        close = get_close_matches(service_name, known_names, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        if known_names:
            message += f" (known services: {', '.join(known_names)})"
        else:
            message += " (no services are registered or running)"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service_name, self.known_services))


class MethodNotFoundError(ServiceError, AttributeError):
    """The service has no public method of that name (names starting with ``_`` are never callable)."""


class ServiceTimeoutError(ServiceError, TimeoutError):
    """The call did not complete before its deadline.

    ``may_have_run`` is ``False`` when the service found the deadline passed
    before the method started (it did not run), ``True`` when it passed while
    the method ran, and ``None`` when the caller stopped waiting without an
    answer (the call may have run, or may still run until its deadline).
    """

    #: whether the request may have reached the method (see the class docstring)
    may_have_run: bool | None = None


class ServiceUnavailableError(ServiceError):
    """The service exists but cannot take the call now (stopped, failed, host gone, breaker open).

    ``may_have_run`` says which of two cases it is: ``False``, the request
    provably never reached the service (any method may be sent again);
    ``True``, it may have run (its host died or the connection was lost
    after it was sent: only an idempotent method may be sent again, and retry
    policies never re-send any other); ``None``, the transport did not say,
    which retry policies treat as ``True``.
    """

    #: whether the request may have reached the service (see the class docstring)
    may_have_run: bool | None = None


class ServiceStoppedError(ServiceUnavailableError):
    """The service was stopped by its owner (or failed to start): retrying will not bring it back."""


class ServiceOverloadedError(ServiceUnavailableError):
    """The service's request queue stayed full for ``service.local.queue_timeout``: the request was not accepted."""


class ConfigError(ServiceError, ValueError):
    """A configuration file or value is invalid; the message names the full key path."""


class PluginError(ServiceError, RuntimeError):
    """A plugin failed to load or behaved wrongly (raised in strict mode, warned otherwise)."""


class ServiceCallError(ServiceError):
    """The service method raised.

    ``remote_type`` is the qualified name of the original exception class and
    ``remote_traceback`` its formatted traceback in the service. When the
    original class can be imported by the caller the raised object is also an
    instance of it (``except ValueError`` works across every transport).
    """

    remote_type: str
    remote_traceback: str
    service_name: str
    method_name: str

    def __init__(
        self,
        message: str = "",
        *,
        remote_type: str = "",
        remote_traceback: str = "",
        service_name: str = "",
        method_name: str = "",
    ) -> None:
        Exception.__init__(self, message)
        self._message = message
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.service_name = service_name
        self.method_name = method_name

    def __str__(self) -> str:
        # The original's message, also once ``args`` are the original's arguments (see restore_state).
        message = self.__dict__.get("_message")
        if message is not None:
            return str(message)
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled again (returned as a value, put on a queue, relayed by Ray): the original's arguments and
        # attributes go with it as they crossed the first time (what pickles of them).
        return (
            _rebuild_call_error,
            (
                str(self),
                self.remote_type,
                self.remote_traceback,
                self.service_name,
                self.method_name,
                portable_state(self),
            ),
        )


def _rebuild_call_error(
    message: str,
    remote_type: str,
    remote_traceback: str,
    service_name: str,
    method_name: str,
    state: tuple[bytes, bytes | None] | None = None,
) -> ServiceCallError:
    loaded = None if state is None else loaded_state(state)
    error = make_call_error(
        message,
        remote_type=remote_type,
        remote_traceback=remote_traceback,
        service_name=service_name,
        method_name=method_name,
        original_args=None if loaded is None else loaded[0],
    )
    if loaded is not None:
        restore_state(error, *loaded)
    return error


_call_error_classes: dict[type[BaseException], type[ServiceCallError]] = {}
_call_error_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # As ``_fork.renew_after_fork`` does, written here: ``import kservice`` loads this module alone.
    global _call_error_lock
    _call_error_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def _import_exception_class(qualified_name: str) -> type[BaseException] | None:
    """The class named ``module.Qualname`` if the caller can import it, else None."""
    module_name, _, qualname = qualified_name.rpartition(".")
    if not module_name:
        found = getattr(builtins, qualified_name, None)
    else:
        try:
            found = importlib.import_module(module_name)
        except Exception:
            # Dotted qualnames (nested classes) resolve below; anything else is unknown here.
            head, _, tail = module_name.rpartition(".")
            return _import_exception_class(head + "." + tail) if head else None
        for part in qualname.split("."):
            found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return None


def _call_error_class_for(original: type[BaseException]) -> type[ServiceCallError]:
    """A subclass of both ServiceCallError and ``original``, cached per class."""
    cls = _call_error_classes.get(original)
    if cls is not None:
        return cls
    with _call_error_lock:
        cls = _call_error_classes.get(original)
        if cls is None:
            try:
                cls = type(
                    original.__name__,
                    (ServiceCallError, original),
                    {"__module__": "kservice.remote", "__qualname__": original.__name__},
                )
            except TypeError:
                # Incompatible C layouts (rare builtins): the plain error still carries remote_type.
                cls = ServiceCallError
            _call_error_classes[original] = cls
    return cls


def make_call_error(
    message: str,
    *,
    remote_type: str,
    remote_traceback: str = "",
    service_name: str = "",
    method_name: str = "",
    original_class: type[BaseException] | None = None,
    note: bool = True,
    original_args: tuple[Any, ...] | None = None,
) -> ServiceCallError:
    """Build the ServiceCallError a caller sees for an exception raised by a service method.

    With ``note`` (the default) the remote traceback is attached as a note, so
    an uncaught error prints it; pass ``note=False`` when the original
    exception is chained as ``__cause__`` instead (it prints the same traceback).
    ``original_args`` (the original's arguments, when known) make an instance
    of a class whose ``__new__`` takes them (``ExceptionGroup``: its message
    and exceptions); without them such a class gives a plain ServiceCallError.
    Never raises for the original's class.
    """
    if original_class is None and remote_type:
        original_class = _import_exception_class(remote_type)
    cls: type[ServiceCallError] = ServiceCallError
    if (
        original_class is not None
        and issubclass(original_class, Exception)
        and not issubclass(original_class, ServiceCallError)
    ):
        cls = _call_error_class_for(original_class)
    error = _new_call_error(cls, original_args)
    ServiceCallError.__init__(
        error,
        message,
        remote_type=remote_type,
        remote_traceback=remote_traceback,
        service_name=service_name,
        method_name=method_name,
    )
    if remote_traceback and note:
        error.add_note(f"remote traceback (service {service_name!r}, method {method_name!r}):\n{remote_traceback}")
    return error


def _new_call_error(cls: type[ServiceCallError], original_args: tuple[Any, ...] | None) -> ServiceCallError:
    """An uninitialised instance of ``cls``; a plain ServiceCallError when ``cls``'s ``__new__`` refuses."""
    try:
        return cls.__new__(cls)
    except Exception:  # noqa: BLE001 - a __new__ that wants the original's arguments (BaseExceptionGroup's)
        pass
    if original_args is not None:
        try:
            return cls.__new__(cls, *original_args)
        except Exception:  # noqa: BLE001 - arguments it will not take: the plain error below
            pass
    return ServiceCallError.__new__(ServiceCallError)


#: A call error's own attributes: the original exception's state never replaces them.
_OWN_ATTRIBUTES = ("_message", "remote_type", "remote_traceback", "service_name", "method_name", "__notes__")


_builtin_fields_of: dict[type, tuple[str, ...]] = {}


def _builtin_fields(cls: type) -> tuple[str, ...]:
    """The fields ``cls``'s built-in exception bases keep outside ``__dict__`` (``OSError.errno``, ``.filename``,
    ``UnicodeDecodeError.start``, ``ImportError.name``...): not all of them are in ``args``. Cached per class."""
    found = _builtin_fields_of.get(cls)
    if found is not None:
        return found
    names: list[str] = []
    for base in cls.__mro__:
        if base.__module__ == "builtins" and base is not BaseException and issubclass(base, BaseException):
            names += [
                name
                for name, member in vars(base).items()
                if isinstance(member, (types.MemberDescriptorType, types.GetSetDescriptorType))
            ]
    found = _builtin_fields_of[cls] = tuple(dict.fromkeys(names))
    return found


def exception_state(exc: BaseException) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``exc``'s arguments and attributes (its built-in fields too), as :func:`restore_state` gives them back."""
    try:
        attributes = {k: v for k, v in vars(exc).items() if k not in _OWN_ATTRIBUTES}
    except TypeError:  # an exception class with __slots__ only
        attributes = {}
    for name in _builtin_fields(type(exc)):
        try:
            value = getattr(exc, name)
        except AttributeError:  # OSError.characters_written, when not set
            continue
        if value is not None:
            attributes[name] = value
    return exc.args, attributes


def restore_state(error: ServiceCallError, args: tuple[Any, ...], attributes: dict[str, Any]) -> None:
    """Give ``error`` the original exception's ``args`` and attributes (``e.args[0]``, ``e.code``,
    ``e.filename`` work as on the original); its message, remote type and traceback, service and method stay
    its own. An attribute the error's class will not take (a read-only property) is left out."""
    error.args = args
    for name, value in attributes.items():
        if name not in _OWN_ATTRIBUTES:
            try:
                setattr(error, name, value)
            except Exception:  # noqa: BLE001 - a property without a setter, a field of another type
                continue


#: Largest pickled state an error carries (a bigger one travels as the message alone).
_ERROR_STATE_LIMIT = 64 << 10


def portable_state(exc: BaseException) -> tuple[bytes, bytes | None] | None:
    """``exc``'s arguments and attributes, pickled apart (so a caller that cannot load the attributes still gets
    the arguments); None when the arguments do not pickle; an attribute that does not pickle is left out, and all
    of them when they exceed the limit."""
    import pickle  # error path only: a caller's start does not import it for this

    args, attributes = exception_state(exc)
    try:
        packed_args = pickle.dumps(args, protocol=5)
    except Exception:  # noqa: BLE001 - whatever pickling raises: the error travels as its message
        return None
    if len(packed_args) > _ERROR_STATE_LIMIT:
        return None
    packed_attributes: bytes | None = None
    if attributes:
        try:
            packed_attributes = pickle.dumps(attributes, protocol=5)
        except Exception:  # noqa: BLE001 - the arguments still travel, and the attributes that pickle
            packed_attributes = _picklable_attributes(attributes)
        if packed_attributes is not None and len(packed_args) + len(packed_attributes) > _ERROR_STATE_LIMIT:
            packed_attributes = None
    return packed_args, packed_attributes


def loaded_state(state: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """What :func:`portable_state` made, as far as it loads here (a class this process lacks leaves out what
    holds it: the attributes, or everything when the arguments do not load)."""
    import pickle

    try:
        packed_args, packed_attributes = state
        args = pickle.loads(packed_args)
    except Exception:  # noqa: BLE001 - the error still has its type and message
        return None
    if type(args) is not tuple:
        return None
    attributes: Any = {}
    if packed_attributes is not None:
        try:
            attributes = pickle.loads(packed_attributes)
        except Exception:  # noqa: BLE001 - the arguments still hold
            attributes = {}
    return args, attributes if type(attributes) is dict else {}


def _picklable_attributes(attributes: dict[str, Any]) -> bytes | None:
    """The attributes that pickle, pickled (None when none does): one that does not (a lock) is left out."""
    import pickle

    kept: dict[str, Any] = {}
    for name, value in attributes.items():
        try:
            pickle.dumps(value, protocol=5)
        except Exception:  # noqa: BLE001 - whatever pickling raises
            continue
        kept[name] = value
    return pickle.dumps(kept, protocol=5) if kept else None


#: Errors the runtime itself raises on the service side, rebuilt by name on the caller side.
RUNTIME_ERRORS: dict[str, type[ServiceError]] = {
    cls.__name__: cls
    for cls in (
        ServiceError,
        ServiceNotFoundError,
        MethodNotFoundError,
        ServiceTimeoutError,
        ServiceUnavailableError,
        ServiceOverloadedError,
        ServiceStoppedError,
        ConfigError,
        PluginError,
    )
}
