"""ServiceManager: call services by name, synchronously or asynchronously."""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._config import Config
from ._context import _current_request, is_idempotent
from ._errors import (
    ConfigError,
    MethodNotFoundError,
    ServiceError,
    ServiceNotFoundError,
    ServiceStoppedError,
    ServiceTimeoutError,
    ServiceUnavailableError,
    _short_repr,
)
from ._messages import ServiceRequest, ServiceResponse, _monotonic_deadline, _reanchor
from ._messages import new_request_id as _new_request_id
from ._middleware import MiddlewareChain, contributed_middleware
from ._plugins import (
    PLUGIN_ANSWER_TIMEOUT,
    ask_each_plugin,
    call_hook,
    check_answers,
    get_transport,
    transports,
    wrong_answer,
)
from ._transport import Connection, ServiceAddress
from .keys import ADDRESS_IDEMPOTENT, CONNECTION_CLOSED, HOST_REPLACING

if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Protocol

    from ._asynccall import _AsyncCall
    from ._batch import AsyncCallMap, CallMap
    from ._environment import ServiceEnvironment
    from ._status import ServiceStatus
    from ._stream import ItemStream
    from ._task import BaseServiceTask

__all__ = ["ServiceManager", "ServiceProxy"]

_time = time.time
_monotonic = time.monotonic
_TIMEOUT_MAX = threading.TIMEOUT_MAX


def _checked_timeout(timeout: Any) -> float:
    """``timeout`` if it is a finite number of seconds a wait can take; ValueError (TypeError) naming it otherwise."""
    if type(timeout) is bool:  # an int to Python, but True is no number of seconds (a stream's window refuses it too)
        raise TypeError(f"timeout must be a number of seconds or None, got bool ({timeout!r})")
    try:
        if -_TIMEOUT_MAX <= timeout <= _TIMEOUT_MAX:  # False for NaN, which compares false with everything
            return float(timeout)
    except TypeError:
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__name__} ({timeout!r})"
        ) from None
    raise ValueError(f"timeout must be a finite number of seconds (at most {_TIMEOUT_MAX:g}) or None, got {timeout!r}")


def _takes_timeout(function: Callable[..., Any]) -> bool:
    """Whether ``function`` takes a ``timeout`` keyword (a transport's optional ``remote_status`` may not)."""
    try:
        return "timeout" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


if TYPE_CHECKING:  # a Protocol class costs a caller's start 0.1 ms to build, for the type checker alone

    class _Expiring(Protocol):
        """What the timer watches: an async call, or a chunk of a batch (``kservice._batch``)."""

        _expires_at: float
        _state: str

        def _expire(self) -> None: ...

        def _finished(self) -> bool: ...

        def _abandon(self) -> None: ...


