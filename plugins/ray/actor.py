"""Inside the actor: the replica body (threaded and async) that hosts the service instance, and its Ray actor class."""

from __future__ import annotations

import inspect
import os
import pickle
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar, cast

from kservice import (
    BaseServiceTask,
    Config,
    LocalStream,
    ServiceFactory,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
    StreamSink,
    TaskContext,
    idempotent_methods,
)
from kservice._aio import awaited

from .common import (
    _CONTROL_GROUP,
    _REFUSED_KEY,
    HEALTH_ANSWER_WAIT,
    MAY_HAVE_RUN_KEY,
    RETRYABLE_KEY,
    _first_line,
    _ray,
)
from .wire import (
    _COST,
    WIRE_VERSION,
    Unpicklable,
    WireRequest,
    WireResponse,
    _pack,
    _Stored,
    clock_offset,
    stream_shape,
)

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
        #: the calls Ray's threads run now, by request id (set by the replica, see _ReplicaHost._handle: a
        #: threaded replica's pool runs none of them)
        self.executing: dict[str, ServiceRequest] = {}

    def _running_deadlines(self) -> list[float | None]:
        """The core's (pool, loop, streams) and the calls Ray's threads run now (see ``ServiceStatus.running_until``).

        The health monitor reads them to tell a busy replica from a stuck one:
        a call running past ``health.stuck_after`` whose caller still waits (a
        batch job given a long timeout) is work, and rebuilding the instance
        under it would lose its state.
        """
        return [*super()._running_deadlines(), *(request.deadline for request in list(self.executing.values()))]


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
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        self.actor_name = actor_name
        #: what this replica was built from (see ``spawn_args``)
        self._spawn: dict[str, Any] = {
            "factory": factory,
            "config": config_data,
            "middlewares": middlewares,
            "environment_name": environment_name,
            "actor_options": actor_options,
        }
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

    def handle(self, envelope: bytes | WireRequest, sent_at: float | None = None) -> WireResponse:
        """Run one call; ``envelope`` and the answer use the forms of :func:`_to_wire` / :func:`_from_wire`.

        ``sent_at``: the caller's wall clock when it sent the call (wire
        version 4; see :func:`clock_offset`). Never raises: every outcome,
        arguments that do not unpickle here included, is an answer the caller decodes.
        """
        return self._handle(envelope, clock_offset(sent_at))

    def _handle(self, envelope: bytes | WireRequest, offset: float | None) -> WireResponse:
        request = self._request(envelope, offset)
        if isinstance(request, ServiceResponse):
            return request
        task: _HostedTask = self.task  # type: ignore[assignment]  # not None: _request refuses the call otherwise
        began = time.perf_counter()
        # Counted while it runs in this Ray thread, outside the task's pool: see _HostedTask.get_service_status.
        task.executing[request.request_id] = request
        try:
            return self._answer(task.execute(request), began)
        finally:
            task.executing.pop(request.request_id, None)

    def _request(self, envelope: bytes | WireRequest, offset: float | None) -> ServiceRequest | ServiceResponse:
        """The request an envelope carries, or the wire answer refusing it (undecodable, replica not running).

        ``offset``: what to add to its deadline to read it on this replica's clock (see :func:`clock_offset`).
        """
        task = self.task
        if type(envelope) is bytes:
            try:
                envelope = pickle.loads(envelope)
            except BaseException as exc:  # noqa: BLE001 - the arguments' own code may raise SystemExit & co.
                # As over mmap: a TypeError (what the caller sent is wrong), not retryable (the same bytes fail
                # the same way on every replica), nothing ran. The request id and the method are in the
                # envelope that did not unpickle: the caller fills them in (see wire._from_wire).
                error = TypeError(
                    f"could not decode the arguments of the call in replica {self.actor_name} (pid {os.getpid()}): "
                    f"{_first_line(exc)}; the method did not run. Every argument's class must be importable by the "
                    "replica's workers under the same module name (ship its module with the cluster's runtime_env)"
                )
                response = ServiceResponse.from_exception("", error, origin="service", with_traceback=False)
                response.metadata = {RETRYABLE_KEY: False}
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
                request_id,
                ServiceUnavailableError(f"call {service_name}.{method_name} was cancelled before it started"),
                origin="runtime",
            )
            skipped.metadata = {RETRYABLE_KEY: False, MAY_HAVE_RUN_KEY: False}
            return skipped.for_wire()
        if offset is not None and deadline is not None:
            deadline += offset
        return ServiceRequest(request_id, service_name, method_name, args, kwargs, "", deadline, metadata)

    @staticmethod
    def _answer(response: ServiceResponse, began: float) -> WireResponse:
        """What travels back for ``response`` (see WireResponse)."""
        if response.success and not response.metadata and not response.degraded:
            try:
                packed = _pack(response.result)
            except Unpicklable as exc:
                # Not handed to Ray: its serializer would raise the same SystemExit and end this replica.
                error = TypeError(f"the result cannot be sent back to the caller: {exc}")
                return ServiceResponse.from_exception("", error, origin="service", with_traceback=False).for_wire()
            if packed is None:
                # A 1-tuple: Ray serializes the result itself (Ray handles, values needing cloudpickle, zero-copy buffers).
                return (response.result,)
            # The run time rides after the pickle (pickle.loads ignores what follows it): callers learn
            # which methods are fast enough to batch (see RayConnection) at no extra message.
            return packed + _COST.pack(time.perf_counter() - began)
        return response.for_wire()

    def handle_batch(self, envelopes: list[bytes], sent_at: float | None = None) -> list[WireResponse | _Stored]:
        """Run several calls one after the other (a caller's batch, see RayConnection); one answer each, in order.

        Never raises, and no call's outcome can fail another's: a result only
        Ray can serialize is stored on its own (``ray.put``), so one that
        cannot be stored at all fails its own call, not the whole batch's reply.
        """
        import ray

        answers: list[WireResponse | _Stored] = []
        offset = clock_offset(sent_at)  # on arrival: the calls after the first do not get the time it took
        for envelope in envelopes:
            answer: WireResponse | _Stored = self._handle(envelope, offset)
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

    def handle_stream(
        self, envelope: bytes | WireRequest, window: int, batched: bool = False, sent_at: float | None = None
    ) -> Iterator[Any]:
        """Serve one stream (called with ``num_returns="streaming"``): its items, then one :class:`_StreamEnd`.

        With ``batched`` (a caller of wire version 3), the items made while the
        last object was on its way travel together, up to
        ``stream_shape(window)[0]`` per Ray object (an :class:`_ItemBatch`; see
        :meth:`_stream_batched`). Otherwise a sync generator is stepped here,
        item by item, as Ray asks for the next (Ray's back-pressure, set by the
        caller from ``window``, bounds how far ahead it runs); an async
        generator (an async replica) runs on the task's event loop. Ray cancelling this generator (the caller
        closed the stream) closes the service's generator: its ``finally``
        runs. Never raises of its own; an item Ray cannot serialize fails this
        Ray task, which the caller reports as a TypeError.
        """
        request = self._request(envelope, clock_offset(sent_at))
        if isinstance(request, ServiceResponse):
            yield _StreamEnd(request)
            return
        if batched:
            yield from self._stream_batched(request, stream_shape(window)[0])
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
                run.abandon(
                    ServiceResponse(
                        True, None, None, request.request_id, metadata={"kservice.stream.closed": "cancelled"}
                    )
                )
            collected.cancel()
            self.streams.pop(request.request_id, None)

    def _stream_batched(self, request: ServiceRequest, per_object: int) -> Iterator[Any]:
        """The items of ``request``'s stream as Ray objects of up to ``per_object`` items (wire version 3).

        The service's generator runs in one of the task's stream threads (an
        async one on its event loop), at most ``per_object`` items ahead of this
        Ray generator, which sends whatever was made each time Ray asks for the
        next object: items made quickly share an object, and an item never
        waits for a later step of the generator (one that never returns keeps
        nothing the generator made before it).
        """
        local = _ReadElsewhere(per_object)
        self.streams[request.request_id] = local
        self.task.open_stream(request, local)  # type: ignore[union-attr]
        try:
            while True:
                items, end = local.receive(_STREAM_POLL)
                for part in _relayed(request, local, items, end, per_object):  # noqa: UP028 - Ray resumes with send()
                    yield part
                if end is not None:
                    return
        finally:
            self._close_local_stream(request.request_id, local)

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
            # Calls Ray runs at once in this actor (what its creator asked of Ray, service.ray.max_concurrency),
            # which callers in other drivers keep in flight at most; the hosted task's own pool size may differ.
            "max_concurrency": int((self._spawn["actor_options"] or {}).get("max_concurrency") or task.max_workers),
            **self._info(),
        }

    def spawn_args(self) -> dict[str, Any]:
        """What this replica was built from: its service factory, config, middleware, environment name and the
        Ray actor options it was created with (None when its creator did not say), so that a driver that attached
        to the deployment (``RayServiceTask.attach``) adds replicas like it."""
        return self._spawn

    def check_health(self) -> Any:
        """The service's own ``check_health()`` outcome (None when it defines none)."""
        task = self.task
        if task is None:
            return f"the service failed to build: {self.failure.error if self.failure else 'unknown error'}"
        method = getattr(task.service, "check_health", None)
        if not callable(method):
            return None
        # An ``async def check_health()`` is awaited on the task's event loop (its coroutine is no answer,
        # and Ray could not carry it), for no longer than its caller waits for the answer.
        return awaited(method(), task._aio, HEALTH_ANSWER_WAIT, "check_health()")

    def status(self) -> dict[str, Any]:
        """The hosted task's status as a dict, with ``clock``: this replica's wall clock (see ``running_until``)."""
        task = self.task
        if task is None:
            return {"state": "failed", "healthy": False, "health_reason": self.failure.error if self.failure else ""}
        return {**task.get_service_status().to_dict(), "clock": time.time()}

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

    async def handle(  # type: ignore[override]
        self, envelope: bytes | WireRequest, sent_at: float | None = None
    ) -> WireResponse:
        return await self._ahandle(envelope, clock_offset(sent_at))

    async def _ahandle(self, envelope: bytes | WireRequest, offset: float | None) -> WireResponse:
        request = self._request(envelope, offset)
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

    async def handle_stream(  # type: ignore[override]
        self, envelope: bytes | WireRequest, window: int, batched: bool = False, sent_at: float | None = None
    ) -> AsyncIterator[Any]:
        """:meth:`_ReplicaHost.handle_stream` on the actor's event loop (Ray cancelling it closes the stream).

        Items the service's generator made while the last object was on its way
        travel together (up to ``stream_shape(window)[0]`` per object, with ``batched``).
        """
        request = self._request(envelope, clock_offset(sent_at))
        if isinstance(request, ServiceResponse):
            yield _StreamEnd(request)
            return
        per_object = stream_shape(window)[0] if batched else 1
        local = self._open_local_stream(request, window)
        try:
            while True:
                items, end = await local.areceive(_STREAM_POLL)
                for part in _relayed(request, local, items, end, per_object, batched):
                    yield part
                if end is not None:
                    return
        finally:
            self._close_local_stream(request.request_id, local)

    async def handle_batch(  # type: ignore[override]
        self, envelopes: list[bytes], sent_at: float | None = None
    ) -> list[WireResponse | _Stored]:
        import asyncio

        offset = clock_offset(sent_at)
        answers = await asyncio.gather(*(self._ahandle(envelope, offset) for envelope in envelopes))
        return [_stored_if_needed(answer) for answer in answers]


