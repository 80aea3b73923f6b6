"""Coroutine methods: the event loop a task awaits them on.

A task whose service has ``async def`` methods (or an ``async def``
``setup``/``cleanup``, or async generator methods) owns one :class:`TaskLoop`:
an asyncio event loop in a thread of its own, started with the task and
stopped with it. Coroutine methods are awaited there, at most
``service.local.max_concurrency`` at once; sync methods keep running in the
worker pool. :func:`execute_coroutine` is the coroutine twin of
``BaseServiceTask.execute`` and runs on whatever loop awaits it (a task's own,
or a Ray async actor's).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._context import _current_request
from ._errors import MethodNotFoundError, ServiceTimeoutError, ServiceUnavailableError
from ._messages import ServiceRequest, ServiceResponse
from ._middleware import MiddlewareError
from ._transport import Reply, deadline_response

if TYPE_CHECKING:
    from ._task import BaseServiceTask

__all__ = ["MethodKinds", "TaskLoop", "call_lifecycle", "execute_coroutine", "method_kinds"]

#: Seconds a stopping loop gives an ``async def cleanup()`` before abandoning it.
CLEANUP_TIMEOUT = 30.0


class MethodKinds:
    """Which public methods of a service class are coroutines, generators or async generators."""

    __slots__ = ("async_generators", "coroutines", "generators", "needs_loop")

    def __init__(self, cls: type) -> None:
        coroutines, generators, async_generators = set(), set(), set()
        for name, member in inspect.getmembers(cls):
            if name.startswith("_") and name not in ("__init__",):
                continue
            function = inspect.unwrap(member) if callable(member) else None
            if function is None:
                continue
            if inspect.iscoroutinefunction(function):
                coroutines.add(name)
            elif inspect.isasyncgenfunction(function):
                async_generators.add(name)
            elif inspect.isgeneratorfunction(function):
                generators.add(name)
        self.coroutines: frozenset[str] = frozenset(coroutines - {"setup", "cleanup", "close"})
        self.generators: frozenset[str] = frozenset(generators)
        self.async_generators: frozenset[str] = frozenset(async_generators)
        #: whether the task needs an event loop (coroutine or async generator methods, async setup/cleanup)
        self.needs_loop = bool(coroutines or async_generators)

    @property
    def streaming(self) -> frozenset[str]:
        """Methods whose calls are streams (generators and async generators)."""
        return self.generators | self.async_generators


_kinds_cache: dict[type, MethodKinds] = {}


def method_kinds(cls: type) -> MethodKinds:
    """The :class:`MethodKinds` of ``cls`` (computed once per class)."""
    kinds = _kinds_cache.get(cls)
    if kinds is None:
        kinds = _kinds_cache[cls] = MethodKinds(cls)
    return kinds


def call_lifecycle(instance: Any, names: Iterable[str], loop: TaskLoop | None) -> None:
    """Call ``instance.<name>()`` for each name that exists; an ``async def`` one is awaited on ``loop``.

    Raises what the method raises. An async method with no loop to run it on
    is run to completion on a private loop (only for instances built outside
    a task).
    """
    for name in names:
        method = getattr(instance, name, None)
        if not callable(method):
            continue
        outcome = method()
        if inspect.iscoroutine(outcome):
            if loop is not None:
                loop.run(outcome, CLEANUP_TIMEOUT if name != "setup" else None)
            else:
                asyncio.run(outcome)


def awaited(outcome: Any, loop: TaskLoop | None, timeout: float, what: str) -> Any:
    """``outcome`` of calling a service's hook (``check_health()``), an ``async def`` one's awaited first.

    A coroutine is awaited on the task's event loop ``loop`` (on a private
    one when there is none) and cancelled when it has not finished within
    ``timeout`` seconds: TimeoutError naming ``what`` then. Raises what the
    coroutine raises. Anything else is returned as it is.
    """
    if not inspect.iscoroutine(outcome):
        return outcome
    try:
        if loop is not None:
            return loop.run(outcome, timeout)
        return asyncio.run(asyncio.wait_for(outcome, timeout))
    except FutureTimeoutError:  # TimeoutError itself on Python 3.11
        raise TimeoutError(f"{what} did not finish within {timeout:g}s; it was cancelled") from None


class TaskLoop:
    """An asyncio event loop in its own thread, serving one task's coroutine methods.

    Guarantees: at most ``max_concurrency`` coroutine calls run at once (the
    others wait their turn, never past their deadline); a call whose deadline
    passes while it runs is cancelled (``asyncio.CancelledError`` is raised
    inside the method) and its caller gets ServiceTimeoutError; :meth:`cancel`
    does the same for a caller that gave up. :meth:`stop` lets running calls
    finish until its deadline, cancels the rest (their callers get
    ServiceUnavailableError), and joins the thread.
    """

    def __init__(self, name: str, max_concurrency: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.max_concurrency = max_concurrency
        self._limit = asyncio.Semaphore(max_concurrency)
        #: coroutine calls in flight, by request id (for cancel and stop)
        self._running: dict[str, asyncio.Task[Any]] = {}
        #: the deadlines of the calls in ``_running`` (their callers wait until then: see running_deadlines)
        self._deadlines: dict[str, float | None] = {}
        self._thread = threading.Thread(target=self._run, name=f"kservice-{name}-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                self.loop.run_forever()
                return  # stopped by stop()
            except BaseException:  # noqa: BLE001 - the service's SystemExit or KeyboardInterrupt, not the loop's end
                # asyncio re-raises both out of the loop when a coroutine of the service raises them (an
                # ``async def setup()`` or ``cleanup()``, a coroutine awaited for a transport): the task that
                # raised has its exception already, which reaches whoever awaits it once the loop runs on.
                if self.loop.is_closed():
                    return

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Await ``coroutine`` on the loop from another thread and return its result (raises what it raises)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeoutError:
            future.cancel()
            raise

    def submit(self, task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], reply: Reply) -> None:
        """Await ``method`` for ``request`` on the loop; ``reply`` gets the response exactly once (in the loop thread).

        A loop already stopped answers ServiceUnavailableError at once.
        """
        try:
            self.loop.call_soon_threadsafe(self._start, task, request, method, reply)
        except RuntimeError:  # the loop is closed: the task stopped under this call
            reply(_stopped(request))

    def blocking(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` (a coroutine function) as a plain function: awaited on the loop, the calling thread waits.

        For transports that run a request where it arrives (``task.execute``).
        The current request's deadline cancels the coroutine (CancelledError
        inside it) and raises ServiceTimeoutError here.
        """

        def call(*args: Any, **kwargs: Any) -> Any:
            request = _current_request.get()
            deadline = None if request is None else request.deadline
            seconds = None if deadline is None else max(0.0, deadline - time.time())
            coroutine = method(*args, **kwargs)
            if seconds is None:
                return self.run(coroutine)
            try:
                return self.run(_within(coroutine, seconds), seconds + 1.0)
            except (TimeoutError, FutureTimeoutError):
                if time.time() < deadline:  # type: ignore[operator]
                    raise  # the method's own TimeoutError
                raise ServiceTimeoutError(
                    f"call {request.service_name}.{request.method_name} timed out after {seconds:.3f}s"  # type: ignore[union-attr]
                ) from None

        return call

    def _start(self, task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], reply: Reply) -> None:
        running = self.loop.create_task(self._serve(task, request, method, reply))
        self._running[request.request_id] = running
        self._deadlines[request.request_id] = request.deadline

    async def _serve(
        self, task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any], reply: Reply
    ) -> None:
        response: ServiceResponse
        try:
            response = await execute_coroutine(task, request, method, self._limit)
        except asyncio.CancelledError:
            # Cancelled while waiting for its turn (a stop, or a caller that gave up).
            response = _stopped(request)
        finally:
            self._running.pop(request.request_id, None)
            self._deadlines.pop(request.request_id, None)
        reply(response)

    def spawn(self, request_id: str, coroutine: Coroutine[Any, Any, Any], refused: Callable[[], None]) -> None:
        """Run ``coroutine`` on the loop as the work of ``request_id`` (drained and cancelled like calls).

        ``refused()`` runs instead when the loop is already closed.
        """

        def start() -> None:
            self._running[request_id] = running = self.loop.create_task(coroutine)
            running.add_done_callback(lambda _: self._running.pop(request_id, None))

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:
            coroutine.close()
            refused()

    def cancel(self, request_id: str) -> None:
        """Cancel the coroutine serving ``request_id``, if it still runs (its caller gave up); never blocks."""
        if request_id in self._running:
            self.loop.call_soon_threadsafe(self._cancel, request_id)

    def _cancel(self, request_id: str) -> None:
        running = self._running.get(request_id)
        if running is not None:
            running.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def running_deadlines(self) -> list[float | None]:
        """The deadlines (epoch seconds; None: none) of the coroutine calls running now (not ``spawn``'s work)."""
        return list(self._deadlines.values())

    def drain(self, deadline: float) -> None:
        """Let running calls finish until ``deadline`` (monotonic), then cancel the rest; never raises.

        A cancelled call's caller gets ServiceTimeoutError or
        ServiceUnavailableError; the method sees CancelledError.
        """
        if self.loop.is_closed() or not self._thread.is_alive() or self.in_loop_thread:
            return

        async def drain() -> None:
            pending = list(self._running.values())
            if pending:
                _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
                for running in late:
                    running.cancel()
                if late:
                    await asyncio.wait(late, timeout=1.0)

        try:
            self.run(drain(), max(0.0, deadline - time.monotonic()) + 2.0)
        except BaseException:  # noqa: BLE001 - stopping goes on whatever the drain does
            pass

    def stop(self, deadline: float, cleanup: Callable[[], Any] | None = None) -> None:
        """:meth:`drain`, run ``cleanup`` on the loop (awaited when it returns an awaitable), stop the loop, join it.

        Idempotent; never raises. Called from the loop's own thread (a method
        stopping its own task), it finishes from another thread.
        """
        if self.loop.is_closed():
            return
        if self.in_loop_thread:
            threading.Thread(target=self.stop, args=(deadline, cleanup), name="loop-stop", daemon=True).start()
            return
        self.drain(deadline)

        async def finish() -> None:
            if cleanup is not None:
                outcome = cleanup()
                if inspect.isawaitable(outcome):
                    await asyncio.wait_for(outcome, CLEANUP_TIMEOUT)

        if self._thread.is_alive():
            for step in (finish(), self.loop.shutdown_asyncgens(), self.loop.shutdown_default_executor()):
                try:
                    self.run(step, CLEANUP_TIMEOUT + 5.0)
                except BaseException:  # noqa: BLE001 - the loop stops whatever cleanup does
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


