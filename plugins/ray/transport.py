"""The ``ray`` transport object, registered when the plugin loads.

It imports the connection machinery (replica sets, the completer, the wire
format) only when a ray service is first listened on or connected to, so a
process that never calls a ray service does not pay for it at start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kservice import (
    ConfigError,
    Connection,
    Listener,
    ServiceAddress,
    ServiceUnavailableError,
    Transport,
)

if TYPE_CHECKING:
    from kservice import BaseServiceTask

__all__ = ["RayTransport"]


class RayTransport(Transport):
    """Connects callers to ray services: those this process owns, and those found by name in the cluster."""

    name = "ray"
    # an actor call through Ray: ~800 µs on one host (README, Performance)
    cost = 800.0
    crosses_processes = True

    def listen(self, task: BaseServiceTask) -> Listener:
        from .connection import _RayListener
        from .task import RayServiceTask

        if not isinstance(task, RayServiceTask):
            raise ConfigError(
                f"service {task.service_name!r}: the 'ray' transport serves only tasks of kind 'ray' "
                f"(this one is {task.kind!r}); set 'kind: ray' instead of listing 'ray' in transports"
            )
        return _RayListener(task)

    def connect(self, address: ServiceAddress) -> Connection:
        from .connection import RayConnection, _connect_deployment, _DeploymentRef
        from .replicas import _ReplicaSet

        target = address.target
        if isinstance(target, _ReplicaSet):
            return RayConnection(target)
        if isinstance(target, _DeploymentRef):
            return _connect_deployment(target)
        raise ServiceUnavailableError(f"not a ray service address: {address!r}")


_transport = RayTransport()