#: seconds a replica's stream generator waits for the service's next item before looking again
_STREAM_POLL = 0.5


class _ItemBatch:
    """Several items of a stream in one Ray object (wire version 3): Ray's cost per object, paid once.

    ``packed`` is the list of items pickled as a call's result is (``wire._pack``).
    """

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        self.packed = packed

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ItemBatch, (self.packed,))

    def items(self) -> list[Any]:
        items: list[Any] = pickle.loads(self.packed)
        return items


#: item types whose pickling runs none of the item's own code: they travel alone as they are (see _alone)
_PLAIN_ITEMS = frozenset({bytes, str, int, float, bool, type(None), bytearray})


def _alone(item: Any) -> Any:
    """``item`` as the Ray object that carries it alone (wire version 3: the caller reads an ``_ItemBatch``).

    Pickled here first, unless its type runs no code of its own when
    pickled: an item whose pickling raises ``SystemExit`` (its class's
    ``__reduce__``) must raise it here, as :class:`Unpicklable`, and not in
    Ray's serializer, which would end the replica's worker. The bytes travel
    as a one-item ``_ItemBatch``, so nothing is pickled twice; an item only
    Ray's serializer should carry (see ``wire._pack``) goes to it as it is.
    """
    if type(item) in _PLAIN_ITEMS:
        return item
    packed = _pack([item])
    return item if packed is None else _ItemBatch(packed)


