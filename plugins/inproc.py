"""The ``inproc`` transport: calls to a task in this process, with no serialization.

Also contributes the ``local`` task kind (LocalServiceTask). A request is handed
to the task's worker pool as the very object the caller built (a sync call to a
thread-safe service's method known to be fast runs in the caller's own thread
instead: ``BaseServiceTask.run_inline``); arguments and
results are not copied, so a service must not mutate what it is given unless
the caller expects it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kservice import (
    Connection,
    Listener,
    ServiceAddress,
    ServiceRequest,
    ServiceResponse,
    Transport,
    hookimpl,
)

if TYPE_CHECKING:  # the task and stream machinery load with the first local task or stream, not with every caller
    from kservice import BaseServiceTask, ItemStream, ServiceFactory, ServiceManager, StreamSource, TaskContext


class InprocListener(Listener):
    def __init__(self, task: BaseServiceTask) -> None:
        self.address = ServiceAddress("inproc", task.service_name, task, instance=str(id(task)))

    def close(self) -> None:
        pass


class InprocConnection(Connection):
    """Submits straight into the task's worker pool."""

    def __init__(self, task: BaseServiceTask) -> None:
        self._task = task
        # The task's own function, bound: one call fewer on the open of a pulled stream (first-item latency).
        self.pull_items = task.pull_items  # type: ignore[method-assign]

    def send(self, request: ServiceRequest, reply: Callable[[ServiceResponse], None]) -> None:
        """Hand ``request`` (the caller's own object) to the task: :meth:`BaseServiceTask.submit`."""
        self._task.submit(request, reply)

    def send_many(self, requests: Sequence[ServiceRequest], reply: Callable[[ServiceResponse], None]) -> None:
        """What is cheapest in one process: a method known to be fast runs right here, in order
        (``task.run_inline``, as a sync call's does); the others go to the pool one by one."""
        task = self._task
        run_inline = task.run_inline
        submit = task.submit
        for request in requests:
            response = run_inline(request)
            if response is None:
                submit(request, reply)
            else:
                reply(response)

    def cancel(self, request: ServiceRequest) -> None:
        """Move the request's deadline to the past: queued, it is never started (``task.execute``).

        The task holds the caller's own request object, so no message is needed.
        One already running runs to its end; calls it makes from then on
        inherit the past deadline and fail at once. A request dropped this way
        counts as expired in the task's status. A coroutine method still
        running for it is cancelled (``asyncio.CancelledError`` inside it).
        """
        request.deadline = 0.0
        self._task.cancel_request(request.request_id)

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        """A method known to be fast runs in this thread (``task.run_inline``); others through the pool.

        A call from the task's own event loop to one of its coroutine methods is refused at once
        (``task.refuse_waiting_on_own_loop``): it would wait for the loop it blocks.
        """
        task = self._task
        response = task.run_inline(request)
        if response is not None:
            return response
        refused = task.refuse_waiting_on_own_loop(request)
        if refused is not None:
            return refused
        return super().call(request, timeout)

    def open_stream(self, request: ServiceRequest, window: int) -> StreamSource:
        """A generator known quick runs in the caller's thread as it reads (``task.pull_stream``, as a sync
        call's method runs inline); otherwise in the task (its stream threads, or its event loop), the items
        passing through a bounded deque."""
        pulled = self._task.pull_stream(request, window)
        if pulled is not None:
            return pulled
        from kservice._stream import LocalStream

        stream = LocalStream(window)
        self._task.open_stream(request, stream)
        return stream

    def pull_items(
        self, manager: ServiceManager, route: Any, request: ServiceRequest, window: int
    ) -> ItemStream | None:
        """A generator known quick, for a call with no client middleware and no retry policy: the caller's
        iterator steps it directly (``task.pull_items``), one object for the whole stream."""
        return self._task.pull_items(manager, route, request, window)


class InprocTransport(Transport):
    name = "inproc"
    # a method call in the caller's thread or a hand-off to the pool: a few microseconds
    cost = 2.0
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
    register("local", _make_local_task)


def _make_local_task(factory: ServiceFactory, ctx: TaskContext) -> BaseServiceTask:
    from kservice._task import LocalServiceTask

    return LocalServiceTask(factory, ctx)
