"""kservice: register any Python class as a service, start it anywhere, call it by name.

The public API is what this module exports; everything in ``kservice._*``
modules is private.
"""

from __future__ import annotations

from ._config import Config, Setting
from ._context import current_request, idempotent, remaining_time, service
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
from ._messages import ServiceRequest, ServiceResponse
from ._middleware import ServiceMiddleware
from ._plugins import get_plugin_manager, hookimpl
from ._status import ServiceStatus
from ._stream import ItemStream, LocalStream, SinkBusy, StreamSink, StreamSource
from ._task import BaseServiceTask, LocalServiceTask, ServiceFactory, TaskContext
from ._transport import Connection, Listener, ServiceAddress, Transport

__version__ = "0.1.0"

__all__ = [
    "BaseServiceTask",
    "Config",
    "ConfigError",
    "Connection",
    "ItemStream",
    "Listener",
    "LocalServiceTask",
    "LocalStream",
    "MethodNotFoundError",
    "PluginError",
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
    "remaining_time",
    "service",
]