def _objects_of(items: list[Any], per_object: int, batched: bool = True) -> Iterator[Any]:
    """``items`` as the Ray objects that carry them: alone, or in :class:`_ItemBatch` es of ``per_object``.

    Items that cannot be pickled together (see ``wire._pack``: one that Ray
    handles, a ``__main__`` class, a numpy buffer, or one that cannot be
    pickled at all) travel alone (:func:`_alone`), as without batches: the
    items before an unserializable one still arrive. So do the items before
    one whose pickling raises ``SystemExit``: that one raises ``Unpicklable``,
    which ends the generator, and the caller gets its TypeError after them.
    ``batched=False`` (a caller of wire version 2 or older, which reads no
    ``_ItemBatch``): every item travels as it is.
    """
    if not batched:
        yield from items
        return
    for start in range(0, len(items), per_object):
        part = items[start : start + per_object]
        try:
            packed = _pack(part) if len(part) > 1 else None
        except Unpicklable:
            packed = None  # one of them raised SystemExit & co.: alone, it raises again, after the items before it
        if packed is None:
            for item in part:
                yield _alone(item)
        else:
            yield _ItemBatch(packed)


class _ReadElsewhere(LocalStream):
    """A sink read by the Ray thread that opens the stream: its items are never made in that thread."""

    in_place_allowed = False


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


def _relayed(
    request: ServiceRequest,
    local: LocalStream,
    items: list[Any],
    end: ServiceResponse | None,
    per_object: int,
    batched: bool = True,
) -> Iterator[Any]:
    """One receive of a replica's local stream as what its Ray generator yields: the items' objects, then
    the end if it came. Credit goes back once Ray took the objects (the window bounds what waits in Ray)."""
    for part in _objects_of(items, per_object, batched):  # noqa: UP028 - a plain loop, as where it is used
        yield part
    if items:
        local.consumed(len(items))
    if end is not None:
        yield _stream_end(request, end)


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


def _has_async_methods(cls: type) -> bool:
    """Whether ``cls`` has ``async def`` methods or async generators (its replicas are Ray async actors)."""
    return any(
        inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
        for _, member in inspect.getmembers(cls)
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