def _stopped(request: ServiceRequest) -> ServiceResponse:
    """The answer of a coroutine call cancelled by a stop or by its caller: it may have run in part, so never retried."""
    response = ServiceResponse.from_exception(
        request.request_id,
        ServiceUnavailableError(
            f"call {request.service_name}.{request.method_name} was cancelled (the service stopped or the caller "
            "gave up); it may have run in part"
        ),
        origin="runtime",
    )
    response.metadata = {"kservice.retryable": False}
    return response


async def execute_coroutine(
    task: BaseServiceTask,
    request: ServiceRequest,
    method: Callable[..., Any],
    limit: asyncio.Semaphore | None,
) -> ServiceResponse:
    """Await one coroutine method for ``request`` and return its response (never raises but CancelledError).

    The coroutine twin of ``BaseServiceTask.execute``: the same deadline
    check, statistics, middleware and error mapping; ``limit`` bounds how
    many run at once. The deadline cancels the method (CancelledError inside
    it) and answers ServiceTimeoutError. A service declared not thread-safe
    holds the task's serial lock while its coroutine runs, so its calls run one
    at a time, sync or async. Whatever the method raises is its error
    response, ``BaseException`` included (SystemExit, KeyboardInterrupt,
    GeneratorExit), as for ``execute``: never the end of the loop.
    """
    deadline = request.deadline
    if deadline is not None and time.time() > deadline:
        next(task._expired)
        return deadline_response(request, started=False)
    if limit is not None and limit.locked():
        try:
            if deadline is None:
                await limit.acquire()
            else:
                await _within(limit.acquire(), max(0.0, deadline - time.time()))
        except TimeoutError:
            next(task._expired)
            return deadline_response(request, started=False)
    elif limit is not None:
        await limit.acquire()
    try:
        return await _run_method(task, request, method)
    finally:
        if limit is not None:
            limit.release()


