"""Service tasks: one running service instance, its workers, listeners and statistics."""

from __future__ import annotations

import collections
import contextlib
import copy
import heapq
import importlib
import inspect
import itertools
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from queue import SimpleQueue
from time import perf_counter
from types import CoroutineType
from typing import TYPE_CHECKING, Any, ClassVar

from ._config import Config
from ._context import _current_request
from ._errors import (
    ConfigError,
    MethodNotFoundError,
    ServiceError,
    ServiceOverloadedError,
    ServiceStoppedError,
    ServiceUnavailableError,
    _short_repr,
)
from ._messages import ServiceRequest, ServiceResponse
from ._middleware import CallBatch, MiddlewareChain, MiddlewareError, contributed_middleware
from ._status import ServiceStatus, TaskState
from ._stream import (
    StreamSink,
    SyncStreamRun,
    _Cancellable,
    _StreamDeadlines,
    open_on_task,
    pull_items,
    pull_stream,
    run_here,
    shutdown_stream_threads,
)
from ._transport import Listener, Reply, deadline_response, timeout_response
from .keys import AT_CAPACITY

if TYPE_CHECKING:
    from ._aio import TaskLoop
    from ._environment import ServiceEnvironment

__all__ = [
    "BaseServiceTask",
    "LocalServiceTask",
    "ServiceFactory",
    "TaskContext",
    "import_service_class",
    "next_cost_estimate",
]

log = logging.getLogger("kservice.task")

#: Seconds ``stop_service()`` waits for in-flight calls when given no timeout.
DEFAULT_STOP_TIMEOUT = 30.0
#: The longest drain a stop waits for: a longer ``timeout`` (or infinity) means "without limit" in practice
#: (about 146 years). Half of ``threading.TIMEOUT_MAX``, so that a deadline computed from it still gives a
#: wait every lock and join accepts (past that they raise OverflowError).
STOP_TIMEOUT_MAX = threading.TIMEOUT_MAX / 2


def stop_timeout(timeout: object) -> float:
    """The seconds a stop drains for: ``timeout``, DEFAULT_STOP_TIMEOUT for None, at most STOP_TIMEOUT_MAX.

    A timeout longer than STOP_TIMEOUT_MAX, infinity included, waits without
    limit (it is clamped). Raises TypeError for a bool or a non-number and
    ValueError for NaN, naming the value, before anything is stopped.
    """
    if timeout is None:
        return DEFAULT_STOP_TIMEOUT
    if type(timeout) is bool or not isinstance(timeout, (int, float)):
        raise TypeError(f"stop timeout must be a number of seconds or None, got {type(timeout).__name__} ({timeout!r})")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float: longer than any wait
        return STOP_TIMEOUT_MAX if timeout > 0 else 0.0
    if math.isnan(seconds):
        raise ValueError("stop timeout must be a number of seconds or None, got nan")
    return min(seconds, STOP_TIMEOUT_MAX)


#: The least a stop gives a plugin's ``kservice_task_stopping``/``_stopped`` (not kservice's own), even
#: when its timeout has passed: a hook that takes a millisecond is not reported as hanging.
MIN_HOOK_ALLOWANCE = 0.1


def _hook_allowance(deadline: float, share: float) -> float:
    """Seconds a stop lets plugins' lifecycle hooks take: ``share`` of what is left before ``deadline``, at least ``MIN_HOOK_ALLOWANCE``."""
    return max(MIN_HOOK_ALLOWANCE, (deadline - time.monotonic()) * share)


#: Seconds a status waits for each plugin's ``kservice_task_status`` (not kservice's own): a status
#: is asked for often (the dashboard, every second) and its callers have timeouts of their own.
STATUS_HOOK_TIMEOUT = 1.0

#: Method names whose running time a task remembers (``method_cost``); names beyond it always go to the pool.
MAX_TRACKED_METHODS = 1024
#: A request waiting for room in a full queue is answered ServiceOverloadedError this long before its
#: deadline, so the answer reaches the caller before the caller's own timer turns it into a timeout.
OVERLOAD_ANSWER_MARGIN = 0.05


def _working_directory_hint(module_name: str) -> str:
    """What to do when the module is in the working directory, which is deliberately not searched."""
    top = module_name.partition(".")[0]
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path:
        return ""
    if not (os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))):
        return ""
    return (
        f" ({top!r} is in the working directory, which kservice does not search: "
        "pass '--app-dir .' to 'kservice serve' or set PYTHONPATH)"
    )


def import_service_class(path: str) -> type:
    """The class named by ``'package.module:Class'`` (or ``'package.module.Class'``).

    Raises ConfigError naming the path and what failed, a module that exits
    when imported (SystemExit) included.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"service class {path!r} is not an import path like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        # A script's module-level code (argparse, sys.exit()): left alone, the program importing it would exit
        # with the script's own usage line, as if kservice needed the script's options.
        raise ConfigError(
            f"importing module {module_name!r} for service class {path!r} exited (SystemExit: {exc.code}): the "
            "module runs a program when imported (command-line parsing, sys.exit()); move that code under "
            "\"if __name__ == '__main__':\" so the module can be imported"
        ) from exc
    except Exception as exc:
        hint = _working_directory_hint(module_name) if isinstance(exc, ModuleNotFoundError) else ""
        raise ConfigError(f"cannot import module {module_name!r} for service class {path!r}: {exc}{hint}") from exc
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
    verbatim, whatever their names: ``args`` is a tuple (a list is taken as
    one) and ``kwargs`` a mapping (copied into a dict). Raises ConfigError at
    construction for a path that does not import or a ``service_class`` that
    cannot be called, and TypeError for ``args`` or ``kwargs`` of another type
    (a dict given as ``args`` is the usual slip: the message shows both fixes).
    """

    service_name: str
    service_class: type
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        args: Any = self.args
        if isinstance(args, list):
            self.args = tuple(args)
        elif not isinstance(args, tuple):
            fixes = f"args=({args!r},) for one positional argument"
            if isinstance(args, Mapping):
                fixes += f", or kwargs={args!r} for keyword arguments"
            raise TypeError(
                f"ServiceFactory({self.service_name!r}, ...): args must be a tuple or list of positional arguments, "
                f"got {type(args).__name__} {args!r}; write {fixes}"
            )
        kwargs: Any = self.kwargs
        if kwargs is not None:
            if not isinstance(kwargs, Mapping):
                raise TypeError(
                    f"ServiceFactory({self.service_name!r}, ...): kwargs must be a mapping of keyword arguments "
                    f"(e.g. kwargs={{'initial': {{}}}}), got {type(kwargs).__name__} {kwargs!r}"
                )
            if type(kwargs) is not dict:
                self.kwargs = dict(kwargs)
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


def next_cost_estimate(previous: float | None, seconds: float, slow: float) -> float:
    """A method's running-time estimate after a run of ``seconds`` (``previous``: the estimate before, None at first).

    The first run is taken as is; a run slower than ``slow`` raises the
    estimate at once (pessimistic: the next calls take the cautious path,
    the pool or a lone send); otherwise it moves a quarter of the way to the
    new run. Used by tasks (:meth:`BaseServiceTask.observe_cost`) and by
    transports that keep their own estimate of the methods they send.
    """
    if previous is None:
        return seconds
    if seconds > slow:
        return seconds if seconds > previous else previous
    return previous * 0.75 + seconds * 0.25


