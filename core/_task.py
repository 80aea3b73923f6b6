"""Service tasks: one running service instance, its workers, listeners and statistics."""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from queue import SimpleQueue
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar

from ._aio import TaskLoop, call_lifecycle, method_kinds
from ._config import Config
from ._context import _current_request
from ._errors import (
    ConfigError,
    MethodNotFoundError,
    ServiceOverloadedError,
    ServiceStoppedError,
    ServiceUnavailableError,
)
from ._messages import ServiceRequest, ServiceResponse
from ._middleware import MiddlewareChain, MiddlewareError
from ._status import ServiceStatus, TaskState
from ._stream import StreamSink, SyncStreamRun, open_on_task, run_here, shutdown_stream_threads
from ._transport import Listener, Reply, timeout_response

if TYPE_CHECKING:
    from ._environment import ServiceEnvironment

__all__ = ["BaseServiceTask", "LocalServiceTask", "ServiceFactory", "TaskContext", "import_service_class"]

#: Seconds ``stop_service()`` waits for in-flight calls when given no timeout.
DEFAULT_STOP_TIMEOUT = 30.0


def import_service_class(path: str) -> type:
    """The class named by ``'package.module:Class'`` (or ``'package.module.Class'``).

    Raises ConfigError naming the path and what failed.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"service class {path!r} is not an import path like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import module {module_name!r} for service class {path!r}: {exc}") from exc
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (service class {path!r})")
    if not isinstance(found, type):
        raise ConfigError(f"{path!r} is not a class (got {type(found).__name__})")
    return found


@dataclass
class ServiceFactory:
    """How to build one service instance: ``service_class(*args, **kwargs)``.

    ``service_class`` may also be given as an import path
    (``'package.module:Class'``), imported here. Arguments are forwarded
    verbatim, whatever their names. Raises ConfigError at construction for a
    path that does not import or a ``service_class`` that cannot be called.
    """

    service_name: str
    service_class: type
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.service_class, str):
            self.service_class = import_service_class(self.service_class)
        elif not callable(self.service_class):
            raise ConfigError(
                f"service {self.service_name!r}: service_class must be a class or an import path like "
                f"'package.module:Class', not {type(self.service_class).__name__} {self.service_class!r}"
            )

    def create(self) -> Any:
        return self.service_class(*self.args, **(self.kwargs or {}))

    @property
    def class_path(self) -> str:
        return f"{self.service_class.__module__}:{self.service_class.__qualname__}"


@dataclass
class TaskContext:
    """What a task knows about where it runs: the environment's name, config and middleware."""

    environment_name: str = "default"
    config: Config | None = None
    middlewares: tuple[Any, ...] = ()
    environment: ServiceEnvironment | None = field(default=None, repr=False)

    def current_middlewares(self) -> tuple[Any, ...]:
        """This context's middleware, then the environment's as of now (each once)."""
        chosen = list(self.middlewares)
        if self.environment is not None:
            chosen.extend(m for m in self.environment.middlewares if not any(m is known for known in chosen))
        return tuple(chosen)

    def resolved_config(self) -> Config:
        if self.config is None:
            self.config = Config.load(None)
        return self.config


def _call_lifecycle(instance: Any, names: Iterable[str]) -> None:
    for name in names:
        method = getattr(instance, name, None)
        if callable(method):
            method()


