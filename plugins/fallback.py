"""The ``fallback`` plugin: answer a call with a declared stand-in when the service cannot.

A fallback is a value, or a callable ``handler(request, error) -> value``. It
answers a call whose final response failed for a reason it covers (``on``):

- ``circuit_open``: the breaker refused the call (CircuitOpenError);
- ``unavailable``: ServiceUnavailableError, ServiceOverloadedError or ServiceStoppedError from the runtime;
- ``timeout``: ServiceTimeoutError (the deadline passed);
- ``error``: the method itself raised (off by default: a bug should be seen).

The answer is a successful response marked ``degraded = True`` and
``metadata["kservice.degraded"] = True`` (``metadata["kservice.fallback"]``
says why), and it is counted (:func:`degraded_counts`). Values are deep-copied
per call, so callers may mutate what they get; a value nothing can mutate
(strings, bytes, numbers, None, and tuples or frozensets of those) is given
as is.

Declared three ways (the first found wins, in this order):

1. by a caller: :func:`register_fallback` ``(service, method, value=... | handler=...)``;
2. by config: ``services.<name>.fallback.methods.<method>.value``;
3. by the service class: ``@fallback(value=...)`` or ``@fallback(handler=...)`` on
   the method (seen by callers whose environment holds the service, and by the
   service's own side; callers of a service hosted elsewhere import the class and
   call :func:`declare_service_class`).

Ordering: this middleware is registered ``tryfirst``, so it is the outermost
call policy: its ``after_call`` runs after the breaker's (``trylast``) and sees
its rejection. Each attempt of a call passes through it, so a covered failure
is answered by the fallback at once rather than retried: declare a fallback
where a degraded answer now beats a real one later.

Streams (``manager.stream``): a fallback answers a stream that failed before
its first item, and its value (an iterable, e.g. a list) is the items the
caller gets; a stream that already yielded items and then failed ends with
its error (never cut short into a success that looks complete).

If the handler raises, the caller gets the original error with a note naming
the handler's error. ServiceNotFoundError (a name that does not resolve) is
raised before any middleware runs and is never covered.
"""

from __future__ import annotations

import copy
import inspect
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from kservice import (
    ConfigError,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    Setting,
    hookimpl,
)
from kservice._fork import renew_after_fork
from kservice.keys import DEGRADED, FALLBACK, STREAM_ITEMS

__all__ = [
    "Fallback",
    "FallbackMiddleware",
    "declare_service_class",
    "degraded_counts",
    "fallback",
    "register_fallback",
    "unregister_fallback",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The reasons ``fallback.on`` accepts.
REASONS = ("circuit_open", "unavailable", "timeout", "error")
_MISSING = object()


#: Types whose values no caller can mutate: a fallback value made only of these is not copied.
_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), range)


def _immutable(value: Any) -> bool:
    """Whether ``value`` is immutable all the way down (tuples and frozensets of immutables included)."""
    if type(value) in (tuple, frozenset):
        return all(_immutable(item) for item in value)
    return type(value) in _IMMUTABLE


class Fallback:
    """A stand-in answer: a ``value`` (a deep copy per use, unless immutable) or a ``handler(request, error)``."""

    __slots__ = ("handler", "shared", "value")

    def __init__(
        self, value: Any = _MISSING, handler: Callable[[ServiceRequest, BaseException], Any] | None = None
    ) -> None:
        if (value is _MISSING) == (handler is None):
            raise TypeError("a fallback takes exactly one of value=... or handler=...")
        if handler is not None and not callable(handler):
            raise TypeError(f"fallback handler must be callable, got {type(handler).__name__}")
        if handler is not None and inspect.iscoroutinefunction(handler):
            name = getattr(handler, "__qualname__", repr(handler))
            raise TypeError(
                f"fallback handler {name} is async def: a handler runs in the caller's thread, inside the call, and "
                "its return value is the caller's answer; make it a plain function (def) returning the value"
            )
        self.value = value
        self.handler = handler
        #: the value itself is the answer: nothing in it can be mutated (deepcopy would cost 0.2-1.3 µs a call)
        self.shared = handler is None and _immutable(value)

    def answer(self, request: ServiceRequest, error: BaseException) -> Any:
        """The stand-in value; raises what the handler raises, or TypeError when it returns a coroutine."""
        if self.handler is not None:
            value = self.handler(request, error)
            if inspect.iscoroutine(value):
                value.close()  # never awaited: closed, so no "never awaited" warning follows
                raise TypeError("it returned a coroutine, not a value (a handler must be a plain function)")
            return value
        if self.shared:
            return self.value
        return copy.deepcopy(self.value)


def fallback(
    value: Any = _MISSING, *, handler: Callable[[ServiceRequest, BaseException], Any] | None = None
) -> Callable[[F], F]:
    """Declare on a service method what callers get when the service cannot answer.

    ``@fallback(value=[])`` or ``@fallback(handler=lambda request, error: ...)``.
    """
    declared = Fallback(value, handler)

    def decorate(method: F) -> F:
        method.__kservice_fallback__ = declared  # type: ignore[attr-defined]
        return method

    return decorate


# --------------------------------------------------------------- registries

_caller_fallbacks: dict[tuple[str, str], Fallback] = {}
#: service name -> class, for services hosted elsewhere whose class a caller declared (declare_service_class).
_classes: weakref.WeakValueDictionary[str, type] = weakref.WeakValueDictionary()
_lock = threading.Lock()
_degraded: Counter[tuple[str, str]] = Counter()
renew_after_fork(sys.modules[__name__], "_lock")


