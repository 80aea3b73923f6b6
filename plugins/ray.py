"""The ``ray`` transport: services hosted in Ray actors, one named actor per replica.

A service of kind ``ray`` runs as ``replicas`` Ray actors. Each actor hosts the
service instance in a :class:`BaseServiceTask` core, so deadlines, refusal of
private methods, server-side middleware and statistics behave exactly as in a
local task. Callers reach the actors through Ray's own actor calls (one
``ObjectRef`` per call; async calls are completed in batches by one thread per
process; no thread per call and no relay actor); a pluggable balancer spreads
calls over the live replicas. A call's envelope and a plain result travel as
bytes pickled by the standard library (Ray's cheapest path); values that need
Ray's own serializer (Ray handles, ``__main__`` classes, numpy buffers,
closures) go through it unchanged.

Actors are named ``kservice:<service>:<deployment>:<index>`` in the Ray
namespace ``service.ray.namespace``. ``<deployment>`` is unique per start, so
a task only ever talks to the actors it created; another driver connected to
the same cluster finds a running service by its name through
``ServiceManager`` (the ``kservice_resolve_service`` hook).

Ray is imported lazily: this module imports (and ``kservice plugins`` lists
it) without Ray installed; asking for a ``ray`` service then raises a
ConfigError naming the extra, ``pip install 'kservice[ray]'``.
"""

from __future__ import annotations

import collections
import inspect
import io
import itertools
import os
import pickle
import random
import secrets
import socket
import struct
import sys
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, Protocol, TypeAlias, cast

from kservice import (
    BaseServiceTask,
    Config,
    ConfigError,
    Connection,
    Listener,
    LocalStream,
    ServiceAddress,
    ServiceError,
    ServiceFactory,
    ServiceRequest,
    ServiceResponse,
    ServiceStatus,
    ServiceStoppedError,
    ServiceUnavailableError,
    Setting,
    StreamSink,
    StreamSource,
    TaskContext,
    Transport,
    hookimpl,
    idempotent_methods,
    keys,
    next_cost_estimate,
    timeout_response,
)

__all__ = [
    "ACTOR_PREFIX",
    "RAY_EXTRA_HINT",
    "PowerOfTwoChoices",
    "RayConnection",
    "RayServiceTask",
    "RayTransport",
    "ReplicaBalancer",
    "ReplicaView",
    "RoundRobin",
    "balancer_names",
    "register_balancer",
]

#: what to install when Ray is missing
RAY_EXTRA_HINT = "pip install 'kservice[ray]'"
#: every replica actor's name starts with this
ACTOR_PREFIX = "kservice:"
#: Ray concurrency group for status, readiness and shutdown calls, so they are
#: answered even when every request slot of the replica is busy
_CONTROL_GROUP = "kservice-control"


def _ray() -> ModuleType:
    """The ``ray`` module; ConfigError naming the extra when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"services of kind 'ray' need Ray, which is not installed: {RAY_EXTRA_HINT}") from exc
    return ray


def _ray_if_running() -> ModuleType | None:
    """The ``ray`` module when this process has already connected to a cluster, else None (never imports Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "is_initialized") or not ray.is_initialized():
        return None
    return ray


# ---------------------------------------------------------------------------
# Replica selection
# ---------------------------------------------------------------------------


class ReplicaView(Protocol):
    """What a balancer may read of a replica."""

    #: position of the replica in its deployment (stable across restarts)
    index: int
    #: calls this process has sent to the replica and not yet seen answered
    in_flight: int


class ReplicaBalancer(Protocol):
    """Chooses the replica of each call among the live ones.

    ``pick`` runs on every call, in the caller's thread, and must be cheap;
    ``live`` is never empty. One balancer object serves one service in one
    process (it may keep state, e.g. a counter).
    """

    def pick(self, live: Sequence[Any]) -> Any: ...


class PowerOfTwoChoices:
    """Two live replicas at random, the one with fewer calls in flight from this process wins."""

    def pick(self, live: Sequence[Any]) -> Any:
        count = len(live)
        if count == 1:
            return live[0]
        first = random.randrange(count)
        second = random.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = live[first], live[second]
        return a if a.in_flight <= b.in_flight else b


class RoundRobin:
    """Each live replica in turn."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(self, live: Sequence[Any]) -> Any:
        return live[next(self._next) % len(live)]


_balancers: dict[str, Callable[[], ReplicaBalancer]] = {
    "power_of_two": PowerOfTwoChoices,
    "round_robin": RoundRobin,
}


def register_balancer(name: str, factory: Callable[[], ReplicaBalancer]) -> None:
    """Make a replica-selection policy selectable as ``service.ray.balancer: <name>``.

    Plugins call this when imported. Registering a taken name with another
    factory raises ValueError.
    """
    existing = _balancers.get(name)
    if existing is not None and existing is not factory:
        raise ValueError(f"a replica balancer named {name!r} is already registered ({existing!r})")
    _balancers[name] = factory


def balancer_names() -> tuple[str, ...]:
    """Names accepted by ``service.ray.balancer``."""
    return tuple(sorted(_balancers))


def _make_balancer(name: str) -> ReplicaBalancer:
    factory = _balancers.get(name)
    if factory is None:
        raise ConfigError(f"service.ray.balancer: {name!r} is not one of {', '.join(map(repr, balancer_names()))}")
    return factory()


# ---------------------------------------------------------------------------
# Inside the actor
# ---------------------------------------------------------------------------


class _HostedTask(BaseServiceTask):
    """The service inside one replica actor: the core's request handling, no listeners.

    Requests run in the actor's own threads (Ray's ``max_concurrency``) by
    calling :meth:`execute`, so the worker pool is reduced to one idle thread.
    """

    kind: ClassVar[str] = "ray-replica"
    default_transports: ClassVar[tuple[str, ...]] = ()

    def __init__(self, service_factory: ServiceFactory, ctx: TaskContext, *, pooled: bool = False) -> None:
        super().__init__(service_factory, ctx)
        self.transport_names = ()
        #: whether sync methods run in the task's own worker pool (an async replica) rather than Ray's threads
        self.pooled = pooled

    def host_instance(self) -> None:
        if self.pooled:
            super().host_instance()
            return
        workers: int = self.max_workers
        self.max_workers = 1
        try:
            super().host_instance()
        finally:
            self.max_workers = workers


class _ReplicaHost:
    """The body of a replica actor (made a Ray actor class by :func:`_actor_class`).

    The constructor never raises: a service constructor that fails is reported
    by :meth:`ready`, so ``start_service`` can raise the original typed error
    instead of Ray's "actor died" message.
    """

    #: whether the hosted task runs sync methods in its own pool (see _AsyncReplicaHost)
    pooled: ClassVar[bool] = False

    def __init__(
        self,
        factory: ServiceFactory,
        config_data: Config,
        middlewares: tuple[Any, ...],
        environment_name: str,
        actor_name: str,
    ) -> None:
        self.actor_name = actor_name
        #: streams this replica serves, by request id (so a caller's cancel reaches them)
        self.streams: dict[str, StreamSink] = {}
        self.failure: ServiceResponse | None = None
        #: request ids of calls their callers cancelled before the replica reached them (see ``skip``)
        self.skipped: dict[str, bool] = {}
        self.task: _HostedTask | None = None
        try:
            ctx = TaskContext(environment_name, Config.load(config_data), middlewares)
            task = _HostedTask(factory, ctx, pooled=self.pooled)
            task.start_service()
            self.task = task
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, ServiceUnavailableError) and exc.__cause__ is not None else exc
            self.failure = ServiceResponse.from_exception("", cause, origin="service").for_wire()

    def handle(self, envelope: bytes | WireRequest) -> WireResponse:
        """Run one call; ``envelope`` and the answer use the forms of :func:`_to_wire` / :func:`_from_wire`.

        Never raises: every outcome, arguments that do not unpickle here
        included, is an answer the caller decodes.
        """
        request = self._request(envelope)
        if isinstance(request, ServiceResponse):
            return request
        began = time.perf_counter()
        return self._answer(self.task.execute(request), began)  # type: ignore[union-attr]

    def _request(self, envelope: bytes | WireRequest) -> ServiceRequest | ServiceResponse:
        """The request an envelope carries, or the wire answer refusing it (undecodable, replica not running)."""
        task = self.task
        if type(envelope) is bytes:
            try:
                envelope = pickle.loads(envelope)
            except Exception as exc:
                # The request id is unknown here; the caller fills it in.
                response = ServiceResponse.from_exception("", exc, origin="service")
                response.error = f"the arguments of the call could not be unpickled in replica {self.actor_name}: {_first_line(exc)}"
                return response.for_wire()
        request_id, method_name, args, kwargs, deadline, metadata = cast(WireRequest, envelope)
        service_name = task.service_name if task is not None else ""
        if task is None or not task.running:
            # Refused without running: the caller sends the call to another replica (see _REFUSED_KEY).
            state = "failed" if task is None else task.state
            refused = ServiceResponse.from_exception(
                request_id,
                ServiceUnavailableError(f"replica {self.actor_name} of service {service_name!r} is {state}"),
                origin="runtime",
            )
            refused.metadata = {_REFUSED_KEY: True}
            return refused.for_wire()
        if self.skipped and self.skipped.pop(request_id, False):
            skipped = ServiceResponse.from_exception(
                request_id, ServiceUnavailableError(f"call {service_name}.{method_name} was cancelled before it started"), origin="runtime"
            )
            skipped.metadata = {RETRYABLE_KEY: False}
            return skipped.for_wire()
        return ServiceRequest(request_id, service_name, method_name, args, kwargs, "", deadline, metadata)

    @staticmethod
    def _answer(response: ServiceResponse, began: float) -> WireResponse:
        """What travels back for ``response`` (see WireResponse)."""
        if response.success and not response.metadata and not response.degraded:
            packed = _pack(response.result)
            if packed is None:
                # A 1-tuple: Ray serializes the result itself (Ray handles, values needing cloudpickle, zero-copy buffers).
                return (response.result,)
            # The run time rides after the pickle (pickle.loads ignores what follows it): callers learn
            # which methods are fast enough to batch (see RayConnection) at no extra message.
            return packed + _COST.pack(time.perf_counter() - began)
        return response.for_wire()

    def handle_batch(self, envelopes: list[bytes]) -> list[WireResponse | _Stored]:
        """Run several calls one after the other (a caller's batch, see RayConnection); one answer each, in order.

        Never raises, and no call's outcome can fail another's: a result only
        Ray can serialize is stored on its own (``ray.put``), so one that
        cannot be stored at all fails its own call, not the whole batch's reply.
        """
        import ray

        answers: list[WireResponse | _Stored] = []
        for envelope in envelopes:
            answer: WireResponse | _Stored = self.handle(envelope)
            if type(answer) is tuple:
                try:
                    answer = _Stored(ray.put(answer[0]))
                except Exception as exc:
                    failed = ServiceResponse.from_exception("", exc, origin="service")
                    failed.error = f"the result could not be returned through Ray: {_first_line(exc)}"
                    answer = failed.for_wire()
            answers.append(answer)
        return answers

    def skip(self, request_ids: list[str]) -> None:
        """Calls whose callers cancelled them: not started if they have not been (a control call).

        For calls sent in a batch, which Ray cannot cancel one by one. Ids of
        calls that already ran are forgotten oldest first beyond
        ``_SKIPPED_KEPT``, so the set stays bounded.
        """
        skipped = self.skipped
        for request_id in request_ids:
            skipped[request_id] = True
        while len(skipped) > _SKIPPED_KEPT:
            skipped.pop(next(iter(skipped)), None)

    def handle_stream(self, envelope: bytes | WireRequest, window: int) -> Iterator[Any]:
        """Serve one stream (called with ``num_returns="streaming"``): its items, then one :class:`_StreamEnd`.

        A sync generator is stepped here, item by item, as Ray asks for the
        next (Ray's back-pressure, set to ``window`` by the caller, bounds how
        far ahead it runs); an async generator (an async replica) runs on the
        task's event loop. Ray cancelling this generator (the caller closed the
        stream) closes the service's generator: its ``finally`` runs. Never
        raises of its own; an item Ray cannot serialize fails this Ray task,
        which the caller reports as a TypeError.
        """
        request = self._request(envelope)
        if isinstance(request, ServiceResponse):
            yield _StreamEnd(request)
            return
        # The service's generator is stepped right here, in this Ray thread: no hand-off per item.
        collected = _CollectedItems()
        self.streams[request.request_id] = collected
        run = self.task.run_stream_here(request, collected)  # type: ignore[union-attr]
        try:
            while True:
                if run is not None:
                    run.pump(1)
                items = collected.take()
                for item in items:  # noqa: UP028 - not "yield from": Ray resumes its generators with send()
                    yield item
                if collected.response is not None:
                    yield _stream_end(request, collected.response)
                    return
                if run is None:
                    collected.wait(_STREAM_POLL)  # an async generator: made on the task's event loop
        finally:
            if run is not None:
                # Ray cancelled it (the caller closed the stream) or the stream ended: the generator is closed.
                run.abandon(ServiceResponse(True, None, None, request.request_id, metadata={"kservice.stream.closed": "cancelled"}))
            collected.cancel()
            self.streams.pop(request.request_id, None)

    def _open_local_stream(self, request: ServiceRequest, window: int) -> LocalStream:
        local = LocalStream(window)
        self.streams[request.request_id] = local
        self.task.open_stream(request, local)  # type: ignore[union-attr]
        return local

    def _close_local_stream(self, request_id: str, local: LocalStream) -> None:
        local.close()  # the service's generator stops (its finally runs) if it had not ended
        self.streams.pop(request_id, None)

    def cancel_stream(self, request_id: str) -> None:
        """The caller closed stream ``request_id`` early: stop the service's generator (control group)."""
        sink = self.streams.get(request_id)
        if sink is not None:
            sink.cancel()

    def ready(self) -> ServiceResponse:
        if self.failure is not None:
            return self.failure
        return ServiceResponse.ok("", self._info())

    def _info(self) -> dict[str, Any]:
        import ray

        return {
            "wire": WIRE_VERSION,
            "actor": self.actor_name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }

    def describe(self) -> dict[str, Any]:
        task = self.task
        if task is None:
            return {"idempotent": [], "class": "", **self._info()}
        return {
            "idempotent": sorted(_idempotent_methods(task.service_factory.service_class, task.options)),
            "class": task.service_factory.class_path,
            "max_concurrency": task.max_workers,
            **self._info(),
        }

    def check_health(self) -> Any:
        """The service's own ``check_health()`` outcome (None when it defines none)."""
        task = self.task
        if task is None:
            return f"the service failed to build: {self.failure.error if self.failure else 'unknown error'}"
        method = getattr(task.service, "check_health", None)
        return method() if callable(method) else None

    def status(self) -> dict[str, Any]:
        task = self.task
        if task is None:
            return {"state": "failed", "healthy": False, "health_reason": self.failure.error if self.failure else ""}
        return task.get_service_status().to_dict()

    def shutdown(self, timeout: float) -> None:
        """Stop the hosted task after the calls it is running finish (up to ``timeout`` seconds)."""
        task = self.task
        if task is None:
            return
        deadline = time.monotonic() + timeout
        task.stop_service(timeout)
        # Requests run in Ray's threads, not in the task's pool: wait for them here.
        while task.get_service_status().in_flight and time.monotonic() < deadline:
            time.sleep(0.01)


