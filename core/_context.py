"""What a running service method can know about the call it serves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, TypeVar

from ._messages import ServiceRequest

__all__ = ["current_request", "idempotent", "remaining_time", "service"]

_current_request: ContextVar[ServiceRequest | None] = ContextVar("kservice_current_request", default=None)

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)


def current_request() -> ServiceRequest | None:
    """The request the calling service method is serving, or None outside a service call.

    Calls a service method makes through a ServiceManager inherit this
    request's deadline and metadata.
    """
    return _current_request.get()


def remaining_time() -> float | None:
    """Seconds left before the current request's deadline (None: no deadline or no request)."""
    request = _current_request.get()
    if request is None or request.deadline is None:
        return None
    return request.deadline - time.time()


def idempotent(method: F) -> F:
    """Declare a service method safe to run more than once for one call.

    Retry policies may re-send it after a failure that reached the service,
    a Ray replica restart may replay it, and a result cache may answer it.
    """
    method.__kservice_idempotent__ = True  # type: ignore[attr-defined]
    return method


def service(
    *,
    max_workers: int | None = None,
    thread_safe: bool = True,
    idempotent_methods: Iterable[str] = (),
) -> Callable[[C], C]:
    """Class decorator with per-service defaults; config still overrides them.

    ``thread_safe=False`` runs one request at a time (for instances that are
    not safe to share between threads).
    """

    def decorate(cls: C) -> C:
        options: dict[str, Any] = dict(getattr(cls, "__kservice_options__", {}))
        if max_workers is not None:
            options["max_workers"] = max_workers
        if not thread_safe:
            options["max_workers"] = 1
        if idempotent_methods:
            options["idempotent_methods"] = sorted(idempotent_methods)
        cls.__kservice_options__ = options  # type: ignore[attr-defined]
        return cls

    return decorate


def is_idempotent(service_class: type | None, method_name: str, configured: Iterable[str] = ()) -> bool:
    """Whether ``method_name`` was declared safe to run twice: listed in ``configured`` (the service's
    ``idempotent`` option), in ``@service(idempotent_methods=...)``, or decorated ``@idempotent``.

    ``service_class`` None (a caller that does not know the class) leaves only ``configured``.
    """
    if method_name in configured:
        return True
    if service_class is None:
        return False
    if method_name in getattr(service_class, "__kservice_options__", {}).get("idempotent_methods", ()):
        return True
    return bool(getattr(getattr(service_class, method_name, None), "__kservice_idempotent__", False))


def idempotent_methods(service_class: type | None, configured: Iterable[str] = ()) -> set[str]:
    """Every public method name :func:`is_idempotent` accepts for ``service_class`` (plus ``configured``)."""
    names = set(configured)
    if service_class is None:
        return names
    names.update(getattr(service_class, "__kservice_options__", {}).get("idempotent_methods", ()))
    for name in dir(service_class):
        if not name.startswith("_") and getattr(getattr(service_class, name, None), "__kservice_idempotent__", False):
            names.add(name)
    return names