async def _run_method(task: BaseServiceTask, request: ServiceRequest, method: Callable[..., Any]) -> ServiceResponse:
    next(task._started)
    serial = task._serial_lock
    if serial is not None and not await _acquire_thread_lock(serial, request.deadline):
        next(task._finished)
        next(task._failed)
        return deadline_response(request, started=False)
    _current_request.set(request)  # this asyncio task's own context: other calls never see it
    chain = task._server_chain
    limit = 0
    began = 0.0
    try:
        response: ServiceResponse | None = None
        if chain is not None:
            began = perf_counter()
            if chain.has_before:
                request, response, limit = chain.run_before(request)
            else:
                limit = chain.size
        if response is None:
            deadline = request.deadline
            coroutine = method(*request.args, **request.kwargs)
            if deadline is None:
                result = await coroutine
            else:
                try:
                    result = await _within(coroutine, max(0.0, deadline - time.time()))
                except TimeoutError:
                    if time.time() < deadline:
                        raise  # the method's own TimeoutError, not the deadline
                    response = deadline_response(request, started=True)
                    result = None
            if response is None:
                response = ServiceResponse(True, result, None, request.request_id)
    except MethodNotFoundError as exc:
        response = ServiceResponse.from_exception(request.request_id, exc, origin="runtime")
    except MiddlewareError as exc:
        request, limit = exc.request, exc.index
        response = ServiceResponse.from_exception(request.request_id, exc.error, origin="service")
    except asyncio.CancelledError:
        next(task._finished)
        next(task._failed)
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the method's outcome, not the loop's end
        # (asyncio re-raises SystemExit and KeyboardInterrupt out of a task, which would end the loop's
        # thread: every later coroutine call of the task would wait out its timeout.)
        response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
    finally:
        if serial is not None:
            serial.release()
    if chain is not None:
        try:
            response = chain.run_after(request, response, limit, began)
        except BaseException as exc:  # noqa: BLE001 - an after-hook that raises past the chain's own guard
            response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
    next(task._finished)
    if not response.success:
        next(task._failed)
    return response


