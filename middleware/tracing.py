"""Distributed tracing through the OpenTelemetry API.

With ``opentelemetry-api`` installed (``pip install kservice[tracing]``) and a
tracer provider configured by the application (the SDK, or any other
implementation), every call gets:

- a ``CLIENT`` span from ``before_call`` to ``after_call`` in the caller's
  process, one per attempt, child of whatever span is current there;
- a ``SERVER`` span from ``before_handle`` to ``after_handle`` around the
  method, in the service's process, child of the client span, and current
  while the method runs, so calls the method makes are its children;
- the trace context carried in ``request.metadata`` as W3C ``traceparent``
  (and ``tracestate``/``baggage``) through the global propagator, so a trace
  crosses processes and Ray actors with any transport that carries metadata.

Spans are named ``<service>/<method>`` with ``rpc.system=kservice``,
``rpc.service``, ``rpc.method`` and ``kservice.request_id``; a failed call
sets the span status to ERROR and ``error.type``; a fallback answer sets
``kservice.degraded``.

When it is on: ``tracing.enabled: null`` (the default) puts the middleware
in a service's chains when opentelemetry-api is installed and the
application has configured a tracer provider by the time the chain is built
(configure it before starting services and managers, as OpenTelemetry
recommends); otherwise the plugin stays out of the chain and costs nothing.
``tracing.enabled: true`` always adds it (when the API is installed), for
applications that set their provider later: each hook then costs a clock
read until one is set, since the provider is looked up again at most once a
second (the API's lookup reads the environment, ~1.5 µs, too much for every
call); :func:`refresh` looks at once. The API allows setting the provider
only once, so once found it is used for good. Without opentelemetry the
plugin stays out of every chain (``enabled: true`` then warns once).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from kservice import ServiceMiddleware, ServiceRequest, ServiceResponse, Setting, __version__, hookimpl
from kservice._fork import renew_after_fork

# The OpenTelemetry API, imported by _load_api() when a chain may trace (it costs ~20 ms to import, so a
# process that configured no tracer provider never loads it). None until then, and without the API.
trace: Any = None
otel_context: Any = None
propagate: Any = None
SpanKind: Any = None
Status: Any = None
StatusCode: Any = None
_api_missing = False


def _load_api() -> bool:
    """Import the OpenTelemetry API into this module's names once; False when it is not installed."""
    global trace, otel_context, propagate, SpanKind, Status, StatusCode, _api_missing
    if trace is not None:
        return True
    if _api_missing:
        return False
    try:
        from opentelemetry import context as _context
        from opentelemetry import propagate as _propagate
        from opentelemetry import trace as _trace
        from opentelemetry.trace import SpanKind as _SpanKind
        from opentelemetry.trace import Status as _Status
        from opentelemetry.trace import StatusCode as _StatusCode
    except ImportError:  # the plugin then contributes no middleware
        _api_missing = True
        return False
    otel_context, propagate, SpanKind, Status, StatusCode = _context, _propagate, _SpanKind, _Status, _StatusCode
    trace = _trace
    return True


def _provider_possible() -> bool:
    """Whether a tracer provider can be configured in this process without importing the API here.

    An application sets its provider through ``opentelemetry.trace`` (so the
    module is imported already) or names one in ``OTEL_PYTHON_TRACER_PROVIDER``;
    with neither, auto mode has nothing to find and the API stays unimported.
    """
    return "opentelemetry.trace" in sys.modules or bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))


__all__ = ["ClientTracing", "ServerTracing", "available", "refresh"]

#: Seconds between looks for a tracer provider while none is configured.
_PROVIDER_RECHECK = 1.0
#: A span started this long ago without its after-hook is dropped (its async call was cancelled).
_STALE_START = 3600.0


def available() -> bool:
    """Whether the OpenTelemetry API can be imported in this process (imports it)."""
    return _load_api()


def _schema() -> dict[str, Setting]:
    return {
        "enabled": Setting(
            (bool,),
            None,
            "Trace calls; null (the default): when opentelemetry-api is installed and a tracer provider is set when the chain is built.",
            nullable=True,
        ),
        "client": Setting((bool,), True, "Start a CLIENT span per call attempt in the caller's process."),
        "server": Setting((bool,), True, "Start a SERVER span around the method in the service's process."),
    }


