"""Connections: the ``ray`` transport, a connection to a replica set (calls, batching, streams) and the listener."""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kservice import (
    Connection,
    Listener,
    ServiceAddress,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
    StreamSource,
)

from . import hooks
from .actor import _STREAM_POLL, _ItemBatch, _StreamEnd
from .balancers import _make_balancer
from .common import (
    _CONTROL_GROUP,
    _REFUSED_KEY,
    ACTOR_PREFIX,
    MAY_HAVE_RUN_KEY,
    RETRYABLE_KEY,
    _first_line,
    _ray,
    _send_failure,
    _timed_out,
    _unavailable,
)
from .completion import _completer
from .discovery import _deployments
from .replicas import _aggregate_status, _Replica, _ReplicaSet, _Waiting
from .wire import _claimed, _from_wire, _to_wire, stream_shape, with_clock

if TYPE_CHECKING:
    from .task import RayServiceTask

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
    good, sent once to another live replica. A call that times out or is
    cancelled after it was sent makes the caller check its replica with a
    call Ray does not retry: one Ray cannot reach (its node lost) leaves the
    rotation, which Ray would not otherwise tell a caller whose calls it
    holds for a restart. A replica that answers that it
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

    def __init__(
        self, replicas: _ReplicaSet, *, refresh: Callable[[], None] | None = None, refresh_every: float = 0.0
    ) -> None:
        self.replicas = replicas
        self.queue_name = f"ray:{replicas.namespace}/{ACTOR_PREFIX}{replicas.service_name}:{replicas.deployment}"
        self._ray = sys.modules["ray"]
        self._refresh = refresh
        self._refresh_every = refresh_every
        self._refresh_at = (
            time.monotonic() + refresh_every if refresh is not None and refresh_every > 0 else float("inf")
        )
        self._closed = False
        #: why calls are refused once closed: (message, whether another attempt may succeed)
        self._closed_because = ("the connection to this service was closed", True)
        _connections.add(self)
        if hooks.forked_from_driver is not None:
            self._forked()

    def _forked(self) -> None:
        """In a process forked from the driver: refuse every call at once (Ray's connection is the driver's)."""
        self._closed = True
        self._closed_because = (hooks.forked_driver_refusal(self.replicas.service_name), False)

    def _refused(self, request: ServiceRequest) -> ServiceResponse:
        message, retryable = self._closed_because
        return _unavailable(request, message, retryable=retryable)

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
            reply(self._refused(request))
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
                reply(self._refused(request))
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
                batching
                and not idempotent
                and type(envelope) is bytes
                and (cost is None or cost < replicas.batch_cost_limit)
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
            raise self._refused(request).to_exception()
        self._maybe_refresh()
        replicas = self.replicas
        replica = replicas.pick_for_stream()
        if replica is None:
            return _RayStreamSource.failed(replicas.no_replica(request))
        return _RayStreamSource(self._ray, replica, request, window, replicas.wire, replicas)

    def call(self, request: ServiceRequest, timeout: float) -> ServiceResponse:
        ray = self._ray
        if self._closed:
            return self._refused(request)
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
                ref = replica.send(entry.envelope, idempotent, replicas.wire)
            except Exception as exc:
                replicas.release(replica)
                return _send_failure(request, exc)
            try:
                answer = ray.get(ref, timeout=max(give_up_at - time.monotonic(), 0.0))
            except ray.exceptions.GetTimeoutError:
                self._give_up(ref, replica)
                return _timed_out(request, timeout)
            except Exception as exc:
                response = replicas.translate(request, replica, exc)
                replicas.release(replica)
                if not replicas.should_fail_over(entry, exc):
                    return response
                entry.failovers += 1
                continue
            except BaseException:
                self._give_up(ref, replica)  # the caller gave up (Ctrl-C): a task still queued must not run after
                raise
            replicas.observe(request.method_name, answer)
            response = _from_wire(request, answer)
            replicas.release(replica)
            if response.metadata and response.metadata.get(_REFUSED_KEY):
                replicas.mark_leaving(replica)
                continue
            return response

    def _give_up(self, ref: Any, replica: _Replica) -> None:
        """The caller stopped waiting for ``ref``: Ray drops the task if it is still queued on the replica; it
        does not interrupt a running one, so the slot is freed when the replica is done with it. The replica
        leaves the rotation if Ray cannot reach it (``_ReplicaSet.check``: a lost node is otherwise not told to
        callers of idempotent methods)."""
        self._ray.cancel(ref)
        _completer().add(ref, lambda _answer, _error: self.replicas.release(replica))
        self.replicas.check(replica)

    def _wait_for_slot(self, entry: _Waiting, give_up_at: float) -> _Replica | ServiceResponse | None:
        """Wait (until ``give_up_at``) for the queued sync ``entry`` to be granted a slot; None on timeout.

        A wait interrupted by an exception (Ctrl-C) withdraws the entry, or gives back the slot granted
        meanwhile, before the exception goes on: no slot is left to a caller that is gone.
        """
        grant = entry.grant
        try:
            acquired = grant.acquire(True, max(give_up_at - time.monotonic(), 0.0))
        except BaseException:
            if not self.replicas.withdraw(entry):
                # Granted or answered meanwhile: the granting thread sets ``granted``, then releases the grant,
                # which this thread may hold already (the exception came just after the acquire): a bounded wait.
                grant.acquire(True, 1.0)
                if type(entry.granted) is _Replica:
                    self.replicas.release(entry.granted, 1)
            raise
        if not acquired:
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