if hasattr(asyncio, "timeout"):

    async def _within(coroutine: Coroutine[Any, Any, Any], seconds: float) -> Any:
        """Await ``coroutine`` in this task (its context kept), cancelling it after ``seconds`` (TimeoutError)."""
        async with asyncio.timeout(seconds):  # type: ignore[attr-defined,unused-ignore]
            return await coroutine

else:  # Python 3.10

    async def _within(coroutine: Coroutine[Any, Any, Any], seconds: float) -> Any:
        return await asyncio.wait_for(coroutine, seconds)


async def _acquire_thread_lock(lock: Any, deadline: float | None) -> bool:
    """Take a ``threading.Lock`` from the loop without blocking it (a worker thread may hold it).

    False when the deadline passed first.
    """
    if lock.acquire(False):
        return True
    loop = asyncio.get_running_loop()
    wait = -1 if deadline is None else max(0.0, deadline - time.time())
    taken: Future[bool] = Future()

    def acquire() -> None:
        got = lock.acquire(True, wait)
        if not taken.set_running_or_notify_cancel():
            if got:
                lock.release()  # the waiting coroutine was cancelled meanwhile
            return
        taken.set_result(got)

    # One short-lived thread per wait: only services declared not thread-safe that mix sync and
    # async methods get here, and only while a sync call holds the lock.
    threading.Thread(target=acquire, name="serial-lock-wait", daemon=True).start()
    try:
        return await asyncio.wrap_future(taken, loop=loop)
    except asyncio.CancelledError:
        if not taken.cancel() and taken.done() and taken.result():
            lock.release()
        raise
