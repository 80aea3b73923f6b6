"""Shared by both sides of the ``ray`` transport: Ray imported lazily, actor naming, and the errors a caller sees."""

from __future__ import annotations

import sys
from types import ModuleType

from kservice import (
    ConfigError,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
    keys,
    timeout_response,
)

RAY_EXTRA_HINT = "pip install 'kservice[ray]'"
#: every replica actor's name starts with this
ACTOR_PREFIX = "kservice:"
#: Ray concurrency group for status, readiness and shutdown calls, so they are
#: answered even when every request slot of the replica is busy
_CONTROL_GROUP = "kservice-control"
#: Seconds the health check waits for a replica's ``check_health()`` answer (an async one is cancelled then).
HEALTH_ANSWER_WAIT = 5.0


def _ray() -> ModuleType:
    """The ``ray`` module; ConfigError naming the extra when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"services of kind 'ray' need Ray, which is not installed: {RAY_EXTRA_HINT}") from exc
    return ray


def _ray_if_running() -> ModuleType | None:
    """The ``ray`` module when this process has already connected to a cluster, else None (never imports Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "is_initialized") or not ray.is_initialized():
        return None
    return ray


RETRYABLE_KEY = keys.RETRYABLE
REPLICA_DOWN_KEY = keys.REPLICA_DOWN
MAY_HAVE_RUN_KEY = keys.MAY_HAVE_RUN
_REFUSED_KEY = keys.REPLICA_REFUSED


def _unavailable(request: ServiceRequest, message: str, *, retryable: bool = True) -> ServiceResponse:
    """ServiceUnavailableError for a call that never reached a replica (safe to re-send, unless not ``retryable``)."""
    response = ServiceResponse.from_exception(request.request_id, ServiceUnavailableError(message), origin="runtime")
    response.metadata = {MAY_HAVE_RUN_KEY: False} if retryable else {MAY_HAVE_RUN_KEY: False, RETRYABLE_KEY: False}
    return response


def _may_have_run(request: ServiceRequest, message: str, *, retryable: bool) -> ServiceResponse:
    """ServiceUnavailableError for a call that reached a replica and may have run (retryable only if idempotent)."""
    response = ServiceResponse.from_exception(request.request_id, ServiceUnavailableError(message), origin="runtime")
    response.metadata = {MAY_HAVE_RUN_KEY: True} if retryable else {MAY_HAVE_RUN_KEY: True, RETRYABLE_KEY: False}
    return response


_timed_out = timeout_response


def _cancelled(request: ServiceRequest) -> ServiceResponse:
    """The answer to a call cancelled while it waited in the caller: it never reached a replica."""
    return _unavailable(
        request,
        f"call {request.service_name}.{request.method_name} was cancelled before it was sent to a replica",
        retryable=False,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _send_failure(request: ServiceRequest, exc: BaseException) -> ServiceResponse:
    """A call whose request Ray could not serialize: the caller gets a TypeError saying which call and why."""
    error = TypeError(
        f"cannot send call {request.service_name}.{request.method_name} through Ray: its arguments cannot be "
        f"serialized ({_first_line(exc)}); pass picklable values"
    )
    error.__cause__ = exc
    return ServiceResponse.from_exception(request.request_id, error, origin="client")
