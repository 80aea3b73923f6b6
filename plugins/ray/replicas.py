"""Caller side: the replicas of one deployment as this process sees them, how calls are sent to them and how failures are told."""

from __future__ import annotations

import collections
import sys
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from kservice import (
    ServiceRequest,
    ServiceResponse,
    ServiceStatus,
    ServiceStoppedError,
    next_cost_estimate,
)
from kservice.keys import STATUS_LOAD

from .balancers import ReplicaBalancer, wrong_pick
from .common import (
    _CONTROL_GROUP,
    _REFUSED_KEY,
    REPLICA_DOWN_KEY,
    _cancelled,
    _first_line,
    _may_have_run,
    _ray,
    _send_failure,
    _timed_out,
    _unavailable,
)
from .completion import _backlogged, _completer
from .wire import _COST, WireRequest, _from_wire, _Stored, with_clock

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
    #: a reachability check (``_ReplicaSet.check``) is on its way
    checking: bool = False

    def send(self, envelope: Any, idempotent: bool, wire: int) -> Any:
        """Send one call (its ObjectRef): Ray retries it across restarts only when ``idempotent``.

        ``wire``: the replica's wire version, for what travels with the call (:func:`with_clock`).
        """
        send = self.send_retrying if idempotent else self.send_once
        return send.remote(*with_clock(wire, envelope))


# Response metadata keys this transport sets (their contracts: kservice.keys).