class _WorkerPool:
    """Fixed worker threads fed by a SimpleQueue.

    Written here rather than using ThreadPoolExecutor because the task needs
    the queue depth, a drain on stop, and a per-call path lighter than
    ``executor.submit`` (no Future or work-item object per request).
    """

    def __init__(self, task: BaseServiceTask, size: int) -> None:
        self._task = task
        self._queue: SimpleQueue[tuple[ServiceRequest, Reply] | None] = SimpleQueue()
        self.put = self._queue.put
        self._threads = [
            threading.Thread(target=self._work, name=f"kservice-{task.service_name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        get = self._queue.get
        task = self._task
        clock = time.perf_counter
        while True:
            item = get()
            if item is None:
                return
            request, reply = item
            began = clock()
            response = task.execute(request, from_queue=True)
            # Learned before the reply: the caller's next call must find this run's cost.
            task.observe_cost(request.method_name, clock() - began)
            reply(response)

    def shutdown(self, deadline: float) -> list[tuple[ServiceRequest, Reply]]:
        """Stop the workers after the queued work; returns work still queued at ``deadline``."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        leftovers = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                leftovers.append(item)
        # Draining took the stop markers too: workers still busy need theirs back to exit.
        for thread in self._threads:
            if thread.is_alive():
                self._queue.put(None)
        return leftovers

    @property
    def threads(self) -> list[threading.Thread]:
        return self._threads


def _count(counter: itertools.count[int]) -> int:
    """The next value of ``counter`` without advancing it (its repr is the only way to read one)."""
    return int(repr(counter)[6:-1])


class BaseServiceTask:
    """One service instance and everything that serves its calls.

    The task owns the instance (``task.service``), a worker pool of
    ``service.local.max_workers`` threads (1 for a service declared not
    thread-safe), the listeners of the transports it is reachable through,
    and its statistics. Guarantees:

    - a request whose deadline has passed when a worker picks it up is not
      run; its caller gets ServiceTimeoutError;
    - a method name starting with ``_`` is refused with MethodNotFoundError
      and never looked up;
    - a call to a task that is not running is answered at once with
      ServiceUnavailableError;
    - ``stop_service`` stops accepting, lets queued and running calls finish
      up to its timeout, answers what is left with ServiceUnavailableError,
      then calls the service's ``cleanup()``/``close()``. It is idempotent.
    """

    #: the task kind this class implements (config ``services.<name>.kind``)
    kind: ClassVar[str] = "base"
    #: transports every task of this class listens on, before configured ones
    default_transports: ClassVar[tuple[str, ...]] = ()

    def __init__(self, service_factory: ServiceFactory, ctx: TaskContext | None = None) -> None:
        self.service_factory = service_factory
        self.service_name = service_factory.service_name
        self.ctx = ctx if ctx is not None else TaskContext()
        config = self.ctx.resolved_config()
        self.options = config.for_service(self.service_name)
        self.max_workers = self._configured_max_workers(config)
        self.queue_limit: int = self.options["local"]["request_queue_size"]
        self.queue_timeout: float = self.options["local"]["queue_timeout"]
        self.inline_limit: float = self.options["local"]["inline_limit"]
        # Running time of each method as last observed (smoothed; pessimistic after a slow run).
        self._method_cost: dict[str, float] = {}
        self.transport_names: tuple[str, ...] = tuple(
            dict.fromkeys([*self.default_transports, *self.options.get("transports", ())])
        )
        self.idempotent_methods: frozenset[str] = frozenset(self.options.get("idempotent", ()))
        self.restarts = 0
        self.health_reason = ""
        self.last_health_check: float | None = None
        self.started_at: float | None = None
        self.listeners: list[Listener] = []
        self._state: TaskState = "created"
        self._state_lock = threading.RLock()
        self._service: Any = None
        self._pool: _WorkerPool | None = None
        self._methods: dict[str, Callable[..., Any]] = {}
        self._server_chain: MiddlewareChain | None = None
        self._serial_lock = threading.Lock() if self.max_workers == 1 else None
        # Coroutine methods (``async def``) are awaited on the task's own event loop, at most
        # max_concurrency at once (one at a time for a service declared not thread-safe).
        self.max_concurrency: int = 1 if self.max_workers == 1 else int(self.options["local"]["max_concurrency"])
        self._aio: TaskLoop | None = None
        self._async_methods: dict[str, Callable[..., Any]] = {}
        self._stream_methods: frozenset[str] = frozenset()
        # The queue depth is guarded by a lock (room waiters sleep on it). Per-call
        # counters are itertools.count objects instead: next() is one atomic C
        # call (~40 ns), where each lock pair costs ~150 ns on the per-call path.
        self._counter_lock = threading.Lock()
        self._room = threading.Condition(self._counter_lock)
        self._room_waiters = 0
        self._queued = 0
        self._started = itertools.count()
        self._finished = itertools.count()
        self._failed = itertools.count()
        self._expired = itertools.count()
        from ._plugins import on_plugins_changed

        on_plugins_changed(self._plugins_changed)

    def _configured_max_workers(self, config: Config) -> int:
        entry = config.service_entry(self.service_name) or {}
        written: int | None = (entry.get("local") or {}).get("max_workers")
        if written is not None:
            return written
        declared = getattr(self.service_factory.service_class, "__kservice_options__", {}).get("max_workers")
        return int(declared) if declared else int(self.options["local"]["max_workers"])

    # ------------------------------------------------------------------ state

    @property
    def service(self) -> Any:
        """The service instance (None before start and after stop)."""
        return self._service

    @property
    def state(self) -> TaskState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def addresses(self) -> list[Any]:
        """Where callers reach this task, one address per transport, best first."""
        return [listener.address for listener in self.listeners]

    def _announce(self, hook: str, **kwargs: Any) -> None:
        from ._plugins import get_plugin_manager

        getattr(get_plugin_manager().hook, hook)(**kwargs)

    # -------------------------------------------------------------- lifecycle

    def start_service(self) -> None:
        """Create the instance, call its ``setup()``, start workers and listeners.

        Idempotent while running. On failure the task is ``failed``, anything
        started is released, and ServiceUnavailableError is raised with the
        cause chained.
        """
        with self._state_lock:
            if self._state in ("running", "starting"):
                return
            self._state = "starting"
            try:
                self._start_serving()
            except Exception as exc:
                self._state = "failed"
                self._release(time.monotonic())
                self._announce("kservice_task_failed", task=self, error=exc)
                raise ServiceUnavailableError(
                    f"service {self.service_name!r} failed to start: {type(exc).__name__}: {exc}"
                ) from exc
            self.started_at = time.time()
        self._announce("kservice_task_started", task=self)

    def _start_serving(self) -> None:
        """Bring the instance, workers and listeners up (subclasses that host elsewhere override)."""
        from ._plugins import get_transport

        self._service = self.service_factory.create()
        kinds = method_kinds(type(self._service))
        if kinds.needs_loop:
            self._aio = TaskLoop(self.service_name, self.max_concurrency)
        call_lifecycle(self._service, ("setup",), self._aio)
        self._methods = {}
        self._bind_method_kinds(self._service)
        self._compile_server_chain()
        self._pool = _WorkerPool(self, self.max_workers)
        self._state = "running"
        for name in self.transport_names:
            self.listeners.append(get_transport(name).listen(self))

    def _bind_method_kinds(self, instance: Any) -> None:
        kinds = method_kinds(type(instance))
        self._async_methods = {name: getattr(instance, name) for name in kinds.coroutines}
        self._stream_methods = kinds.streaming

    @property
    def event_loop(self) -> TaskLoop | None:
        """The task's event loop (its coroutine methods run there), None when its service has none."""
        return self._aio

    def _plugins_changed(self) -> None:
        """Recompile the server chain of a running task (plugins or environment middleware changed)."""
        if self._state in ("starting", "running"):
            self._compile_server_chain()

    def _compile_server_chain(self) -> None:
        from ._plugins import get_plugin_manager

        contributed = get_plugin_manager().hook.kservice_middleware(service_name=self.service_name, options=self.options)
        chain = MiddlewareChain([*self.ctx.current_middlewares(), *_flatten(contributed)], "server")
        self._server_chain = chain if chain else None

    def stop_service(self, timeout: float | None = None) -> None:
        """Stop accepting calls, drain them (up to ``timeout`` seconds), release everything. Idempotent."""
        with self._state_lock:
            if self._state in ("stopped", "stopping"):
                return
            if self._state in ("created", "failed"):
                self._state = "stopped"
                return
            self._state = "stopping"
        self._announce("kservice_task_stopping", task=self)
        deadline = time.monotonic() + (DEFAULT_STOP_TIMEOUT if timeout is None else timeout)
        self._release(deadline)
        with self._state_lock:
            self._state = "stopped"
        self._announce("kservice_task_stopped", task=self)

    def _release(self, deadline: float) -> None:
        """Drain and release workers, listeners and the instance (never raises)."""
        shutdown_stream_threads(self, deadline)
        if self._pool is not None:
            leftovers = self._pool.shutdown(deadline)
            self._pool = None
            for request, reply in leftovers:
                self._dequeued()
                reply(self._unavailable(request, "stopped before the request could run"))
        with self._room:
            self._room.notify_all()
        if self._aio is not None:
            self._aio.drain(deadline)
        for listener in self.listeners:
            try:
                listener.close()
            except Exception:  # noqa: BLE001 - a failing listener must not stop the others closing
                pass
        self.listeners = []
        aio, self._aio = self._aio, None
        if aio is not None:
            # Coroutine calls drain (up to the deadline) before an async cleanup runs on the same loop.
            instance = self._service
            aio.stop(deadline, (lambda: _lifecycle_coroutine(instance, ("cleanup", "close"))) if instance is not None else None)
            self._service = None
        if self._service is not None:
            try:
                _call_lifecycle(self._service, ("cleanup", "close"))
            except Exception:  # noqa: BLE001 - the task stops whatever the service's cleanup does
                pass
            self._service = None

    def restart_listeners(self) -> int:
        """Restart listeners that stopped receiving; returns how many (health recovery)."""
        restarted = 0
        for listener in self.listeners:
            if not listener.alive:
                listener.restart()
                restarted += 1
        self.restarts += restarted
        return restarted

    def rebuild_service(self) -> None:
        """Replace the instance with a new one (health recovery); calls already running finish on the old one."""
        old = self._service
        new = self.service_factory.create()
        call_lifecycle(new, ("setup",), self._aio)
        self._service = new
        self._methods = {}
        self._bind_method_kinds(new)
        self.restarts += 1
        if old is not None:
            try:
                call_lifecycle(old, ("cleanup", "close"), self._aio)
            except Exception:  # noqa: BLE001
                pass

    def recover(self, reason: str) -> str:
        """Bring an unhealthy task back; returns what was done (health recovery calls this).

        The default restarts listeners that stopped receiving and, when every
        listener was alive, replaces the service instance. Each restart is
        counted in ``restarts``. A task that is not running is left alone.
        Raises what the listener restart or the new instance's construction
        raised; the task then keeps its current instance. Task kinds that host
        the instance elsewhere override this (a process task respawns its
        child, a Ray task replaces a replica). ``reason`` says why recovery
        was asked for (for overrides that log or report it).
        """
        # Held so that a concurrent stop_service cannot release the instance
        # while a new one is being installed (it would leak the new one).
        with self._state_lock:
            if self._state != "running":
                return f"nothing: task is {self._state}"
            restarted = self.restart_listeners()
            if restarted:
                return f"restarted {restarted} listener(s)"
            self.rebuild_service()
            return "rebuilt the service instance"

    # ------------------------------------------------------------- the calls

    def submit(self, request: ServiceRequest, reply: Reply) -> None:
        """Queue ``request`` for a worker; ``reply`` gets the response exactly once.

        ``reply`` runs in the worker thread once the request ran, or in the
        calling thread when the request is refused. The time the request ran
        (its wait in the queue excluded) feeds :meth:`method_cost`.

        A task that is not running answers at once with ServiceUnavailableError;
        a full queue waits up to ``service.local.queue_timeout`` (and never past
        the request's deadline) for room, then answers ServiceOverloadedError.
        """
        pool = self._pool
        if self._state != "running" or pool is None:
            if self._state in ("stopped", "failed", "created"):
                # A deliberate state: the caller learns at once, and retry policies leave it alone.
                reply(
                    ServiceResponse.from_exception(
                        request.request_id,
                        ServiceStoppedError(f"service {self.service_name!r} is {self._state}; start it to call it"),
                        origin="runtime",
                    )
                )
            else:
                reply(self._unavailable(request, f"service is {self._state}"))
            return
        if self._async_methods:
            coroutine_method = self._async_methods.get(request.method_name)
            if coroutine_method is not None and self._aio is not None:
                self._aio.submit(self, request, coroutine_method, reply)
                return
        with self._counter_lock:
            if self._queued >= self.queue_limit and not self._wait_for_room(request):
                reply(
                    ServiceResponse.from_exception(
                        request.request_id,
                        ServiceOverloadedError(
                            f"service {self.service_name!r} is overloaded: {self._queued} requests queued "
                            f"(service.local.request_queue_size={self.queue_limit})"
                        ),
                        origin="runtime",
                    )
                )
                return
            self._queued += 1
        pool.put((request, reply))

    def open_stream(self, request: ServiceRequest, sink: StreamSink) -> None:
        """Serve streaming call ``request`` (a generator or async generator method) into ``sink``; returns at once.

        Transports call this with their :class:`StreamSink`. ``sink.end`` is
        called exactly once: after the last item, with the method's error, or
        with the refusal (task not running, unknown method, not a generator).
        A generator runs in the task's stream threads (at most ``max_workers``
        at once), an async generator on the task's event loop; the deadline,
        a consumer that cancels, and the task stopping all close the generator.
        """
        open_on_task(self, request, sink)

    def run_stream_here(self, request: ServiceRequest, sink: StreamSink) -> SyncStreamRun | None:
        """Serve streaming call ``request`` with its generator stepped in the caller's thread.

        For transports whose own thread drives a stream (a Ray replica's
        generator method): each ``run.pump(limit)`` makes up to ``limit`` items
        into ``sink`` and returns True once the stream ended (``sink.end`` was
        called); ``run.abandon(response)`` ends it early, closing the
        generator. Returns None when there is nothing to step: the stream was
        refused (``sink.end`` was called), or the method is an async generator,
        which runs on the task's event loop as with :meth:`open_stream`.
        """
        return run_here(self, request, sink)

    def cancel_request(self, request_id: str) -> None:
        """Best effort, never blocks: the caller of ``request_id`` gave up.

        A coroutine method still running for it is cancelled
        (``asyncio.CancelledError`` inside the method); a sync method cannot be
        interrupted and runs to its end (a request not started yet never starts
        past its deadline).
        """
        if self._aio is not None:
            self._aio.cancel(request_id)

    def run_inline(self, request: ServiceRequest) -> ServiceResponse | None:
        """Run ``request`` in the calling thread when that is safe and cheap; None: use :meth:`submit`.

        It runs here when the task is running in this process with its worker
        pool, the service is thread-safe, nothing waits in the pool's queue, and
        the method was observed to run in under ``service.local.inline_limit``
        seconds (a method's first call always goes to the pool). That saves the
        two thread wake-ups of a pooled call (tens of µs) for fast methods.
        The request goes through :meth:`execute` as on the pool: deadline,
        middleware, statistics. Unlike a pooled call it cannot be abandoned at
        its deadline once started: a method that turns slow and overruns the
        deadline makes the caller wait for it this once (the caller then gets
        ServiceTimeoutError, as from the pool, and the result is dropped), and
        its next calls go to the pool.
        """
        if self._serial_lock is not None or self._pool is None or self._queued or self._state != "running":
            return None
        name = request.method_name
        cost = self._method_cost.get(name)
        if cost is None or cost >= self.inline_limit:
            return None
        began = time.perf_counter()
        response = self.execute(request)
        ran = time.perf_counter() - began
        self.observe_cost(name, ran)
        deadline = request.deadline
        if deadline is not None and ran > self.inline_limit and time.time() > deadline:
            # It overran its deadline here: the caller gets the timeout it asked for (late, this once).
            return timeout_response(request, deadline - time.time() + ran)
        return response

    def method_cost(self, name: str) -> float | None:
        """Seconds method ``name`` has been observed to run (smoothed), None before its first run.

        Fed by pool runs (their wait in the queue excluded), by in-place runs
        of :meth:`run_inline`, and by transports that run requests in place
        (:meth:`observe_cost`); one slow run raises it at once.
        """
        return self._method_cost.get(name)

    def observe_cost(self, name: str, seconds: float) -> None:
        """Record that method ``name`` just ran for ``seconds`` (see :meth:`method_cost`)."""
        previous = self._method_cost.get(name)
        if previous is None or seconds > self.inline_limit:
            # Pessimistic on a slow run: the next calls go to the pool at once.
            self._method_cost[name] = seconds if previous is None else max(seconds, previous)
        else:
            self._method_cost[name] = previous * 0.75 + seconds * 0.25

    def _wait_for_room(self, request: ServiceRequest) -> bool:
        """Called holding the counter lock with the queue full; True once there is room."""
        wait_until = time.time() + self.queue_timeout
        if request.deadline is not None:
            wait_until = min(wait_until, request.deadline)
        self._room_waiters += 1
        try:
            while self._queued >= self.queue_limit and self._state == "running":
                remaining = wait_until - time.time()
                if remaining <= 0:
                    return False
                self._room.wait(remaining)
            return self._state == "running"
        finally:
            self._room_waiters -= 1

    def _dequeued(self) -> None:
        with self._counter_lock:
            self._queued -= 1
            if self._room_waiters:
                self._room.notify()

    def _unavailable(self, request: ServiceRequest, why: str) -> ServiceResponse:
        return ServiceResponse.from_exception(
            request.request_id,
            ServiceUnavailableError(f"service {self.service_name!r} is unavailable: {why}"),
            origin="runtime",
        )

    def execute(self, request: ServiceRequest, *, from_queue: bool = False) -> ServiceResponse:
        """Run one request in the calling thread and return its response (never raises).

        Listeners of transports that can run a request where it arrives call
        this directly; the worker pool calls it for queued requests
        (``from_queue``, so the queue depth is updated under the same lock).
        """
        if from_queue:
            self._dequeued()
        if request.deadline is not None and time.time() > request.deadline:
            next(self._expired)
            return timeout_response(request, 0.0)
        next(self._started)
        serial = self._serial_lock
        if serial is not None:
            serial.acquire()
        token = _current_request.set(request)
        chain = self._server_chain
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
                if request.method_name[:1] in ("_", ""):
                    raise self._method_not_found(request.method_name)
                response = ServiceResponse(True, self.handle_request(request), None, request.request_id)
        except MethodNotFoundError as exc:
            response = ServiceResponse.from_exception(request.request_id, exc, origin="runtime")
        except MiddlewareError as exc:
            request, limit = exc.request, exc.index
            response = ServiceResponse.from_exception(request.request_id, exc.error, origin="service")
        except Exception as exc:
            response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
        finally:
            _current_request.reset(token)
            if serial is not None:
                serial.release()
        if chain is not None:
            response = chain.run_after(request, response, limit, began)
        next(self._finished)
        if not response.success:
            next(self._failed)
        return response

    def handle_request(self, request: ServiceRequest) -> Any:
        """Turn a request into a result: call the named public method. Subclasses may override.

        Raises MethodNotFoundError for unknown or private names; whatever the
        method raises reaches the caller as ServiceCallError.
        """
        method = self._methods.get(request.method_name)
        if method is None:
            method = self._resolve_method(request.method_name)
        return method(*request.args, **request.kwargs)

    def _resolve_method(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise self._method_not_found(name)
        method = getattr(self._service, name, None)
        if method is None or not callable(method):
            raise self._method_not_found(name)
        if name in self._stream_methods:
            method = _refuse_stream(self.service_name, name)
        elif name in self._async_methods and self._aio is not None:
            # Run where the request arrived (a transport calling execute directly): awaited on the loop.
            method = self._aio.blocking(method)
        self._methods[name] = method
        return method

    def public_methods(self) -> list[str]:
        """Names of the callable public methods of the service."""
        cls = self.service_factory.service_class
        return sorted(
            name
            for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member) and not isinstance(member, type)
        )

    def _method_not_found(self, name: str) -> MethodNotFoundError:
        public = self.public_methods()
        if name.startswith("_"):
            why = "names starting with '_' are private and never callable"
        else:
            why = "no such public method"
        message = f"service {self.service_name!r} has no callable method {name!r} ({why})"
        close = difflib.get_close_matches(name.lstrip("_"), public, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        message += f" (public methods: {', '.join(public) or 'none'})"
        return MethodNotFoundError(message)

    # ----------------------------------------------------------------- status

    def get_service_status(self) -> ServiceStatus:
        """A snapshot of state, health and load; plugins add to ``extra``."""
        # Finished before started: a call between the two reads shows as in flight, never as negative.
        finished, failed, expired = _count(self._finished), _count(self._failed), _count(self._expired)
        started = _count(self._started)
        counts = (finished + expired, failed + expired, expired, started - finished, self._queued)
        listeners_alive = all(listener.alive for listener in self.listeners)
        reason = self.health_reason or ("" if listeners_alive else "a listener stopped receiving")
        status = ServiceStatus(
            service_name=self.service_name,
            kind=self.kind,
            state=self._state,
            healthy=self._state == "running" and not reason,
            health_reason=reason if self._state == "running" else f"task is {self._state}",
            last_health_check=self.last_health_check,
            requests_total=counts[0],
            errors_total=counts[1],
            expired_total=counts[2],
            in_flight=counts[3],
            queue_depth=counts[4],
            max_workers=self.max_workers,
            restarts=self.restarts,
            started_at=self.started_at,
            addresses=[f"{a.transport}:{a.target if isinstance(a.target, str) else a.service_name}" for a in self.addresses],
        )
        from ._plugins import get_plugin_manager

        get_plugin_manager().hook.kservice_task_status(task=self, status=status)
        return status

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.service_name!r} {self._state}>"


class LocalServiceTask(BaseServiceTask):
    """A task whose instance runs in this process; in-process callers reach it over ``inproc``.

    Add ``transports: [mmap]`` to its configuration to make it reachable from
    other processes too.
    """

    kind: ClassVar[str] = "local"
    default_transports: ClassVar[tuple[str, ...]] = ("inproc",)


async def _lifecycle_coroutine(instance: Any, names: Iterable[str]) -> None:
    """Call each of ``instance``'s lifecycle methods in turn on the running loop, awaiting ``async def`` ones."""
    for name in names:
        method = getattr(instance, name, None)
        if callable(method):
            outcome = method()
            if inspect.isawaitable(outcome):
                await outcome


def _refuse_stream(service_name: str, method_name: str) -> Callable[..., Any]:
    """What a plain call of a streaming (generator) method runs: a TypeError saying to stream it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{service_name}.{method_name} is a streaming method (a generator): a plain call cannot return its items; "
            f"iterate manager.stream({service_name!r}, {method_name!r}, ...) or proxy.{method_name}.stream(...) instead"
        )

    return refuse


def _flatten(results: Iterable[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in results:
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            flat.extend(x for x in item if x is not None)
        else:
            flat.append(item)
    return flat
