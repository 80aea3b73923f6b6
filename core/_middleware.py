"""ServiceMiddleware and the compiled chains that run it.

Ordering (both sides): before-hooks run in registration order, after-hooks in
reverse. A before-hook may return a replacement request, or a
ServiceResponse that answers the call without reaching the service (a cache,
an open breaker with a fallback); after-hooks of the middleware registered
before it still run. A before-hook that raises rejects the call with that
error. After-hooks see failures too, may return a replacement response, and
finish before the caller gets its result; an after-hook that raises turns the
response into that error and the remaining after-hooks still run. Observers
(``observe_call``/``observe_handle``) run last, with the final response and
the call's duration, and only for calls that reached their middleware; what
one raises is ignored. "Raises" means anything, ``BaseException`` included:
a hook's SystemExit or KeyboardInterrupt is its call's outcome (on the
caller's side, the caller gets that exception itself, as from a sync call),
never the end of the thread that ran the hook.

Threads: client hooks run in the calling thread for sync calls; for async
calls ``before_call`` runs in the calling thread and ``after_call`` in the
thread that completes the call (a transport's response thread, a worker, or
the timer thread for timeouts). Server hooks run in the thread that runs the
method, in the service's process (a worker, a listener, or an in-process
caller's own thread for a fast method).

Batch hooks (``admit_batch``, ``after_batch``, ``observe_batch`` on the
caller's side, ``after_handle_batch`` and ``observe_handle_batch`` on the
service's side) see a whole chunk of a map's calls at once (a
:class:`CallBatch`). A chain runs a chunk through them only when every
middleware of that side implements the batch form of each per-call hook it
has (``batch`` is then True); otherwise each call of the chunk goes through
the per-call hooks, as a single call does.
"""

from __future__ import annotations

import copy
import inspect
import linecache
from collections.abc import Callable, Iterable
from time import perf_counter, time
from typing import Any

from ._messages import MAY_HAVE_RUN, ServiceRequest, ServiceResponse

__all__ = ["CallBatch", "MiddlewareChain", "ServiceMiddleware"]

BeforeHook = Callable[[ServiceRequest], "ServiceRequest | ServiceResponse | None"]
AfterHook = Callable[[ServiceResponse, ServiceRequest], "ServiceResponse | None"]
ObserveHook = Callable[[ServiceRequest, ServiceResponse, float], None]


class CallBatch:
    """One chunk of a map's calls (``ServiceManager.map``), as the batch hooks see it.

    Built once per chunk, before it is sent (caller's side) or after its calls
    ran (service's side); the outcome fields are filled in before the
    after/observe batch hooks run. Attributes:

    - ``service_name``, ``method_name``: the calls' service and method.
    - ``count``: how many calls the chunk holds (caller's side), or how many of
      them ran here (service's side: calls not started before the deadline, or
      handed to the worker pool after a slow one, are not counted here; the
      pool runs each through the per-call hooks).
    - ``batch_id``: the chunk's id, unique per chunk (a breaker remembers a
      half-open probe by it).
    - ``metadata``: the metadata every call of the chunk carries (read only).
    - ``failures``: index (0-based, within the chunk) -> the failed call's
      ServiceResponse (``error_type``, ``error_origin``, ``metadata`` with
      ``kservice.MAY_HAVE_RUN``), exactly what a single call's after-hook would
      see; the calls not in it succeeded.
    - ``seconds``: caller's side, the chunk's round trip, from just before
      the first ``admit_batch`` to its answer (every call of the chunk is
      taken to have lasted that long); service's side, the time the calls
      took to run, end to end.
    - ``durations``: service's side, each call's own run time in seconds
      (index -> seconds, measured by the loop that runs them); None on the
      caller's side (the host answers a chunk in one record, so a call's own
      round trip is not known).
    - ``refused``: caller's side, the exception an ``admit_batch`` refused the
      chunk with (nothing was sent; every call fails with it, ``may_have_run``
      False); None otherwise.
    """

    __slots__ = (
        "batch_id",
        "count",
        "durations",
        "failures",
        "metadata",
        "method_name",
        "refused",
        "seconds",
        "service_name",
    )

    def __init__(
        self, service_name: str, method_name: str, count: int, batch_id: str, metadata: dict[str, Any] | None = None
    ) -> None:
        self.service_name = service_name
        self.method_name = method_name
        self.count = count
        self.batch_id = batch_id
        self.metadata: dict[str, Any] = metadata if metadata is not None else {}
        self.failures: dict[int, ServiceResponse] = {}
        self.seconds = 0.0
        self.durations: list[float] | None = None
        self.refused: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"<CallBatch {self.service_name}.{self.method_name} x{self.count} failed={len(self.failures)}"
            f"{' refused' if self.refused is not None else ''}>"
        )