class _Waiting:
    """One call on its way to a replica: waiting in the caller for a free slot, or about to be sent.

    ``reply`` is None for a sync call: its own thread waits on ``grant`` and
    sends the call itself once a replica slot is reserved for it
    (``granted`` is then the replica) or reads its answer (``granted`` is a
    response: the call was refused without being sent).
    """

    __slots__ = (
        "batchable",
        "bulk",
        "cancelled",
        "envelope",
        "failovers",
        "grant",
        "granted",
        "idempotent",
        "reply",
        "request",
    )

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
        idempotent: frozenset[str] = frozenset(),
        *,
        batch_max: int = 64,
        batch_cost_limit: float = 0.001,
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
        self.batch_max = batch_max
        self.batch_cost_limit = batch_cost_limit
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
        #: ObjectRefs of single async calls not answered yet with their replica, and the replica of batched ones
        #: (for ``cancel``)
        self.refs: dict[str, tuple[Any, _Replica]] = {}
        self.batched_to: dict[str, _Replica] = {}
        self._lock = threading.Lock()
        #: notified when slots free up while someone drains (``drain``)
        self._changed = threading.Condition(self._lock)
        self._draining = 0
        #: called (without the lock) when membership should be re-read (remote callers)
        self.on_all_down: Callable[[], None] | None = None

    # membership ----------------------------------------------------------

    def adopt_description(self, described: dict[str, Any]) -> None:
        """Take what a running replica's ``describe`` said: its idempotent methods, wire version and concurrency.

        A replica that said nothing (``{}``: none answered) leaves no method
        idempotent, wire version 1 (nothing batched) and the capacity as it was.
        """
        self.idempotent = frozenset(described.get("idempotent", ()))
        self.wire = int(described.get("wire", 1))
        self.capacity = int(described.get("max_concurrency", self.capacity))

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
            return self._pick(live) if len(live) > 1 else live[0]

    def _free(self, live: tuple[_Replica, ...]) -> _Replica | None:
        """A live replica with a free slot, chosen by the balancer (holding the lock)."""
        capacity = self.capacity
        if len(live) == 1:
            only = live[0]
            return only if only.slots < capacity else None
        free = [r for r in live if r.slots < capacity]
        if not free:
            return None
        return self._pick(free) if len(free) > 1 else free[0]

    def _pick(self, candidates: Sequence[_Replica]) -> _Replica:
        """The balancer's choice among ``candidates``; TypeError naming it when it chose none of them."""
        picked = self.balancer.pick(candidates)
        for candidate in candidates:
            if candidate is picked:
                return picked
        raise wrong_pick(self.balancer, picked)

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
            ref = replica.send(entry.envelope, entry.idempotent, self.wire)
        except Exception as exc:
            entry.reply(_send_failure(request, exc))  # type: ignore[misc]
            self.release(replica)
            return
        request_id = request.request_id
        self.refs[request_id] = (ref, replica)

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
            if self.should_fail_over(entry, error):
                entry.failovers += 1
                self.submit(entry)
                return
            entry.reply(response)  # type: ignore[misc]

        _completer().add(ref, done)

    def _launch_batch(self, replica: _Replica, batch: list[_Waiting]) -> None:
        """Send ``batch`` as one ``handle_batch`` call; each caller gets its own answer (at most once, like ``send_once``)."""
        try:
            ref = replica.send_batch.remote(*with_clock(self.wire, [entry.envelope for entry in batch]))
        except Exception as exc:  # noqa: BLE001 - every call of the batch gets it
            for entry in batch:
                entry.reply(
                    _unavailable(
                        entry.request,
                        f"Ray could not send a batch of calls to replica {replica.name}: {_first_line(exc)}",
                    )
                )  # type: ignore[misc]
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
            sent = self.refs.pop(request_id, None)
            if sent is not None:
                sys.modules["ray"].cancel(sent[0])
                self.check(sent[1])
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
        self.cancel_many((request,))

    def _stopped(self, request: ServiceRequest) -> ServiceResponse:
        """The refusal of a call the stopped service never sent to a replica (``MAY_HAVE_RUN`` False)."""
        return ServiceResponse.refusal(
            request.request_id,
            ServiceStoppedError(f"service {self.service_name!r} is unavailable: {self.closed_reason}"),
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
        self.method_cost[method_name] = next_cost_estimate(
            self.method_cost.get(method_name), seconds, self.batch_cost_limit
        )

    def batchable(self, method_name: str) -> bool:
        """Whether an async call of ``method_name`` that has to wait may leave in a batch with others (see RayConnection)."""
        if self.batch_max <= 1 or self.wire < 2:
            return False
        cost = self.method_cost.get(method_name)
        return cost is not None and cost < self.batch_cost_limit

    def should_fail_over(self, entry: _Waiting, error: BaseException) -> bool:
        """Whether a failed call of an idempotent method goes to another replica (Ray already retried it on its own).

        Never a call its caller cancelled (``error`` is Ray's TaskCancelledError): it may be running still, and
        the caller gave it up.
        """
        if not entry.idempotent or entry.failovers >= len(self.replicas) or not self.live:
            return False
        if isinstance(error, sys.modules["ray"].exceptions.TaskCancelledError):
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
        return _may_have_run(
            request, f"call {what} to replica {replica.name} failed in Ray: {_first_line(exc)}", retryable=False
        )

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

    def check(self, replica: _Replica) -> None:
        """A call sent to ``replica`` went unanswered (timed out, cancelled): take it out of rotation if Ray cannot reach it.

        Never blocks. Ray re-sends a call of an idempotent method
        (``send_retrying``) to a restarting actor without telling the caller
        and holds it until the actor is back, which never happens when the
        replica's node is lost and its resources exist nowhere else: the
        caller only sees its deadline pass, and the replica would stay in the
        rotation, every call sent there timing out. So a control call that
        Ray does not retry asks the replica: Ray fails it at once for an
        actor it cannot reach (restarting, its node gone, dead), and the
        replica then goes down as after a failed call (:meth:`mark_down`:
        probed until it serves again). A replica that answers stays; one check
        per replica at a time.
        """
        with self._lock:
            if replica.checking or not replica.up or replica.dead or replica.leaving or self.closed_reason:
                return
            replica.checking = True
        try:
            ask = replica.handle.ready.options(max_task_retries=0, concurrency_group=_CONTROL_GROUP).remote()
        except Exception:  # noqa: BLE001 - best effort: the replica stays as it was
            replica.checking = False
            return
        ask.future().add_done_callback(lambda done: self._checked(replica, done.exception()))

    def _checked(self, replica: _Replica, error: BaseException | None) -> None:
        """A reachability check answered: a Ray actor error takes the replica down (anything else: it answers)."""
        with self._lock:
            replica.checking = False
        if error is not None and isinstance(error, sys.modules["ray"].exceptions.RayActorError):
            self.mark_down(replica, error)

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
    #: the running replicas' latest deadlines (None: one of them cannot say): see ServiceStatus.running_until
    running_until: list[float | None] = []
    for replica, ask in zip(members, asks, strict=True):
        entry: dict[str, Any] = {
            "index": replica.index,
            "actor": replica.name,
            **replica.info,
            "client_in_flight": replica.in_flight,
        }
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
        replica_load = (remote.get("extra") or {}).get(STATUS_LOAD)
        if isinstance(replica_load, dict):
            entry[STATUS_LOAD] = replica_load  # the replica's own window (the metrics plugin sums them)
        if not entry["healthy"]:
            reasons.append(f"{replica.name}: {entry['health_reason'] or 'down'}")
        for key in ("requests_total", "errors_total", "expired_total", "in_flight", "queue_depth", "restarts"):
            setattr(status, key, getattr(status, key) + int(remote.get(key, 0) or 0))
        if remote.get("in_flight"):
            until, clock = remote.get("running_until"), remote.get("clock")
            if isinstance(until, int | float) and isinstance(clock, int | float):
                until += time.time() - clock  # the replica's clock, read on this one's (deadlines were rebased there)
            running_until.append(float(until) if isinstance(until, int | float) else None)
        status.max_workers = max(status.max_workers, int(remote.get("max_workers", 0) or 0))
        status.extra.setdefault("replicas", []).append(entry)
    status.extra.setdefault("replicas", [])
    if running_until and None not in running_until:
        status.running_until = max(until for until in running_until if until is not None)
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