#: most cancelled request ids a replica remembers (see ``_ReplicaHost.skip``)
_SKIPPED_KEPT = 4096


class _AsyncReplicaHost(_ReplicaHost):
    """The body of a replica of a service with ``async def`` methods: a Ray async actor.

    Ray runs every method of such an actor on its event loop, so no call
    holds one of Ray's threads while it waits: a coroutine method is awaited
    on the hosted task's event loop (where its ``async def setup()`` ran too),
    a sync method runs in the task's worker pool, and the actor's handler
    awaits either. Ray cancelling the call (``ray.cancel`` of a caller that
    gave up) cancels the coroutine. Up to ``max_concurrency`` calls are in
    flight per replica, as for threaded replicas.
    """

    pooled: ClassVar[bool] = True

    async def handle(self, envelope: bytes | WireRequest) -> WireResponse:  # type: ignore[override]
        request = self._request(envelope)
        if isinstance(request, ServiceResponse):
            return request
        began = time.perf_counter()
        return self._answer(await self._submit(request), began)

    async def _submit(self, request: ServiceRequest) -> ServiceResponse:
        import asyncio

        task = self.task
        assert task is not None
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[ServiceResponse] = loop.create_future()

        def reply(response: ServiceResponse) -> None:
            loop.call_soon_threadsafe(_settle_future, answered, response)

        task.submit(request, reply)
        try:
            return await answered
        except asyncio.CancelledError:
            task.cancel_request(request.request_id)
            raise

    async def handle_stream(self, envelope: bytes | WireRequest, window: int) -> AsyncIterator[Any]:  # type: ignore[override]
        """:meth:`_ReplicaHost.handle_stream` on the actor's event loop (Ray cancelling it closes the stream)."""
        request = self._request(envelope)
        if isinstance(request, ServiceResponse):
            yield _StreamEnd(request)
            return
        local = self._open_local_stream(request, window)
        try:
            while True:
                items, end = await local.areceive(_STREAM_POLL)
                for item in items:
                    yield item
                if items:
                    local.consumed(len(items))
                if end is not None:
                    yield _stream_end(request, end)
                    return
        finally:
            self._close_local_stream(request.request_id, local)

    async def handle_batch(self, envelopes: list[bytes]) -> list[WireResponse | _Stored]:  # type: ignore[override]
        import asyncio

        answers = await asyncio.gather(*(self.handle(envelope) for envelope in envelopes))
        return [_stored_if_needed(answer) for answer in answers]


#: seconds a replica's stream generator waits for the service's next item before looking again
_STREAM_POLL = 0.5


class _CollectedItems(LocalStream):
    """A threaded replica's sink: items wait here for the Ray generator that steps the service's generator.

    Its window never fills (Ray's generator back-pressure is what bounds the
    stream); :meth:`take` hands over what was made.
    """

    def __init__(self) -> None:
        super().__init__(1 << 30)

    @property
    def response(self) -> ServiceResponse | None:
        return self._response

    def take(self) -> list[Any]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._unacknowledged -= len(items)
        return items

    def wait(self, timeout: float) -> None:
        with self._lock:
            if not self._items and self._response is None:
                self._wait_arrival(timeout)


class _StreamEnd:
    """The last object of a replica's stream: how it ended (a success carrying the item count, or the error)."""

    __slots__ = ("response",)

    def __init__(self, response: ServiceResponse) -> None:
        self.response = response

    def __reduce__(self) -> tuple[Any, ...]:
        return (_StreamEnd, (self.response,))


def _stream_end(request: ServiceRequest, end: ServiceResponse) -> _StreamEnd:
    end.request_id = request.request_id
    return _StreamEnd(end.for_wire())


def _settle_future(future: Any, response: ServiceResponse) -> None:
    if not future.done():
        future.set_result(response)


def _stored_if_needed(answer: WireResponse) -> WireResponse | _Stored:
    """A batched answer as it travels: a result only Ray can serialize is stored on its own (``ray.put``)."""
    if type(answer) is not tuple:
        return answer
    import ray

    try:
        return _Stored(ray.put(answer[0]))
    except Exception as exc:
        failed = ServiceResponse.from_exception("", exc, origin="service")
        failed.error = f"the result could not be returned through Ray: {_first_line(exc)}"
        return failed.for_wire()


#: the run time (seconds, little-endian double) after the pickle of a plain result
_COST = struct.Struct("<d")
#: what a replica speaks, in its ready/describe answers: 2 adds the run-time trailer and ``handle_batch``
#: (a deployment started by an older version answers without it, and its calls are never batched)
WIRE_VERSION = 2

#: the fields of a request as they travel: (request_id, method_name, args, kwargs, deadline, metadata)
WireRequest: TypeAlias = tuple[str, str, tuple[Any, ...], dict[str, Any], float | None, dict[str, Any]]
#: what comes back: bytes (a plain success, pickled by :func:`_pack`, then its run time), a 1-tuple (a plain success Ray
#: serialized), or the whole ServiceResponse (failures, and successes carrying metadata or marked degraded)
WireResponse: TypeAlias = "bytes | tuple[Any] | ServiceResponse"


@dataclass(frozen=True)
class _Stored:
    """A batched call's result that Ray stored on its own (see :meth:`_ReplicaHost.handle_batch`)."""

    ref: Any


class _RaySerializationNeeded(Exception):
    """Raised while pickling a value that only Ray's own serializer handles correctly."""


class _EnvelopePickler(pickle.Pickler):
    """The stdlib C pickler, refusing what Ray serializes differently.

    Ray moves a ``bytes`` argument or result as raw bytes, but a tuple, str or
    dict through msgpack plus cloudpickle, which costs about 10 µs per object
    on each side (measured: ``tests/benchmarks/bench_ray.py``); a call's
    envelope and result pickled here travel as bytes. Values this pickler
    could get wrong go through Ray instead: Ray handles (ObjectRefs and actor
    handles need Ray's reference counting), any type with a Ray or cloudpickle
    reducer (``ray.util.register_serializer`` included), classes and functions
    of ``__main__`` (cloudpickle sends them by value; the other side has
    another ``__main__``), and out-of-band buffers (numpy arrays: Ray avoids a
    copy). ``reducer_override`` runs only for objects that are not of a
    builtin type, so plain envelopes never call back into Python.
    """

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _ray_reduced_types():
            raise _RaySerializationNeeded(kind.__qualname__)
        module = getattr(obj if isinstance(obj, type) or callable(obj) else kind, "__module__", None)
        if module == "__main__" or (_by_value_modules and _pickled_by_value(module)):
            raise _RaySerializationNeeded(f"{kind.__qualname__} of {module}")
        return NotImplemented


def _by_value_module_names() -> set[str]:
    """Modules registered with ``cloudpickle.register_pickle_by_value`` (the live set; empty if unknown)."""
    try:
        from ray.cloudpickle import cloudpickle as vendored
    except ImportError:
        return set()
    names = getattr(vendored, "_PICKLE_BY_VALUE_MODULES", None)
    return names if isinstance(names, set) else set()


def _pickled_by_value(module: str | None) -> bool:
    while module:
        if module in _by_value_modules:
            return True
        module = module.rpartition(".")[0]
    return False


def _refuse_buffer(buffer: pickle.PickleBuffer) -> None:
    raise _RaySerializationNeeded("out-of-band buffer")


_ray_reduced: frozenset[type] = frozenset()
_ray_reduced_source: Any = None
_ray_reduced_size = -1


def _ray_reduced_types() -> frozenset[type]:
    """Types Ray's cloudpickle reduces its own way (read again when Ray registers another)."""
    global _ray_reduced, _ray_reduced_source, _ray_reduced_size, _by_value_modules
    source = _ray_reduced_source
    if source is None or len(source) != _ray_reduced_size:
        import copyreg

        from ray.cloudpickle import CloudPickler

        _by_value_modules = _by_value_module_names()

        table = CloudPickler.dispatch
        # Ray registers into the first map of cloudpickle's ChainMap; its size says when to read again.
        source = table.maps[0] if hasattr(table, "maps") else table
        _ray_reduced = frozenset(t for t in table if copyreg.dispatch_table.get(t) is not table[t])
        _ray_reduced_source, _ray_reduced_size = source, len(source)
    return _ray_reduced


_picklers = threading.local()
_by_value_modules: set[str] = set()


def _pack(value: Any) -> bytes | None:
    """``value`` pickled by :class:`_EnvelopePickler`, or None when Ray must serialize it (never raises)."""
    # One pickler per thread, reused (half the cost of a new one); taken out while in use, so a
    # __reduce__ that itself makes a call through this transport gets a fresh one.
    pair: tuple[io.BytesIO, _EnvelopePickler] | None = _picklers.__dict__.pop("pair", None)
    if pair is None:
        buffer = io.BytesIO()
        pair = (buffer, _EnvelopePickler(buffer, 5, buffer_callback=_refuse_buffer))
    buffer, pickler = pair
    try:
        pickler.dump(value)
        return buffer.getvalue()
    except Exception:
        # Not picklable here (or refused): Ray's serializer decides, and reports what it cannot handle.
        return None
    finally:
        buffer.seek(0)
        buffer.truncate()
        pickler.clear_memo()
        _picklers.pair = pair


#: What an empty kwargs / metadata travels as (see _to_wire): plain dicts, never changed.
_NO_KWARGS: dict[str, Any] = {}
_NO_METADATA: dict[str, Any] = {}


def _to_wire(request: ServiceRequest) -> bytes | WireRequest:
    # The service name is known to the replica. Empty dicts travel as plain ones: a request made
    # without kwargs or metadata may hold kservice's shared read-only empties (dict subclasses).
    kwargs = request.kwargs if request.kwargs else _NO_KWARGS
    metadata = request.metadata if request.metadata else _NO_METADATA
    fields = (request.request_id, request.method_name, request.args, kwargs, request.deadline, metadata)
    packed = _pack(fields)
    return fields if packed is None else packed


def _from_wire(request: ServiceRequest, answer: WireResponse) -> ServiceResponse:
    """The response ``answer`` (from :meth:`_ReplicaHost.handle`) stands for; never raises."""
    if type(answer) is bytes:
        try:
            return ServiceResponse(True, pickle.loads(answer), None, request.request_id)
        except Exception as exc:
            # E.g. the result's class is not importable in this process.
            response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
            response.error = f"the result of {request.service_name}.{request.method_name} could not be unpickled here: {_first_line(exc)}"
            return response
    if isinstance(answer, ServiceResponse):
        if not answer.request_id:
            answer.request_id = request.request_id
        return answer
    return ServiceResponse(True, answer[0], None, request.request_id)