class ServiceMiddleware:
    """Hooks around a call; override only what you need (the rest costs nothing).

    ``before_call``/``after_call``/``observe_call`` run in the caller's
    process, ``before_handle``/``after_handle``/``observe_handle`` in the
    service's process. After-hooks may take ``(response)`` as in the seed, or
    ``(response, request)``. Observers only watch (the final response and the
    duration); ``admit``/``on_refused`` refuse a call before it is built.
    """

    #: True while this middleware has nothing to do for a call that succeeds: its ``admit`` and
    #: ``before_call`` would return None and change nothing, and so would its ``after_call`` given
    #: a successful response. A middleware whose class sets it (a breaker that is closed and has
    #: counted no failure) keeps it up to date as its state changes, without a lock; the client
    #: chain then reads it instead of calling those hooks (one attribute read instead of three
    #: calls), and still calls ``after_call`` with every failed response. Observers, ``on_refused``
    #: and the batch hooks are not affected. A call racing with a change may take either path, as
    #: if it had finished just before or just after it.
    hooks_idle: bool = False

    def before_call(self, request: ServiceRequest) -> ServiceRequest | ServiceResponse | None:
        """Inspect or replace the request before it is sent; raise to reject the call."""
        return None

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        """Inspect or replace the response before the caller sees it."""
        return None

    def before_handle(self, request: ServiceRequest) -> ServiceRequest | ServiceResponse | None:
        """In the service's process, before the method runs."""
        return None

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        """In the service's process, after the method returned or raised."""
        return None

    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        """In the caller's process, after every after-hook: the final response and the attempt's duration.

        ``seconds`` runs from just before the first before-hook to just after
        the last after-hook (middleware and transport included), read once
        for every observer of the chain: cheaper than timing a call with a
        before/after pair and a table of start times. Observers cannot change
        the response; one that raises is ignored. A call answered or refused
        by a middleware registered earlier never reached this one and is not
        observed here (as with ``after_call``).
        """
        return None

    def observe_handle(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        """In the service's process, after every after-handle hook (as :meth:`observe_call`, method included)."""
        return None

    def admit(self, service_name: str, method_name: str) -> BaseException | None:
        """Fast refusal, in the caller's process, before the request is even built.

        Return an exception to refuse the call: the caller gets it raised (an
        async call, a failed Future) without a request, a chain or a retry,
        which makes a refusal cost about a microsecond (an open circuit
        breaker's flood). The manager only asks when every middleware of the
        chain that has an ``after_call`` also implements :meth:`on_refused`,
        so no middleware misses a call it expects to see; otherwise the call
        takes the normal path and ``before_call`` refuses it there.
        """
        return None

    def on_refused(self, service_name: str, method_name: str, error: BaseException) -> None:
        """Told, instead of ``after_call``/``observe_call``, about a call an :meth:`admit` refused (count it, log it)."""
        return None

    # ----------------------------------------------------------- batch hooks
    # The batch form of each per-call hook, for the chunks of ``ServiceManager.map``. A chunk takes
    # the compact path (one record, no request per call) only when every middleware of the chain
    # implements the batch form of each per-call hook it overrides on that side:
    # before_call -> admit_batch, after_call -> after_batch, observe_call -> observe_batch,
    # after_handle -> after_handle_batch, observe_handle -> observe_handle_batch (a server
    # middleware with a before_handle keeps the per-call path). Otherwise every call of the chunk
    # goes through the per-call hooks.

    def admit_batch(self, batch: CallBatch) -> BaseException | None:
        """Caller's process, once per chunk before it is sent: the batch form of ``before_call``.

        Return None to let every call of the chunk go, or an exception to
        refuse them all: nothing is sent, each call fails with (a copy of) it,
        ``may_have_run`` False, and is not retried (as a call ``admit``
        refused). Raising does the same with the raised exception (as a
        ``before_call`` that raises fails its call). Hooks run in chain order;
        after a refusal the later ones are not asked, and every batch hook of
        the chain is told of the refused chunk (``batch.refused`` set, as
        ``on_refused`` is told of a refused call). A chunk admitted here is
        reported to :meth:`after_batch`/:meth:`observe_batch` once, with the
        outcome of each call's first attempt (not if the map is cancelled or
        its manager closed first, as per-call after-hooks are not); a call
        retried after that is an ordinary call, through the per-call hooks.
        """
        return None

    def after_batch(self, batch: CallBatch) -> None:
        """Caller's process, once per chunk with its outcome: the batch form of ``after_call``.

        Runs in the thread that completes the chunk (the transport's response
        thread, or the manager's timer thread when the chunk timed out),
        before the retry policy looks at the failed calls; after-batch hooks
        run in reverse chain order. It cannot replace results; if it raises,
        every call of the chunk fails with that error (as a raising
        ``after_call`` turns its call's response into the error) and the later
        hooks see those failures.
        """
        return None

    def observe_batch(self, batch: CallBatch) -> None:
        """Caller's process, after every :meth:`after_batch`: the batch form of ``observe_call`` (one that raises is ignored)."""
        return None

    def after_handle_batch(self, batch: CallBatch) -> None:
        """Service's process, after the calls of a chunk ran in one loop: the batch form of ``after_handle``.

        ``batch.count`` calls ran (the pool runs any others per call). If it
        raises, every call counted in ``batch`` fails with that error (as a
        raising ``after_handle`` turns its call's response into the error).
        """
        return None

    def observe_handle_batch(self, batch: CallBatch) -> None:
        """Service's process, after every :meth:`after_handle_batch`: the batch form of ``observe_handle`` (one that raises is ignored)."""
        return None


def _fail_every(
    batch: CallBatch, error: BaseException, origin: Any, type_name: str | None, *, refused: bool = False
) -> dict[int, ServiceResponse]:
    """One failed response per call of ``batch``, each carrying its own copy of ``error``.

    Each caller raises (and annotates) its own exception, as with single calls;
    the description (message, type, traceback) is built once. ``refused``:
    nothing was sent, so ``MAY_HAVE_RUN`` is False on the response and on the
    exception when it has the attribute (a kservice error).
    """
    described = ServiceResponse.from_exception(batch.batch_id, error, origin=origin)
    if refused and hasattr(error, "may_have_run"):
        error.may_have_run = False
    failures: dict[int, ServiceResponse] = {}
    for index in range(batch.count):
        try:
            own = copy.copy(error)
            notes = getattr(own, "__notes__", None)
            if notes is not None:
                own.__notes__ = list(notes)  # each caller's note names its own item
        except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared
            own = error
        failures[index] = ServiceResponse(
            False,
            None,
            described.error,
            batch.batch_id,
            type_name or described.error_type,
            origin,
            described.remote_traceback,
            {MAY_HAVE_RUN: False} if refused else {},
            False,
            own,
        )
    return failures


def _register_source(source: str, side: str) -> str:
    """A file name for generated ``source``, its text registered in ``linecache`` (attrs' technique).

    Tracebacks, ``pdb`` and ``inspect.getsource`` then show the generated
    lines of a chain instead of blanks. The name is derived from the text, so
    chains of one shape (the source names hooks by position only) share one
    entry, and the cache stays bounded however often routes are recompiled.
    An entry whose modification time is None is kept by ``linecache.checkcache``.
    """
    digest = f"{hash(source) & 0xFFFFFFFFFFFF:012x}"  # names stay within this process, as linecache does
    filename = f"<kservice middleware chain {side} {digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return filename


def contributed_middleware(
    service_name: str, options: dict[str, Any], service_class: type | None, address: Any
) -> list[Any]:
    """What plugins contribute to ``service_name``'s chain (``kservice_middleware``), as one list.

    ``address`` is the caller's route's address (None on the service's side).
    Raises what ``call_hook`` raises, and PluginError naming the plugin whose
    answer is no middleware (``_plugins.check_answers``).
    """
    from ._plugins import _flatten, call_hook, check_answers

    asked = {"service_name": service_name, "options": options, "service_class": service_class, "address": address}
    contributed = call_hook("kservice_middleware", **asked)
    check_answers(
        "kservice_middleware",
        contributed,
        _is_middleware_answer,
        "the hook returns None, a kservice.ServiceMiddleware (or an object with its hook methods) or a list of them",
        f"for service {service_name!r}",
        **asked,
    )
    return _flatten(contributed)


def _is_middleware(value: Any) -> bool:
    if isinstance(value, ServiceMiddleware):
        return True
    return any(
        callable(getattr(value, name, None))
        for name in ("before_call", "after_call", "observe_call", "before_handle", "after_handle", "observe_handle")
    )


def _is_middleware_answer(answer: Any) -> bool:
    """Whether ``answer`` (one plugin's ``kservice_middleware`` answer, not None) is middleware or a list of it."""
    if isinstance(answer, (list, tuple)):
        return all(item is None or _is_middleware(item) for item in answer)
    return _is_middleware(answer)


#: Every per-call and batch hook a middleware may have, on both sides (see :meth:`MiddlewareChain.hook_methods`).
_HOOK_NAMES = (
    "admit",
    "before_call",
    "after_call",
    "observe_call",
    "on_refused",
    "admit_batch",
    "after_batch",
    "observe_batch",
    "before_handle",
    "after_handle",
    "observe_handle",
    "after_handle_batch",
    "observe_handle_batch",
)


def _overridden(middleware: Any, name: str) -> Callable[..., Any] | None:
    method = getattr(middleware, name, None)
    if method is None:
        return None
    base = getattr(ServiceMiddleware, name)
    if getattr(method, "__func__", None) is base:
        return None
    return method  # type: ignore[no-any-return]


def check_plain_hooks(middleware: Any) -> None:
    """Raise TypeError naming a hook of ``middleware`` that is ``async def``: hooks run inside the call, unawaited.

    Its coroutine would be its answer: a before- or after-hook's a TypeError
    at every call, an observer's silently never run.
    """
    for name in _HOOK_NAMES:
        method = _overridden(middleware, name)
        if method is not None and inspect.iscoroutinefunction(method):
            owner = type(middleware)
            raise TypeError(
                f"middleware {owner.__module__}.{owner.__qualname__}.{name} is async def: middleware hooks run "
                "inside the call, in the thread making or serving it, and are never awaited; make it a plain "
                "function (def), handing slow work to a thread or an event loop of your own"
            )


def _declares_idle(middleware: Any) -> bool:
    """Whether ``middleware`` maintains :attr:`ServiceMiddleware.hooks_idle` (its class, or the instance, sets it).

    Only those get the flag read per call; for the others it would be a read that is always False.
    """
    if "hooks_idle" in getattr(middleware, "__dict__", ()):
        return True
    return any("hooks_idle" in vars(cls) for cls in type(middleware).__mro__ if cls is not ServiceMiddleware)


def _as_after_hook(method: Callable[..., Any]) -> AfterHook:
    try:
        params = [
            p
            for p in inspect.signature(method).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return method
    if len(params) == 1 and params[0].kind != params[0].VAR_POSITIONAL:
        return lambda response, request: method(response)
    return method


def running_hooks(holder: object, hooks: Iterable[tuple[str, Callable[..., Any]]]) -> list[str]:
    """Which of ``hooks`` ("Class.hook", function) are running for ``holder`` now, as "Class.hook (in thread 'name')".

    A diagnosis for a call held past its deadline, never on a call's path: it
    reads every thread's stack (``sys._current_frames``) and finds the frames
    of those functions below a frame holding ``holder`` (the async call or the
    map chunk settling itself).
    """
    import sys
    import threading
    from types import FrameType

    labels: dict[Any, str] = {}
    for name, function in hooks:
        code = getattr(getattr(function, "__func__", function), "__code__", None)
        if code is not None:
            labels.setdefault(code, name)
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    found: list[str] = []
    for ident, innermost in sys._current_frames().items():
        hook: str | None = None
        frame: FrameType | None = innermost
        while frame is not None:
            label = labels.get(frame.f_code)
            if label is not None:
                hook = label  # the outermost of the hooks' frames so far
            elif hook is not None and any(value is holder for value in frame.f_locals.values()):
                found.append(f"{hook} (in thread {names.get(ident, ident)!r})")
                break
            frame = frame.f_back
    return found


class MiddlewareError(Exception):
    """Carries the index of the middleware whose before-hook raised, and the request it was given (internal)."""

    def __init__(self, index: int, error: BaseException, request: ServiceRequest) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error
        self.request = request


class MiddlewareChain:
    """One side's hooks of an ordered middleware list, compiled once.

    ``run_before(request)`` runs the before-hooks and returns (request to
    send, short-circuit response or None, after-hook limit); it raises
    MiddlewareError when a hook raises. ``run_after(request, response,
    limit, began)`` runs the after-hooks of middleware before ``limit``, last
    registered first, then their observers; ``began`` is the
    ``time.perf_counter()`` read just before ``run_before``. The same in two
    steps, for a side that answers between them (``BaseServiceTask.execute``
    with ``answer``): ``run_after_hooks(request, response, limit)`` (the
    after-hooks; the final response) and ``run_observers(request, response,
    limit, seconds)``; ``has_observers`` says whether the second has
    anything to run. ``run_sync(request, connection)`` is a sync call's
    whole attempt in one frame: ``run_before``, ``connection.call(request,
    seconds left before its deadline)`` unless a hook answered or raised,
    then ``run_after`` (a raising before-hook's error answers the call, as
    the manager turns a MiddlewareError into a response).

    A client chain compiles each of these functions the first time it is
    read: a caller's sync calls use ``run_sync`` (and ``admit``) only, and
    compiling the ones it never calls was a third of its first call. A
    server chain (built when its task starts) compiles the ones a task runs
    at once, so that a host does not compile while it answers its first call.
    """

    __slots__ = (
        "_admit_batches",
        "_after_batches",
        "_afters",
        "_befores",
        "_error_origin",
        "_names",
        "_observe_batches",
        "_observers",
        "_refused",
        "_sources",
        "admit",
        "batch",
        "has_before",
        "has_observers",
        "middlewares",
        "run_after",
        "run_after_hooks",
        "run_before",
        "run_observers",
        "run_sync",
        "size",
    )

    def __init__(self, middlewares: Iterable[Any], side: str) -> None:
        before_name, after_name, observe_name = (
            ("before_call", "after_call", "observe_call")
            if side == "client"
            else ("before_handle", "after_handle", "observe_handle")
        )
        # A client hook's error reaches the caller as raised; a server hook's travels like the method's.
        self._error_origin: Any = "client" if side == "client" else "service"
        self.middlewares = tuple(middlewares)
        self.size = len(self.middlewares)
        for middleware in self.middlewares:
            check_plain_hooks(middleware)
        befores: list[tuple[int, BeforeHook]] = []
        afters: list[tuple[int, AfterHook]] = []
        observers: list[tuple[int, ObserveHook]] = []
        for index, middleware in enumerate(self.middlewares):
            before = _overridden(middleware, before_name)
            if before is not None:
                befores.append((index, before))
            after = _overridden(middleware, after_name)
            if after is not None:
                afters.append((index, _as_after_hook(after)))
            observe = _overridden(middleware, observe_name)
            if observe is not None:
                observers.append((index, observe))
        self._befores = tuple(befores)
        self._afters = tuple(reversed(afters))
        self._observers = tuple(observers)
        # Fast refusal (client side): only when every middleware that sees outcomes hears of refusals too.
        admits = [(m.admit, index) for index, m in enumerate(self.middlewares) if _overridden(m, "admit") is not None]
        refused = [m.on_refused for m in self.middlewares if _overridden(m, "on_refused") is not None]
        hears = all(
            _overridden(self.middlewares[index], "on_refused") is not None for index, _ in (*afters, *observers)
        )
        self._refused = tuple(refused)
        self._compile_batch(side)
        #: whether ``run_before`` has any hook to run (callers skip it otherwise)
        self.has_before = bool(befores)
        #: whether ``run_observers`` has any observer to run
        self.has_observers = bool(observers)
        self._generate(tuple(admits) if side == "client" and admits and hears else (), side)
        if side != "client":
            for name in ("run_before", "run_after", "run_after_hooks", "run_observers"):
                getattr(self, name)  # compiled now: the task starts, no call waits

    #: ``admit(service_name, method_name)``: the refusal to raise, or None (None: no fast refusal here).
    admit: Callable[[str, str], BaseException | None] | None
    run_before: Callable[[ServiceRequest], tuple[ServiceRequest, ServiceResponse | None, int]]
    run_after: Callable[[ServiceRequest, ServiceResponse, int, float], ServiceResponse]
    run_after_hooks: Callable[[ServiceRequest, ServiceResponse, int], ServiceResponse]
    run_observers: Callable[[ServiceRequest, ServiceResponse, int, float], None]
    #: ``run_sync(request, connection)``: one attempt of a sync call through the chain and
    #: ``connection.call`` (the request must have a deadline); the final response, never raises
    #: what a hook raises
    run_sync: Callable[[ServiceRequest, Any], ServiceResponse]

    def __getattr__(self, name: str) -> Any:
        # Only for a generated function not read before (then it is a plain slot read): compile it.
        source = None if name.startswith("_") else self._sources.get(name)  # "_": no recursion before _generate
        if source is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        names = self._names
        exec(compile(source, _register_source(source, self._error_origin), "exec"), names)
        function = names[name]
        setattr(self, name, function)
        return function

    def _compile_batch(self, side: str) -> None:
        """Collect the batch hooks, and decide once whether chunks of a map may take them (``batch``).

        ``batch`` is True when every middleware implements the batch form of
        each per-call hook it overrides on this side (see ServiceMiddleware's
        batch hooks): then no middleware misses a call it expects to see. A
        server middleware with a ``before_handle`` has no batch form, so it
        keeps every chunk on the per-call path.
        """
        if side == "client":
            needs = {
                "before_call": ("admit_batch",),
                "admit": ("admit_batch",),
                "after_call": ("after_batch",),
                "observe_call": ("observe_batch",),
                "on_refused": ("after_batch", "observe_batch"),
            }
            admit_name, after_name, observe_name = "admit_batch", "after_batch", "observe_batch"
        else:
            needs = {
                "before_handle": (),
                "after_handle": ("after_handle_batch",),
                "observe_handle": ("observe_handle_batch",),
            }
            admit_name, after_name, observe_name = "", "after_handle_batch", "observe_handle_batch"
        capable = True
        for middleware in self.middlewares:
            for hook, forms in needs.items():
                if _overridden(middleware, hook) is not None and not any(
                    _overridden(middleware, form) is not None for form in forms
                ):
                    capable = False
        admits = [m.admit_batch for m in self.middlewares if admit_name and _overridden(m, admit_name) is not None]
        afters = [getattr(m, after_name) for m in self.middlewares if _overridden(m, after_name) is not None]
        observers = [getattr(m, observe_name) for m in self.middlewares if _overridden(m, observe_name) is not None]
        self._admit_batches: tuple[Callable[[CallBatch], BaseException | None], ...] = tuple(admits)
        self._after_batches: tuple[Callable[[CallBatch], None], ...] = tuple(reversed(afters))
        self._observe_batches: tuple[Callable[[CallBatch], None], ...] = tuple(observers)
        #: whether a map's chunks go through the batch hooks (decided here, once per chain)
        self.batch = capable

    def admit_batch(self, batch: CallBatch) -> BaseException | None:
        """Ask every ``admit_batch`` in chain order; the first refusal (returned or raised) refuses the chunk.

        On a refusal, ``batch.refused`` is set, ``batch.failures`` holds one
        failed response per call (each with its own copy of the exception,
        ``MAY_HAVE_RUN`` False), every after/observe batch hook is told, and
        the refusal is returned. None: the chunk may be sent.
        """
        for check in self._admit_batches:
            try:
                refusal = check(batch)
            except BaseException as exc:  # noqa: BLE001 - as a before_call that raises: the chunk fails with it
                refusal = exc
            if refusal is not None:
                batch.refused = refusal
                batch.failures = _fail_every(batch, refusal, "client", type(refusal).__name__, refused=True)
                self.after_batch(batch)
                return refusal
        return None

    def after_batch(self, batch: CallBatch) -> None:
        """Run the after-batch hooks (reverse chain order), then the observers; never raises.

        An after-batch hook that raises makes every call of ``batch`` fail with
        that error (``batch.failures`` replaced; the caller reads it after this
        returns); an observer that raises is ignored.
        """
        for hook in self._after_batches:
            try:
                hook(batch)
            except BaseException as exc:  # noqa: BLE001 - as a raising after-hook: the calls' outcome becomes the error
                batch.failures = _fail_every(batch, exc, self._error_origin, None)
        for observe in self._observe_batches:
            try:
                observe(batch)
            except BaseException:  # noqa: BLE001 - observers only watch
                continue

    def _refuse(self, service_name: str, method_name: str, answer: Any, index: int) -> BaseException:
        """Tell every ``on_refused`` listener about a fast refusal by middleware ``index``; returns the error raised.

        That is ``answer``, or, when the ``admit`` answered something that is no
        exception, a TypeError naming it.
        """
        error = answer if isinstance(answer, BaseException) else self._wrong_answer(index, "admit", answer)
        for tell in self._refused:
            try:
                tell(service_name, method_name, error)
            except Exception:  # noqa: BLE001 - a failing listener must not change the refusal
                pass
        return error

    def _wrong_answer(self, index: int, hook: str, outcome: Any) -> TypeError:
        """The error of a hook that answered something it does not return (the call fails with it)."""
        from ._plugins import _describe_value

        owner = type(self.middlewares[index])
        returns = (
            "None, the ServiceRequest to go on with, or a ServiceResponse to answer with"
            if hook.startswith("before")
            else "None, or the exception to refuse the call with"
            if hook == "admit"
            else "None or the ServiceResponse to go on with"
        )
        return TypeError(
            f"middleware {owner.__module__}.{owner.__qualname__}.{hook} returned {_describe_value(outcome)}; "
            f"it returns {returns}"
        )

    def __bool__(self) -> bool:
        return bool(self._befores or self._afters or self._observers)

    def hook_methods(self) -> list[tuple[str, Callable[..., Any]]]:
        """("Class.hook", bound method) of every per-call and batch hook this chain's middleware overrides."""
        return [
            (f"{type(middleware).__qualname__}.{name}", method)
            for middleware in self.middlewares
            for name in _HOOK_NAMES
            if (method := _overridden(middleware, name)) is not None
        ]

    def _generate(self, admits: tuple[tuple[Callable[[str, str], BaseException | None], int], ...], side: str) -> None:
        """Write :meth:`run_before`, :meth:`run_after` and ``admit`` as straight-line code for this chain's hooks.

        Generic loops cost ~40 ns per hook and a call's worth of tuple
        unpacking on every call; a chain is built once per route and task and
        then runs on every call, so its functions are generated once with one
        statement per hook (the technique of ``dataclasses``), each hook a
        name bound in the generated code's namespace. On the client side, the
        hooks of a middleware that keeps :attr:`ServiceMiddleware.hooks_idle` are
        guarded by a read of that flag. ``admit`` (the checks of ``admits``,
        each with its middleware's index, in order; the first refusal is told to every
        ``on_refused`` and returned; a check that raises admits the call) is
        generated only when given checks. The behaviour is the one the class
        and module docstrings state; ``tests/core/test_middleware.py`` pins it
        against a plain interpreter for any order and outcome of the hooks.
        """
        names: dict[str, Any] = {
            "MiddlewareError": MiddlewareError,
            "ServiceResponse": ServiceResponse,
            "from_exception": ServiceResponse.from_exception,
            "perf_counter": perf_counter,
            "time": time,
            "origin": self._error_origin,
            "refuse": self._refuse,
            "ServiceRequest": ServiceRequest,
            "wrong": self._wrong_answer,
        }
        before_name, after_name = (
            ("before_call", "after_call") if side == "client" else ("before_handle", "after_handle")
        )
        # Client middleware that keeps ServiceMiddleware.hooks_idle: its admit, before_call and after_call
        # of a success are skipped while it is idle (``idle_<index>`` is the middleware itself).
        idle: set[int] = set()
        if side == "client":
            for index, middleware in enumerate(self.middlewares):
                if _declares_idle(middleware):
                    idle.add(index)
                    names[f"idle_{index}"] = middleware
        admit = ["def admit(service_name, method_name):"]
        for index, (check, position) in enumerate(admits):
            names[f"check_{index}"] = check
            indent = "    "
            if position in idle:
                admit.append(f"    if not idle_{position}.hooks_idle:")
                indent = "        "
            admit += [
                f"{indent}try:",
                f"{indent}    error = check_{index}(service_name, method_name)",
                f"{indent}except BaseException:",  # a failing check decides nothing: the chain handles the call
                f"{indent}    return None",
                f"{indent}if error is not None:",
                f"{indent}    return refuse(service_name, method_name, error, {position})",
            ]
        admit.append("    return None")
        before = ["def run_before(request):"]
        for index, before_hook in self._befores:
            names[f"before_{index}"] = before_hook
            lines = [
                "    try:",
                f"        outcome = before_{index}(request)",
                "    except BaseException as exc:",
                f"        raise MiddlewareError({index}, exc, request) from exc",
                "    if outcome is not None:",
                "        if isinstance(outcome, ServiceResponse):",
                f"            return request, outcome, {index}",
                "        if not isinstance(outcome, ServiceRequest):",
                f"            raise MiddlewareError({index}, wrong({index}, '{before_name}', outcome), request)",
                "        request = outcome",
            ]
            if index in idle:
                lines = [f"    if not idle_{index}.hooks_idle:", *("    " + line for line in lines)]
            before += lines
        before.append(f"    return request, None, {self.size}")
        # run_sync: run_before, the transport's call and run_after in one frame (a sync call's whole
        # attempt). A before-hook that raises or answers ends the before-hooks (``break``); its
        # after-hooks and those of the middleware registered before it still run.
        sync = [
            "def run_sync(request, connection):",
            "    began = perf_counter()",
            "    request_id = request.request_id",
            f"    limit = {self.size}",
            "    response = None",
        ]
        if self._befores:
            sync.append("    while True:")
            for index, _ in self._befores:
                lines = [
                    "try:",
                    f"    outcome = before_{index}(request)",
                    "except BaseException as exc:",
                    "    response = from_exception(request_id, exc, origin=origin)",
                    f"    limit = {index}",
                    "    break",
                    "if outcome is not None:",
                    "    if isinstance(outcome, ServiceResponse):",
                    "        response = outcome",
                    f"        limit = {index}",
                    "        break",
                    "    if not isinstance(outcome, ServiceRequest):",
                    f"        response = from_exception(request_id, wrong({index}, '{before_name}', outcome), origin=origin)",
                    f"        limit = {index}",
                    "        break",
                    "    request = outcome",
                ]
                if index in idle:
                    lines = [f"if not idle_{index}.hooks_idle:", *("    " + line for line in lines)]
                sync += ["        " + line for line in lines]
            sync.append("        break")
        sync += [
            "    if response is None:",
            "        response = connection.call(request, request.deadline - time())",
        ]
        hooks: list[str] = []
        for index, after_hook in self._afters:
            names[f"after_{index}"] = after_hook
            hooks += [
                f"    if limit > {index} and (not response.success or not idle_{index}.hooks_idle):"
                if index in idle
                else f"    if limit > {index}:",
                "        try:",
                f"            outcome = after_{index}(response, request)",
                "        except BaseException as exc:",
                "            response = from_exception(request.request_id, exc, origin=origin)",
                "        else:",
                "            if outcome is not None:",
                "                if isinstance(outcome, ServiceResponse):",
                "                    response = outcome",
                "                else:",
                f"                    response = from_exception(request.request_id, wrong({index}, '{after_name}', outcome), origin=origin)",
            ]
        observing: list[str] = []
        for index, observer in self._observers:
            names[f"observe_{index}"] = observer
            observing += [
                f"    if limit > {index}:",
                "        try:",
                f"            observe_{index}(request, response, seconds)",
                "        except BaseException:",
                "            pass",
            ]
        sync += [
            *hooks,
            *(["    seconds = perf_counter() - began", *observing] if observing else []),
            "    return response",
        ]
        # Each function's text on its own, compiled when first read (see __getattr__).
        self._names = names
        self._sources = {
            "run_before": "\n".join(before) + "\n",
            "run_sync": "\n".join(sync) + "\n",
            "run_after": "\n".join(
                [
                    "def run_after(request, response, limit, began):",
                    *hooks,
                    *(["    seconds = perf_counter() - began", *observing] if observing else []),
                    "    return response",
                ]
            )
            + "\n",
            "run_after_hooks": "\n".join(
                ["def run_after_hooks(request, response, limit):", *hooks, "    return response"]
            )
            + "\n",
            "run_observers": "\n".join(
                ["def run_observers(request, response, limit, seconds):", *(observing or ["    pass"])]
            )
            + "\n",
        }
        if admits:
            self._sources["admit"] = "\n".join(admit) + "\n"
        else:
            self.admit = None