class _Timer:
    """One thread per manager that fires async-call deadlines and retry delays.

    Deadlines cost one ``deque.append`` per call: calls sharing a timeout
    expire in the order they were made, so each distinct timeout gets a FIFO
    whose head is always the next to expire, and finished calls are popped from
    the heads as the thread passes. Retry delays (rare) go through a heap.
    """

    #: while calls are pending the thread wakes at least this often to drop finished ones
    TICK = 0.05

    def __init__(self, name: str, *, running: bool = True) -> None:
        """``running`` False: a timer already closed, with no thread, that runs nothing it is given."""
        self._fifos: dict[float, deque[_Expiring]] = {}
        self._delayed: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._closed = not running
        #: the workers of callbacks that may block (see call_later), started with the first
        self._workers: _Workers | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if running:
            self._thread.start()

    def expire_at(self, timeout: float, call: _Expiring) -> None:
        """Call ``call._expire()`` at monotonic ``call._expires_at`` unless the call has finished by then."""
        fifo = self._fifos.get(timeout)
        if fifo is None:
            with self._cond:
                fifo = self._fifos.setdefault(timeout, deque())
        was_empty = not fifo
        fifo.append(call)
        if was_empty:
            with self._cond:
                self._cond.notify()

    def call_later(self, delay: float, callback: Callable[[], None], *, may_block: bool = False) -> None:
        """Run ``callback()`` after ``delay`` seconds: in the timer thread, or, ``may_block``, in a worker of its own.

        A callback that may block (a retry or re-route: it resolves the service
        again, which asks plugins and may connect) runs in one of a few worker
        threads, so that however long it takes, the timer thread ends every
        other call at its deadline on time.
        """
        import heapq  # with the first delayed callback (a retry's back-off), not with every caller

        if may_block:
            callback = functools.partial(self.hand_over, callback)
        with self._cond:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), callback))
            self._cond.notify()

    def hand_over(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in a worker thread (started with the first), not in the timer's.

        For what may block: the application's code (middleware, retry
        policies) and plugins resolving a service. See :meth:`call_later`.
        """
        if self._closed:
            return  # its manager is closed: no worker is started for a call it abandoned
        workers = self._workers
        if workers is None:
            workers = self._workers = _Workers(f"{self._thread.name}-worker")
        workers.submit(callback)

    def _run(self) -> None:
        import heapq  # in the timer's thread, once

        while True:
            if self._workers is not None:
                self._workers.top_up()  # callbacks waiting behind stuck workers get another one
            due: list[Callable[[], None]] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                next_wake: float | None = None
                for fifo in list(self._fifos.values()):
                    while fifo:
                        call = fifo[0]
                        when = call._expires_at
                        if call._state != "PENDING":  # call._finished(), inline: every call passes here
                            fifo.popleft()
                        elif when <= now:
                            fifo.popleft()
                            due.append(call._expire)
                        else:
                            next_wake = min(when, next_wake if next_wake is not None else when, now + self.TICK)
                            break
                while self._delayed and self._delayed[0][0] <= now:
                    due.append(heapq.heappop(self._delayed)[2])
                if self._delayed:
                    head = self._delayed[0][0]
                    next_wake = head if next_wake is None else min(next_wake, head)
                if not due:
                    self._cond.wait(None if next_wake is None else max(0.0, next_wake - now))
                    continue
            for callback in due:
                _quietly(callback)

    def close(self) -> list[Any]:
        """Stop the thread; returns the calls whose deadline it was still watching (unfinished ones)."""
        with self._cond:
            self._closed = True
            watched = [call for fifo in self._fifos.values() for call in fifo]
            # Calls with an inherited deadline wait in the heap as their bound ``_expire``.
            watched.extend(getattr(entry[2], "__self__", None) for entry in self._delayed)  # type: ignore[misc]
            self._fifos.clear()
            self._delayed.clear()
            self._cond.notify()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join()  # (a timer made closed never started its thread)
        if self._workers is not None:
            self._workers.close()
        # Async calls, and the chunks of ``ServiceManager.map`` (which abandon their calls the same way).
        unfinished = (call for call in watched if hasattr(call, "_abandon") and not call._finished())
        return list(dict.fromkeys(unfinished))


class _Workers:
    """``size`` daemon threads running callbacks in turn, started as callbacks come, and more beside stuck ones.

    Not a ``ThreadPoolExecutor``: its threads are joined when the interpreter
    exits, and a worker here may be waiting on a plugin that hangs (until its
    call's deadline), which must not hold up the exit of the program.

    A worker whose callback has run longer than ``STUCK_AFTER`` seconds (the
    application's hook that blocks, a plugin that hangs) does not count
    against ``size``: while callbacks wait, another worker starts beside it,
    up to ``MAX_THREADS`` in all (see :meth:`top_up`), so that one blocking
    hook does not hold up every other call's retry or timeout. A worker
    beyond ``size`` ends once it finds nothing to do.
    """

    STUCK_AFTER = 1.0
    MAX_THREADS = 32

    def __init__(self, name: str, size: int = 4) -> None:
        from queue import SimpleQueue

        self._name = name
        self._size = size
        self._queue: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._started = 0
        #: when each busy worker's callback began, by worker
        self._busy_since: dict[int, float] = {}
        self._closed = False

    def submit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in a worker (a new one while fewer than ``size`` run unstuck and none is idle)."""
        with self._lock:
            if self._closed:
                return
            self._queue.put(callback)
        self.top_up()

    def top_up(self) -> None:
        """Start a worker if callbacks wait, none is idle and fewer than ``size`` are not stuck (cheap when not)."""
        with self._lock:
            if self._closed or self._idle or self._queue.empty() or self._threads >= self.MAX_THREADS:
                return
            if self._threads >= self._size:
                stuck_since = time.monotonic() - self.STUCK_AFTER
                stuck = sum(1 for began in self._busy_since.values() if began < stuck_since)
                if self._threads - stuck >= self._size:
                    return
            self._threads += 1
            self._started += 1
            index = self._started
        threading.Thread(target=self._run, args=(index,), name=f"{self._name}-{index}", daemon=True).start()

    def _run(self, index: int) -> None:
        from queue import Empty

        while True:
            with self._lock:
                self._idle += 1
                extra = self._threads > self._size
            try:
                # A worker beyond ``size`` (started beside stuck ones) ends once it finds nothing to do.
                callback = self._queue.get(timeout=self.STUCK_AFTER) if extra else self._queue.get()
            except Empty:
                callback = None
            with self._lock:
                self._idle -= 1
                if callback is None:
                    self._threads -= 1
                    return
                self._busy_since[index] = time.monotonic()
            try:
                _quietly(callback)
            finally:
                with self._lock:
                    self._busy_since.pop(index, None)

    def close(self) -> None:
        """End every worker once the callbacks queued before have run (a closed manager's calls are finished,
        so theirs return at once); later submissions are dropped."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)


#: Every manager of this process, for :meth:`ServiceManager._forked` in a forked child.
_managers: weakref.WeakSet[ServiceManager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for manager in list(_managers):
        manager._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_retry_policy(answer: Any) -> bool:
    should_retry = getattr(answer, "should_retry", None)
    # Called after a failed attempt, in the call's thread, and never awaited: an async one's coroutine is no delay.
    return callable(should_retry) and not inspect.iscoroutinefunction(should_retry)


def _is_name_list(answer: Any) -> bool:
    return isinstance(answer, (list, tuple, set, frozenset)) and all(type(name) is str for name in answer)


def _is_address_list(answer: Any) -> bool:
    return isinstance(answer, (list, tuple)) and all(isinstance(address, ServiceAddress) for address in answer)


def _quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except BaseException:  # noqa: BLE001 - a failing callback (SystemExit included) must not stop the timer or its workers
        pass


class _Route:
    """Everything a call to one service needs, compiled once: connection, chain, policy."""

    __slots__ = (
        "address",
        "admit",
        "awaiting_host",
        "chain",
        "connection",
        "default_timeout",
        "idempotent",
        "options",
        "pull_items",
        "retry",
        "service_class",
        "service_name",
        "stream_window",
    )

    def __init__(
        self,
        service_name: str,
        address: ServiceAddress,
        connection: Connection,
        chain: MiddlewareChain | None,
        retry: Any,
        options: dict[str, Any],
        service_class: type | None,
    ) -> None:
        self.service_name = service_name
        self.address = address
        self.connection = connection
        self.chain = chain
        # A middleware's fast refusal, asked before the request is built (see ServiceMiddleware.admit).
        self.admit = chain.admit if chain is not None else None
        self.retry = retry
        self.options = options
        self.default_timeout: float = options["service_call"]["default_timeout"]
        self.stream_window: int = options["service_call"]["stream_window"]
        # A stream with no middleware and no retry policy over a transport that can pull: one object
        # (first-item latency); see Connection.pull_items.
        self.pull_items = (
            connection.pull_items
            if chain is None and retry is None and type(connection).pull_items is not Connection.pull_items
            else None
        )
        self.service_class = service_class
        self.idempotent: dict[str, bool] = {}
        # The task whose host is being replaced, on the refusing route of a call made meanwhile: its
        # retries wait for the new host (see BaseServiceTask.host_replacement).
        self.awaiting_host: BaseServiceTask | None = None

    def retry_delay(self, request: ServiceRequest, response: ServiceResponse, attempt: int) -> float | None:
        """Seconds before retrying a failed attempt, or None: no policy, the policy gives up, or past the deadline."""
        if self.retry is None:
            return None
        try:
            delay: Any = self.retry.should_retry(request, response, attempt, self.is_idempotent(request.method_name))
        except BaseException as exc:  # noqa: BLE001 - a bug in the policy (SystemExit included): the call keeps its own outcome
            self._policy_failed(f"raised {type(exc).__name__}: {exc}")
            return None
        if delay is None:
            return None
        if type(delay) not in (float, int) or not delay >= 0:  # a bool, a str, NaN, a negative delay
            self._policy_failed(f"answered {delay!r}, which is no delay in seconds (a number of at least 0, or None)")
            return None
        if request.deadline is None or time.time() + delay >= request.deadline:
            return None
        return float(delay)

    def _policy_failed(self, what: str) -> None:
        import warnings

        policy = type(self.retry)
        warnings.warn(
            f"kservice retry policy {policy.__module__}.{policy.__qualname__} of service {self.service_name!r} {what}; "
            "the call was not retried and ends with its own outcome",
            RuntimeWarning,
            stacklevel=2,
        )

    def hook_methods(self) -> list[tuple[str, Callable[..., Any]]]:
        """("Class.hook", function) of the application's code a call on this route runs: its middleware and policy."""
        hooks = self.chain.hook_methods() if self.chain is not None else []
        if self.retry is not None:
            hooks.append((f"{type(self.retry).__qualname__}.should_retry", self.retry.should_retry))
        return hooks

    def is_idempotent(self, method_name: str) -> bool:
        known = self.idempotent.get(method_name)
        if known is None:
            configured = self.options.get("idempotent", ())
            if self.service_class is None:
                # A service resolved without its class: what its host declares, beside the caller's own config.
                declared = self.address.info.get(ADDRESS_IDEMPOTENT) if self.address.info else None
                if type(declared) is list:
                    configured = [*configured, *(name for name in declared if type(name) is str)]
            known = is_idempotent(self.service_class, method_name, configured)
            if len(self.idempotent) < 1024:  # bounded: callers may try any number of (unknown) names
                self.idempotent[method_name] = known
        return known


class _Outcome:
    """What a route's build ended with, set once by its thread and read by every caller waiting for it.

    The part of a ``concurrent.futures.Future`` a build needs (set once, wait
    with a timeout, a callback when done): that module, and the ``logging`` it
    imports, would cost a process that only makes sync calls 3 ms of its start.
    ``exception(timeout)`` raises TimeoutError when the build has not ended by then.
    """

    __slots__ = ("_callbacks", "_done", "_error", "_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[_Outcome], object]] = []

    def set_result(self, value: Any) -> None:
        self._end(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._end(None, error)

    def _end(self, value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._value, self._error = value, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[_Outcome], object]) -> None:
        """Call ``callback(self)`` when the build ends (at once, in this thread, if it has)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def exception(self, timeout: float | None) -> BaseException | None:
        if not self._done.wait(timeout):
            raise TimeoutError
        return self._error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _RouteBuild:
    """The building of one service's route, in a thread of its own, shared by every caller waiting for it.

    Resolving a name asks plugins (a directory service, a Ray cluster),
    connecting may wait on a transport, and compiling asks plugins again:
    any of them may hang. The thread is a daemon and holds nothing a caller
    needs, so a caller stops waiting at its deadline and the process can exit.
    """

    __slots__ = ("future", "service_name", "step", "thread")

    def __init__(self, manager: ServiceManager, service_name: str) -> None:
        import contextvars  # with the first route built, not with every caller's start

        self.service_name = service_name
        #: what the thread is doing, for the error of a caller that stops waiting
        self.step = "resolving its name"
        self.future = _Outcome()
        # In the caller's context: a resolver may read the caller's context variables (a tenant, a trace).
        context = contextvars.copy_context()
        self.thread = threading.Thread(
            target=context.run, args=(self._run, manager), name=f"kservice-route-{service_name}", daemon=True
        )
        self.thread.start()

    def _run(self, manager: ServiceManager) -> None:
        try:
            route = manager._build_route(self.service_name, self)
        except BaseException as exc:  # noqa: BLE001 - every waiter gets what building raised
            self._end(manager)
            self.future.set_exception(exc)
        else:
            self._end(manager)
            self.future.set_result(route)

    def _end(self, manager: ServiceManager) -> None:
        # Before the outcome is set: a caller that comes after it builds anew (a failure is not kept).
        with manager._route_lock:
            if manager._building.get(self.service_name) is self:
                del manager._building[self.service_name]

    def wait(self, within: float | None) -> _Route:
        """The route, or what building raised; ServiceTimeoutError once ``within`` seconds pass first."""
        try:
            error = self.future.exception(None if within is None else max(0.0, within))
        except TimeoutError:
            assert within is not None  # no limit: the wait above does not time out
            raise self._timed_out(within) from None
        if error is not None:
            raise error
        route: _Route = self.future.result()
        return route

    async def wait_async(self, within: float) -> _Route:
        """:meth:`wait` for asyncio code: the event loop goes on meanwhile, and no thread waits for it."""
        import asyncio

        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def end() -> None:
            if not ended.done():  # the waiter may have given up (cancelled) first
                ended.set_result(None)

        def wake(_: _Outcome) -> None:
            try:
                loop.call_soon_threadsafe(end)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

        self.future.add_done_callback(wake)
        try:
            await asyncio.wait_for(ended, max(0.0, within))
        except TimeoutError:
            raise self._timed_out(within) from None
        return self.wait(0.0)

    def _timed_out(self, within: float) -> ServiceTimeoutError:
        from ._plugins import hook_running

        running = hook_running(sys._current_frames().get(self.thread.ident or -1))
        where = f" (plugin {running[0]!r} is still in its {running[1]})" if running else ""
        error = ServiceTimeoutError(
            f"service {self.service_name!r} could not be reached within {within:g} s: {self.step} had not "
            f"finished{where}; nothing was sent. The route is still being built and is kept for later calls "
            "when it is done"
        )
        error.may_have_run = False
        return error


class _RefusingConnection(Connection):
    """The connection of a service that cannot take calls right now: stopped, or its host being replaced.

    Every request is answered at once with ``error_class(why)`` (``may_have_run``
    False: nothing is sent). Retry policies never retry ServiceStoppedError;
    they may retry the ServiceUnavailableError of a host being replaced.
    """

    def __init__(
        self, why: str, error_class: type[ServiceError] = ServiceStoppedError, metadata: dict[str, Any] | None = None
    ) -> None:
        self._why = why
        self._error_class = error_class
        self._metadata = metadata or {}

    def _error(self) -> ServiceError:
        error = self._error_class(self._why)
        error.may_have_run = False  # type: ignore[attr-defined]
        return error

    def send(self, request: ServiceRequest, reply: Callable[[ServiceResponse], None]) -> None:
        response = ServiceResponse.refusal(request.request_id, self._error())
        response.metadata.update(self._metadata)
        reply(response)

    def open_stream(self, request: ServiceRequest, window: int) -> Any:
        if not self._metadata:
            raise self._error()
        from ._stream import LocalStream

        # A stream that ends at once with the refusal, so its metadata (the retry policy's and the
        # breaker's signals) reaches them as a call's does.
        ended = LocalStream(window)
        response = ServiceResponse.refusal(request.request_id, self._error())
        response.metadata.update(self._metadata)
        ended.end(response)
        return ended


def _is_environment(value: object) -> bool:
    # A caller without an environment never imports the environment (and with it the task machinery).
    from ._environment import ServiceEnvironment

    return isinstance(value, ServiceEnvironment)


def _not_portable(what: str, service_name: str | None) -> TypeError:
    """The error of pickling or deep-copying a manager or a proxy: what to pass to another process instead."""
    name = repr(service_name) if service_name is not None else "'SERVICE'"
    return TypeError(
        f"a {what} cannot be pickled or deep-copied: it holds this process's connections, threads and locks; "
        f"pass the service name ({name}) and build one where it is needed: ServiceManager().proxy({name})"
    )


class ServiceManager:
    """Calls services by name.

    Names resolve first in the manager's environment, then through the
    ``kservice_resolve_service`` hook (the ``mmap`` plugin finds services hosted
    by other processes on this host; every resolver is asked). A service
    reachable through several transports is called through the first of
    :meth:`service_addresses`: its ``service_call.transports`` preference,
    else the cheapest transport (``Transport.cost``); an address that cannot
    be connected to is skipped for the next. Resolution, the middleware chain and the
    retry policy are compiled once per service name and rebuilt when plugins
    change or the service is found gone.

    Errors: ServiceNotFoundError (unknown name), MethodNotFoundError,
    ServiceTimeoutError (no response by the deadline; a request not started by
    then never runs, a late response is dropped), ServiceUnavailableError
    (stopped or dead service), ServiceCallError (the method raised; also an
    instance of the original exception class where importable).
    """

    def __init__(self, environment: ServiceEnvironment | None = None, *, config: Any = None) -> None:
        """Call the services of ``environment`` (following its configuration), or, without one, those ``config`` configures.

        ``config`` is what :meth:`Config.load` takes (a YAML path, a mapping,
        a Config, None for the defaults). Raises TypeError, before anything is
        set up, for both an environment and a config (the manager follows its
        environment's configuration; the second one would be ignored) and for
        an ``environment`` that is not a ServiceEnvironment (a config passed
        in its place); ConfigError for a config that does not load.
        """
        from ._plugins import get_plugin_manager, on_plugins_changed

        if environment is not None and not _is_environment(environment):
            raise TypeError(
                f"ServiceManager's first argument is a ServiceEnvironment or None, not {type(environment).__name__} "
                f"{_short_repr(environment)}; to call services with a configuration of its own, pass "
                "ServiceManager(config=...)"
            )
        if environment is not None and config is not None:
            raise TypeError(
                f"ServiceManager got both an environment ({environment.name!r}) and a config: a manager follows "
                "its environment's configuration, so this config would be ignored; put the config on the "
                "ServiceEnvironment (ServiceEnvironment(name, config)), or pass only config=... for a manager "
                "without an environment"
            )
        self.environment = environment
        self._config = None if environment is not None else Config.load(config)
        get_plugin_manager()  # plugins load here: one that fails to load is reported now, not at the first call
        self._routes: dict[str, _Route] = {}
        #: routes being built, by service name (see _route)
        self._building: dict[str, _RouteBuild] = {}
        self._route_lock = threading.Lock()
        self._timer: _Timer | None = None
        self._timer_lock = threading.Lock()
        self._closed = False
        on_plugins_changed(self._invalidate_routes)
        if environment is not None:
            environment._managers.add(self)
        _managers.add(self)

    def __reduce__(self) -> Any:
        raise _not_portable("ServiceManager", None)

    def _forked(self) -> None:
        """In a child forked from this process: its timer, the timer's workers and route builds did not come along.

        A new timer starts with the child's first async call (its deadlines
        fire again), routes being built are built again by whoever needs
        them, and the locks are new (another thread may have held them at the
        fork). The routes themselves are kept: their transports reset what a
        child must not share (the mmap client's rings, for one).
        """
        self._timer = None
        self._timer_lock = threading.Lock()
        self._route_lock = threading.Lock()
        self._building = {}

    @property
    def config(self) -> Config:
        """The configuration calls follow: the environment's (as it is now), or the manager's own."""
        if self.environment is not None:
            return self.environment.config
        assert self._config is not None
        return self._config

    # ---------------------------------------------------------------- routes

    def _invalidate_routes(self) -> None:
        with self._route_lock:
            routes, self._routes = self._routes, {}
        for route in routes.values():
            route.connection.close()

    def forget(self, service_name: str) -> None:
        """Drop the compiled route of one service; the next call resolves it again.

        Closing its connection fails no call: calls already sent on it still
        get their answers (see ``Connection.close``).
        """
        with self._route_lock:
            route = self._routes.pop(service_name, None)
        if route is not None:
            route.connection.close()

    def _drop_route(self, route: _Route) -> bool:
        """Drop ``route`` if it is still the service's current one (not a newer one another thread built)."""
        with self._route_lock:
            if self._routes.get(route.service_name) is not route:
                return False
            del self._routes[route.service_name]
        route.connection.close()
        return True

    def _resolve(self, service_name: str) -> tuple[list[ServiceAddress], type | None]:
        if not isinstance(service_name, str):
            raise TypeError(
                f"a service name must be a non-empty str, not {type(service_name).__name__} {_short_repr(service_name)}"
            )
        env = self.environment
        if env is not None:
            task = env.get_task(service_name)
            if task is not None:
                addresses = task.addresses
                if not addresses:
                    if task.replacing_host:
                        replacing = ServiceUnavailableError(
                            f"service {service_name!r} is being restarted in environment {env.name!r} (its host "
                            "is being replaced); nothing was sent"
                        )
                        replacing.may_have_run = False
                        raise replacing
                    if task.state == "running":
                        raise ServiceUnavailableError(
                            f"service {service_name!r} is running in environment {env.name!r} but has no address "
                            "to call it at (its host could not be restarted: its status says why); nothing was sent"
                        )
                    error = (
                        ServiceStoppedError
                        if task.state in ("created", "stopped", "failed")
                        else ServiceUnavailableError
                    )
                    raise error(f"service {service_name!r} is {task.state} in environment {env.name!r}; start it first")
                return addresses, task.service_factory.service_class
        # Every resolver is asked: which plugin answers first must not decide the transport.
        asked = {"service_name": service_name, "options": self.config.for_service(service_name), "manager": self}
        answers = call_hook("kservice_resolve_service", **asked)
        check_answers(
            "kservice_resolve_service",
            answers,
            _is_address_list,
            "a resolver returns None or a list of kservice.ServiceAddress",
            f"for service {service_name!r}",
            **asked,
        )
        found = [address for answer in answers for address in answer]
        if found:
            return found, None
        raise ServiceNotFoundError(service_name, self.known_services())

    def service_addresses(self, service_name: str) -> list[ServiceAddress]:
        """Every address ``service_name`` is reachable at, in the order calls try them.

        First those whose transport the service's ``service_call.transports``
        lists (in its order), then by ``Transport.cost`` (cheapest first; a
        transport declaring none last), then by transport name: plugin
        registration order never matters. Raises ServiceNotFoundError (and
        what resolving raises), and ConfigError for a preferred transport that
        no plugin registers.
        """
        return self._ranked(service_name, self._resolve(service_name)[0])

    def _ranked(self, service_name: str, addresses: list[ServiceAddress]) -> list[ServiceAddress]:
        registered = transports()
        preferred: list[str] = list(self.config.for_service(service_name)["service_call"]["transports"])
        for name in preferred:
            if name not in registered:
                import difflib  # error path only

                close = difflib.get_close_matches(str(name), list(registered), n=1)
                raise ConfigError(
                    f"service_call.transports (service {service_name!r}): no transport named {name!r} is registered"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (registered: {', '.join(sorted(registered)) or 'none'})"
                )
        rank = {name: index for index, name in enumerate(preferred)}

        def key(address: ServiceAddress) -> tuple[int, float, str]:
            transport = registered.get(address.transport)
            cost = math.inf if transport is None else float(transport.cost)
            return (rank.get(address.transport, len(rank)), cost, address.transport)

        return sorted(addresses, key=key)  # stable: one transport's addresses keep their order

    def known_services(self, notes: list[str] | None = None) -> list[str]:
        """Every service name this manager can see: its environment's and the plugins' (``kservice_known_services``).

        Takes at most about ``PLUGIN_ANSWER_TIMEOUT`` seconds: a plugin that
        raises or has not answered by then is left out, with a line naming it
        in ``notes``; one that answers something other than a list of names is
        a PluginError naming it.
        """
        names = set(self.environment.service_names()) if self.environment is not None else set()
        asked = ask_each_plugin(("kservice_known_services",), PLUGIN_ANSWER_TIMEOUT, [] if notes is None else notes)
        for plugin, contributed in asked["kservice_known_services"]:
            if contributed is None:
                continue
            if not _is_name_list(contributed):
                raise wrong_answer(
                    f"plugin {plugin!r}",
                    "kservice_known_services",
                    contributed,
                    "it returns a list of service names (str)",
                )
            names.update(contributed)
        return sorted(names)

    def _route(self, service_name: str, within: float | None = None) -> _Route:
        """The compiled route of ``service_name``; building one waits at most ``within`` seconds (None: no limit).

        A route not built yet is built in a thread of its own, shared by every
        caller that needs it meanwhile (see :class:`_RouteBuild`): a plugin's
        resolver, a transport's connect or a middleware hook that hangs holds
        no caller past ``within``, which then gets ServiceTimeoutError naming
        the service, the step and the plugin still running (``may_have_run``
        False: nothing was sent). The build goes on, and a route it ends
        with is kept for the next call. What building raises is raised to
        every caller waiting for it.
        """
        if self._closed:
            raise ServiceStoppedError("this ServiceManager is closed; make a new one to call services")
        route = self._routes.get(service_name)
        if route is not None:
            return route
        return self._route_build(service_name).wait(within)

    def _route_build(self, service_name: str) -> _RouteBuild:
        """The building of ``service_name``'s route in flight, started if none is."""
        with self._route_lock:
            build = self._building.get(service_name)
            if build is None:
                build = self._building[service_name] = _RouteBuild(self, service_name)
        return build

    def _found(self, service_name: str, timeout: float | None) -> tuple[_Route, float]:
        """A call's route, and what is left of its ``timeout`` (None: the service's default) once it is found.

        Finding the service is part of the call: it waits at most the call's
        timeout, and the time it took is taken from it.
        """
        route = self._routes.get(service_name)
        if route is not None and not self._closed:
            return route, route.default_timeout if timeout is None else timeout
        began = _monotonic()
        within = (
            self.config.for_service(service_name)["service_call"]["default_timeout"] if timeout is None else timeout
        )
        route = self._route(service_name, within)
        left = (route.default_timeout if timeout is None else timeout) - (_monotonic() - began)
        return route, left

    def _build_route(self, service_name: str, build: _RouteBuild) -> _Route:
        """Resolve, connect and compile the route of ``service_name`` (in ``build``'s thread; see :meth:`_route`)."""
        try:
            addresses, service_class = self._resolve(service_name)
        except ServiceStoppedError as exc:
            task = self.environment.get_task(service_name) if self.environment is not None else None
            if task is None:
                raise
            # A task of the environment that is not running: its calls go through the client chain
            # (a fallback, metrics and the caller's middleware see them) and end with this error at
            # once. Not kept: the call after the task starts resolves it again.
            return self._compile(
                service_name,
                ServiceAddress("", service_name, None),
                _RefusingConnection(str(exc)),
                task.service_factory.service_class,
            )
        except ServiceUnavailableError as exc:
            task = self.environment.get_task(service_name) if self.environment is not None else None
            if task is None or getattr(exc, "may_have_run", None) is not False:
                raise
            # Its host is being replaced: the call is refused through the client chain (a fallback,
            # metrics and the caller's middleware see it) and its retries wait for the new host. Not
            # kept: the next call resolves the new host.
            route = self._compile(
                service_name,
                ServiceAddress("", service_name, None),
                _RefusingConnection(str(exc), ServiceUnavailableError, {HOST_REPLACING: True}),
                task.service_factory.service_class,
            )
            route.awaiting_host = task
            return route
        failures: list[ServiceError] = []
        for address in self._ranked(service_name, addresses):
            build.step = f"connecting to it over {address.transport}"
            try:
                transport = get_transport(address.transport)
                connection = transport.connect(address)
                break
            except ServiceError as exc:  # this address is gone or its plugin missing: the next may answer
                failures.append(exc)
        else:
            raise failures[0]
        build.step = "compiling its middleware and retry policy"
        route = self._compile(service_name, address, connection, service_class)
        with self._route_lock:
            existing = self._routes.get(service_name)
            if existing is not None or self._closed:  # closed meanwhile: nothing may keep the connection
                connection.close()
                if existing is None:
                    raise ServiceStoppedError("this ServiceManager is closed; make a new one to call services")
                return existing
            self._routes[service_name] = route
        return route

    def _compile(
        self, service_name: str, address: ServiceAddress, connection: Connection, service_class: type | None
    ) -> _Route:
        """The route of calls to ``service_name`` over ``connection``: its client chain and retry policy."""
        options = self.config.for_service(service_name)
        contributed = contributed_middleware(
            service_name,
            options,
            service_class,
            address if address.transport else None,  # "": a route refusing every call (_RefusingConnection)
        )
        middlewares = [*(self.environment.middlewares if self.environment is not None else ()), *contributed]
        compiled = MiddlewareChain(middlewares, "client")
        chain = compiled if compiled else None  # None: the per-call path skips the chain with one test
        retry = call_hook("kservice_retry_policy", service_name=service_name, options=options)
        if retry is not None:
            check_answers(
                "kservice_retry_policy",
                [retry],
                _is_retry_policy,
                "a retry policy has a should_retry(request, response, attempt, idempotent) method, a plain "
                "function, not async def (kservice.hookspecs.RetryPolicy), or the hook returns None",
                f"for service {service_name!r}",
                service_name=service_name,
                options=options,
            )
        return _Route(service_name, address, connection, chain, retry, options, service_class)

    def client_middlewares(self, service_name: str) -> tuple[Any, ...]:
        """The middleware compiled into the client chain of calls to ``service_name``, outermost first.

        The environment's middleware, then what plugins contribute
        (``kservice_middleware``); empty when none of them overrides a
        client-side hook (the call then skips the chain). Compiles the
        service's route if no call did yet (so raises what resolving the name
        raises, e.g. ServiceNotFoundError; ServiceTimeoutError when that takes
        longer than the service's ``default_timeout``).
        """
        chain = self._found(service_name, None)[0].chain
        return () if chain is None else chain.middlewares

    def get_service_queue(self, service_name: str) -> Connection:
        """The connection calls to ``service_name`` use (its ``queue_name`` names the request queue).

        Finding the service waits at most its ``default_timeout``, as a call's would.
        """
        return self._found(service_name, None)[0].connection

    def get_service_status(self, service_name: str, *, timeout: float | None = None) -> ServiceStatus | dict[str, Any]:
        """Status of a service in this manager's environment, or as its transport reports it.

        ``timeout`` (seconds) bounds the wait for a transport whose
        ``remote_status`` takes a ``timeout`` (mmap: ServiceUnavailableError
        saying the host did not answer within it); other transports keep their
        own bound, as they do when ``timeout`` is None. Finding a service not
        called yet waits at most ``timeout`` (the service's ``default_timeout``
        when None). A timeout that is no finite number of seconds raises
        ValueError or TypeError at once.
        """
        if timeout is not None:
            timeout = _checked_timeout(timeout)
        if self.environment is not None:
            task = self.environment.get_task(service_name)
            if task is not None:
                return task.get_service_status()
        connection = self._found(service_name, timeout)[0].connection
        status = getattr(connection, "remote_status", None)
        if status is None:
            raise ServiceUnavailableError(f"the transport of {service_name!r} cannot report its status")
        if timeout is not None and _takes_timeout(status):
            return status(timeout=timeout)  # type: ignore[no-any-return]
        return status()  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- calls

    @staticmethod
    def _request(
        service_name: str,
        method: str,
        args: Any,
        kwargs: dict[str, Any] | None,
        timeout: float,
        metadata: dict[str, Any] | None,
    ) -> ServiceRequest:
        if metadata is not None and type(metadata) is not dict:
            metadata = _checked_mapping("metadata", metadata)  # before the merge below, which needs a mapping
        deadline = _time() + timeout
        parent = _current_request.get()
        if parent is not None:
            # Calls made while serving a request inherit its deadline and metadata.
            if parent.deadline is not None and parent.deadline < deadline:
                deadline = parent.deadline
            if parent.metadata:
                metadata = {**parent.metadata, **(metadata or {})}
        if type(args) is not tuple:
            args = _checked_args(args)
        if kwargs is None:
            kwargs = {}
        elif type(kwargs) is not dict:
            kwargs = _checked_mapping("kwargs", kwargs)
        return ServiceRequest(
            _new_request_id(),
            service_name,
            method,
            args,
            kwargs,
            "",
            deadline,
            metadata if metadata is not None else {},
        )

    def call_service_sync(
        self,
        service_name: str,
        method: str,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Call ``service_name.method(*args, **kwargs)`` and return its result.

        ``kwargs`` reach the method verbatim (a parameter may be called
        ``timeout`` or ``method``). ``timeout`` (seconds) defaults to
        ``service_call.default_timeout``; it bounds the whole call, retries
        and finding the service (resolving, connecting: see ``_route``)
        included. Raises the errors listed on the class, and at once, with
        nothing sent: ValueError for a timeout that is NaN or infinite,
        TypeError for a ``method`` that is not a str, MethodNotFoundError for
        the empty name, TypeError for ``args`` that are not a tuple or list
        (a str, bytes, dict, set or single value: spread, it would be the
        wrong call) and for ``kwargs`` that are not a mapping.
        """
        if timeout is not None:
            timeout = _checked_timeout(timeout)
        if type(method) is not str or not method:
            method = _checked_method_name(method)
        route, left = self._found(service_name, timeout)
        admit = route.admit
        if admit is not None:
            refusal = admit(service_name, method)
            if refusal is not None:
                raise refusal
        request = self._request(service_name, method, args, kwargs, left, metadata)
        give_up_at: float = _monotonic_deadline(request)  # type: ignore[assignment]  # _request sets a deadline
        attempt = 0
        rerouted = False
        while True:
            chain = route.chain
            if chain is None:  # the common call
                response = route.connection.call(request, request.deadline - _time())  # type: ignore[operator]
            else:
                response = chain.run_sync(request, route.connection)
            if response.success:
                return response.result
            _reanchor(request, give_up_at)
            if not rerouted and response.metadata.get(CONNECTION_CLOSED):
                rerouted = True
                fresh = self._rerouted(route, response, request.deadline)
                if fresh is not None:
                    route = fresh
                    continue
            delay = route.retry_delay(request, response, attempt)
            if delay is not None:
                attempt += 1
                route = self._retry_route(route, response, delay, request.deadline)
                continue
            self._refresh_route(route, response, request.deadline)
            raise response.to_exception(service_name, method)

    def _refresh_route(self, route: _Route, response: ServiceResponse, deadline: float | None) -> _Route:
        """The route a retry of a call that failed on ``route`` with ``response`` is sent on.

        After an unavailable service, the service is resolved again: it may
        have moved, restarted or stopped. Only ``route`` is dropped (and its
        connection closed, which fails no call in flight); a newer route
        another thread built meanwhile is kept. A service now stopped gives a
        route that answers every request with that ServiceStoppedError at once
        (never retried), so the call ends with it, naming the service, instead
        of retrying on a closed connection. Any other resolution error leaves
        ``route``: the next attempt reports the failure. Resolving waits at
        most until the call's ``deadline`` (epoch seconds; None: no limit),
        and leaves ``route`` when it has not ended by then.
        """
        if (
            not response.success
            and response.error_type == "ServiceUnavailableError"
            and response.error_origin == "runtime"
        ):
            self._drop_route(route)
            try:
                return self._route(route.service_name, None if deadline is None else deadline - _time())
            except ServiceStoppedError as exc:  # a resolver's service stopped on purpose
                return self._compile(
                    route.service_name,
                    ServiceAddress("", route.service_name, None),
                    _RefusingConnection(str(exc)),
                    route.service_class,
                )
            except Exception:  # noqa: BLE001 - the next attempt reports it
                return route
        return route

    def _reresolve(self, route: _Route, response: ServiceResponse, deadline: float | None) -> tuple[_Route, bool]:
        """:meth:`_refresh_route`, and whether the route now leads elsewhere.

        Elsewhere: another address (a restarted or moved host) or a service
        now stopped; not when it leads to the same place or does not resolve.
        """
        fresh = self._refresh_route(route, response, deadline)
        return fresh, fresh is not route and fresh.address != route.address

    def _rerouted(self, route: _Route, refused: ServiceResponse, deadline: float | None) -> _Route | None:
        """Where a request ``route``'s closed connection refused (``CONNECTION_CLOSED``) goes now, or None.

        The route to the name's new address when the name now resolves to
        another one (a host restarted or moved under it); None when it leads
        to the same place, does not resolve, or refuses every call (a stopped
        task, a host being replaced): the retry policy then decides as for
        any failure. Nothing was sent on ``route``, so sending the request on
        the new route is delivery, not a retry: callers do it once per call,
        without asking the retry policy (or spending its budget).
        """
        if self._closed:
            return None
        fresh, moved = self._reresolve(route, refused, deadline)
        if moved and fresh.address.transport and fresh.awaiting_host is None:
            return fresh
        return None

    def _retry_route(self, route: _Route, response: ServiceResponse, delay: float, deadline: float | None) -> _Route:
        """The route a sync retry goes on, after the policy's ``delay`` unless the service has moved.

        A retry the policy allows after a runtime refusal is re-sent at once when the
        name now resolves elsewhere (the refusal was the old host's); otherwise it
        waits ``delay`` and resolves again (the service may come back meanwhile).
        While the service's host is being replaced it waits, instead, until the new
        host is in place or ``deadline`` (epoch seconds) passes, and resolves again.
        """
        fresh, moved = self._reresolve(route, response, deadline)
        task = fresh.awaiting_host
        if task is not None:
            task.wait_host_ready(_TIMEOUT_MAX if deadline is None else min(_TIMEOUT_MAX, deadline - _time()))
            return self._refresh_route(fresh, response, deadline)
        if moved:
            return fresh
        time.sleep(delay)
        return self._refresh_route(fresh, response, deadline)

    def call_service_async(
        self,
        service_name: str,
        method: str,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Future[Any]:
        """Start a call and return a Future of its result; no thread is held per call.

        The future is completed by the transport's response path (or with
        ServiceTimeoutError at the deadline by the manager's timer thread).
        Its done callbacks run in the thread that completes it, as Python
        runs a future's callbacks: over mmap or Ray, the one thread that
        completes every async call of the process. Keep them quick and hand
        slow work to an executor: one that blocks holds up the other calls'
        answers, to their deadlines (the transport logs a warning naming it).
        Finding the service (a first call's resolving and connecting) happens
        before this returns and takes at most ``timeout``: ServiceTimeoutError
        here when a plugin holds it up longer (nothing was sent).
        Resolution errors (unknown service) are raised here, not in the future,
        and so are ValueError for a timeout that is NaN or infinite, TypeError
        for a ``method`` that is not a str and MethodNotFoundError for the
        empty name (nothing is sent).

        ``future.cancel()`` (also what cancelling an asyncio task awaiting
        :meth:`acall` does) completes the future as cancelled at once and asks
        the transport to drop the request (``Connection.cancel``): a call that
        has not started never starts. One already running cannot be
        interrupted (a thread runs to the end); its result is dropped, and its
        deadline is moved to the past, so calls it makes from then on fail
        with ServiceTimeoutError at once.
        """
        if timeout is not None:
            # A plain number checked here (every pipelined call passes one); anything else by the helper.
            kind = type(timeout)
            if (kind is float or kind is int) and -_TIMEOUT_MAX <= timeout <= _TIMEOUT_MAX:
                timeout = float(timeout)
            else:
                timeout = _checked_timeout(timeout)
        if type(method) is not str or not method:
            method = _checked_method_name(method)
        route = self._routes.get(service_name)
        if route is None or self._closed:
            route, left = self._found(service_name, timeout)
        else:  # a service called before: what _found answers, without its frame
            left = route.default_timeout if timeout is None else timeout
        admit = route.admit
        if admit is not None:
            refusal = admit(service_name, method)
            if refusal is not None:
                from ._future import CallFuture

                refused: Future[Any] = CallFuture()
                refused.set_exception(refusal)
                return refused
        if kwargs is None and metadata is None and type(args) is tuple and _current_request.get() is None:
            # _request's common case without its frame: nothing to check, merge or inherit.
            request = ServiceRequest(_new_request_id(), service_name, method, args, {}, "", _time() + left, {})
        else:
            request = self._request(service_name, method, args, kwargs, left, metadata)
        return (_async_call_class or async_call_class())(
            self, route, request, route.default_timeout if timeout is None else timeout
        )

    async def acall(
        self,
        service_name: str,
        method: str,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """``await`` form of :meth:`call_service_async` for asyncio code (a bad timeout raises before the first await).

        Finding a service not called yet runs in a thread, so the event loop goes on meanwhile.
        """
        import asyncio  # already imported by the awaiting code; not at import time, for processes that never await

        if service_name not in self._routes and not self._closed and type(service_name) is str:
            # Finding the service (resolvers, connecting) may take until the timeout: the loop goes on meanwhile.
            if timeout is not None:
                timeout = _checked_timeout(timeout)
            within = (
                self.config.for_service(service_name)["service_call"]["default_timeout"] if timeout is None else timeout
            )
            began = _monotonic()
            route = await self._route_build(service_name).wait_async(within)
            timeout = (route.default_timeout if timeout is None else timeout) - (_monotonic() - began)
        return await asyncio.wrap_future(
            self.call_service_async(service_name, method, args, kwargs, timeout=timeout, metadata=metadata)
        )

    def map(
        self,
        service_name: str,
        method: str,
        iterable: Iterable[Any],
        *,
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 256,
        max_in_flight: int = 2048,
    ) -> CallMap:
        """Call ``service_name.method`` once per item of ``iterable``; an iterator of the results.

        Each item is the positional arguments of one call: a tuple is spread
        (``(1, 2)`` calls ``method(1, 2)``), anything else is the one argument
        (wrap a tuple meant as one argument: ``((1, 2),)``). ``kwargs`` and
        ``metadata`` go with every call. Calls leave in chunks of
        ``chunk_size`` (one ``Connection.send_many`` each: one ring record over
        ``mmap``, a few actor calls on Ray); the iterable is read a chunk at a
        time and at most ``max_in_flight`` calls (whole chunks) are in flight,
        so memory stays bounded however long it is. The first chunks are sent
        before ``map`` returns, like ``Executor.map``.

        Every item is its own call, with its own outcome. With ``ordered``
        results come in item order; without, a chunk at a time in the order
        chunks finish (item order within a chunk). A failed item raises its
        typed error when it is reached (as from a single call, with a note
        naming the item), which ends the map and cancels the calls not
        finished, like ``Executor.map``; with ``return_exceptions`` the error
        is yielded in its place instead and the map goes on, like
        ``asyncio.gather``.

        ``timeout`` (default ``service_call.default_timeout``) bounds each call
        from the moment its chunk is sent (not from ``map``): waiting for room
        in the window does not count. Retries follow the route's retry policy
        per item, within that item's deadline, under the same at-most-once rules
        as a single call. Client middleware sees every call (``before_call``,
        ``after_call``, ``observe_call``, ``admit``).

        Closing the iterator (``close()``, leaving its ``with`` block, or
        dropping it) cancels every call not finished: one not started never
        starts; one running runs to its end and its answer is dropped. An
        iterable that raises ends the map the same way and the error
        propagates. Raised at once, nothing sent: what ``call_service_async``
        raises for the service, method and timeout; TypeError for an
        ``iterable`` that is not iterable or ``kwargs`` that is not a dict;
        ValueError for a ``chunk_size`` or ``max_in_flight`` below 1.
        """
        from ._batch import CallMap, _Batch

        batch = _Batch(
            self,
            service_name,
            method,
            iterable,
            kwargs,
            timeout,
            metadata,
            ordered,
            return_exceptions,
            chunk_size,
            max_in_flight,
            None,
        )
        batch.fill()
        return CallMap(batch)

    def amap(
        self,
        service_name: str,
        method: str,
        iterable: Iterable[Any],
        *,
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 256,
        max_in_flight: int = 2048,
    ) -> AsyncCallMap:
        """:meth:`map` for asyncio code: an async iterator (``async for result in manager.amap(...)``).

        Call it from a coroutine (it needs the running loop). The same rules as
        :meth:`map`; cancelling the task that iterates, or ``aclose()``, cancels
        every call not finished. The iterable is read in the loop's thread.
        """
        import asyncio  # not at import time, for processes that never await

        from ._batch import AsyncCallMap, _Batch

        loop = asyncio.get_running_loop()
        batch = _Batch(
            self,
            service_name,
            method,
            iterable,
            kwargs,
            timeout,
            metadata,
            ordered,
            return_exceptions,
            chunk_size,
            max_in_flight,
            loop,
        )
        batch.fill()
        return AsyncCallMap(batch)

    def stream(
        self,
        service_name: str,
        method: str,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        window: int | None = None,
    ) -> ItemStream:
        """Call generator method ``service_name.method(*args, **kwargs)`` and iterate its items as they come.

        ``for item in manager.stream(...)``; the same object also supports
        ``async for`` (see :meth:`astream`). ``timeout`` (seconds, default
        ``service_call.default_timeout``) bounds the whole stream; ``window``
        (default ``service_call.stream_window``; a positive int, else
        TypeError or ValueError at once) is how many items the producer may
        have sent ahead of the consumer before it waits.
        Breaking out of the loop, ``close()``, leaving a ``with`` block or
        dropping the iterator stops the generator in the service (its
        ``finally`` runs). Errors: those of calls, raised by the iteration
        (after the items yielded before the failure); resolution errors are
        raised here, and so are the ValueError and TypeError of a bad timeout
        or method name (nothing is sent). See :class:`ItemStream` for the
        guarantees.
        """
        if timeout is not None:
            timeout = _checked_timeout(timeout)
        if type(method) is not str or not method:
            method = _checked_method_name(method)
        route, left = self._found(service_name, timeout)
        admit = route.admit
        if admit is not None:
            refusal = admit(service_name, method)
            if refusal is not None:
                raise refusal
        request = self._request(service_name, method, args, kwargs, left, metadata)
        from ._batch import _checked_count
        from ._stream import ItemStream  # streams' machinery loads with the first stream, not with every caller

        window = route.stream_window if window is None else _checked_count("window", window)
        pull = route.pull_items
        if pull is not None:
            pulled = pull(self, route, request, window)
            if pulled is not None:
                return pulled
        return ItemStream(self, route, request, window)

    def astream(
        self,
        service_name: str,
        method: str,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        window: int | None = None,
    ) -> ItemStream:
        """:meth:`stream` for asyncio code: ``async for item in manager.astream(...)``.

        Cancelling the consuming task closes the stream (the generator in the
        service is stopped). A failure before the first item is not retried
        here (retries would block the event loop).
        """
        return self.stream(service_name, method, args, kwargs, timeout=timeout, metadata=metadata, window=window)

    def proxy(self, service_name: str, *, timeout: float | None = None) -> ServiceProxy:
        """An object whose attribute calls are sync calls: ``proxy.get("k")``; ValueError at once for a NaN or infinite timeout."""
        return ServiceProxy(self, service_name, None if timeout is None else _checked_timeout(timeout))

    def timer(self) -> _Timer:
        """The manager's timer, started with its first use; once the manager is closed, one that runs nothing.

        Every call in flight was abandoned by :meth:`close`: what a late answer
        or a late caller schedules afterwards has nothing left to do, and must
        not start a thread that nothing would stop.
        """
        timer = self._timer
        if timer is None:
            with self._timer_lock:
                if self._timer is None:
                    if self._closed:
                        return _Timer(f"kservice-manager-timer-{id(self):x}-closed", running=False)
                    self._timer = _Timer(f"kservice-manager-timer-{id(self):x}")
                timer = self._timer
        return timer

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close connections and the timer thread; idempotent.

        Every async call of this manager still in flight fails at once with
        ServiceStoppedError (``may_have_run`` True: it may have started) and
        is cancelled at its transport, so one still queued never starts. A
        sync call in flight in another thread ends by its own deadline, as it
        would have. Later calls raise ServiceStoppedError. No call of this
        manager completes past its deadline or after ``close`` returned,
        except a sync call whose deadline is still ahead.
        """
        if self._closed:
            return
        self._closed = True
        with self._timer_lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            for call in timer.close():
                call._abandon()
        self._invalidate_routes()
        if self.environment is not None:
            self.environment._managers.discard(self)

    def __enter__(self) -> ServiceManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: The class of asynchronous calls (``_asynccall._AsyncCall``), imported with the first one: with it
#: ``concurrent.futures`` and the ``logging`` it imports, 3 ms of the start of a process that only
#: makes sync calls.
_async_call_class: type[_AsyncCall] | None = None


def async_call_class() -> type[_AsyncCall]:
    """The class of asynchronous calls (imported on the first call of this)."""
    global _async_call_class
    if _async_call_class is None:
        from ._asynccall import _AsyncCall

        _async_call_class = _AsyncCall
    return _async_call_class


class ServiceProxy:
    """Attribute access becomes a sync call: ``manager.proxy("kv").get("a")``."""

    def __init__(self, manager: ServiceManager, service_name: str, timeout: float | None) -> None:
        self._manager = manager
        self._service_name = service_name
        self._timeout = timeout

    def __getattr__(self, method: str) -> _ProxyMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _ProxyMethod(self._manager, self._service_name, method, self._timeout)

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._service_name!r}>"

    def __reduce__(self) -> Any:
        raise _not_portable(f"proxy of service {self._service_name!r}", self._service_name)

    def __copy__(self) -> ServiceProxy:
        return self  # a handle: nothing in it changes


def _checked_args(args: Any) -> tuple[Any, ...]:
    """A call's ``args`` that is not a tuple, as a tuple; TypeError naming it when it is not a sequence of arguments.

    A list (any sequence) is its items. A str, bytes, dict, set or a single
    value is refused: spread into arguments it would call the method with
    its characters, bytes or keys (``"ab"`` as ``("a", "b")``), which can
    run the wrong call without an error.
    """
    if type(args) is list:
        return tuple(args)
    if isinstance(args, Sequence) and not isinstance(args, (str, bytes, bytearray, memoryview)):
        return tuple(args)
    if isinstance(args, Mapping):
        hint = "; to pass keyword arguments, use kwargs="
    else:
        hint = f"; to pass it as the only argument, wrap it: ({_short_repr(args, 40)},)"
    raise TypeError(
        f"args must be a tuple (or list) of the method's positional arguments, not {type(args).__name__} "
        f"{_short_repr(args)}{hint}"
    )


def _checked_mapping(what: str, value: Any) -> dict[str, Any]:
    """A call's (or a map's) ``kwargs`` or ``metadata`` that is not a dict, as a dict; TypeError naming it when it
    is not a mapping."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{what} must be a dict or None, not {type(value).__name__} {_short_repr(value)}")


def _checked_method_name(method: Any) -> str:
    """``method`` as a plain str, for a name that failed the call's fast check; raises naming what is wrong.

    A str subclass (an enum member, say) is accepted as its plain string value;
    the empty name is MethodNotFoundError, any other value TypeError.
    """
    if isinstance(method, str):
        if method:
            return str.__str__(method)
        # MethodNotFoundError, as the service itself would answer, but raised before anything is sent.
        raise MethodNotFoundError(
            "a method name must be a non-empty str, got '' (pass the name of a public method of the service)"
        )
    raise TypeError(
        f"a method name must be a non-empty str, not {type(method).__name__} {_short_repr(method, 80)} "
        "(pass the name of a public method of the service)"
    )


class _ProxyMethod:
    """``proxy.method(...)`` is a sync call; ``proxy.method.stream(...)``/``.astream(...)`` iterate a generator's items."""

    __slots__ = ("__name__", "_manager", "_service_name", "_timeout")

    def __init__(self, manager: ServiceManager, service_name: str, method: str, timeout: float | None) -> None:
        self._manager = manager
        self._service_name = service_name
        self.__name__ = method
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._manager.call_service_sync(self._service_name, self.__name__, args, kwargs, timeout=self._timeout)

    def stream(self, *args: Any, **kwargs: Any) -> ItemStream:
        return self._manager.stream(self._service_name, self.__name__, args, kwargs, timeout=self._timeout)

    def astream(self, *args: Any, **kwargs: Any) -> ItemStream:
        return self._manager.astream(self._service_name, self.__name__, args, kwargs, timeout=self._timeout)

    def __repr__(self) -> str:
        return f"<proxy method {self._service_name}.{self.__name__}>"

    def __reduce__(self) -> Any:
        raise _not_portable(f"proxy of service {self._service_name!r}", self._service_name)

    def __copy__(self) -> _ProxyMethod:
        return self  # a handle: nothing in it changes
