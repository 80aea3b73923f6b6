"""The ``inproc`` transport: calls to a task in this process, with no serialization.

Also contributes the ``local`` task kind (LocalServiceTask). A request is handed
to the task's worker pool as the very object the caller built (a sync call to a
thread-safe service's method known to be fast runs in the caller's own thread
instead: ``BaseServiceTask.run_inline``); arguments and
results are not copied, so a service must not mutate what it is given unless
the caller expects it.
"""

from __future__ import annotations

from collections.abc import Callable

from kservice import (
    BaseServiceTask,
    Connection,
    Listener,
    LocalServiceTask,
    LocalStream,
    ServiceAddress,
    ServiceRequest,
    ServiceResponse,
    Transport,
    hookimpl,
)


class InprocListener(Listener):
    def __init__(self, task: BaseServiceTask) -> None:
        self.address = ServiceAddress("inproc", task.service_name, task, instance=str(id(task)))

    def close(self) -> None:
        pass


class InprocConnection(Connection):
    """Submits straight into the task's worker pool."""

    def __init__(self, task: BaseServiceTask) -> None:
        self._task = task
        self.send = task.submit  # type: ignore[method-assign]

    def send(self, request: ServiceRequest, reply: Callable[[ServiceResponse], None]) -> None:  # pragma: no cover
        self._task.submit(request, reply)

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        """A method known to be fast runs in this thread (``task.run_inline``); others through the pool."""
        response = self._task.run_inline(request)
        if response is not None:
            return response
        return super().call(request, timeout)

    def open_stream(self, request: ServiceRequest, window: int) -> LocalStream:
        """The generator runs in the task (its stream threads, or its event loop); items pass through a bounded deque."""
        stream = LocalStream(window)
        self._task.open_stream(request, stream)
        return stream

    def cancel(self, request: ServiceRequest) -> None:
        """The caller gave up: a coroutine method still running for ``request`` is cancelled (CancelledError inside it)."""
        self._task.cancel_request(request.request_id)


class InprocTransport(Transport):
    name = "inproc"
    crosses_processes = False

    def listen(self, task: BaseServiceTask) -> Listener:
        return InprocListener(task)

    def connect(self, address: ServiceAddress) -> Connection:
        return InprocConnection(address.target)


_transport = InprocTransport()


@hookimpl
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    register(_transport)


@hookimpl
def kservice_register_task_kinds(register: Callable[..., None]) -> None:
    register("local", LocalServiceTask)


