"""The ``ray`` transport: services hosted in Ray actors, one named actor per replica.

A service of kind ``ray`` runs as ``replicas`` Ray actors. Each actor hosts the
service instance in a :class:`BaseServiceTask` core, so deadlines, refusal of
private methods, server-side middleware and statistics behave exactly as in a
local task. Callers reach the actors through Ray's own actor calls (one
``ObjectRef`` per call; async calls are completed in batches by one thread per
process; no thread per call and no relay actor); a pluggable balancer spreads
calls over the live replicas. A call's envelope and a plain result travel as
bytes pickled by the standard library (Ray's cheapest path); values that need
Ray's own serializer (Ray handles, ``__main__`` classes, numpy buffers,
closures) go through it unchanged.

Actors are named ``kservice:<service>:<deployment>:<index>`` in the Ray
namespace ``service.ray.namespace``. ``<deployment>`` is unique per start, so
a task only ever talks to the actors it created; another driver connected to
the same cluster finds a running service by its name through
``ServiceManager`` (the ``kservice_resolve_service`` hook).

Ray is imported lazily: this module imports (and ``kservice plugins`` lists
it) without Ray installed; asking for a ``ray`` service then raises a
ConfigError naming the extra, ``pip install 'kservice[ray]'``.

The package, one module per role:

- ``common``: Ray imported lazily, actor naming, the errors a caller sees;
- ``balancers``: replica selection (the balancer protocol, the built-in policies, their registry);
- ``wire``: what travels between callers and replicas;
- ``actor``: the replica body inside each actor (threaded and async) and its Ray actor class;
- ``replicas``: the replica set, as callers in one process see it, and how calls are sent to it;
- ``completion``: the thread that completes async calls in batches;
- ``transport``: the ``ray`` transport object (imports the connection machinery when first used);
- ``connection``: connections (batching, streams) and the listener;
- ``discovery``: finding deployments in the cluster by their actors' names;
- ``task``: the ``ray`` task kind;
- ``hooks``: the plugin's hooks (this package re-exports them, so pluggy finds them here).

Loading the plugin imports only ``balancers``, ``transport`` and ``hooks``;
the rest is imported when a ray service is first started, found or called
(and the names re-exported from it here, when first read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .balancers import (
    PowerOfTwoChoices as PowerOfTwoChoices,
)
from .balancers import (
    ReplicaBalancer as ReplicaBalancer,
)
from .balancers import (
    ReplicaView as ReplicaView,
)
from .balancers import (
    RoundRobin as RoundRobin,
)
from .balancers import (
    balancer_names as balancer_names,
)
from .balancers import (
    register_balancer as register_balancer,
)
from .hooks import (
    RayRuntime as RayRuntime,
)
from .hooks import (
    kservice_config_schema as kservice_config_schema,
)
from .hooks import (
    kservice_kind_runtime as kservice_kind_runtime,
)
from .hooks import (
    kservice_known_services as kservice_known_services,
)
from .hooks import (
    kservice_register_task_kinds as kservice_register_task_kinds,
)
from .hooks import (
    kservice_register_transports as kservice_register_transports,
)
from .hooks import (
    kservice_resolve_service as kservice_resolve_service,
)
from .hooks import (
    kservice_status_columns as kservice_status_columns,
)
from .transport import (
    RayTransport as RayTransport,
)
from .transport import (
    _transport as _transport,
)

if TYPE_CHECKING:
    from .common import ACTOR_PREFIX as ACTOR_PREFIX
    from .common import RAY_EXTRA_HINT as RAY_EXTRA_HINT
    from .connection import RayConnection as RayConnection
    from .task import RayServiceTask as RayServiceTask
    from .task import _ensure_ray as _ensure_ray
    from .wire import _from_wire as _from_wire
    from .wire import _pack as _pack

#: name -> the module of this package it is imported from when first read
_LAZY = {
    "ACTOR_PREFIX": "common",
    "RAY_EXTRA_HINT": "common",
    "RayConnection": "connection",
    "RayServiceTask": "task",
    "_ensure_ray": "task",
    "_from_wire": "wire",
    "_pack": "wire",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ACTOR_PREFIX",
    "RAY_EXTRA_HINT",
    "PowerOfTwoChoices",
    "RayConnection",
    "RayServiceTask",
    "RayTransport",
    "ReplicaBalancer",
    "ReplicaView",
    "RoundRobin",
    "balancer_names",
    "register_balancer",
]