def _has_async_methods(cls: type) -> bool:
    """Whether ``cls`` has ``async def`` methods or async generators (its replicas are Ray async actors)."""
    return any(
        inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member) for _, member in inspect.getmembers(cls)
    )


_actor_class_cache: Any = None
_async_actor_class_cache: Any = None
_actor_class_lock = threading.Lock()


def _actor_class(service_class: type | None = None) -> Any:
    """``ray.remote`` of the replica body for ``service_class``, built once per process.

    A service with coroutine methods (or async generators, or ``async def``
    setup/cleanup) gets :class:`_AsyncReplicaHost`, a Ray async actor; the
    others :class:`_ReplicaHost`, a threaded actor.
    """
    global _actor_class_cache, _async_actor_class_cache
    if service_class is not None and _has_async_methods(service_class):
        if _async_actor_class_cache is None:
            with _actor_class_lock:
                if _async_actor_class_cache is None:
                    _async_actor_class_cache = _ray().remote(concurrency_groups={_CONTROL_GROUP: 2})(_AsyncReplicaHost)
        return _async_actor_class_cache
    if _actor_class_cache is None:
        with _actor_class_lock:
            if _actor_class_cache is None:
                ray = _ray()
                _actor_class_cache = ray.remote(concurrency_groups={_CONTROL_GROUP: 2})(_ReplicaHost)
    return _actor_class_cache


def _idempotent_methods(service_class: type | None, options: dict[str, Any]) -> set[str]:
    """Methods declared safe to run twice: ``idempotent:`` config, ``@service(idempotent_methods=)``, ``@idempotent``."""
    return idempotent_methods(service_class, options.get("idempotent", ()))


# ---------------------------------------------------------------------------
# Caller side: replicas, errors
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Replica:
    """One replica actor as callers in this process see it."""

    index: int
    name: str
    handle: Any
    #: the bound ``handle`` method, and its variant that Ray retries across restarts
    send_once: Any = None
    send_retrying: Any = None
    #: the bound ``handle_batch`` method (at most once, like ``send_once``)
    send_batch: Any = None
    #: the control method that makes the replica skip calls of a batch it has not started (None: older replica)
    send_skip: Any = None
    #: calls this process has sent to the replica and not yet seen answered (each call of a batch counts)
    in_flight: int = 0
    #: actor calls (one call or one batch) this process has sent to the replica and not yet seen answered;
    #: kept at or below the set's ``capacity`` (the replica's max_concurrency), so none of them queues in the actor
    slots: int = 0
    #: False after a Ray failure until a readiness probe succeeds
    up: bool = True
    #: True once Ray reports the actor dead for good (restarts exhausted, killed)
    dead: bool = False
    #: taken out of rotation on purpose (scale-down, stop, or it answered that it is stopping): it
    #: finishes the calls it has and gets no new ones
    leaving: bool = False
    last_error: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    probing: bool = False


# Response metadata keys this transport sets (their contracts: kservice.keys).
RETRYABLE_KEY = keys.RETRYABLE
REPLICA_DOWN_KEY = keys.REPLICA_DOWN
MAY_HAVE_RUN_KEY = keys.MAY_HAVE_RUN
_REFUSED_KEY = keys.REPLICA_REFUSED


def _unavailable(request: ServiceRequest, message: str, *, retryable: bool = True) -> ServiceResponse:
    """ServiceUnavailableError for a call that never reached a replica (safe to re-send, unless not ``retryable``)."""
    response = ServiceResponse.from_exception(request.request_id, ServiceUnavailableError(message), origin="runtime")
    response.metadata = {MAY_HAVE_RUN_KEY: False} if retryable else {MAY_HAVE_RUN_KEY: False, RETRYABLE_KEY: False}
    return response


def _may_have_run(request: ServiceRequest, message: str, *, retryable: bool) -> ServiceResponse:
    """ServiceUnavailableError for a call that reached a replica and may have run (retryable only if idempotent)."""
    response = ServiceResponse.from_exception(request.request_id, ServiceUnavailableError(message), origin="runtime")
    response.metadata = {MAY_HAVE_RUN_KEY: True} if retryable else {MAY_HAVE_RUN_KEY: True, RETRYABLE_KEY: False}
    return response


_timed_out = timeout_response


