"""The ``relay`` transport: a second way to reach services hosted by ``kservice serve``.

A test plugin for transport choice (tests/cli/test_transport_choice.py). It
resolves every service the mmap registry knows, as a third-party transport
for the same hosts would, and carries calls by relaying them over an mmap
connection while counting them. It declares no ``cost`` unless
``KSERVICE_RELAY_COST`` is set, so by default callers must keep using
``mmap``. Its entry-point name sorts after ``mmap``: it is registered later, so
pluggy asks its resolver first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kservice import Connection, Listener, ServiceAddress, ServiceRequest, ServiceResponse, Transport, hookimpl

#: calls this process sent through the relay
CALLS = 0


class RelayConnection(Connection):
    def __init__(self, inner: Connection) -> None:
        self.inner = inner
        self.queue_name = inner.queue_name

    def send(self, request: ServiceRequest, reply: Callable[[ServiceResponse], None]) -> None:
        global CALLS
        CALLS += 1
        self.inner.send(request, reply)

    def close(self) -> None:
        self.inner.close()


class RelayTransport(Transport):
    name = "relay"

    def listen(self, task: Any) -> Listener:
        raise NotImplementedError("the relay transport only reaches hosts that serve over mmap")

    def connect(self, address: ServiceAddress) -> Connection:
        from kservice._plugins import get_transport

        mmap_address = ServiceAddress("mmap", address.service_name, address.target, instance=address.instance)
        return RelayConnection(get_transport("mmap").connect(mmap_address))


if os.environ.get("KSERVICE_RELAY_COST"):
    RelayTransport.cost = float(os.environ["KSERVICE_RELAY_COST"])


@hookimpl
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    register(RelayTransport())


@hookimpl
def kservice_resolve_service(service_name: str, manager: Any) -> list[ServiceAddress] | None:
    from kservice.plugins.mmap.registry import lookup

    record = lookup(service_name)
    if record is None:
        return None
    return [ServiceAddress("relay", service_name, record["queue"], instance=record["queue"])]
