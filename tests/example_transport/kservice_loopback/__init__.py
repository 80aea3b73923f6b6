"""The ``loopback-pickle`` transport: in-process calls that pickle every request and response.

It proves a service works across a serialization boundary (what the ``mmap``
and ``ray`` transports impose) without leaving the process: arguments and
results are copies, and anything that cannot be pickled fails the call the
way it would across processes. It also contributes the ``loopback`` task kind,
a task reachable only through this transport, and one configuration key.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, ClassVar

from kservice import (
    MAY_HAVE_RUN,
    BaseServiceTask,
    Connection,
    Listener,
    ServiceAddress,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
    Setting,
    Transport,
    hookimpl,
)

Reply = Callable[[ServiceResponse], None]


class LoopbackListener(Listener):
    """Makes one task reachable: its address names the task's entry in the transport's table."""

    def __init__(self, transport: LoopbackTransport, task: BaseServiceTask) -> None:
        self._transport = transport
        self.key = f"{task.service_name}@{id(task):x}"
        self.address = ServiceAddress("loopback-pickle", task.service_name, self.key, instance=self.key)
        transport.tasks[self.key] = task

    def close(self) -> None:
        self._transport.tasks.pop(self.key, None)


class LoopbackConnection(Connection):
    """Pickles each request on the way in and each response on the way out."""

    def __init__(self, transport: LoopbackTransport, key: str) -> None:
        self._transport = transport
        self._key = key
        self.queue_name = key

    def send(self, request: ServiceRequest, reply: Reply) -> None:
        protocol = self._transport.protocol
        try:
            copied: ServiceRequest = pickle.loads(pickle.dumps(request, protocol))
        except Exception as exc:
            # As across processes: an argument that cannot be pickled fails this call only.
            reply(ServiceResponse.from_exception(request.request_id, exc, origin="client"))
            return
        task = self._transport.tasks.get(self._key)
        if task is None:
            error = ServiceUnavailableError(f"service {request.service_name!r} is no longer listening")
            refused = ServiceResponse.from_exception(request.request_id, error, origin="runtime")
            refused.metadata[MAY_HAVE_RUN] = False  # nothing was sent: any retry policy may send it again
            reply(refused)
            return

        def reply_copied(response: ServiceResponse) -> None:
            try:
                # for_wire() drops the live exception object, as a real wire would.
                data = pickle.dumps(response.for_wire(), protocol)
            except Exception as exc:
                response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
                data = pickle.dumps(response.for_wire(), protocol)
            reply(pickle.loads(data))

        task.submit(copied, reply_copied)


class LoopbackTransport(Transport):
    """One instance per process, registered by the hook below."""

    name = "loopback-pickle"
    crosses_processes = False

    def __init__(self) -> None:
        self.tasks: dict[str, BaseServiceTask] = {}
        self.protocol = pickle.HIGHEST_PROTOCOL

    def listen(self, task: BaseServiceTask) -> Listener:
        self.protocol = int(task.options.get("loopback", {}).get("protocol", self.protocol))
        return LoopbackListener(self, task)

    def connect(self, address: ServiceAddress) -> Connection:
        if address.target not in self.tasks:
            raise ServiceUnavailableError(f"service {address.service_name!r} is not listening on {self.name}")
        return LoopbackConnection(self, address.target)


class LoopbackServiceTask(BaseServiceTask):
    """A task in this process reachable only through ``loopback-pickle`` (kind ``loopback``)."""

    kind: ClassVar[str] = "loopback"
    default_transports: ClassVar[tuple[str, ...]] = ("loopback-pickle",)


_transport = LoopbackTransport()


@hookimpl
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    register(_transport)


@hookimpl
def kservice_register_task_kinds(register: Callable[..., None]) -> None:
    register("loopback", LoopbackServiceTask)


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "loopback",
        {
            "protocol": Setting(
                (int,), pickle.HIGHEST_PROTOCOL, "Pickle protocol of the loopback-pickle transport.", minimum=2
            )
        },
    )