def _cancelled(request: ServiceRequest) -> ServiceResponse:
    """The answer to a call cancelled while it waited in the caller: it never reached a replica."""
    return _unavailable(
        request, f"call {request.service_name}.{request.method_name} was cancelled before it was sent to a replica", retryable=False
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Waiting:
    """One call on its way to a replica: waiting in the caller for a free slot, or about to be sent.

    ``reply`` is None for a sync call: its own thread waits on ``grant`` and
    sends the call itself once a replica slot is reserved for it
    (``granted`` is then the replica) or reads its answer (``granted`` is a
    response: the call was refused without being sent).
    """

    __slots__ = ("batchable", "bulk", "cancelled", "envelope", "failovers", "grant", "granted", "idempotent", "reply", "request")

    def __init__(
        self,
        request: ServiceRequest,
        reply: Callable[[ServiceResponse], None] | None,
        envelope: bytes | WireRequest,
        idempotent: bool,
        batchable: bool,
    ) -> None:
        self.request = request
        self.reply = reply
        self.envelope = envelope
        self.idempotent = idempotent
        self.batchable = batchable
        self.failovers = 0
        #: one call of a map (``RayConnection.send_many``): it may leave in a larger batch
        self.bulk = False
        self.cancelled = False
        self.grant: Any = None
        self.granted: _Replica | ServiceResponse | None = None


#: Replicas and the calls to send them: (replica, calls) with one slot of the replica reserved per entry.
_Handouts: TypeAlias = "list[tuple[_Replica, list[_Waiting]]]"


class _ReplicaSet:
    """The replicas of one deployment, the balancer over them, the calls waiting for them, and failure tracking.

    Admission: this process sends each replica at most ``capacity`` actor
    calls at a time (its ``max_concurrency``; a batch is one actor call).
    A call that finds every live replica full waits here, in ``waiting``,
    and is handed to the first replica that frees a slot; several waiting
    calls of a fast method leave together as one batch. So nothing this
    process sends queues inside a replica: a replica that dies fails at most
    the actor calls it was running, and a waiting call, which provably never
    left, goes to another replica instead.

    ``live`` is rebuilt (copy on write) whenever a replica goes down, comes
    back, leaves or the set changes. A replica that fails a call with a Ray
    actor error leaves ``live`` and is probed with a readiness call that Ray
    holds until the actor has restarted: success brings it back, a final
    "actor died" marks it dead. Every state change happens under ``_lock``;
    actor calls are sent outside it.
    """

    def __init__(
        self,
        service_name: str,
        namespace: str,
        deployment: str,
        balancer: ReplicaBalancer,
        max_task_retries: int,
        idempotent: frozenset[str],
    ) -> None:
        self.service_name = service_name
        self.namespace = namespace
        self.deployment = deployment
        self.balancer = balancer
        self.max_task_retries = max_task_retries
        self.idempotent = idempotent
        #: actor calls this process keeps in flight per replica (the replicas' max_concurrency)
        self.capacity = 8
        #: most calls in one batch (0: no batching), and the run time under which a method may be batched
        self.batch_max = 64
        self.batch_cost_limit = 0.001
        #: most calls of a map (``ServiceManager.map``) in one batch: its calls are all waiting at once,
        #: so larger batches cost no caller any wait and save actor calls (never fewer than ``batch_max``)
        self.map_batch_max = 256
        #: each method's run time in the replica (smoothed; one slow run counts at once), from its answers
        self.method_cost: dict[str, float] = {}
        self.replicas: dict[int, _Replica] = {}
        #: the replicas' wire version (see WIRE_VERSION); below 2 nothing is observed or batched
        self.wire = 1
        #: ``handle_batch`` calls this process sent, and the calls they carried (under ``_lock``)
        self.batches_sent = 0
        self.batched_calls = 0
        self.live: tuple[_Replica, ...] = ()
        #: set when the owner stopped the service: new calls are answered with it
        self.closed_reason = ""
        #: calls waiting for a free slot, oldest first (cancelled ones stay until popped), and the
        #: not-cancelled ones by request id
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.queued: dict[str, _Waiting] = {}
        #: ObjectRefs of single async calls not answered yet, and the replica of batched ones (for ``cancel``)
        self.refs: dict[str, Any] = {}
        self.batched_to: dict[str, _Replica] = {}
        self._lock = threading.Lock()
        #: notified when slots free up while someone drains (``drain``)
        self._changed = threading.Condition(self._lock)
        self._draining = 0
        #: called (without the lock) when membership should be re-read (remote callers)
        self.on_all_down: Callable[[], None] | None = None

    # membership ----------------------------------------------------------

    def add(self, index: int, name: str, handle: Any, info: dict[str, Any] | None = None) -> _Replica:
        replica = _Replica(index, name, handle, info=dict(info or {}))
        replica.send_once = handle.handle
        # None on a replica of an older version (no such method; see WIRE_VERSION).
        replica.send_batch = getattr(handle, "handle_batch", None)
        skip = getattr(handle, "skip", None)
        replica.send_skip = skip.options(concurrency_group=_CONTROL_GROUP) if skip is not None else None
        # Ray re-runs these on the restarted actor; only idempotent methods use them.
        replica.send_retrying = handle.handle.options(max_task_retries=self.max_task_retries)
        with self._lock:
            self.replicas[index] = replica
            self._rebuild()
            handouts = self._dispatch()
        self._launch_all(handouts)
        return replica

    def remove(self, index: int) -> _Replica | None:
        """Forget a replica (gone from the cluster); calls already sent to it are still answered."""
        with self._lock:
            replica = self.replicas.pop(index, None)
            self._rebuild()
            stranded = self._strand()
        self._refuse_all(stranded)
        return replica

    def retire(self, leaving: Sequence[_Replica]) -> None:
        """Take ``leaving`` out of rotation for good: they get no new call and finish the ones they have."""
        with self._lock:
            for replica in leaving:
                replica.leaving = True
                if self.replicas.get(replica.index) is replica:
                    del self.replicas[replica.index]
            self._rebuild()
            stranded = self._strand()
        self._refuse_all(stranded)

    def drain(self, replicas: Sequence[_Replica], deadline: float, *, queue: bool = False) -> bool:
        """Wait until this process has no call in flight to ``replicas`` (and, with ``queue``, none waiting).

        Returns False when ``deadline`` (monotonic) passed first.
        """
        with self._lock:
            self._draining += 1
            try:
                while any(r.slots for r in replicas) or (queue and self.queued):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._changed.wait(min(remaining, 0.1))
                return True
            finally:
                self._draining -= 1

    def _rebuild(self) -> None:
        self.live = tuple(r for _, r in sorted(self.replicas.items()) if r.up and not r.dead and not r.leaving)

    def close(self, reason: str) -> None:
        """Refuse new calls with ServiceStoppedError(``reason``); calls already waiting are still sent."""
        with self._lock:
            self.closed_reason = reason

    def waiting_count(self) -> int:
        """Calls of this process waiting for a free replica slot."""
        return len(self.queued)

    # the per-call path ---------------------------------------------------

    def pick_for_stream(self) -> _Replica | None:
        """A live replica for a stream, chosen by the balancer, None when none is live.

        A stream takes no call slot: it may last long, and Ray's generator
        back-pressure (the stream's window) is what bounds it.
        """
        with self._lock:
            live = self.live
            if not live:
                return None
            return self.balancer.pick(live) if len(live) > 1 else live[0]

    def _free(self, live: tuple[_Replica, ...]) -> _Replica | None:
        """A live replica with a free slot, chosen by the balancer (holding the lock)."""
        capacity = self.capacity
        if len(live) == 1:
            only = live[0]
            return only if only.slots < capacity else None
        free = [r for r in live if r.slots < capacity]
        if not free:
            return None
        return self.balancer.pick(free) if len(free) > 1 else free[0]

    def admit(self, entry: _Waiting) -> _Replica | ServiceResponse | None:
        """Reserve a replica slot for ``entry``, or queue it (None), or refuse it (the response to give).

        A sync entry that is queued is granted its slot later through
        ``entry.grant``; an async one is sent by whoever frees the slot.
        """
        with self._lock:
            if self.closed_reason:
                return self._stopped(entry.request)
            live = self.live
            if live:
                if not self.queued:
                    if self.waiting:
                        self.waiting.clear()  # only cancelled leftovers
                    replica = self._free(live)
                    if replica is not None:
                        replica.slots += 1
                        replica.in_flight += 1
                        return replica
                if entry.reply is None and entry.grant is None:
                    # A sync caller waits on this; made here, under the lock the granting thread takes too.
                    entry.grant = _allocate_lock()
                    entry.grant.acquire()
                self.waiting.append(entry)
                self.queued[entry.request.request_id] = entry
                _backlogged.add(self)
                return None
            if entry.idempotent:
                # Ray holds calls retried across restarts until a restarting actor is back.
                restarting = [r for _, r in sorted(self.replicas.items()) if not r.dead and not r.leaving]
                if restarting:
                    replica = restarting[0]
                    replica.slots += 1
                    replica.in_flight += 1
                    return replica
        return self.no_replica(entry.request)

    def requeue(self, entry: _Waiting) -> None:
        """Send ``entry`` again (it provably did not run): first in line, to another replica."""
        with self._lock:
            if not self.live:
                refused = True
            else:
                refused = False
                self.waiting.appendleft(entry)
                self.queued[entry.request.request_id] = entry
                _backlogged.add(self)
                handouts = self._dispatch()
        if refused:
            self._answer(entry, self.no_replica(entry.request))
            return
        self._launch_all(handouts)

    def withdraw(self, entry: _Waiting) -> bool:
        """Take a queued entry out (its caller gave up); False when it was already handed a slot or answered."""
        with self._lock:
            if self.queued.pop(entry.request.request_id, None) is entry:
                entry.cancelled = True
                return True
            return False

    def release(self, replica: _Replica, calls: int = 1) -> None:
        """An actor call to ``replica`` carrying ``calls`` calls was answered: free its slot, hand it on."""
        with self._lock:
            replica.slots -= 1
            replica.in_flight -= calls
            if self._draining:
                self._changed.notify_all()
            if not self.queued:
                return
            handouts = self._dispatch()
        self._launch_all(handouts)

    def _dispatch(self) -> _Handouts:
        """Hand waiting calls to live replicas with a free slot (holding the lock); send them with ``_launch_all``."""
        handouts: _Handouts = []
        waiting, queued = self.waiting, self.queued
        while queued:
            replica = self._free(self.live) if self.live else None
            if replica is None:
                break
            entry = waiting.popleft()
            if entry.cancelled:
                continue
            del queued[entry.request.request_id]
            group = [entry]
            if entry.batchable and replica.send_batch is not None:
                limit = max(self.batch_max, self.map_batch_max) if entry.bulk else self.batch_max
                while waiting and len(group) < limit:
                    following = waiting[0]
                    if following.cancelled:
                        waiting.popleft()
                        continue
                    if not following.batchable:
                        break
                    waiting.popleft()
                    del queued[following.request.request_id]
                    group.append(following)
                if len(group) > 1:
                    self.batches_sent += 1
                    self.batched_calls += len(group)
            replica.slots += 1
            replica.in_flight += len(group)
            handouts.append((replica, group))
        if self._draining:
            self._changed.notify_all()
        return handouts

    def _strand(self) -> list[_Waiting]:
        """With no live replica left, take every waiting call out (holding the lock); refuse them with ``_refuse_all``."""
        if self.live or not self.queued:
            return []
        stranded = list(self.queued.values())
        self.queued.clear()
        self.waiting.clear()
        if self._draining:
            self._changed.notify_all()
        return stranded

    def _refuse_all(self, stranded: list[_Waiting]) -> None:
        if not stranded:
            return
        if self.on_all_down is not None:
            self.on_all_down()
        for entry in stranded:
            self._answer(entry, self.no_replica(entry.request, refresh=False))

    def _answer(self, entry: _Waiting, response: ServiceResponse) -> None:
        """Give ``entry`` its final response without sending it (a sync caller reads it from ``granted``)."""
        if entry.reply is not None:
            entry.reply(response)
        else:
            entry.granted = response
            entry.grant.release()

    def _launch_all(self, handouts: _Handouts) -> None:
        for replica, group in handouts:
            entry = group[0]
            if len(group) > 1:
                self._launch_batch(replica, group)
            elif entry.reply is None:
                entry.granted = replica
                entry.grant.release()
            else:
                self._launch(replica, entry)

    def _launch(self, replica: _Replica, entry: _Waiting) -> None:
        """Send one async call to ``replica`` (its slot is reserved); ``entry.reply`` gets its outcome."""
        request = entry.request
        try:
            ref = (replica.send_retrying if entry.idempotent else replica.send_once).remote(entry.envelope)
        except Exception as exc:
            entry.reply(_send_failure(request, exc))  # type: ignore[misc]
            self.release(replica)
            return
        request_id = request.request_id
        self.refs[request_id] = ref

        def done(answer: Any, error: BaseException | None) -> None:
            self.refs.pop(request_id, None)
            if error is None:
                self.observe(request.method_name, answer)
                response = _from_wire(request, answer)
                if response.metadata and response.metadata.get(_REFUSED_KEY):
                    self.release(replica)
                    self.refused(replica, entry)
                    return
                entry.reply(response)  # type: ignore[misc]
                self.release(replica)
                return
            response = self.translate(request, replica, error)
            self.release(replica)
            if self.should_fail_over(entry):
                entry.failovers += 1
                self.submit(entry)
                return
            entry.reply(response)  # type: ignore[misc]

        _completer().add(ref, done)

    def _launch_batch(self, replica: _Replica, batch: list[_Waiting]) -> None:
        """Send ``batch`` as one ``handle_batch`` call; each caller gets its own answer (at most once, like ``send_once``)."""
        try:
            ref = replica.send_batch.remote([entry.envelope for entry in batch])
        except Exception as exc:  # noqa: BLE001 - every call of the batch gets it
            for entry in batch:
                entry.reply(_unavailable(entry.request, f"Ray could not send a batch of calls to replica {replica.name}: {_first_line(exc)}"))  # type: ignore[misc]
            self.release(replica, len(batch))
            return
        batched_to = self.batched_to
        for entry in batch:
            batched_to[entry.request.request_id] = replica

        def done(answers: Any, error: BaseException | None) -> None:
            refused: list[_Waiting] = []
            for index, entry in enumerate(batch):
                request = entry.request
                batched_to.pop(request.request_id, None)
                if error is not None:
                    entry.reply(self.translate(request, replica, error))  # type: ignore[misc]
                    continue
                answer = answers[index]
                if type(answer) is _Stored:
                    try:
                        answer = (sys.modules["ray"].get(answer.ref),)
                    except Exception as exc:  # noqa: BLE001 - this call's result only
                        entry.reply(self.translate(request, replica, exc))  # type: ignore[misc]
                        continue
                self.observe(request.method_name, answer)
                response = _from_wire(request, answer)
                if response.metadata and response.metadata.get(_REFUSED_KEY):
                    refused.append(entry)
                    continue
                entry.reply(response)  # type: ignore[misc]
            self.release(replica, len(batch))
            for entry in refused:
                self.refused(replica, entry)

        _completer().add(ref, done)

    def submit(self, entry: _Waiting) -> None:
        """Send an async call now, or queue it for the next free slot, or answer it at once when it cannot be served."""
        admitted = self.admit(entry)
        if admitted is None:
            return
        if type(admitted) is _Replica:
            self._launch(admitted, entry)
        else:
            entry.reply(admitted)  # type: ignore[misc, arg-type]

    def submit_many(self, entries: list[_Waiting]) -> None:
        """Queue several async calls at once (``ServiceManager.map``) and hand them out: consecutive batchable
        ones leave together as ``handle_batch`` calls of up to ``batch_max``, one per free replica slot."""
        with self._lock:
            if self.closed_reason or not self.live:
                refuse = True
            else:
                refuse = False
                waiting, queued = self.waiting, self.queued
                if not queued and waiting:
                    waiting.clear()  # only cancelled leftovers
                for entry in entries:
                    waiting.append(entry)
                    queued[entry.request.request_id] = entry
                _backlogged.add(self)
                handouts = self._dispatch()
        if refuse:  # stopped, or no live replica: each call is answered as a single one would be
            for entry in entries:
                self.submit(entry)
            return
        self._launch_all(handouts)

    def cancel_many(self, requests: Sequence[ServiceRequest]) -> None:
        """:meth:`cancel` for several calls: waiting ones leave the queue, batched ones are skipped with one
        control call per replica, single ones are cancelled in Ray. Never blocks."""
        skips: dict[int, tuple[_Replica, list[str]]] = {}
        for request in requests:
            request_id = request.request_id
            with self._lock:
                entry = self.queued.pop(request_id, None)
                if entry is not None:
                    entry.cancelled = True
            if entry is not None:
                self._answer(entry, _cancelled(request))
                continue
            ref = self.refs.pop(request_id, None)
            if ref is not None:
                sys.modules["ray"].cancel(ref)
                continue
            replica = self.batched_to.get(request_id)
            if replica is not None and replica.send_skip is not None:
                skips.setdefault(id(replica), (replica, []))[1].append(request_id)
        for replica, request_ids in skips.values():
            try:
                replica.send_skip.remote(request_ids)
            except Exception:  # noqa: BLE001 - best effort: the calls then run and their answers are dropped
                pass

    def refused(self, replica: _Replica, entry: _Waiting) -> None:
        """``replica`` answered that it is stopping without running ``entry``: it leaves the rotation, the call goes elsewhere."""
        self.mark_leaving(replica)
        self.requeue(entry)

    def mark_leaving(self, replica: _Replica) -> None:
        """Take a replica that said it is stopping out of rotation (it finishes what it has)."""
        with self._lock:
            if not replica.leaving:
                replica.leaving = True
                replica.last_error = "stopping"
                self._rebuild()

    def cancel(self, request: ServiceRequest) -> None:
        """Stop ``request`` if it has not started: out of the queue if waiting, ``ray.cancel`` if sent alone.

        Never blocks. A waiting call is answered at once (cancelled, never
        sent); a single call already sent is cancelled in Ray (dropped if the
        replica has not started it; a running method is not interrupted); a
        call sent in a batch is skipped by the replica if it has not reached
        it yet.
        """
        request_id = request.request_id
        with self._lock:
            entry = self.queued.pop(request_id, None)
            if entry is not None:
                entry.cancelled = True
        if entry is not None:
            self._answer(entry, _cancelled(request))
            return
        ref = self.refs.pop(request_id, None)
        if ref is not None:
            sys.modules["ray"].cancel(ref)
            return
        replica = self.batched_to.get(request_id)
        if replica is not None and replica.send_skip is not None:
            try:
                replica.send_skip.remote([request_id])
            except Exception:  # noqa: BLE001 - best effort: the call then runs and its answer is dropped
                pass

    def _stopped(self, request: ServiceRequest) -> ServiceResponse:
        return ServiceResponse.from_exception(
            request.request_id, ServiceStoppedError(f"service {self.service_name!r} is unavailable: {self.closed_reason}"), origin="runtime"
        )

    def no_replica(self, request: ServiceRequest, *, refresh: bool = True) -> ServiceResponse:
        """The answer to a call no replica can take (it was never sent: retrying it later is safe).

        ``refresh``: let a remote caller re-read the membership first (``on_all_down``).
        """
        if self.closed_reason:
            return self._stopped(request)
        states = ", ".join(
            f"{r.name} {'dead' if r.dead else 'restarting'}" + (f" ({r.last_error})" if r.last_error else "")
            for _, r in sorted(self.replicas.items())
        )
        if refresh and self.on_all_down is not None:
            self.on_all_down()
        restarting = any(not r.dead and not r.leaving for r in self.replicas.values())
        # Dead for good (restarts used up): an immediate retry cannot help; health recovery replaces them.
        return _unavailable(
            request,
            f"service {self.service_name!r} has no live replica ({states or 'no replicas'})"
            + ("; retry later" if restarting else ""),
            retryable=restarting,
        )

    def observe(self, method_name: str, answer: Any) -> None:
        """Learn ``method_name``'s run time from a plain answer (the trailer :meth:`_ReplicaHost.handle` adds)."""
        if type(answer) is not bytes or len(answer) <= _COST.size or self.wire < 2:
            return
        seconds = _COST.unpack_from(answer, len(answer) - _COST.size)[0]
        self.method_cost[method_name] = next_cost_estimate(self.method_cost.get(method_name), seconds, self.batch_cost_limit)

    def batchable(self, method_name: str) -> bool:
        """Whether an async call of ``method_name`` that has to wait may leave in a batch with others (see RayConnection)."""
        if self.batch_max <= 1 or self.wire < 2:
            return False
        cost = self.method_cost.get(method_name)
        return cost is not None and cost < self.batch_cost_limit

    def should_fail_over(self, entry: _Waiting) -> bool:
        """Whether a failed call of an idempotent method goes to another replica (Ray already retried it on its own)."""
        if not entry.idempotent or entry.failovers >= len(self.replicas) or not self.live:
            return False
        remaining = entry.request.remaining()
        return remaining is None or remaining > 0

    # failures ------------------------------------------------------------

    def translate(self, request: ServiceRequest, replica: _Replica, exc: BaseException) -> ServiceResponse:
        """The response a caller gets for a Ray-level failure of ``request`` sent to ``replica``."""
        ray = sys.modules["ray"]
        exceptions = ray.exceptions
        what = f"{request.service_name}.{request.method_name}"
        if isinstance(exc, exceptions.GetTimeoutError):
            return _timed_out(request, 0.0)
        if isinstance(exc, exceptions.TaskCancelledError):
            # Only a cancelled call gets here, and its caller already has its answer; it may have been running.
            remaining = request.remaining()
            if remaining is not None and remaining <= 0:
                return _timed_out(request, 0.0)
            return _may_have_run(request, f"call {what} was cancelled on replica {replica.name}", retryable=False)
        if isinstance(exc, exceptions.RayActorError):
            self.mark_down(replica, exc)
            idempotent = request.method_name in self.idempotent
            # The call may have run: only an idempotent method may be sent again, by anyone.
            response = _may_have_run(
                request,
                f"replica {replica.name} of service {self.service_name!r} "
                + ("was stopped" if replica.leaving else "failed")
                + f" during call {what} ({_first_line(exc)}); the call may or may not have run"
                + ("" if idempotent else " (declare the method idempotent to have it retried on a restarted replica)"),
                retryable=idempotent,
            )
            with self._lock:
                others_up = any(r.up and not r.dead and r is not replica for r in self.replicas.values())
            if others_up or replica.leaving:
                # This replica is out of rotation already (a per-replica breaker, in effect), or leaving on
                # purpose: a service-wide circuit breaker must not open on it while others serve.
                response.metadata[REPLICA_DOWN_KEY] = replica.name
            return response
        if isinstance(exc, exceptions.RayTaskError):
            # The replica's handler never raises, so this is Ray failing to store or read the result.
            cause = getattr(exc, "cause", None) or exc
            response = ServiceResponse.from_exception(request.request_id, cause, origin="service")
            response.error = f"the result of {what} could not be returned through Ray: {_first_line(cause)}"
            return response.for_wire()
        return _may_have_run(request, f"call {what} to replica {replica.name} failed in Ray: {_first_line(exc)}", retryable=False)

    def mark_down(self, replica: _Replica, exc: BaseException) -> None:
        """Take ``replica`` out of rotation and probe it until it is back or known dead."""
        with self._lock:
            replica.last_error = _first_line(exc)
            replica.up = False
            self._rebuild()
            stranded = self._strand()
            probe = not (replica.probing or replica.dead or replica.leaving or self.closed_reason)
            if probe:
                replica.probing = True
        self._refuse_all(stranded)
        if not probe:
            return
        try:
            ready = replica.handle.ready.options(max_task_retries=-1, concurrency_group=_CONTROL_GROUP).remote()
        except Exception as probe_error:
            self._probed(replica, probe_error)
            return
        ready.future().add_done_callback(lambda done: self._probed(replica, _probe_error(done)))

    def _probed(self, replica: _Replica, error: BaseException | None) -> None:
        """A probe answered: ``error`` None brings the replica back, anything else marks it dead."""
        with self._lock:
            replica.probing = False
            if self.replicas.get(replica.index) is not replica:
                return
            if error is None:
                replica.up = True
                replica.last_error = ""
            else:
                replica.dead = True
                replica.last_error = _first_line(error)
            self._rebuild()
            handouts = self._dispatch()
            stranded = self._strand()
        self._launch_all(handouts)
        self._refuse_all(stranded)

    def snapshot(self) -> list[_Replica]:
        with self._lock:
            return [r for _, r in sorted(self.replicas.items())]


def _probe_error(done: Any) -> BaseException | None:
    """What a finished readiness probe says: None when the replica serves again."""
    error: BaseException | None = done.exception()
    if error is not None:
        return error
    answer = done.result()
    if isinstance(answer, ServiceResponse) and not answer.success:
        # Restarted, but its constructor raised this time.
        return RuntimeError(answer.error or "the service constructor failed on restart")
    return None


# ---------------------------------------------------------------------------
# Completing async calls
# ---------------------------------------------------------------------------


class _RefCompleter:
    """One thread per process that turns the ObjectRefs of async calls into callbacks, in batches.

    ``ref.future()`` costs a Future and a callback that a Ray thread runs
    under the GIL for every call, handing the GIL back and forth with the
    threads that submit calls; with thousands of calls in flight that, not
    Ray, bounded the call rate. Here one thread asks ``ray.wait`` about the
    oldest pending refs (between ``MIN_WINDOW`` and ``WINDOW`` of them, about
    twice as many as finished in the previous round), gathers whatever finishes within
    ``BATCH_WAIT`` seconds (returning at once when all of them have), fetches
    the batch with one ``ray.get`` and runs the callbacks.

    Guarantees: ``callback(answer, error)`` runs exactly once per ``add``, in
    this thread: ``error`` is None and ``answer`` the task's value, or
    ``error`` is what ``ray.get`` raises for that ref (actor died, task
    cancelled, ...). A call that finishes while others are in flight is
    reported up to ``BATCH_WAIT`` late; a lone call at once. When none of the
    oldest refs finishes within ``BATCH_WAIT`` they move behind the others, so
    long-running calls never hide finished ones for more than
    ``BATCH_WAIT * pending / WINDOW`` seconds. If Ray itself fails (e.g. it
    was shut down), every pending callback gets that error.
    """

    #: most refs asked about per ``ray.wait``: its cost grows with the count (about 0.4 µs each)
    WINDOW = 256
    #: fewest refs asked about per ``ray.wait`` (the window adapts between the two)
    MIN_WINDOW = 16
    #: seconds to let a batch accumulate while several calls are in flight
    BATCH_WAIT = 0.002

    #: seconds the thread stays without work before it exits (the next call starts another)
    IDLE_EXIT = 0.5

    def __init__(self, ray: ModuleType) -> None:
        self._ray = ray
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[tuple[Any, Callable[[Any, BaseException | None], None]]] = []
        self._soon: list[Callable[[], None]] = []
        self._idle = False
        self._running = False
        self._window = self.MIN_WINDOW

    def add(self, ref: Any, callback: Callable[[Any, BaseException | None], None]) -> None:
        with self._lock:
            self._incoming.append((ref, callback))
            self._wake_up()

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run ``function()`` in this thread before its next wait (within ``BATCH_WAIT`` s); exceptions are dropped."""
        with self._lock:
            self._soon.append(function)
            self._wake_up()

    def _wake_up(self) -> None:
        # Holding the lock.
        if not self._running:
            self._running = True
            threading.Thread(target=self._run, name="kservice-ray-completer", daemon=True).start()
        elif self._idle:
            self._idle = False
            self._wake.notify()

    def _run(self) -> None:
        # Insertion-ordered: the oldest refs first.
        pending: dict[Any, Callable[[Any, BaseException | None], None]] = {}
        while True:
            with self._lock:
                if not self._incoming and not pending and not self._soon:
                    self._idle = True
                    self._wake.wait(self.IDLE_EXIT)
                    self._idle = False
                    if not self._incoming and not self._soon:
                        # No thread lingers in a process that stopped calling.
                        self._running = False
                        return
                soon, self._soon = self._soon, []
            for function in soon:
                try:
                    function()
                except Exception:  # noqa: BLE001 - one failing function must not stop the completer
                    pass
            with self._lock:
                incoming, self._incoming = self._incoming, []
            for ref, callback in incoming:
                pending[ref] = callback
            if not pending:
                continue
            try:
                self._complete_some(pending)
            except Exception as exc:  # noqa: BLE001 - Ray itself failed: nothing pending can complete any more
                failed, pending = pending, {}
                for callback in failed.values():
                    _run_callback(callback, None, exc)

    def _complete_some(self, pending: dict[Any, Callable[[Any, BaseException | None], None]]) -> None:
        ray = self._ray
        window = list(itertools.islice(pending, self._window))
        if _calls_waiting():
            # Calls wait in this process for the slots these refs hold: hand each slot on as soon as it frees.
            ready, _ = ray.wait(window, num_returns=1, timeout=self.BATCH_WAIT, fetch_local=False)
            if ready and len(window) > 1:
                ready, _ = ray.wait(window, num_returns=len(window), timeout=0, fetch_local=False)
        else:
            ready, _ = ray.wait(window, num_returns=len(window), timeout=self.BATCH_WAIT, fetch_local=False)
        # Ask about twice what finished this time: enough to catch a batch, no more (ray.wait's cost grows
        # with it); after a round where nothing finished, about as many as allowed, to look past slow calls.
        self._window = min(self.WINDOW, max(self.MIN_WINDOW, 2 * len(ready))) if ready else self.WINDOW
        if not ready:
            if len(pending) > len(window):
                for ref in window:
                    pending[ref] = pending.pop(ref)
            return
        try:
            outcomes: list[tuple[Any, BaseException | None]] = [(value, None) for value in ray.get(ready)]
        except Exception:
            # At least one failed: ask each (all are ready, so this does not block).
            outcomes = []
            for ref in ready:
                try:
                    outcomes.append((ray.get(ref), None))
                except Exception as exc:  # noqa: BLE001 - delivered to the call's callback
                    outcomes.append((None, exc))
        for ref, (value, error) in zip(ready, outcomes, strict=True):
            _run_callback(pending.pop(ref), value, error)


#: replica sets that have had calls waiting for a slot since the completer last looked (see _calls_waiting)
_backlogged: set[Any] = set()


def _calls_waiting() -> bool:
    """Whether calls of this process wait in the caller for a replica slot (forgets sets whose queue emptied)."""
    if not _backlogged:
        return False
    for replicas in list(_backlogged):
        if replicas.queued:
            return True
        _backlogged.discard(replicas)
    return False


def _run_callback(callback: Callable[[Any, BaseException | None], None], value: Any, error: BaseException | None) -> None:
    try:
        callback(value, error)
    except Exception:  # noqa: BLE001 - a failing callback must not stop the completer
        pass


_completer_instance: _RefCompleter | None = None
_completer_lock = threading.Lock()


def _completer() -> _RefCompleter:
    global _completer_instance
    completer = _completer_instance
    if completer is None:
        with _completer_lock:
            if _completer_instance is None:
                _completer_instance = _RefCompleter(_ray())
            completer = _completer_instance
    return completer


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _DeploymentRef:
    """A deployment found by name in the cluster (another driver's service)."""

    namespace: str
    service_name: str
    deployment: str
    actor_names: tuple[str, ...]
    membership_refresh: float
    balancer: str
    max_task_retries: int
    batch_max: int
    batch_cost_limit: float


class RayConnection(Connection):
    """Calls one ray service's replicas through Ray's actor calls.

    Admission: this process keeps at most ``max_concurrency`` actor calls in
    flight per replica. A call that finds every live replica full waits in
    the caller (in the :class:`_ReplicaSet` shared by every connection of
    this process to the service) and goes to the first replica that frees a
    slot, like Ray Serve's router bounding ``max_ongoing_requests``. So a
    replica that dies fails at most the calls it was running; calls still
    waiting go to the other replicas, and with no live replica left they
    fail at once with ServiceUnavailableError (never sent, so retrying them
    is safe).

    ``send`` submits ``replica.handle(envelope)`` and hands the ObjectRef to
    the process's :class:`_RefCompleter`, which calls ``reply`` (no thread per
    call; up to ``_RefCompleter.BATCH_WAIT`` after the result arrives while
    other async calls are in flight). ``call`` waits with
    ``ray.get(ref, timeout=...)`` in the caller's thread. ``reply`` is called
    exactly once per ``send``. Ray failures become ServiceUnavailableError
    (replica died, node lost; marked "may have run", not retryable unless the
    method is idempotent) or ServiceTimeoutError; idempotent methods are
    re-run by Ray on a restarted replica and, if their replica is dead for
    good, sent once to another live replica. A replica that answers that it
    is stopping (a scale-down seen late by a caller in another driver) ran
    nothing: the call goes to another replica.

    Cancellation (``cancel``, called for a call whose caller timed out or
    cancelled it): a waiting call leaves the queue and never starts; a call
    sent alone is cancelled with ``ray.cancel`` (dropped if the replica has
    not started it; a running method is not interrupted and runs to its
    end); a call sent in a batch is skipped by the replica if it has not
    reached it yet.

    Batching: a Ray actor call costs a few hundred µs of CPU across the
    caller, the raylet and the actor whatever it carries. Async calls of a
    non-idempotent method that the replica reports running in under
    ``service.ray.batch_cost_limit`` s (every plain answer carries its run
    time) that had to wait for a slot leave together: a freed slot takes up
    to ``service.ray.batch_max`` consecutive such calls as one
    ``handle_batch`` call. The replica runs them in order and answers each,
    so every caller still gets exactly its own outcome, at most once. Sync
    calls, idempotent methods (Ray retries those per call), slow or not yet
    observed methods and calls whose arguments only Ray can serialize always
    travel alone.
    """

    def __init__(self, replicas: _ReplicaSet, *, refresh: Callable[[], None] | None = None, refresh_every: float = 0.0) -> None:
        self.replicas = replicas
        self.queue_name = f"ray:{replicas.namespace}/{ACTOR_PREFIX}{replicas.service_name}:{replicas.deployment}"
        self._ray = sys.modules["ray"]
        self._refresh = refresh
        self._refresh_every = refresh_every
        self._refresh_at = time.monotonic() + refresh_every if refresh is not None and refresh_every > 0 else float("inf")
        self._closed = False

    def _maybe_refresh(self) -> None:
        # Remote callers re-read membership now and then so a scale change by the owner reaches them.
        if time.monotonic() >= self._refresh_at and self._refresh is not None:
            self._refresh_at = time.monotonic() + self._refresh_every
            try:
                self._refresh()
            except Exception:
                pass

    def send(self, request: ServiceRequest, reply: Callable[[ServiceResponse], None]) -> None:
        if self._closed:
            reply(_unavailable(request, "the connection to this service was closed"))
            return
        self._maybe_refresh()
        replicas = self.replicas
        idempotent = request.method_name in replicas.idempotent
        envelope = _to_wire(request)
        batchable = not idempotent and type(envelope) is bytes and replicas.batchable(request.method_name)
        replicas.submit(_Waiting(request, reply, envelope, idempotent, batchable))

    def cancel(self, request: ServiceRequest) -> None:
        """Stop ``request`` if it has not started (see the class docstring); never blocks."""
        self.replicas.cancel(request)

    def send_many(self, requests: Sequence[ServiceRequest], reply: Callable[[ServiceResponse], None]) -> None:
        """Several async calls at once (``ServiceManager.map``): they queue together and leave in batches.

        Calls of a method not declared idempotent whose envelope is plain bytes
        leave as ``handle_batch`` actor calls of up to 256 calls (or
        ``service.ray.batch_max`` when larger), one per free replica slot; unlike single calls they are batched
        before the method's run time is known (the caller asked for many calls
        of one method), unless it is known to be slower than
        ``batch_cost_limit``. Each call keeps its own outcome and the at-most-once
        rule of ``send``; idempotent methods and calls only Ray can serialize
        travel alone.
        """
        if self._closed:
            for request in requests:
                reply(_unavailable(request, "the connection to this service was closed"))
            return
        self._maybe_refresh()
        replicas = self.replicas
        idempotent_methods = replicas.idempotent
        batching = replicas.batch_max > 1 and replicas.wire >= 2
        entries = []
        for request in requests:
            idempotent = request.method_name in idempotent_methods
            envelope = _to_wire(request)
            cost = replicas.method_cost.get(request.method_name)
            batchable = (
                batching and not idempotent and type(envelope) is bytes and (cost is None or cost < replicas.batch_cost_limit)
            )
            entry = _Waiting(request, reply, envelope, idempotent, batchable)
            entry.bulk = True
            entries.append(entry)
        replicas.submit_many(entries)

    def cancel_many(self, requests: Sequence[ServiceRequest]) -> None:
        """:meth:`cancel` for several calls (batched ones are skipped with one control call per replica)."""
        self.replicas.cancel_many(requests)

    def open_stream(self, request: ServiceRequest, window: int) -> StreamSource:
        """Stream ``request`` from one replica through a Ray streaming generator (``ObjectRefGenerator``).

        Ray's generator back-pressure holds the replica to ``window`` items
        the caller has not taken. A stream is never failed over to another
        replica once sent (it may have started).
        """
        if self._closed:
            raise ServiceUnavailableError(f"service {request.service_name!r} is unavailable: the connection was closed")
        self._maybe_refresh()
        replicas = self.replicas
        replica = replicas.pick_for_stream()
        if replica is None:
            return _RayStreamSource.failed(replicas.no_replica(request))
        return _RayStreamSource(self._ray, replica, request, window)

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        ray = self._ray
        if self._closed:
            return _unavailable(request, "the connection to this service was closed")
        self._maybe_refresh()
        replicas = self.replicas
        idempotent = request.method_name in replicas.idempotent
        entry = _Waiting(request, None, _to_wire(request), idempotent, False)
        give_up_at = time.monotonic() + max(timeout, 0.0)
        while True:
            admitted = replicas.admit(entry)
            if admitted is None:
                admitted = self._wait_for_slot(entry, give_up_at)
                if admitted is None:
                    return _timed_out(request, timeout)
            if type(admitted) is not _Replica:
                return admitted  # type: ignore[return-value]
            replica: _Replica = admitted
            try:
                ref = (replica.send_retrying if idempotent else replica.send_once).remote(entry.envelope)
            except Exception as exc:
                replicas.release(replica)
                return _send_failure(request, exc)
            try:
                answer = ray.get(ref, timeout=max(give_up_at - time.monotonic(), 0.0))
            except ray.exceptions.GetTimeoutError:
                # Drops the task if it is still queued on the replica; Ray does not interrupt a running one,
                # so the slot is freed when the replica is done with it.
                ray.cancel(ref)
                _completer().add(ref, lambda _answer, _error: replicas.release(replica))  # noqa: B023 - the loop ends: returns below
                return _timed_out(request, timeout)
            except Exception as exc:
                response = replicas.translate(request, replica, exc)
                replicas.release(replica)
                if not replicas.should_fail_over(entry):
                    return response
                entry.failovers += 1
                continue
            replicas.observe(request.method_name, answer)
            response = _from_wire(request, answer)
            replicas.release(replica)
            if response.metadata and response.metadata.get(_REFUSED_KEY):
                replicas.mark_leaving(replica)
                continue
            return response

    def _wait_for_slot(self, entry: _Waiting, give_up_at: float) -> _Replica | ServiceResponse | None:
        """Wait (until ``give_up_at``) for the queued sync ``entry`` to be granted a slot; None on timeout."""
        grant = entry.grant
        if not grant.acquire(True, max(give_up_at - time.monotonic(), 0.0)):
            if self.replicas.withdraw(entry):
                return None
            grant.acquire()  # granted or answered meanwhile: the releasing thread is about to release it
        granted = entry.granted
        entry.granted = None
        if type(granted) is _Replica and time.monotonic() >= give_up_at:
            self.replicas.release(granted, 1)
            return None
        return granted

    def remote_status(self) -> dict[str, Any]:
        """The service's status as its replicas report it (for callers outside the owning environment)."""
        return _aggregate_status(self.replicas, "running" if self.replicas.live else "failed", "ray").to_dict()

    def close(self) -> None:
        """Refuse new calls through this connection; calls already sent or waiting are still answered."""
        self._closed = True


class _RayStreamSource(StreamSource):
    """The caller's end of one stream from a replica (see :meth:`RayConnection.open_stream`)."""

    def __init__(self, ray: ModuleType | None, replica: _Replica | None, request: ServiceRequest, window: int) -> None:
        self._ray = ray
        self._replica = replica
        self._request = request
        self._failed: ServiceResponse | None = None
        self._generator: Any = None
        if replica is None:
            return
        try:
            self._generator = replica.handle.handle_stream.options(
                num_returns="streaming", _generator_backpressure_num_objects=window
            ).remote(_to_wire(request), window)
        except Exception as exc:
            self._failed = _send_failure(request, exc)

    @classmethod
    def failed(cls, response: ServiceResponse) -> _RayStreamSource:
        source = cls(None, None, ServiceRequest(response.request_id, "", ""), 1)
        source._failed = response
        return source

    def receive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        if self._failed is not None:
            failed, self._failed = self._failed, None
            return [], failed
        generator = self._generator
        if generator is None:
            return [], None
        ray = self._ray
        assert ray is not None
        # One item per receive: asking Ray whether more are ready costs as much as waiting for one.
        wait = _STREAM_POLL if timeout is None else max(0.0, min(timeout, _STREAM_POLL))
        try:
            ref = generator._next_sync(timeout_s=wait)
        except StopIteration:
            return [], self._broken("the replica's stream ended without its last record")
        if ref.is_nil():
            return [], None
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            # The replica's stream generator raises nothing of its own: Ray failed to serialize an item.
            self._generator = None
            error = TypeError(
                f"an item of stream {self._request.service_name}.{self._request.method_name} cannot be sent to the "
                f"caller: Ray could not serialize it ({type(exc.cause).__name__}: {_first_line(exc.cause)}); the stream ends here"
            )
            return [], ServiceResponse.from_exception(self._request.request_id, error, origin="service", with_traceback=False)
        except Exception as exc:
            return [], self._broken(f"{type(exc).__name__}: {_first_line(exc)}")
        if type(value) is _StreamEnd:
            self._generator = None
            return [], value.response
        return [value], None

    def _broken(self, why: str) -> ServiceResponse:
        self._generator = None
        replica = self._replica
        where = f" (replica {replica.name})" if replica is not None else ""
        response = ServiceResponse.from_exception(
            self._request.request_id,
            ServiceUnavailableError(f"stream {self._request.service_name}.{self._request.method_name} broke{where}: {why}"),
            origin="runtime",
        )
        response.metadata = {RETRYABLE_KEY: False}  # it may have run
        return response

    def consumed(self, count: int) -> None:
        pass  # Ray counts what the caller took from the generator

    def close(self) -> None:
        generator, self._generator = self._generator, None
        replica = self._replica
        if generator is None or replica is None:
            return
        try:
            # Stops the replica's generator even while it waits on Ray's back-pressure (its finally runs);
            # the cancel record stops a service generator running elsewhere in the replica.
            self._ray.cancel(generator)  # type: ignore[union-attr]
            replica.handle.cancel_stream.options(concurrency_group=_CONTROL_GROUP).remote(self._request.request_id)
        except Exception:  # noqa: BLE001 - the replica is gone: nothing runs there any more
            pass
        del generator  # Ray drops what the stream still held


def _send_failure(request: ServiceRequest, exc: BaseException) -> ServiceResponse:
    """A call whose request Ray could not serialize: the caller gets a TypeError saying which call and why."""
    error = TypeError(
        f"cannot send call {request.service_name}.{request.method_name} through Ray: its arguments cannot be "
        f"serialized ({_first_line(exc)}); pass picklable values"
    )
    error.__cause__ = exc
    return ServiceResponse.from_exception(request.request_id, error, origin="client")


class _RayListener(Listener):
    def __init__(self, task: RayServiceTask) -> None:
        replicas = task.replica_set
        assert replicas is not None
        self._replicas = replicas
        self.address = ServiceAddress(
            "ray",
            task.service_name,
            replicas,
            instance=replicas.deployment,
            info={"namespace": replicas.namespace, "deployment": replicas.deployment},
        )

    @property
    def alive(self) -> bool:
        return bool(self._replicas.live)

    def close(self) -> None:
        pass


class RayTransport(Transport):
    """Connects callers to ray services: those this process owns, and those found by name in the cluster."""

    name = "ray"
    # an actor call through Ray: ~800 µs on one host (README, Performance)
    cost = 800.0
    crosses_processes = True

    def listen(self, task: BaseServiceTask) -> Listener:
        if not isinstance(task, RayServiceTask):
            raise ConfigError(
                f"service {task.service_name!r}: the 'ray' transport serves only tasks of kind 'ray' "
                f"(this one is {task.kind!r}); set 'kind: ray' instead of listing 'ray' in transports"
            )
        return _RayListener(task)

    def connect(self, address: ServiceAddress) -> Connection:
        target = address.target
        if isinstance(target, _ReplicaSet):
            return RayConnection(target)
        if isinstance(target, _DeploymentRef):
            return _connect_deployment(target)
        raise ServiceUnavailableError(f"not a ray service address: {address!r}")


def _connect_deployment(ref: _DeploymentRef) -> RayConnection:
    """A connection to a deployment another driver started, membership re-read every ``membership_refresh`` s."""
    ray = _ray()
    replicas = _ReplicaSet(ref.service_name, ref.namespace, ref.deployment, _make_balancer(ref.balancer), ref.max_task_retries, frozenset())
    replicas.batch_max, replicas.batch_cost_limit = ref.batch_max, ref.batch_cost_limit

    def refresh() -> None:
        names = _deployments(ray, ref.namespace).get(ref.service_name, {}).get(ref.deployment, {})
        known = {r.index for r in replicas.snapshot()}
        for index, name in names.items():
            if index not in known:
                try:
                    replicas.add(index, name, ray.get_actor(name, namespace=ref.namespace))
                except ValueError:
                    continue  # gone between listing and lookup
        for index in known - set(names):
            replicas.remove(index)

    for name in ref.actor_names:
        index = int(name.rsplit(":", 1)[1])
        try:
            replicas.add(index, name, ray.get_actor(name, namespace=ref.namespace))
        except ValueError:
            continue
    if not replicas.replicas:
        raise ServiceUnavailableError(f"ray service {ref.service_name!r} has no replica left in namespace {ref.namespace!r}")
    described: dict[str, Any] = {}
    for replica in replicas.snapshot():
        try:
            described = ray.get(replica.handle.describe.options(concurrency_group=_CONTROL_GROUP).remote(), timeout=30)
            break
        except Exception:
            continue
    replicas.idempotent = frozenset(described.get("idempotent", ()))
    replicas.capacity = int(described.get("max_concurrency", replicas.capacity))
    replicas.wire = int(described.get("wire", 1))
    connection = RayConnection(replicas, refresh=refresh, refresh_every=ref.membership_refresh)
    replicas.on_all_down = refresh
    return connection


# ---------------------------------------------------------------------------
# Finding deployments in the cluster
# ---------------------------------------------------------------------------


def _deployments(ray: ModuleType, namespace: str | None) -> dict[str, dict[str, dict[int, str]]]:
    """Live replica actors by service, deployment and index (``namespace`` None: every namespace)."""
    found: dict[str, dict[str, dict[int, str]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name, actor_namespace = entry["name"], entry["namespace"]
        if not name.startswith(ACTOR_PREFIX) or (namespace is not None and actor_namespace != namespace):
            continue
        try:
            head, deployment, index = name.rsplit(":", 2)
            found.setdefault(head[len(ACTOR_PREFIX) :], {}).setdefault(deployment, {})[int(index)] = name
        except ValueError:
            continue
    return found


def _newest_deployment(deployments: dict[str, dict[int, str]]) -> str | None:
    # Deployment ids start with the start time in hex, so the newest sorts last.
    return max(deployments, default=None)


def _new_deployment_id() -> str:
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------


class RayServiceTask(BaseServiceTask):
    """A service whose instance lives in Ray actors, one per replica.

    ``start_service`` connects to Ray when this process has not (``ray.init``
    with ``service.ray.address`` and ``service.ray.namespace``; a configured
    address that does not answer is a quick error, not a hang), creates
    ``replicas`` named actors with the ``service.ray`` options and waits up to
    ``service.ray.start_timeout`` until every one has built its instance: a
    constructor that raises fails ``start_service`` with that error, the task
    is ``failed`` and the actors are killed. Starting a service whose name
    already runs in the namespace is refused (stop the other one first).

    ``stop_service`` drains and kills every replica, detached ones included.
    ``scale(n)`` changes the replica count while running; callers in this
    process see the change at once, callers in other drivers within
    ``service.ray.membership_refresh`` seconds.
    """

    kind: ClassVar[str] = "ray"
    default_transports: ClassVar[tuple[str, ...]] = ("ray",)

    def __init__(self, service_factory: ServiceFactory, ctx: TaskContext | None = None, *, replicas: int | None = None) -> None:
        _ray()
        super().__init__(service_factory, ctx)
        self.transport_names = ("ray",)
        ray_options: dict[str, Any] = self.options["ray"]
        self.ray_options = ray_options
        self.namespace: str = ray_options["namespace"]
        self.replica_count: int = int(replicas if replicas is not None else self.options.get("replicas", 1))
        if self.replica_count < 1:
            raise ConfigError(f"services.{self.service_name}.replicas: {self.replica_count} is below the minimum 1")
        _make_balancer(ray_options["balancer"])  # unknown names fail at construction, listing the known ones
        if ray_options["max_concurrency"] is not None:
            self.max_workers = int(ray_options["max_concurrency"])
        self.deployment = ""
        self.replica_set: _ReplicaSet | None = None
        self._next_index = 0
        self._scale_lock = threading.Lock()

    # -------------------------------------------------------------- starting

    def host_instance(self) -> None:
        """Connect to Ray, refuse a name already deployed, create the replicas and wait until each is built."""
        ray = _ray()
        _ensure_ray(ray, self.ray_options)
        existing = _deployments(ray, self.namespace).get(self.service_name)
        if existing:
            deployment = max(existing)
            raise ServiceError(
                f"service {self.service_name!r} already runs in Ray namespace {self.namespace!r} "
                f"(deployment {deployment}, actors {sorted(existing[deployment].values())}); stop it first "
                f"(RayServiceTask.attach({self.service_name!r}, namespace={self.namespace!r}).stop_service()) "
                "or set another service.ray.namespace"
            )
        self.deployment = _new_deployment_id()
        klass = self.service_factory.service_class
        self.replica_set = _ReplicaSet(
            self.service_name,
            self.namespace,
            self.deployment,
            _make_balancer(self.ray_options["balancer"]),
            int(self.ray_options["max_task_retries"]),
            frozenset(_idempotent_methods(klass, self.options)),
        )
        self.replica_set.capacity = self.max_workers
        self.replica_set.wire = WIRE_VERSION  # replicas of this very code
        self.replica_set.batch_max = int(self.ray_options["batch_max"])
        self.replica_set.batch_cost_limit = float(self.ray_options["batch_cost_limit"])
        self._add_replicas(self.replica_count)

    def open_listeners(self) -> list[Listener]:
        """The ``ray`` address of the replica set (its actors listen by themselves)."""
        return [_transport.listen(self)]

    def _actor_options(self, name: str) -> dict[str, Any]:
        opts = self.ray_options
        resources = dict(opts["resources"] or {})
        # Ray takes CPU and GPU as their own options, not as custom resources.
        num_cpus = resources.pop("CPU", opts["num_cpus"])
        num_gpus = resources.pop("GPU", opts["num_gpus"])
        options: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "lifetime": opts["lifetime"],
            "max_restarts": opts["max_restarts"],
            # At most once by default; idempotent methods ask Ray for retries per call.
            "max_task_retries": 0,
            "max_concurrency": self.max_workers,
        }
        if resources:
            options["resources"] = resources
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        if num_gpus is not None:
            options["num_gpus"] = num_gpus
        if opts["runtime_env"]:
            options["runtime_env"] = opts["runtime_env"]
        return options

    def _add_replicas(self, count: int) -> None:
        """Create ``count`` replicas and add them once every one is ready; on failure kill them and raise."""
        ray = _ray()
        replicas = self.replica_set
        assert replicas is not None
        actor_class = _actor_class(self.service_factory.service_class)
        # The validated Config itself, not its data: revalidating in the replica would reject values that
        # only the caller's process knows (a balancer registered there, a plugin the replica lacks).
        config_data = self.ctx.resolved_config()
        middlewares = self._middlewares()
        created: list[tuple[int, str, Any]] = []
        try:
            for _ in range(count):
                index = self._next_index
                self._next_index += 1
                name = f"{ACTOR_PREFIX}{self.service_name}:{self.deployment}:{index}"
                handle = actor_class.options(**self._actor_options(name)).remote(
                    self.service_factory, config_data, middlewares, self.ctx.environment_name, name
                )
                created.append((index, name, handle))
            readiness = [h.ready.options(concurrency_group=_CONTROL_GROUP).remote() for _, _, h in created]
            timeout = float(self.ray_options["start_timeout"])
            try:
                answers: list[ServiceResponse] = ray.get(readiness, timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise ServiceUnavailableError(
                    f"replicas of {self.service_name!r} were not ready within service.ray.start_timeout={timeout}s: "
                    f"Ray could not place them (each asks for resources={self.ray_options['resources']!r}, "
                    f"num_cpus={self.ray_options['num_cpus']!r}; the cluster has {ray.cluster_resources()}) "
                    "or their constructor is slow"
                ) from None
            except ray.exceptions.RayActorError as exc:
                # The actor could not even be built: usually its arguments (the service class) do not unpickle there.
                detail = str(exc)
                missing = "ModuleNotFoundError" in detail or "No module named" in detail
                hint = (
                    f"; the service class {self.service_factory.class_path} must be importable in Ray's workers "
                    "(install its package on every node, or ship it with service.ray.runtime_env, e.g. "
                    "{py_modules: [...]} or {working_dir: ...})"
                    if missing
                    else ""
                )
                last = [line.strip() for line in detail.splitlines() if line.strip()][-1:]
                raise ServiceUnavailableError(
                    f"replicas of {self.service_name!r} could not be created by Ray: {last[0] if last else type(exc).__name__}{hint}"
                ) from exc
            for answer in answers:
                if not answer.success:
                    raise answer.to_exception(self.service_name, "__init__")
        except BaseException:
            # Gone for good before the error reaches the caller: a retried start must not find them.
            _kill_and_wait(ray, [(name, handle) for _, name, handle in created], self.namespace)
            raise
        for (index, name, handle), answer in zip(created, answers, strict=True):
            replicas.add(index, name, handle, answer.result)

    def _middlewares(self) -> tuple[Any, ...]:
        """The environment's middleware as of now (added before this start), after the context's own."""
        return self.ctx.current_middlewares()

    @classmethod
    def attach(
        cls, service_name: str, *, namespace: str | None = None, config: Any = None, ctx: TaskContext | None = None
    ) -> RayServiceTask:
        """A running task controlling a deployment another driver started (``stop_service`` kills it).

        Raises ServiceNotFoundError-like ServiceUnavailableError when no
        replica of ``service_name`` runs in the namespace.
        """
        ray = _ray()
        if not ray.is_initialized():
            raise ServiceUnavailableError("RayServiceTask.attach needs a Ray connection: call ray.init(address=...) first")
        if ctx is None:
            ctx = TaskContext(config=Config.load(config))
        factory = ServiceFactory(service_name, object)
        task = cls(factory, ctx)
        if namespace is not None:
            task.namespace = namespace
        existing = _deployments(ray, task.namespace).get(service_name)
        if not existing:
            raise ServiceUnavailableError(f"no replica of ray service {service_name!r} runs in namespace {task.namespace!r}")
        deployment = _newest_deployment(existing)
        assert deployment is not None
        task.deployment = deployment
        task.replica_set = _ReplicaSet(
            service_name, task.namespace, deployment, _make_balancer(task.ray_options["balancer"]),
            int(task.ray_options["max_task_retries"]), frozenset(),
        )
        for index, name in sorted(existing[deployment].items()):
            task.replica_set.add(index, name, ray.get_actor(name, namespace=task.namespace))
        task._next_index = max(existing[deployment]) + 1
        task.replica_count = len(existing[deployment])
        described = ray.get(task.replica_set.snapshot()[0].handle.describe.options(concurrency_group=_CONTROL_GROUP).remote(), timeout=30)
        task.replica_set.idempotent = frozenset(described.get("idempotent", ()))
        task.replica_set.wire = int(described.get("wire", 1))
        task.replica_set.capacity = int(described.get("max_concurrency", task.replica_set.capacity))
        task.replica_set.batch_max = int(task.ray_options["batch_max"])
        task.replica_set.batch_cost_limit = float(task.ray_options["batch_cost_limit"])
        task.adopt_running()
        return task

    # -------------------------------------------------------------- scaling

    def scale(self, replicas: int, timeout: float | None = None) -> None:
        """Run ``replicas`` replicas from now on (at least 1).

        Growing waits until the new replicas are ready (ServiceUnavailableError
        and no change if they fail). Shrinking fails no call: the
        highest-numbered replicas leave the rotation at once (calls waiting
        in this process go to the others), finish the calls they were sent
        (up to ``timeout`` seconds, default ``service.ray.start_timeout``;
        after that they are killed and those calls fail as "may have run"),
        then stop and are killed. Callers in other drivers see the change
        within ``service.ray.membership_refresh`` seconds; a call one of them
        sends to a leaving replica meanwhile is refused unrun and goes to
        another replica.
        """
        if replicas < 1:
            raise ValueError(f"a ray service needs at least 1 replica, got {replicas}")
        if not self.running or self.replica_set is None:
            raise ServiceUnavailableError(f"service {self.service_name!r} is {self.state}; start it before scaling")
        with self._scale_lock:
            current = self.replica_set.snapshot()
            if replicas > len(current):
                self._add_replicas(replicas - len(current))
            elif replicas < len(current):
                leaving = current[replicas:]
                self.replica_set.retire(leaving)
                self._retire(leaving, self.ray_options["start_timeout"] if timeout is None else timeout)
            self.replica_count = replicas

    set_replicas = scale

    def _retire(self, leaving: Sequence[_Replica], timeout: float) -> None:
        """Drain (up to ``timeout`` seconds) and kill replicas already out of rotation.

        First this process's calls to them are let finish (none waits in the
        actors, see _ReplicaSet), then each replica stops its task (refusing,
        unrun, what other drivers still send) and waits for what it runs.
        """
        if not leaving:
            return
        ray = _ray()
        deadline = time.monotonic() + timeout
        if self.replica_set is not None:
            self.replica_set.drain(leaving, deadline)
        remaining = max(0.0, deadline - time.monotonic())
        drains = [
            r.handle.shutdown.options(concurrency_group=_CONTROL_GROUP).remote(remaining) for r in leaving if not r.dead
        ]
        if drains:
            ray.wait(drains, num_returns=len(drains), timeout=remaining + 1.0)
        _kill_and_wait(ray, [(replica.name, replica.handle) for replica in leaving], self.namespace)

    # -------------------------------------------------------------- health

    def _unhealthy_replicas(self) -> list[tuple[_Replica, str]]:
        """Replicas that are dead, down, unreachable, or whose service's ``check_health()`` fails."""
        ray = _ray()
        if self.replica_set is None:
            return []
        unhealthy: list[tuple[_Replica, str]] = []
        asks: list[tuple[_Replica, Any]] = []
        for replica in self.replica_set.snapshot():
            if replica.dead or not replica.up:
                unhealthy.append((replica, f"{replica.name} is {'dead' if replica.dead else 'down'} ({replica.last_error})"))
            else:
                asks.append((replica, replica.handle.check_health.options(concurrency_group=_CONTROL_GROUP).remote()))
        for replica, ask in asks:
            try:
                outcome = ray.get(ask, timeout=5.0)
            except Exception as exc:
                unhealthy.append((replica, f"{replica.name} did not answer its health check: {_first_line(exc)}"))
                continue
            if isinstance(outcome, str) or (outcome is not None and not outcome):
                unhealthy.append((replica, f"{replica.name}: check_health() returned {outcome!r}"))
        return unhealthy

    def check_service_health(self) -> str | None:
        """None when every replica serves and passes its service's ``check_health()``, else the reasons."""
        return "; ".join(reason for _, reason in self._unhealthy_replicas()) or None

    def recover(self, reason: str) -> str:
        """Replace the replicas that are dead, down or failing their health check with new ones.

        Returns what was done. Raises what creating the new replicas raised
        (the broken ones are then already gone and the service runs with fewer).
        """
        with self._state_lock:
            if self.state != "running" or self.replica_set is None:
                return f"nothing: task is {self.state}"
            with self._scale_lock:
                broken = [replica for replica, _ in self._unhealthy_replicas()]
                if not broken:
                    return "nothing: every replica serves"
                self.replica_set.retire(broken)
                self._retire(broken, 0.0)
                self.restarts += len(broken)
                self._add_replicas(len(broken))
                return f"replaced replica(s) {', '.join(r.name for r in broken)}"

    # -------------------------------------------------------------- stopping

    def release_instance(self, deadline: float) -> None:
        """Refuse new calls, let every call already accepted in this process finish (until ``deadline``), then kill.

        Calls still waiting in this process at ``deadline`` never reached a
        replica: they fail with ServiceStoppedError.
        """
        replicas = self.replica_set
        if replicas is not None:
            replicas.close(f"service {self.service_name!r} is stopped")
            members = replicas.snapshot()
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                replicas.drain(members, deadline, queue=True)
            replicas.retire(members)  # what still waits is answered ServiceStoppedError
            if ray is not None and ray.is_initialized():
                self._retire(members, max(0.0, deadline - time.monotonic()))
        super().release_instance(deadline)

    # ---------------------------------------------------------------- status

    def report_status(self) -> ServiceStatus:
        """State, load and health summed over replicas; ``extra['replicas']`` has one entry per replica.

        Replicas are asked with a control call answered even when every request
        slot is busy; one that does not answer within 5 s is reported unhealthy.
        """
        if self.replica_set is None or not self.running:
            status = ServiceStatus(self.service_name, self.kind, self.state, False, f"task is {self.state}", max_workers=self.max_workers)
        else:
            status = _aggregate_status(self.replica_set, self.state, self.kind)
        status.started_at = self.started_at
        # Calls each replica runs at once (Ray's max_concurrency), not the replica's idle pool.
        status.max_workers = self.max_workers
        status.restarts = self.restarts + status.restarts
        status.extra["ray"] = {
            "namespace": self.namespace,
            "deployment": self.deployment,
            "lifetime": self.ray_options["lifetime"],
            "balancer": self.ray_options["balancer"],
            "replicas": self.replica_count,
        }
        return status


def _aggregate_status(replicas: _ReplicaSet, state: Any, kind: str) -> ServiceStatus:
    ray = _ray()
    members = replicas.snapshot()
    asks = []
    for replica in members:
        try:
            asks.append(replica.handle.status.options(concurrency_group=_CONTROL_GROUP).remote())
        except Exception:
            asks.append(None)
    status = ServiceStatus(replicas.service_name, kind, state, True)
    reasons = []
    for replica, ask in zip(members, asks, strict=True):
        entry: dict[str, Any] = {"index": replica.index, "actor": replica.name, **replica.info, "client_in_flight": replica.in_flight}
        try:
            if ask is None:
                raise RuntimeError("cannot reach the actor")
            remote = ray.get(ask, timeout=5.0)
        except Exception as exc:
            entry.update(state="dead" if replica.dead else "unreachable", healthy=False, health_reason=_first_line(exc))
            reasons.append(f"{replica.name}: {entry['health_reason']}")
            status.extra.setdefault("replicas", []).append(entry)
            continue
        entry.update(
            state=remote.get("state"),
            healthy=bool(remote.get("healthy")) and replica.up,
            health_reason=remote.get("health_reason", "") or replica.last_error,
            requests_total=remote.get("requests_total", 0),
            in_flight=remote.get("in_flight", 0),
        )
        if not entry["healthy"]:
            reasons.append(f"{replica.name}: {entry['health_reason'] or 'down'}")
        for key in ("requests_total", "errors_total", "expired_total", "in_flight", "queue_depth", "restarts"):
            setattr(status, key, getattr(status, key) + int(remote.get(key, 0) or 0))
        status.max_workers = max(status.max_workers, int(remote.get("max_workers", 0) or 0))
        status.extra.setdefault("replicas", []).append(entry)
    status.extra.setdefault("replicas", [])
    status.healthy = state == "running" and not reasons and bool(members)
    status.health_reason = "; ".join(reasons) if state == "running" else f"task is {state}"
    status.addresses = [f"ray:{replicas.namespace}/{r.name}" for r in members]
    status.extra["waiting_in_caller"] = replicas.waiting_count()
    status.extra["batching"] = {
        "batch_max": replicas.batch_max,
        "batches_sent": replicas.batches_sent,
        "batched_calls": replicas.batched_calls,
    }
    return status


def _kill_and_wait(ray: ModuleType, actors: Sequence[tuple[str, Any]], namespace: str, timeout: float = 10.0) -> None:
    """Kill the named actors and wait (up to ``timeout`` s) until their names are released.

    ``ray.kill`` returns before the GCS releases a name: without the wait, a
    stopped or failed service would still be listed, and a new start under the
    same name refused.
    """
    for _, handle in actors:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
    gone_by = time.monotonic() + timeout
    for name, _ in actors:
        while time.monotonic() < gone_by:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.02)


def _ensure_ray(ray: ModuleType, options: dict[str, Any]) -> None:
    """Connect this process to Ray unless it already is (``ray.init`` with the configured address and namespace).

    The address is ``service.ray.address``, else ``RAY_ADDRESS``, else
    ``"local"``: a new Ray instance private to this process, never a cluster
    that happens to run on the machine (Ray's own default with no address
    joins one). A ``host:port`` address is first checked with a TCP
    connection bounded by ``service.ray.connect_timeout``, because
    ``ray.init`` keeps retrying an unreachable address for minutes.
    """
    if ray.is_initialized():
        return
    address = options.get("address") or os.environ.get("RAY_ADDRESS") or "local"
    if address and address not in ("auto", "local") and "://" not in address:
        host, _, port = address.rpartition(":")
        timeout = float(options["connect_timeout"])
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        except (OSError, ValueError) as exc:
            raise ServiceUnavailableError(
                f"cannot reach the Ray cluster at {address!r} (service.ray.address or RAY_ADDRESS): {exc}; "
                "start one with 'ray start --head' or fix the address"
            ) from None
    try:
        ray.init(address=address, namespace=options["namespace"])
    except Exception as exc:
        raise ServiceUnavailableError(f"cannot connect to Ray (address {address!r}): {_first_line(exc)}") from exc


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


_transport = RayTransport()


def _make_task(factory: ServiceFactory, ctx: TaskContext) -> BaseServiceTask:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"services.{factory.service_name}.kind: 'ray' needs Ray, which is not installed: {RAY_EXTRA_HINT}"
        ) from None
    return RayServiceTask(factory, ctx)


@hookimpl
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    register(_transport)


@hookimpl
def kservice_register_task_kinds(register: Callable[..., None]) -> None:
    register("ray", _make_task)


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "service.ray",
        {
            "namespace": Setting((str,), "kservice", "Ray namespace of the replica actors (and of ray.init when kservice connects)."),
            "resources": Setting((dict,), {}, "Ray resources each replica actor asks for, e.g. {CPU: 2}."),
            "lifetime": Setting(
                (str,), "non_detached", "Actor lifetime: 'detached' outlives the driver.", choices=("detached", "non_detached")
            ),
            "max_restarts": Setting((int,), 3, "Times Ray restarts a dead replica actor.", minimum=-1),
            "address": Setting(
                (str,),
                None,
                "Cluster address for ray.init when this process is not connected yet ('auto': the cluster running on "
                "this machine; null: RAY_ADDRESS, else 'local', a new Ray instance of this process only).",
                nullable=True,
            ),
            "connect_timeout": Setting((float,), 10.0, "Seconds to wait for a configured address to answer before failing.", minimum=0),
            "max_concurrency": Setting(
                (int,), None, "Calls one replica runs at once (None: service.local.max_workers).", nullable=True, minimum=1
            ),
            "max_task_retries": Setting(
                (int,),
                3,
                "Times Ray re-runs a call of an idempotent method on a restarted replica (-1: unlimited). "
                "Other methods run at most once.",
                minimum=-1,
            ),
            "num_cpus": Setting((float,), None, "CPUs each replica reserves (None: Ray's actor default).", nullable=True, minimum=0),
            "num_gpus": Setting((float,), None, "GPUs each replica reserves.", nullable=True, minimum=0),
            "runtime_env": Setting((dict,), None, "Ray runtime_env of the replica actors.", nullable=True),
            "balancer": Setting(
                (str,), "power_of_two", "How calls choose a replica (register_balancer adds more).", choices=balancer_names
            ),
            "start_timeout": Setting(
                (float,), 120.0, "Seconds start_service and scale wait for replicas to be placed and built.", minimum=0
            ),
            "membership_refresh": Setting(
                (float,), 5.0, "Seconds between re-reads of the replica list by callers in other drivers.", minimum=0
            ),
            "batch_max": Setting(
                (int,),
                64,
                "Most async calls sent together in one actor call while a replica is busy (0: every call travels alone).",
                minimum=0,
            ),
            "batch_cost_limit": Setting(
                (float,), 0.001, "Only methods the replica runs in under this many seconds are batched.", minimum=0
            ),
        },
    )


@hookimpl
def kservice_resolve_service(service_name: str, options: dict[str, Any]) -> list[ServiceAddress] | None:
    ray = _ray_if_running()
    if ray is None:
        return None
    options = options["ray"]
    namespace = options["namespace"]
    deployments = _deployments(ray, namespace).get(service_name)
    if not deployments:
        return None
    deployment = _newest_deployment(deployments)
    assert deployment is not None
    names = tuple(name for _, name in sorted(deployments[deployment].items()))
    target = _DeploymentRef(
        namespace,
        service_name,
        deployment,
        names,
        float(options["membership_refresh"]),
        options["balancer"],
        int(options["max_task_retries"]),
        int(options["batch_max"]),
        float(options["batch_cost_limit"]),
    )
    return [ServiceAddress("ray", service_name, target, instance=deployment, info={"namespace": namespace, "actors": list(names)})]


@hookimpl
def kservice_known_services() -> list[str]:
    ray = _ray_if_running()
    if ray is None:
        return []
    try:
        return sorted(_deployments(ray, None))
    except Exception:
        return []


# ---------------------------------------------------------------------------
# What tools outside this plugin need from Ray (status columns, the runtime)
# ---------------------------------------------------------------------------


@hookimpl
def kservice_status_columns(status: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """Replicas alive of ``extra["replicas"]`` (one entry per replica actor) and the namespace of ``extra["ray"]``."""
    cells: dict[str, Any] = {}
    section = extra.pop("ray", None)
    if isinstance(section, dict):
        cells["namespace"] = section.get("namespace")
    replicas = extra.pop("replicas", None)
    if isinstance(replicas, list):

        def up(replica: Any) -> bool:
            if not isinstance(replica, dict):
                return True
            if "healthy" in replica:
                return bool(replica["healthy"])
            return replica.get("state", "running") in ("running", "alive")

        cells.update(replicas=len(replicas), replicas_alive=sum(1 for r in replicas if up(r)))
    elif replicas is not None:
        extra["replicas"] = replicas  # not this plugin's shape: left for details
    return cells or None


class RayRuntime:
    """The :class:`kservice.KindRuntime` of the ``ray`` kind: a Ray for the tools that host ray services."""

    def __init__(self) -> None:
        self._started: ModuleType | None = None

    def unavailable(self) -> str | None:
        try:
            import ray  # noqa: F401 - importing is the test: a broken install counts as missing
        except ImportError:
            return f"Ray is not installed ({RAY_EXTRA_HINT}); kind='ray' services cannot run"
        return None

    def start(self) -> str:
        ray = _ray()
        if ray.is_initialized():
            return f"the Ray this process is connected to ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
        # A private local Ray unless RAY_ADDRESS names a cluster: never land on whatever runs nearby.
        address = os.environ.get("RAY_ADDRESS") or "local"
        import logging

        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        self._started = ray
        where = "a local Ray" if address == "local" else f"the Ray at {address}"
        return f"{where} with {int(ray.cluster_resources().get('CPU', 0))} CPUs"

    def stop(self) -> None:
        ray, self._started = self._started, None
        if ray is not None:
            ray.shutdown()

    def kill_replica(self, task: BaseServiceTask, index: int) -> str:
        ray = _ray()
        extra = task.get_service_status().extra
        name = str(extra.get("replicas", [])[index]["actor"])
        namespace = extra.get("ray", {}).get("namespace", "kservice")
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
        return name


_runtime = RayRuntime()


@hookimpl
def kservice_kind_runtime(kind: str) -> RayRuntime | None:
    return _runtime if kind == "ray" else None
