"""kservice: register any Python class as a service, start it anywhere, call it by name.

The public API is what this module exports; everything in ``kservice._*``
modules is private.
"""

from __future__ import annotations

# Not typing's: importing typing here would make its objects before the first import below pauses the collector.
TYPE_CHECKING = False

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use (below)
    from ._batch import AsyncCallMap, CallMap
    from ._config import Config, Setting
    from ._context import current_request, idempotent, idempotent_methods, is_idempotent, remaining_time, service
    from ._environment import ServiceEnvironment
    from ._errors import (
        ConfigError,
        MethodNotFoundError,
        PluginError,
        ServiceCallError,
        ServiceError,
        ServiceNotFoundError,
        ServiceOverloadedError,
        ServiceStoppedError,
        ServiceTimeoutError,
        ServiceUnavailableError,
    )
    from ._manager import ServiceManager, ServiceProxy
    from ._messages import MAY_HAVE_RUN, ServiceRequest, ServiceResponse
    from ._middleware import CallBatch, ServiceMiddleware
    from ._plugins import get_plugin_manager, hookimpl
    from ._status import ServiceStatus
    from ._stream import ItemStream, LocalStream, SinkBusy, StreamSink, StreamSource
    from ._task import BaseServiceTask, LocalServiceTask, ServiceFactory, TaskContext, next_cost_estimate
    from ._transport import Connection, Listener, ServiceAddress, Transport, timeout_response
    from .hookspecs import KindRuntime, RetryPolicy

__version__ = "0.1.0"

#: Each public name -> the private module that defines it. A name is imported when first looked
#: up (PEP 562), so a process loads the modules of what it uses: a caller's ``from kservice import
#: ServiceManager`` does not import the task machinery, streams, batches or status records.
_EXPORTS: dict[str, str] = {
    "AsyncCallMap": "_batch",
    "CallMap": "_batch",
    "Config": "_config",
    "Setting": "_config",
    "current_request": "_context",
    "idempotent": "_context",
    "idempotent_methods": "_context",
    "is_idempotent": "_context",
    "remaining_time": "_context",
    "service": "_context",
    "ServiceEnvironment": "_environment",
    "ConfigError": "_errors",
    "MethodNotFoundError": "_errors",
    "PluginError": "_errors",
    "ServiceCallError": "_errors",
    "ServiceError": "_errors",
    "ServiceNotFoundError": "_errors",
    "ServiceOverloadedError": "_errors",
    "ServiceStoppedError": "_errors",
    "ServiceTimeoutError": "_errors",
    "ServiceUnavailableError": "_errors",
    "ServiceManager": "_manager",
    "ServiceProxy": "_manager",
    "MAY_HAVE_RUN": "_messages",
    "ServiceRequest": "_messages",
    "ServiceResponse": "_messages",
    "CallBatch": "_middleware",
    "ServiceMiddleware": "_middleware",
    "get_plugin_manager": "_plugins",
    "hookimpl": "_plugins",
    "ServiceStatus": "_status",
    "ItemStream": "_stream",
    "LocalStream": "_stream",
    "SinkBusy": "_stream",
    "StreamSink": "_stream",
    "StreamSource": "_stream",
    "BaseServiceTask": "_task",
    "LocalServiceTask": "_task",
    "next_cost_estimate": "_task",
    "ServiceFactory": "_task",
    "TaskContext": "_task",
    "Connection": "_transport",
    "Listener": "_transport",
    "ServiceAddress": "_transport",
    "timeout_response": "_transport",
    "Transport": "_transport",
    "KindRuntime": "hookspecs",
    "RetryPolicy": "hookspecs",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    from ._startup import collector_paused

    with collector_paused():  # a first import loads most of kservice: objects that live as long as the process
        value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "MAY_HAVE_RUN",
    "AsyncCallMap",
    "BaseServiceTask",
    "CallBatch",
    "CallMap",
    "Config",
    "ConfigError",
    "Connection",
    "ItemStream",
    "KindRuntime",
    "Listener",
    "LocalServiceTask",
    "LocalStream",
    "MethodNotFoundError",
    "PluginError",
    "RetryPolicy",
    "ServiceAddress",
    "ServiceCallError",
    "ServiceEnvironment",
    "ServiceError",
    "ServiceFactory",
    "ServiceManager",
    "ServiceMiddleware",
    "ServiceNotFoundError",
    "ServiceOverloadedError",
    "ServiceProxy",
    "ServiceRequest",
    "ServiceResponse",
    "ServiceStatus",
    "ServiceStoppedError",
    "ServiceTimeoutError",
    "ServiceUnavailableError",
    "Setting",
    "SinkBusy",
    "StreamSink",
    "StreamSource",
    "TaskContext",
    "Transport",
    "__version__",
    "current_request",
    "get_plugin_manager",
    "hookimpl",
    "idempotent",
    "idempotent_methods",
    "is_idempotent",
    "next_cost_estimate",
    "remaining_time",
    "service",
    "timeout_response",
]
