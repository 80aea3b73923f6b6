"""kservice: register any Python class as a service, start it anywhere, call it by name.

The public API is what this module exports; everything in ``kservice._*``
modules is private.
"""

from __future__ import annotations

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