def register_fallback(
    service_name: str,
    method: str,
    value: Any = _MISSING,
    *,
    handler: Callable[[ServiceRequest, BaseException], Any] | None = None,
) -> None:
    """Declare, for callers in this process, the fallback of ``service_name.method``.

    Takes effect for calls to a service whose route is compiled afterwards
    (register before the first call, or call ``manager.forget(service_name)``);
    replaces an earlier registration.
    """
    declared = Fallback(value, handler)
    with _lock:
        _caller_fallbacks[(service_name, method)] = declared


def unregister_fallback(service_name: str, method: str) -> bool:
    """Remove a caller's fallback; False when there was none."""
    with _lock:
        return _caller_fallbacks.pop((service_name, method), None) is not None


def declare_service_class(service_name: str, service_class: type) -> None:
    """Let callers in this process see ``@fallback`` declarations of a service hosted elsewhere."""
    _classes[service_name] = service_class


def degraded_counts() -> dict[tuple[str, str], int]:
    """Degraded answers given in this process, by (service, method)."""
    with _lock:
        return dict(_degraded)


def _class_fallbacks(service_class: type | None) -> dict[str, Fallback]:
    if service_class is None:
        return {}
    found = {}
    for name in dir(service_class):
        if name.startswith("_"):
            continue
        declared = getattr(getattr(service_class, name, None), "__kservice_fallback__", None)
        if isinstance(declared, Fallback):
            found[name] = declared
    return found


def _config_fallbacks(service_name: str, methods: Any) -> dict[str, Fallback]:
    prefix = f"services.{service_name}.fallback.methods"
    if not isinstance(methods, dict):
        raise ConfigError(
            f"{prefix}: expected a mapping of method name to {{value: ...}}, got {type(methods).__name__}"
        )
    found = {}
    for method, entry in methods.items():
        if not isinstance(entry, dict) or set(entry) != {"value"}:
            raise ConfigError(
                f"{prefix}.{method}: expected a mapping with exactly one key 'value' (e.g. {{value: []}}), got {entry!r}"
            )
        found[str(method)] = Fallback(entry["value"])
    return found


# ---------------------------------------------------------------- middleware


class FallbackMiddleware(ServiceMiddleware):
    """Replaces covered failures of one service's calls with degraded answers."""

    def __init__(self, service_name: str, declared: dict[str, Fallback], reasons: frozenset[str]) -> None:
        self.service_name = service_name
        self.declared = declared
        self.reasons = reasons

    def reason(self, response: ServiceResponse) -> str | None:
        """Which covered reason this failed response is, or None."""
        if response.error_origin == "runtime":
            kind = response.error_type
            if kind == "CircuitOpenError":
                reason = "circuit_open"
            elif kind in ("ServiceUnavailableError", "ServiceOverloadedError", "ServiceStoppedError"):
                reason = "unavailable"
            elif kind == "ServiceTimeoutError":
                reason = "timeout"
            else:
                return None
        elif response.error_origin == "service":
            reason = "error"
        else:
            return None
        return reason if reason in self.reasons else None

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        if response.success or response.metadata.get(STREAM_ITEMS):
            # A stream that already gave the caller items ends with its error: a stand-in now would
            # make the items so far look like the whole stream.
            return None
        method = request.method_name
        declared = _caller_fallbacks.get((self.service_name, method)) or self.declared.get(method)
        if declared is None:
            return None
        reason = self.reason(response)
        if reason is None:
            return None
        if declared.shared:
            # An immutable value is the answer as it is, and nothing needs the error: the flood path
            # of an open breaker with a fallback value.
            value = declared.value
        else:
            error = response.to_exception(self.service_name, method)
            try:
                value = declared.answer(request, error)
            except Exception as exc:
                error.add_note(f"the fallback of {self.service_name}.{method} raised too: {type(exc).__name__}: {exc}")
                return ServiceResponse.from_exception(request.request_id, error, origin="client")
        with _lock:
            _degraded[(self.service_name, method)] += 1
        # Positional: a successful response, marked degraded, with the failure's metadata and why.
        return ServiceResponse(
            True,
            value,
            None,
            request.request_id,
            "",
            "",
            "",
            {**response.metadata, DEGRADED: True, FALLBACK: reason},
            True,
            None,
        )


# --------------------------------------------------------------------- hooks


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "fallback",
        {
            "enabled": Setting((bool,), True, "Whether declared fallbacks answer for the service."),
            "on": Setting(
                (list,),
                ["circuit_open", "unavailable", "timeout"],
                f"Failures a fallback answers: any of {', '.join(REASONS)}.",
            ),
            "methods": Setting((dict,), {}, "Per method: {value: X}, the answer when the service cannot give one."),
        },
    )


@hookimpl(tryfirst=True)
def kservice_middleware(
    service_name: str, options: dict[str, Any], service_class: type | None
) -> ServiceMiddleware | None:
    # tryfirst: outermost, so after_call sees the breaker's (trylast) rejection.
    settings = options.get("fallback")
    if not settings or not settings["enabled"]:
        return None
    unknown = [r for r in settings["on"] if r not in REASONS]
    if unknown:
        raise ConfigError(
            f"services.{service_name}.fallback.on: unknown reason(s) {unknown} (known: {', '.join(REASONS)})"
        )
    if service_class is None:  # a service reached through a resolver: the class a caller declared, if any
        service_class = _classes.get(service_name)
    declared = {**_class_fallbacks(service_class), **_config_fallbacks(service_name, settings["methods"])}
    with _lock:
        has_caller = any(name == service_name for name, _ in _caller_fallbacks)
    if not declared and not has_caller:
        return None  # nothing to answer with: stay out of the chain
    return FallbackMiddleware(service_name, declared, frozenset(settings["on"]))