class _Tracer:
    """The process's tracer once a real provider is configured (shared by every tracing middleware)."""

    def __init__(self) -> None:
        self.tracer: Any = None
        self.next_check = 0.0
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The tracer, or None while the application has configured no provider."""
        tracer = self.tracer
        if tracer is not None:
            return tracer
        now = time.monotonic()
        if now < self.next_check:
            return None
        with self._lock:
            self.next_check = now + _PROVIDER_RECHECK
            if not _load_api():  # a middleware built directly, not through the hook, may come first
                return None
            provider = trace.get_tracer_provider()
            if not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
                self.tracer = provider.get_tracer("kservice", __version__)
        return self.tracer


_tracer = _Tracer()
renew_after_fork(_tracer, "_lock")


def refresh() -> bool:
    """Look for the application's tracer provider now; True when one is set.

    With ``tracing.enabled: true``, calls are traced from the next one on
    (without it, within a second). Chains built in auto mode before the
    provider was set stay untraced until they are rebuilt.
    """
    if not _load_api():
        return False
    _tracer.next_check = 0.0
    return _tracer.get() is not None


def _attributes(request: ServiceRequest) -> dict[str, Any]:
    return {
        "rpc.system": "kservice",
        "rpc.service": request.service_name,
        "rpc.method": request.method_name,
        "kservice.request_id": request.request_id,
    }


def _finish_span(span: Any, response: ServiceResponse) -> None:
    if not response.success:
        span.set_attribute("error.type", response.error_type or "unknown")
        span.set_status(Status(StatusCode.ERROR, response.error or response.error_type))
    elif response.degraded:
        span.set_attribute("kservice.degraded", True)
    span.end()


class _Spans(ServiceMiddleware):
    def __init__(self) -> None:
        # Live spans by request id: the request crosses processes and must not carry them.
        self._active: dict[str, tuple[float, Any, Any]] = {}
        self._sweep_at = 4096

    def _remember(self, request_id: str, span: Any, token: Any) -> None:
        active = self._active
        active[request_id] = (time.monotonic(), span, token)
        if len(active) > self._sweep_at:
            now = time.monotonic()
            for key, (started, *_rest) in list(active.items()):
                if now - started > _STALE_START:
                    active.pop(key, None)
            self._sweep_at = max(4096, 2 * len(active))


class ClientTracing(_Spans):
    """A CLIENT span per call attempt; injects its context into the request's metadata."""

    def before_call(self, request: ServiceRequest) -> None:
        tracer = _tracer.get()
        if tracer is None:
            return
        span = tracer.start_span(
            f"{request.service_name}/{request.method_name}", kind=SpanKind.CLIENT, attributes=_attributes(request)
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        # A new dict: the metadata dict may be the caller's own object.
        request.metadata = {**request.metadata, **carrier}
        self._remember(request.request_id, span, None)

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        entry = self._active.pop(request.request_id, None)
        if entry is not None:
            _finish_span(entry[1], response)


class ServerTracing(_Spans):
    """A SERVER span around the method, child of the caller's span, current while the method runs."""

    def before_handle(self, request: ServiceRequest) -> None:
        tracer = _tracer.get()
        if tracer is None:
            return
        parent = propagate.extract(request.metadata) if request.metadata else None
        span = tracer.start_span(
            f"{request.service_name}/{request.method_name}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_attributes(request),
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._remember(request.request_id, span, token)

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> None:
        entry = self._active.pop(request.request_id, None)
        if entry is None:
            return
        _, span, token = entry
        try:
            _finish_span(span, response)
        finally:
            # Same worker thread as before_handle: the token belongs to this context.
            otel_context.detach(token)


_warned = False


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register("tracing", _schema())


@hookimpl(tryfirst=True)
def kservice_middleware(service_name: str, options: dict[str, Any]) -> list[ServiceMiddleware] | None:
    """Outermost of the built-in middleware (tryfirst): its spans cover everything the others do."""
    global _warned
    section = options.get("tracing") or {}
    enabled = section.get("enabled")
    if enabled is False:
        return None
    if enabled is None and not _provider_possible():
        return None  # auto, and no provider can have been configured: stay out without importing the API
    if not _load_api():
        if enabled and not _warned:
            _warned = True
            warnings.warn(
                "tracing.enabled is true but opentelemetry-api is not installed: calls are not traced "
                "(pip install 'kservice[tracing]')",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    if enabled is None and not refresh():
        return None  # auto: nothing would record spans, so stay out of the chain
    chosen: list[ServiceMiddleware] = []
    if section.get("client", True):
        chosen.append(ClientTracing())
    if section.get("server", True):
        chosen.append(ServerTracing())
    return chosen or None