def _call_lifecycle(instance: Any, names: Iterable[str]) -> None:
    for name in names:
        method = getattr(instance, name, None)
        if callable(method):
            method()


class _WorkerPool:
    """Fixed worker threads fed by a SimpleQueue; a thread that dies is replaced at once.

    Written here rather than using ThreadPoolExecutor because the task needs
    the queue depth, a drain on stop, and a per-call path lighter than
    ``executor.submit`` (no Future or work-item object per request).

    A worker never dies of what a request does: ``execute`` turns every
    exception a method raises into a response, and the worker answers a
    request whose handling raised anyway (a subclass's ``execute``) with a
    ServiceError, and survives a reply callback that raises. A worker that
    dies all the same (an asynchronous exception, memory exhaustion) is
    replaced by a new thread of the same name and counted in ``replaced``; a
    request it had taken from the queue but not yet started is lost (its
    caller gets ServiceTimeoutError at its deadline).
    """

    def __init__(self, task: BaseServiceTask, size: int) -> None:
        self._task = task
        self._queue: SimpleQueue[tuple[ServiceRequest, Reply] | None] = SimpleQueue()
        self.put = self._queue.put
        self.size = size
        #: worker threads that died and were replaced (by the pool itself or by recovery)
        self.replaced = 0
        self._lock = threading.Lock()
        self._stopping = False
        #: the request each worker runs now (None: none), for :meth:`running_deadlines`
        self._running: list[ServiceRequest | None] = [None] * size
        self._threads = [self._new_thread(i) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def _new_thread(self, index: int) -> threading.Thread:
        return threading.Thread(
            target=self._work, args=(index,), name=f"kservice-{self._task.service_name}-{index}", daemon=True
        )

    def _work(self, index: int) -> None:
        get = self._queue.get
        task = self._task
        dequeued = task._dequeued
        execute = task.execute
        observe_cost = task.observe_cost
        clock = time.perf_counter
        running = self._running
        stopped = False
        try:
            while True:
                item = get()
                if item is None:
                    stopped = True
                    return
                request, reply = item
                running[index] = request
                try:
                    dequeued()
                    began = clock()
                    response = execute(request)
                    if response.success or response.error_type != "MethodNotFoundError":
                        # Learned before the reply: the caller's next call must find this run's cost.
                        # Unknown names are not remembered (see MAX_TRACKED_METHODS).
                        observe_cost(request.method_name, clock() - began)
                except BaseException as exc:  # noqa: BLE001 - execute never raises; an override might
                    response = task._handling_failed(request, exc)
                running[index] = None
                try:
                    reply(response)
                except BaseException:  # noqa: BLE001 - a failing reply must not take the worker down
                    log.exception("service %r: replying to request %s failed", task.service_name, request.request_id)
        finally:
            if not stopped:
                self._replace(index)

    def _replace(self, index: int) -> None:
        """Called by worker ``index`` as it dies: start its replacement (unless the pool is stopping)."""
        with self._lock:
            if self._stopping:
                return
            log.error("service %r: worker thread %d died; starting a replacement", self._task.service_name, index)
            self._start_replacement(index)

    def _start_replacement(self, index: int) -> bool:
        """Holding the lock: a new thread in slot ``index``; False when it could not be started."""
        thread = self._new_thread(index)
        self._threads[index] = thread
        try:
            thread.start()
        except BaseException:  # noqa: BLE001 - e.g. no more threads: health recovery tries again
            log.exception("service %r: could not start a replacement worker thread", self._task.service_name)
            return False
        self.replaced += 1
        return True

    def replace_dead(self) -> int:
        """Start a new thread for every dead worker; returns how many were started."""
        with self._lock:
            if self._stopping:
                return 0
            dead = [index for index, thread in enumerate(self._threads) if not thread.is_alive()]
            return sum(self._start_replacement(index) for index in dead)

    @property
    def alive(self) -> int:
        """Worker threads alive now."""
        return sum(thread.is_alive() for thread in self._threads)

    def running_deadlines(self) -> list[float | None]:
        """The deadlines (epoch seconds; None: none) of the requests the workers run now."""
        return [request.deadline for request in list(self._running) if request is not None]

    def shutdown(self, deadline: float) -> list[tuple[ServiceRequest, Reply]]:
        """Stop the workers after the queued work; returns work still queued at ``deadline``."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        leftovers = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                leftovers.append(item)
        # Draining took the stop markers too: workers still busy need theirs back to exit.
        for thread in threads:
            if thread.is_alive():
                self._queue.put(None)
        return leftovers

    @property
    def threads(self) -> list[threading.Thread]:
        return self._threads


class _Parked:
    """A request that met a full queue, waiting (in no thread) for room or for its wait to end."""

    __slots__ = ("done", "reply", "request", "until")

    def __init__(self, request: ServiceRequest, reply: Reply, until: float) -> None:
        self.request: ServiceRequest | None = request
        self.reply: Reply | None = reply
        self.until = until
        self.done = False


def _count(counter: itertools.count[int]) -> int:
    """The next value of ``counter`` without advancing it (its repr is the only way to read one)."""
    return int(repr(counter)[6:-1])


def _returned_coroutine(service_name: str, method_name: str, coroutine: Any) -> TypeError:
    """The error of a plain method that returned a coroutine (its ``async def`` hidden by a decorator); closes it.

    Closed, the coroutine never runs and leaves no "never awaited" warning.
    """
    coroutine.close()
    return TypeError(
        f"{service_name}.{method_name} returned a coroutine: it is an async def method behind a decorator that hides "
        "it (a wrapper without functools.wraps), so it was called as a plain method and its body never ran; decorate "
        "the wrapper with functools.wraps(function) and it is awaited like any async def method"
    )


def _run_items(
    method: Callable[..., Any],
    args_list: tuple[Any, ...],
    results: list[Any],
    failures: dict[int, ServiceResponse],
    request_id: str,
    began: float,
    end: float,
    budget: float,
    durations: list[float] | None,
    single: bool,
) -> int:
    """:meth:`BaseServiceTask.run_many`'s loop for the common chunk: no serial lock, no keyword arguments.

    The same outcomes as the general loop, with less work per call (no
    ``**kwargs`` unpacking, no lock checks, one subtraction): a chunk of
    trivial calls spends most of its host time here. Returns how many items
    were not started because the deadline (``end``, on ``perf_counter``'s
    scale) had passed. ``single``: each entry is a call's one argument.
    """
    append = results.append
    clock = perf_counter
    keep = durations.append if durations is not None else None
    if single:
        for index, arg in enumerate(args_list):
            if began > end:
                return len(args_list) - index
            try:
                append(method(arg))
            except BaseException as exc:  # noqa: BLE001 - as in execute(): the item's outcome, not the thread's end
                append(None)
                failures[index] = ServiceResponse.from_exception(request_id, exc, origin="service")
            finished = clock()
            spent = finished - began
            if keep is not None:
                keep(spent)
            if spent > budget:
                break
            began = finished
        return 0
    for index, args in enumerate(args_list):
        if began > end:
            return len(args_list) - index
        try:
            if type(args) is not tuple:
                raise TypeError(f"item {index} of a chunk carries {type(args).__name__} arguments, not a tuple")
            append(method(*args))
        except BaseException as exc:  # noqa: BLE001 - as in execute(): the item's outcome, not the thread's end
            append(None)
            failures[index] = ServiceResponse.from_exception(request_id, exc, origin="service")
        finished = clock()
        spent = finished - began
        if keep is not None:
            keep(spent)
        if spent > budget:
            break
        began = finished
    return 0


#: Every task of this process, for :meth:`BaseServiceTask._forked` in a forked child.
_tasks: weakref.WeakSet[BaseServiceTask] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for task in list(_tasks):
        task._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
    - whatever a method raises, ``BaseException`` included (SystemExit,
      KeyboardInterrupt, GeneratorExit, an exception whose ``__str__``
      raises), its caller gets an error response: the method's outcome,
      never the death of the thread running it. A worker thread that dies
      anyway is replaced at once and counted (``status.workers_replaced``);
    - ``submit`` never blocks its caller: a request meeting a full queue waits,
      in no thread, for room (admitted in arrival order) for up to
      ``service.local.queue_timeout`` (never past its deadline), then is
      answered ServiceOverloadedError; such a request never ran;
    - ``stop_service`` stops accepting, lets queued and running calls finish
      up to its timeout, answers what is left with ServiceUnavailableError,
      then calls the service's ``cleanup()``/``close()``. It is idempotent
      and always completes: a lifecycle hook that raises is reported and the
      teardown goes on.
    """

    #: the task kind this class implements (config ``services.<name>.kind``)
    kind: ClassVar[str] = "base"
    #: transports every task of this class listens on, before configured ones
    default_transports: ClassVar[tuple[str, ...]] = ()
    #: Whether the instance, its methods and its server-side middleware run in this process. A kind
    #: that hosts them elsewhere (a child process, Ray actors) sets False: what the service's side
    #: records (the metrics plugin's load window, its recent errors) is then its host's, which the
    #: kind's ``report_status`` brings in ``status.extra``, never this process's empty record.
    hosted_here: ClassVar[bool] = True

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
        # Running time of each method as last observed (smoothed; pessimistic after a slow run);
        # at most MAX_TRACKED_METHODS names.
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
        # The service's generator methods, bound once (an in-process stream finds its method in one lookup).
        self._generator_methods: dict[str, Callable[..., Any]] = {}
        # The streams being produced (a sink, or a pulled source): the task cancels them when it stops;
        # see _stream.py.
        # Each with its deadline (see _running_deadlines).
        self._open_streams: dict[_Cancellable, float | None] = {}
        # What ends the streams a consumer steps (pulled) at their deadline when left paused: started with
        # the first such stream, stopped with the task (see _stream.py).
        self._stream_deadlines: _StreamDeadlines | None = None
        # The queue depth and the parked requests are guarded by a lock (the overflow
        # thread sleeps on it). Per-call counters are itertools.count objects instead:
        # next() is one atomic C call (~40 ns), where each lock pair costs ~150 ns.
        self._counter_lock = threading.Lock()
        self._room = threading.Condition(self._counter_lock)
        self._queued = 0
        # Requests that met a full queue: in arrival order (admitted from the left as room
        # frees), and by the time their wait ends (answered overloaded by the overflow thread).
        # Invariant: a live parked request exists only while the queue is full.
        self._parked: collections.deque[_Parked] = collections.deque()
        self._parked_by_time: list[tuple[float, int, _Parked]] = []
        self._parked_live = 0
        self._parked_seq = itertools.count()
        self._overflow_thread: threading.Thread | None = None
        self._stop_done = threading.Event()
        # Clear while the host is being replaced (see host_replacement); callbacks waiting for the new one.
        self._host_ready = threading.Event()
        self._host_ready.set()
        self._host_lock = threading.Lock()
        self._when_host_ready: list[Callable[[], None]] = []
        self._started = itertools.count()
        self._finished = itertools.count()
        self._failed = itertools.count()
        self._expired = itertools.count()
        # The process the task was started in, and, in a process forked from it while it ran, that
        # process's pid: the service runs there, not in this copy (see _forked).
        self._started_in = 0
        self._inherited_from: int | None = None
        _tasks.add(self)
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
        """Where callers reach this task, one address per transport, best first (none while its host is replaced)."""
        if not self._host_ready.is_set():
            return []
        return [listener.address for listener in self.listeners]

    @property
    def replacing_host(self) -> bool:
        """Whether the task's host is being replaced right now (see :meth:`host_replacement`)."""
        return not self._host_ready.is_set()

    @contextlib.contextmanager
    def host_replacement(self) -> Iterator[None]:
        """Mark the task's host as being replaced while the body replaces it (a respawned child process).

        Meanwhile the task has no :attr:`addresses`: managers drop their route
        to the old host at once (calls already sent on it still get their
        answers) and a new call is refused with ServiceUnavailableError "being
        restarted" (``may_have_run`` False: nothing is sent), which a retry
        policy may retry; such a retry waits for the new host (up to its
        call's deadline) instead of its usual delay. When the body ends,
        whether it raised or not, the task has addresses again, managers are
        told (:meth:`addresses_changed`), and the waiting retries go ahead.
        """
        self._host_ready.clear()
        self.addresses_changed()
        try:
            yield
        finally:
            with self._host_lock:
                self._host_ready.set()
                waiting, self._when_host_ready = self._when_host_ready, []
            self.addresses_changed()
            for callback in waiting:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - one caller's failure must not stop the others
                    log.exception("service %r: a call waiting for its new host failed", self.service_name)

    def wait_host_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds while the host is being replaced; True when it is not (any more)."""
        return self._host_ready.wait(max(0.0, timeout))

    def call_when_host_ready(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the host is not being replaced: now, in this thread, or in the replacing thread.

        ``callback`` must not block (it runs in the thread that replaced the host).
        """
        with self._host_lock:
            if not self._host_ready.is_set():
                self._when_host_ready.append(callback)
                return
        callback()

    def _announce(self, hook: str, within: float | None = None, **kwargs: Any) -> bool:
        """Tell plugins about a lifecycle step (see :func:`kservice._plugins.announce`): whether every plugin returned.

        An implementation that raises, or that has not returned within
        ``within`` seconds (None: the plugins' default), is a warning naming it.
        """
        from ._plugins import announce

        return announce(hook, within, **kwargs)

    # -------------------------------------------------------------- lifecycle

    def start_service(self) -> None:
        """Host the instance (:meth:`host_instance`), mark the task running, open its listeners.

        Idempotent while running. On failure the task is ``failed``, anything
        started is released (:meth:`release_instance`, then every listener
        opened is closed), ``kservice_task_failed`` is announced, and
        ServiceUnavailableError is raised with the cause chained.
        """
        with self._state_lock:
            if self._state in ("running", "starting"):
                return
            self._state = "starting"
            self._stop_done.clear()
            try:
                self.host_instance()
                # Running before the listeners open: a request arriving through one is served, not refused.
                self._state = "running"
                self.listeners = list(self.open_listeners())
            except BaseException as exc:  # noqa: BLE001 - the service's SystemExit too: the start failed, the task is not left starting
                self._state = "failed"
                self._teardown(time.monotonic())
                self._announce("kservice_task_failed", task=self, error=exc)
                if isinstance(exc, KeyboardInterrupt):
                    raise  # a Ctrl-C while starting stops the program, as anywhere else
                raise ServiceUnavailableError(
                    f"service {self.service_name!r} failed to start: {type(exc).__name__}: {exc}"
                ) from exc
            self.started_at = time.time()
            self._started_in = os.getpid()
            self._inherited_from = None
        self.addresses_changed()
        self._announce("kservice_task_started", task=self)

    # ------------------------------------------------ what a task kind implements
    #
    # A task kind (``services.<name>.kind``) subclasses BaseServiceTask and overrides
    # these public steps; the base class sequences them, owns ``state``, and announces
    # each lifecycle step to plugins. docs/guide-task-kind.md walks through one.

    def host_instance(self) -> None:
        """Bring the service instance up where this kind hosts it (the task is ``starting``).

        The default builds the instance in this process, calls its ``setup()``
        and starts the worker pool. A kind that hosts elsewhere (a child
        process, Ray actors) starts that host here and waits until it serves.
        Raise to fail the start: :meth:`release_instance` is then called to
        undo whatever was started, so it must cope with a partial start.
        Called with the task's state lock held; never sets ``state``.
        """
        if self._serial_lock is not None:
            # One at a time per instance: a call the last stop left running on the old instance
            # (a thread cannot be interrupted) holds the old lock, not this instance's.
            self._serial_lock = threading.Lock()
        self._service = self.service_factory.create()
        from ._aio import TaskLoop, call_lifecycle, method_kinds  # asyncio only where a service is hosted

        kinds = method_kinds(type(self._service))
        if kinds.needs_loop:
            self._aio = TaskLoop(self.service_name, self.max_concurrency)
        call_lifecycle(self._service, ("setup",), self._aio)
        self._methods = {}
        self._bind_method_kinds(self._service)
        self._compile_server_chain()
        self._pool = _WorkerPool(self, self.max_workers)

    def open_listeners(self) -> list[Listener]:
        """The listeners callers reach this task through, opened now (the task is already ``running``).

        The default opens one per name in ``transport_names`` (the kind's
        ``default_transports`` then the configured ``transports``). A kind whose
        host listens by itself returns listeners describing those addresses.
        A listener opened before a later one raises is closed by the failed start.
        """
        from ._plugins import get_transport

        listeners: list[Listener] = []
        try:
            for name in self.transport_names:
                listeners.append(get_transport(name).listen(self))
        except BaseException:
            self.listeners = listeners  # closed by the failed start's teardown
            raise
        return listeners

    def release_instance(self, deadline: float) -> None:
        """Stop hosting: let accepted calls finish until ``deadline`` (monotonic), then release the instance.

        Called once by :meth:`stop_service` (the task is ``stopping``, new calls
        are refused) and by a failed :meth:`start_service` (after a partial
        :meth:`host_instance`). The default drains the worker pool, answers what
        is still queued at ``deadline`` with ServiceUnavailableError (it never
        ran), closes the listeners and calls the service's ``cleanup()``/``close()``.
        It should not raise; if it does, the base class still closes every
        listener and ends the task ``stopped`` (the error is reported).
        """
        shutdown_stream_threads(self, deadline)
        if self._pool is not None:
            leftovers = self._pool.shutdown(deadline)
            self._pool = None
            for request, reply in leftovers:
                self._dequeued()
                reply(self._unavailable(request, "stopped before the request could run"))
        overflow = self._overflow_thread
        if overflow is not None and overflow is not threading.current_thread():
            overflow.join(1.0)  # it exits as soon as nothing is parked
        if self._aio is not None:
            self._aio.drain(deadline)
        # Before the instance's cleanup: no listener can run a request on a cleaned-up instance.
        self.close_listeners()
        aio, self._aio = self._aio, None
        if aio is not None:
            # Coroutine calls drain (up to the deadline) before an async cleanup runs on the same loop.
            instance = self._service
            aio.stop(
                deadline,
                (lambda: _lifecycle_coroutine(instance, ("cleanup", "close"))) if instance is not None else None,
            )
            self._service = None
        if self._service is not None:
            try:
                _call_lifecycle(self._service, ("cleanup", "close"))
            except BaseException:  # noqa: BLE001 - the task stops whatever the service's cleanup does (SystemExit too)
                pass
            self._service = None

    def report_status(self) -> ServiceStatus:
        """This kind's snapshot of state, health and load, before plugins add theirs.

        :meth:`get_service_status` calls it and then announces
        ``kservice_task_status`` once; a kind that hosts elsewhere asks its
        host here (and falls back to ``super().report_status()`` with
        ``healthy=False`` when the host cannot answer). Must not raise.
        """
        # Finished before started: a call between the two reads shows as in flight, never as negative.
        finished, failed, expired = _count(self._finished), _count(self._failed), _count(self._expired)
        started = _count(self._started)
        counts = (finished + expired, failed + expired, expired, started - finished, self._queued + self._parked_live)
        listeners_alive = all(listener.alive for listener in self.listeners)
        pool = self._pool
        workers_alive = None if pool is None else pool.alive
        deadlines = self._running_deadlines()
        running_until = max(deadlines) if deadlines and None not in deadlines else None  # type: ignore[type-var]
        reason = self.health_reason or ("" if listeners_alive else "a listener stopped receiving")
        if pool is not None and workers_alive is not None and workers_alive < pool.size:
            dead = f"{pool.size - workers_alive} of {pool.size} worker thread(s) are dead"
            reason = f"{reason}; {dead}" if reason else dead
        return ServiceStatus(
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
            addresses=[
                f"{a.transport}:{a.target if isinstance(a.target, str) else a.service_name}" for a in self.addresses
            ],
            workers_alive=workers_alive,
            running_until=running_until,
            workers_replaced=0 if pool is None else pool.replaced,
        )

    def _running_deadlines(self) -> list[float | None]:
        """The deadlines of the work running here now: the pool's calls, the loop's coroutines, the open streams.

        ``ServiceStatus.running_until`` is the latest: until then a caller
        still waits, so a task that completes nothing meanwhile is busy, not
        stuck (a stream of tokens, an ``async def`` call given a long
        timeout run outside the pool). A kind that runs calls elsewhere in
        this process adds theirs (a threaded Ray replica, in Ray's threads).
        """
        deadlines = list(self._open_streams.values())
        if self._pool is not None:
            deadlines += self._pool.running_deadlines()
        if self._aio is not None:
            deadlines += self._aio.running_deadlines()
        return deadlines

    def adopt_running(self) -> None:
        """Mark this task running around a host that already serves, started elsewhere (e.g. by another driver).

        For kinds whose host outlives its starter (Ray's ``RayServiceTask.attach``):
        the caller has found the host; this opens the listeners
        (:meth:`open_listeners`) and marks the task ``running`` without calling
        :meth:`host_instance` or announcing ``kservice_task_started`` (this
        process did not start it). :meth:`stop_service` then stops the host as
        usual. Raises ServiceUnavailableError, the task unchanged, unless it is
        ``created``.
        """
        with self._state_lock:
            if self._state != "created":
                raise ServiceUnavailableError(
                    f"service {self.service_name!r} is {self._state}: only a new task can adopt a host"
                )
            self._state = "running"
            try:
                self.listeners = list(self.open_listeners())
            except BaseException:
                self._state = "created"
                self.close_listeners()
                raise
            self.started_at = time.time()

    def close_listeners(self) -> None:
        """Close every listener of this task (one that raises does not stop the others); idempotent."""
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            try:
                listener.close()
            except Exception:  # noqa: BLE001 - a failing listener must not stop the others closing
                pass

    def _teardown(self, deadline: float) -> None:
        """Release the instance and close the listeners whatever either raises (never raises)."""
        try:
            self._refuse_parked("stopped before the request could run")
            self.release_instance(deadline)
        except Exception:  # noqa: BLE001 - teardown always completes; the error is reported
            log.exception("service %r: release_instance raised; the task stops anyway", self.service_name)
        finally:
            self.close_listeners()

    def _bind_method_kinds(self, instance: Any) -> None:
        from ._aio import method_kinds

        kinds = method_kinds(type(instance))
        self._async_methods = {name: getattr(instance, name) for name in kinds.coroutines}
        self._stream_methods = kinds.streaming
        self._generator_methods = {name: getattr(instance, name) for name in kinds.generators}

    @property
    def event_loop(self) -> TaskLoop | None:
        """The task's event loop (its coroutine methods run there), None when its service has none."""
        return self._aio

    def _plugins_changed(self) -> None:
        """Recompile the server chain of a running task (plugins or environment middleware changed)."""
        if self._state in ("starting", "running"):
            self._compile_server_chain()

    def _compile_server_chain(self) -> None:
        contributed = contributed_middleware(self.service_name, self.options, self.service_factory.service_class, None)
        chain = MiddlewareChain([*self.ctx.current_middlewares(), *contributed], "server")
        self._server_chain = chain if chain else None

    def stop_service(self, timeout: float | None = None) -> None:
        """Stop accepting calls, drain them (up to ``timeout`` seconds), release everything.

        Idempotent, and always completes: the task ends ``stopped`` with its
        workers, listeners and instance released whatever a plugin's
        ``kservice_task_stopping``/``kservice_task_stopped`` raises (reported as
        a RuntimeWarning naming the plugin) or the service's cleanup raises.
        Within ``timeout`` too when a plugin's hook hangs: the hooks' time counts
        against it (``kservice_task_stopping`` gets half of it at most, the drain
        the rest, ``kservice_task_stopped`` what is left; each at least
        ``MIN_HOOK_ALLOWANCE``), and one still running then is left running
        (reported the same way).
        A call while another stop is in progress waits for that stop to finish
        (up to ``timeout``). Requests waiting for room in a full queue are
        answered ServiceUnavailableError at once (they never ran).

        ``timeout`` (seconds; None for ``DEFAULT_STOP_TIMEOUT``) longer than
        ``STOP_TIMEOUT_MAX`` (about 146 years), or infinite, drains without limit; one that is no
        number (NaN, a bool, a string) raises ValueError or TypeError before
        anything stops, and the task keeps serving.

        In a process forked from the one that started the task, it only lets go
        of the service there: the service goes on serving where it runs, and
        its copy here is not cleaned up (see ``_forked``).
        """
        deadline = time.monotonic() + stop_timeout(timeout)
        if self._inherited_from is not None:
            self._let_go()
            return
        with self._state_lock:
            if self._state == "stopping":
                in_progress = True
            elif self._state == "stopped":
                return
            elif self._state in ("created", "failed"):
                self._state = "stopped"
                return
            else:
                in_progress = False
                self._state = "stopping"
        if in_progress:
            self._stop_done.wait(max(0.0, deadline - time.monotonic()))
            return
        try:
            # A plugin's hook counts against the stop's timeout, and gets half of it at most: one that
            # hangs is left running, and the drain still has the other half.
            self._announce("kservice_task_stopping", _hook_allowance(deadline, 0.5), task=self)
        finally:
            try:
                self._teardown(deadline)
            finally:
                with self._state_lock:
                    self._state = "stopped"
                self._stop_done.set()
                self.addresses_changed()
        self._announce("kservice_task_stopped", _hook_allowance(deadline, 1.0), task=self)

    def _forked(self) -> None:
        """In a child forked from this process: the service stays the parent's; the child has a copy of it.

        Its locks are new (another thread may have held them at the fork). A
        task running at the fork is *inherited*: the service runs in the
        process that started it, so stopping it here only lets go of it
        (:meth:`_let_go`). One whose instance ran in that process (``local``)
        stops serving here at once, its worker threads being there: calls
        from the child are refused naming that process (``_not_running``),
        never run on the child's copy of the instance nor left to wait for
        threads that did not come along. One hosted elsewhere (``process``)
        is still called at its host, which serves every process.
        """
        self._state_lock = threading.RLock()
        self._counter_lock = threading.Lock()
        self._room = threading.Condition(self._counter_lock)
        self._host_lock = threading.Lock()
        if self._inherited_from is None and self._state in ("starting", "running", "stopping"):
            self._inherited_from = self._started_in
        if self._inherited_from is None or not self.hosted_here or self._state == "stopped":
            return
        # What served here were threads of the parent: none of them exists in this process.
        self._state = "stopped"
        self._pool = None
        self._aio = None
        self._stream_deadlines = None
        self._overflow_thread = None
        self._parked.clear()
        self._parked_by_time.clear()
        self._parked_live = 0
        self._queued = 0
        self._stop_done = threading.Event()
        self._stop_done.set()

    def _let_go(self) -> None:
        """:meth:`stop_service` of an inherited task (see :meth:`_forked`): stopped here, left running where it runs.

        Nothing of the service is touched: no drain, no ``cleanup()`` of the
        copy of the instance, no stop hooks (the service did not stop), and
        its host is not told to stop. This process's callers find it stopped;
        :meth:`start_service` starts this process's own.
        """
        with self._state_lock:
            self._state = "stopped"
            self.listeners = []
        self.addresses_changed()

    def addresses_changed(self) -> None:
        """Tell the managers of this task's environment that its :attr:`addresses` changed; never raises.

        Each drops its route to the service (calls already sent on it still
        get their answers), so its next call resolves the service again: after
        a restart it reaches the new host at once, and while the task is
        stopped it fails at once with ServiceStoppedError. The base class calls
        it when the task starts and when it stops; a kind that moves its host
        while running (a respawned child process) calls it once the new
        listeners are in place.
        """
        environment = self.ctx.environment
        if environment is None:
            return
        try:
            environment._addresses_changed(self.service_name)
        except Exception:  # noqa: BLE001 - a manager's stale route is refreshed by its next failed call anyway
            log.exception("service %r: telling managers its addresses changed failed", self.service_name)

    def restart_listeners(self) -> int:
        """Restart listeners that stopped receiving; returns how many (health recovery)."""
        restarted = 0
        for listener in self.listeners:
            if not listener.alive:
                listener.restart()
                restarted += 1
        self.restarts += restarted
        return restarted

    @property
    def dead_workers(self) -> int:
        """Worker threads of this task's pool that are not alive (0 without a pool in this process)."""
        pool = self._pool
        return 0 if pool is None else pool.size - pool.alive

    def replace_dead_workers(self) -> int:
        """Start a new thread for every dead worker of the pool; returns how many (health recovery)."""
        pool = self._pool
        return 0 if pool is None else pool.replace_dead()

    def rebuild_service(self) -> None:
        """Replace the instance with a new one (health recovery); calls already running finish on the old one."""
        from ._aio import call_lifecycle

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

        The default restarts listeners that stopped receiving and replaces
        dead worker threads (the instance and its state are kept); only when
        every listener and worker was alive does it replace the service
        instance. Each listener restart and rebuild is counted in
        ``restarts``, each replaced worker in ``status.workers_replaced``. A task that is not running is left alone.
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
            dead = self.dead_workers
            replaced = self.replace_dead_workers() if dead else 0
            if dead and not replaced:
                # The threads are the problem: a new instance would not bring them back.
                return f"could not replace {dead} dead worker thread(s); will try again"
            if restarted or replaced:
                done = [f"restarted {restarted} listener(s)"] if restarted else []
                done += [f"replaced {replaced} dead worker thread(s)"] if replaced else []
                return "; ".join(done)
            self.rebuild_service()
            return "rebuilt the service instance"

    # ------------------------------------------------------------- the calls

    def submit(self, request: ServiceRequest, reply: Reply) -> None:
        """Queue ``request`` for a worker; ``reply`` gets the response exactly once. Never blocks.

        ``reply`` runs in the worker thread once the request ran, in the calling
        thread when the request is refused at once, or in the task's overflow
        thread (``kservice-<name>-overflow``) for a request that waited for room.
        The time the request ran (its wait in the queue excluded) feeds
        :meth:`method_cost`.

        A task that is not running answers at once with ServiceUnavailableError
        (ServiceStoppedError once stopped). A request meeting a full queue
        (``service.local.request_queue_size``) is parked, holding no thread:
        parked requests enter the queue in arrival order as room frees, and one
        still parked after ``service.local.queue_timeout`` seconds (or
        ``OVERLOAD_ANSWER_MARGIN`` before its deadline, whichever comes first)
        is answered ServiceOverloadedError. An overloaded request never ran,
        so retry policies may send it again.
        """
        pool = self._pool
        if self._state != "running" or pool is None:
            reply(self._not_running(request))
            return
        if self._async_methods:
            coroutine_method = self._async_methods.get(request.method_name)
            if coroutine_method is not None and self._aio is not None:
                self._aio.submit(self, request, coroutine_method, reply)
                return
        with self._counter_lock:
            full = self._queued >= self.queue_limit
            if full:
                refusal = self._park(request, reply)
            else:
                self._queued += 1
        if full:
            if refusal is not None:
                reply(refusal)
            return
        pool.put((request, reply))

    def _overloaded(self, request: ServiceRequest) -> ServiceResponse:
        """The refusal of a request the queue never took: it did not run (``MAY_HAVE_RUN`` False), and the
        service refused it at its admission limit (``AT_CAPACITY``)."""
        response = ServiceResponse.refusal(
            request.request_id,
            ServiceOverloadedError(
                f"service {self.service_name!r} is overloaded: {self._queued} requests queued "
                f"(service.local.request_queue_size={self.queue_limit}) and no room within "
                f"service.local.queue_timeout={self.queue_timeout:g}s"
            ),
        )
        response.metadata[AT_CAPACITY] = True  # the service answered: it is busy, not broken
        return response

    def _park(self, request: ServiceRequest, reply: Reply) -> ServiceResponse | None:
        """Holding the counter lock, the queue full: park ``request``; the refusal to send when it cannot wait."""
        now = time.time()
        until = now + self.queue_timeout
        if request.deadline is not None:
            until = min(until, request.deadline - OVERLOAD_ANSWER_MARGIN)
        if until <= now:
            return self._overloaded(request)
        entry = _Parked(request, reply, until)
        self._parked.append(entry)
        self._parked_live += 1
        heapq.heappush(self._parked_by_time, (until, next(self._parked_seq), entry))
        if self._overflow_thread is None:
            self._overflow_thread = threading.Thread(
                target=self._answer_overflow, name=f"kservice-{self.service_name}-overflow", daemon=True
            )
            self._overflow_thread.start()
        elif self._parked_by_time[0][2] is entry:
            self._room.notify()  # the overflow thread sleeps until a later time
        return None

    def _answer_overflow(self) -> None:
        """The overflow thread: answers parked requests whose wait ended; exits when none is parked."""
        by_time = self._parked_by_time
        while True:
            due: list[_Parked] = []
            with self._room:
                now = time.time()
                while by_time and by_time[0][0] <= now:
                    entry = heapq.heappop(by_time)[2]
                    if not entry.done:
                        entry.done = True
                        self._parked_live -= 1
                        due.append(entry)
                parked = self._parked
                while parked and parked[0].done:
                    parked.popleft()
                if not due:
                    if not by_time:
                        self._overflow_thread = None
                        return
                    self._room.wait(by_time[0][0] - now)
                    continue
            for entry in due:
                self._answer(entry, self._overloaded(entry.request))  # type: ignore[arg-type]

    def _answer(self, entry: _Parked, response: ServiceResponse) -> None:
        reply, entry.reply, entry.request = entry.reply, None, None
        try:
            reply(response)  # type: ignore[misc]
        except BaseException:  # noqa: BLE001 - one failing reply must not stop the others
            log.exception("service %r: answering a parked request failed", self.service_name)

    def _refuse_parked(self, why: str) -> None:
        """Answer every parked request ServiceUnavailableError (the task is stopping); they never ran."""
        with self._room:
            refused = [entry for entry in self._parked if not entry.done]
            for entry in refused:
                entry.done = True
            self._parked.clear()
            self._parked_by_time.clear()
            self._parked_live = 0
            self._room.notify()
        for entry in refused:
            self._answer(entry, self._unavailable(entry.request, why))  # type: ignore[arg-type]

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

    #: ``pull_stream(request, window)``: streaming call ``request`` as a source whose generator the consumer
    #: steps in its own thread, or None (then use :meth:`open_stream`). For in-process transports: the
    #: stream's counterpart of :meth:`run_inline` (a thread-safe service's generator whose first item was
    #: observed quick runs where it is read, with no thread hand-off; see :class:`PulledStream` for what
    #: changes, and when it moves to a stream thread). The function itself, not a method calling it: one
    #: call fewer on an in-process stream's open (first-item latency).
    pull_stream = pull_stream
    #: ``pull_items(manager, route, request, window)``: as :attr:`pull_stream`, the caller's iterator itself
    #: (a :class:`~kservice._stream.PulledItems`), for streams with no client middleware and no retry policy.
    pull_items = pull_items

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

    def refuse_waiting_on_own_loop(self, request: ServiceRequest) -> ServiceResponse | None:
        """The refusal of a sync call that would wait forever, or None: a blocking call made on this task's
        own event loop thread to one of its coroutine methods (which that loop must run, and the wait blocks).

        A client-side ``RuntimeError`` naming the call and saying to await it instead; nothing is sent.
        """
        aio = self._aio
        if aio is None or not aio.in_loop_thread or request.method_name not in self._async_methods:
            return None
        name, method = self.service_name, request.method_name
        error = RuntimeError(
            f"a sync call to {name}.{method} from a coroutine of {name} would wait forever: {method} runs on "
            f"{name}'s own event loop, which this call blocks; await manager.acall({name!r}, {method!r}, ...) instead"
        )
        return ServiceResponse.from_exception(request.request_id, error, origin="client")

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
        try:
            cost = self._method_cost.get(name)
        except TypeError:  # an unhashable name: execute() answers it, from the pool
            return None
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
        """Record that method ``name`` just ran for ``seconds`` (see :meth:`method_cost`).

        At most ``MAX_TRACKED_METHODS`` names are remembered: a name beyond
        them, or one that is not a str, is not recorded (its calls keep going
        to the pool), so callers cannot grow this state without bound.
        """
        previous = self._method_cost.get(name)
        if previous is None and (len(self._method_cost) >= MAX_TRACKED_METHODS or type(name) is not str):
            return
        # next_cost_estimate(previous, seconds, self.inline_limit), inlined: this runs on every call, and the
        # function call would cost ~45 ns of a ~3 µs in-process call (tests/core/test_inline.py pins them equal).
        # Pessimistic on a slow run (over inline_limit): the next calls go to the pool at once.
        if previous is None or seconds > self.inline_limit:
            self._method_cost[name] = seconds if previous is None or seconds > previous else previous
        else:
            self._method_cost[name] = previous * 0.75 + seconds * 0.25

    def _dequeued(self) -> None:
        """A worker took a request from the queue: the first parked request takes its place."""
        with self._counter_lock:
            self._queued -= 1
            if not self._parked:
                return
            admitted = None
            parked = self._parked
            while parked:
                entry = parked.popleft()
                if not entry.done:
                    entry.done = True
                    self._parked_live -= 1
                    self._queued += 1
                    admitted = (entry.request, entry.reply)
                    entry.request = entry.reply = None
                    break
        if admitted is None:
            return
        pool = self._pool
        if pool is not None:
            pool.put(admitted)  # type: ignore[arg-type]
            return
        # The pool is gone (stopped meanwhile): answered like the rest of the queue.
        with self._counter_lock:
            self._queued -= 1
        request, reply = admitted
        reply(self._unavailable(request, "stopped before the request could run"))  # type: ignore[misc, arg-type]

    def _not_running(self, request: ServiceRequest) -> ServiceResponse:
        """The refusal of a request that reached this task while it is not running (it never started).

        ServiceStoppedError when the task is stopped, failed or not started (a
        deliberate state: the caller learns at once, and retry policies leave
        it alone); ServiceUnavailableError while it is starting or stopping.
        """
        state = self._state
        if self._inherited_from is not None and state == "stopped":
            parent = self._inherited_from
            return ServiceResponse.refusal(
                request.request_id,
                ServiceStoppedError(
                    f"service {self.service_name!r} runs in process {parent}, which this process ({os.getpid()}) "
                    "was forked from: a forked process has a copy of the instance but none of the threads that "
                    f"serve it. Call it from process {parent}, start it in this process (start_service, or the "
                    "environment's start: an instance of this process's own), or host it with kind 'process' so "
                    "that every process calls the same instance; nothing was sent"
                ),
            )
        if state in ("stopped", "failed", "created"):
            return ServiceResponse.refusal(
                request.request_id,
                ServiceStoppedError(f"service {self.service_name!r} is {state}; start it to call it"),
            )
        return self._unavailable(request, f"service is {state}")

    def _unavailable(self, request: ServiceRequest, why: str) -> ServiceResponse:
        """A refusal of a request that never started (so any retry policy may send it again)."""
        return ServiceResponse.refusal(
            request.request_id, ServiceUnavailableError(f"service {self.service_name!r} is unavailable: {why}")
        )

    def execute(
        self,
        request: ServiceRequest,
        *,
        from_queue: bool = False,
        answer: Callable[[ServiceRequest, ServiceResponse], None] | None = None,
    ) -> ServiceResponse:
        """Run one request in the calling thread and return its response (never raises).

        Listeners of transports that can run a request where it arrives call
        this directly; the worker pool calls it for queued requests
        (``from_queue``: the queue depth is updated first).

        ``answer``, when given, is called once with ``request`` (as received)
        and the final response, after the after-hooks and the task's counts
        and before the server middleware's observers: a caller waiting for
        the answer does not wait for them (the observers still get the same
        response and duration, which excludes ``answer``). An exception
        ``answer`` raises propagates from here, after the observers ran.

        Every exception the method or a server middleware raises becomes an
        error response, ``BaseException`` included: SystemExit,
        KeyboardInterrupt and GeneratorExit raised by a method are its
        outcome (the caller gets ServiceCallError with ``remote_type``
        naming them), never the end of the thread that ran it. A
        KeyboardInterrupt from a real Ctrl-C that lands while a method runs in
        the main thread (an in-process call run inline) is therefore reported
        the same way, as a ServiceCallError. A method name that is not a
        ``str`` is answered MethodNotFoundError before any middleware sees it.
        """
        if from_queue:
            self._dequeued()
        received = request
        refusal = None
        if request.deadline is not None and time.time() > request.deadline:
            next(self._expired)
            refusal = deadline_response(request, started=False)
        elif type(request.method_name) is not str:
            refusal = self._refuse_method_name(request)
        if refusal is not None:
            if answer is not None:
                answer(received, refusal)
            return refusal
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
        except BaseException as exc:  # noqa: BLE001 - SystemExit & co. are the method's outcome, not the worker's end
            response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
        finally:
            _current_request.reset(token)
            if serial is not None:
                serial.release()
        observe_later = False
        if chain is not None:
            observe_later = answer is not None and chain.has_observers
            try:
                if observe_later:
                    response = chain.run_after_hooks(request, response, limit)
                else:
                    response = chain.run_after(request, response, limit, began)
            except BaseException as exc:  # noqa: BLE001 - an after-hook that raises past the chain's own guard
                response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
        next(self._finished)
        if not response.success:
            next(self._failed)
        if answer is None:
            return response
        if not observe_later:
            answer(received, response)
            return response
        seconds = perf_counter() - began
        try:
            answer(received, response)
        finally:
            try:
                chain.run_observers(request, response, limit, seconds)  # type: ignore[union-attr]
            except BaseException:  # noqa: BLE001 - observers only watch, past the chain's own guard too
                pass
        return response

    def run_many(
        self, request: ServiceRequest, args_list: tuple[Any, ...], budget: float, *, single: bool = False
    ) -> tuple[list[Any], dict[int, ServiceResponse]] | None:
        """Run ``request``'s method once per argument tuple of ``args_list``, in the calling thread, in order.

        The batch counterpart of :meth:`execute` for transports that carry many
        calls of one method together (``ServiceManager.map``): ``request``
        gives the method, the shared ``kwargs``, ``metadata`` and deadline (its
        ``args`` are ignored); its id names every failure. Returns None, having
        run nothing, when this cannot keep :meth:`execute`'s guarantees cheaply:
        the task is not running, a server middleware of the task does not
        implement the batch hooks (``MiddlewareChain.batch`` False: it must see
        each call), or a subclass overrides :meth:`handle_request`; the caller
        then runs the calls one by one.

        With a server chain of batch hooks, the calls that ran are reported
        to it once, as a :class:`CallBatch` (``after_handle_batch`` then
        ``observe_handle_batch``) with each call's own run time; an after
        batch hook that raises fails every one of them with its error (as a
        raising ``after_handle`` does its call). An unknown method is reported
        too (every call failed with MethodNotFoundError), as :meth:`execute`
        reports it to the per-call hooks.

        Otherwise returns ``(results, failures)``: the first ``len(results)``
        items were run (``results[i]`` is the result of item ``i``, None when it
        failed), ``failures`` maps the index of each failed item to its error
        response, built as :meth:`execute` builds it (every ``BaseException``
        the method raises is that item's outcome; an argument entry that is not
        a tuple fails its item with TypeError, not run; with ``single``, each
        entry is the call's one positional argument). The remaining items
        were not started: the deadline had passed before their turn, or the
        last item run took longer than ``budget`` seconds (the caller then
        hands the rest elsewhere). An unknown method fails every item with
        MethodNotFoundError, none run. Never raises.
        """
        chain = self._server_chain
        if (
            self._state != "running"
            or (chain is not None and not chain.batch)
            or type(self).handle_request is not _handle_request
        ):
            return None
        results: list[Any] = []
        failures: dict[int, ServiceResponse] = {}
        request_id = request.request_id
        name = request.method_name
        try:
            if type(name) is not str or name[:1] in ("_", ""):
                raise self._method_not_found(str(name))
            method = self._methods.get(name) or self._resolve_method(name)
        except MethodNotFoundError as exc:
            refusal = ServiceResponse.from_exception(request_id, exc, origin="runtime")
            for index in range(len(args_list)):
                failures[index] = refusal
                results.append(None)
            if chain is not None:
                self._report_batch(chain, request, len(results), failures, 0.0, [0.0] * len(results))
            return results, failures
        kwargs = request.kwargs
        deadline = request.deadline
        serial = self._serial_lock
        append = results.append
        clock = perf_counter
        # One clock read per call serves both checks: the deadline, moved to perf_counter's scale once.
        began = clock()
        end = began + (deadline - time.time()) if deadline is not None else float("inf")
        expired = 0
        # Each call's run time, for the batch hooks (only with a chain: one append per call).
        durations: list[float] | None = [] if chain is not None else None
        first = began
        token = _current_request.set(request)  # calls the method makes inherit the chunk's deadline and metadata
        try:
            if serial is None and not kwargs:
                expired = _run_items(
                    method, args_list, results, failures, request_id, began, end, budget, durations, single
                )
                args_list = ()  # run: the general loop below has nothing left to do
            for index, args in enumerate(args_list):
                if began > end:
                    expired = len(args_list) - index
                    break
                if serial is not None:
                    serial.acquire()
                try:
                    if single:
                        append(method(args, **kwargs))
                    elif type(args) is not tuple:
                        raise TypeError(f"item {index} of a chunk carries {type(args).__name__} arguments, not a tuple")
                    else:
                        append(method(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - as in execute(): the item's outcome, not the thread's end
                    append(None)
                    failures[index] = ServiceResponse.from_exception(request_id, exc, origin="service")
                finally:
                    if serial is not None:
                        serial.release()
                finished = clock()
                if durations is not None:
                    durations.append(finished - began)
                if finished - began > budget:
                    break
                began = finished
        finally:
            _current_request.reset(token)
        ran = len(results)
        if ran and type(results[0]) is CoroutineType:  # a method that returns coroutines returns them every time
            for index, result in enumerate(results):
                if type(result) is CoroutineType:
                    error = _returned_coroutine(self.service_name, name, result)
                    failures[index] = ServiceResponse.from_exception(request_id, error, origin="service")
                    results[index] = None
        if chain is not None and ran:
            failures = self._report_batch(chain, request, ran, failures, clock() - first, durations)
            for index in failures:
                results[index] = None
        # The statistics in bulk (started before finished: a status read between shows none in flight).
        for counter, count in (
            (self._started, ran),
            (self._finished, ran),
            (self._failed, len(failures)),
            (self._expired, expired),
        ):
            if count:
                collections.deque(itertools.islice(counter, count), maxlen=0)
        return results, failures

    def _report_batch(
        self,
        chain: MiddlewareChain,
        request: ServiceRequest,
        ran: int,
        failures: dict[int, ServiceResponse],
        seconds: float,
        durations: list[float] | None,
    ) -> dict[int, ServiceResponse]:
        """Tell the server chain's batch hooks about ``ran`` calls of a chunk; the failures after them."""
        batch = CallBatch(self.service_name, request.method_name, ran, request.request_id, request.metadata)
        batch.failures = failures
        batch.seconds = seconds
        batch.durations = durations
        try:
            chain.after_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - never raises by contract; if it did, the calls fail with it
            return {
                index: ServiceResponse.from_exception(request.request_id, exc, origin="service") for index in range(ran)
            }
        return batch.failures

    def _refuse_method_name(self, request: ServiceRequest) -> ServiceResponse:
        """The answer to a request whose method name is not a str (counted as a failed request)."""
        next(self._started)
        next(self._finished)
        next(self._failed)
        name = request.method_name
        error = MethodNotFoundError(
            f"service {self.service_name!r}: a method name must be a non-empty str, "
            f"not {type(name).__name__} {_short_repr(name)}"
        )
        return ServiceResponse.from_exception(request.request_id, error, origin="runtime")

    def _handling_failed(self, request: ServiceRequest, exc: BaseException) -> ServiceResponse:
        """The answer to a request whose handling raised past :meth:`execute` (a subclass's override)."""
        log.error(
            "service %r: handling request %s raised past execute()", self.service_name, request.request_id, exc_info=exc
        )
        return ServiceResponse.from_exception(
            request.request_id,
            ServiceError(
                f"service {self.service_name!r}: handling the request failed inside the runtime "
                f"({type(exc).__name__}); the call may or may not have run"
            ),
            origin="runtime",
        )

    def handle_request(self, request: ServiceRequest) -> Any:
        """Turn a request into a result: call the named public method. Subclasses may override.

        Raises MethodNotFoundError for unknown or private names; whatever the
        method raises reaches the caller as ServiceCallError.
        """
        method = self._methods.get(request.method_name)
        if method is None:
            method = self._resolve_method(request.method_name)
        kwargs = request.kwargs
        result = method(*request.args, **kwargs) if kwargs else method(*request.args)
        if type(result) is CoroutineType:
            raise _returned_coroutine(self.service_name, request.method_name, result)
        return result

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
        from difflib import get_close_matches  # error path only: a caller's start does not import it

        close = get_close_matches(name.lstrip("_"), public, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        message += f" (public methods: {', '.join(public) or 'none'})"
        return MethodNotFoundError(message)

    # ----------------------------------------------------------------- status

    def get_service_status(self) -> ServiceStatus:
        """A snapshot of state, health and load; plugins add to ``extra``.

        Never healthy while a listener or a worker thread is dead: a pool
        that lost threads says so in ``health_reason`` and ``workers_alive``.
        A plugin whose ``kservice_task_status`` raises, or has not returned
        within ``STATUS_HOOK_TIMEOUT`` seconds, is reported (a RuntimeWarning
        naming it) and the status is returned without its part (a copy, which
        the hook left running cannot change). ``queue_depth`` counts queued
        requests and those waiting for room.
        """
        status = self.report_status()
        if not self._announce("kservice_task_status", STATUS_HOOK_TIMEOUT, task=self, status=status):
            # A plugin's hook left running may still write into it: the caller gets a copy.
            status = copy.copy(status)
            status.extra = dict(status.extra)
        return status

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.service_name!r} {self._state}>"


#: The base implementation: :meth:`BaseServiceTask.run_many` calls methods directly only when a task keeps it.
_handle_request = BaseServiceTask.handle_request


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
            f"iterate manager.stream({service_name!r}, {method_name!r}, ...) or proxy.{method_name}.stream(...) instead "
            f"(from a shell: kservice call --stream {service_name} {method_name} ...)"
        )

    return refuse