#: Every connection of this process, for a process forked from it (see ``_after_fork_in_child``).
_connections: weakref.WeakSet[RayConnection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    if hooks.forked_from_driver is not None:
        for connection in list(_connections):
            connection._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _RayStreamSource(StreamSource):
    """The caller's end of one stream from a replica (see :meth:`RayConnection.open_stream`)."""

    def __init__(
        self,
        ray: ModuleType | None,
        replica: _Replica | None,
        request: ServiceRequest,
        window: int,
        wire: int,
        replicas: _ReplicaSet | None = None,
    ) -> None:
        self._ray = ray
        self._replica = replica
        #: told when the replica fails the stream (Ray says the actor is gone), so it leaves the rotation
        self._replicas = replicas
        self._request = request
        self._failed: ServiceResponse | None = None
        self._generator: Any = None
        if replica is None:
            return
        try:
            if wire >= 3:  # several items per Ray object (a replica of an older version sends one each)
                self._generator = replica.handle.handle_stream.options(
                    num_returns="streaming", _generator_backpressure_num_objects=stream_shape(window)[1]
                ).remote(*with_clock(wire, _to_wire(request), window, True))
            else:
                self._generator = replica.handle.handle_stream.options(
                    num_returns="streaming", _generator_backpressure_num_objects=window
                ).remote(_to_wire(request), window)
        except Exception as exc:
            self._failed = _send_failure(request, exc)

    @classmethod
    def failed(cls, response: ServiceResponse) -> _RayStreamSource:
        source = cls(None, None, ServiceRequest(response.request_id, "", ""), 1, 0)
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
        except Exception as exc:
            return [], self._broken(f"{type(exc).__name__}: {_first_line(exc)}", exc)
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
            return [], ServiceResponse.from_exception(
                self._request.request_id, error, origin="service", with_traceback=False
            )
        except Exception as exc:
            return [], self._broken(f"{type(exc).__name__}: {_first_line(exc)}", exc)
        if type(value) is _ItemBatch:
            return value.items(), None
        if type(value) is _StreamEnd:
            self._generator = None
            return [], _claimed(self._request, value.response)
        return [value], None

    def _broken(self, why: str, error: BaseException | None = None) -> ServiceResponse:
        """The stream's end when the replica fails it; one Ray reports gone leaves the rotation as a call's would."""
        self._generator = None
        replica = self._replica
        ray = self._ray
        if (
            error is not None
            and replica is not None
            and self._replicas is not None
            and ray is not None
            and isinstance(error, ray.exceptions.RayActorError)
        ):
            # Down (probed until it restarts) or dead for good: without this, a caller that only streams
            # would keep choosing a dead replica, and every stream it got would fail.
            self._replicas.mark_down(replica, error)
        where = f" (replica {replica.name})" if replica is not None else ""
        response = ServiceResponse.from_exception(
            self._request.request_id,
            ServiceUnavailableError(
                f"stream {self._request.service_name}.{self._request.method_name} broke{where}: {why}"
            ),
            origin="runtime",
        )
        response.metadata = {RETRYABLE_KEY: False, MAY_HAVE_RUN_KEY: True}  # it may have run
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


def _connect_deployment(ref: _DeploymentRef) -> RayConnection:
    """A connection to a deployment another driver started, membership re-read every ``membership_refresh`` s."""
    ray = _ray()
    replicas = _ReplicaSet(
        ref.service_name,
        ref.namespace,
        ref.deployment,
        _make_balancer(ref.balancer),
        ref.max_task_retries,
        batch_max=ref.batch_max,
        batch_cost_limit=ref.batch_cost_limit,
    )

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
        raise ServiceUnavailableError(
            f"ray service {ref.service_name!r} has no replica left in namespace {ref.namespace!r}"
        )
    described: dict[str, Any] = {}
    for replica in replicas.snapshot():
        try:
            described = ray.get(replica.handle.describe.options(concurrency_group=_CONTROL_GROUP).remote(), timeout=30)
            break
        except Exception:
            continue
    replicas.adopt_description(described)
    connection = RayConnection(replicas, refresh=refresh, refresh_every=ref.membership_refresh)
    replicas.on_all_down = refresh
    return connection
