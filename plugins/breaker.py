"""The ``breaker`` plugin: a circuit breaker per service, in the caller's process.

States:

- ``closed``: calls go through; failures are counted. The breaker opens after
  ``failure_threshold`` consecutive failures, or, when ``failure_rate`` is
  set, when at least ``minimum_calls`` calls in the last ``window`` seconds
  failed at that rate or more.
- ``open``: calls fail at once with :class:`CircuitOpenError` (a
  ServiceUnavailableError) without reaching the service. The rejection is
  marked ``metadata["kservice.retryable"] = False`` so retries never hammer
  an open breaker.
- ``half_open``: after ``cooldown`` seconds, ``half_open_probes`` calls are let
  through as probes; when all of them succeed the breaker closes, the first
  failing probe re-opens it (and the cool-down starts again). Other calls are
  rejected while probes are out. A probe whose outcome never comes back (a
  cancelled async call) is given up after another ``cooldown``.

What counts as a failure: runtime unavailability (ServiceUnavailableError,
ServiceOverloadedError) and timeouts (ServiceTimeoutError), whether or not the
call ran: a call whose deadline passed while it waited in the service's queue
is one the service could not serve in time, and the caller waited for it. One
kind of refusal is not an outcome of the service at all: a ServiceOverloadedError
the service's own task gave at its admission limit (``kservice.keys.AT_CAPACITY``:
its request queue stayed full for ``service.local.queue_timeout``; the service
answered and is serving at capacity). It counts neither as a failure nor as a
success, and a half-open probe refused so frees its probe slot. (An overload
the caller's transport saw, a request ring its host did not drain, still counts:
the host is not reading.) Nor does the ServiceUnavailableError of a call made while
health recovery replaces the service's host (``kservice.keys.HOST_REPLACING``:
nothing was sent, and its retry waits for the new host; counting it would cut
callers off for a cool-down after the new host serves). Nor does the refusal of a
request a transport could not send because its connection is closed for good
(``kservice.keys.CONNECTION_CLOSED``: the host's queue closed; nothing was
sent, and the manager resolves the name again: a new host gets the call at
once, and a name that no longer resolves fails later calls before they are
sent). And when the service
resolves to another address while the breaker is open (its host died or was
drained and a new one serves under the name: a supervisor's restart, a
redeploy), the next call is a half-open probe at once: the failures were the
old host's (``kservice_middleware`` tells the breaker where each route a
caller compiles leads). ServiceStoppedError does not count: a service stopped on purpose
already answers at once, and counting it would keep the breaker open for a
cool-down after the service is restarted. An exception
raised by the method itself (a KeyError) means the service answered: it counts
as a success unless ``count_service_errors`` is true. MethodNotFoundError and
errors raised by caller-side middleware never count.

Breakers live in the caller's process, one per service name (keyed by
``(service_name, instance)``, with ``instance`` empty today so per-replica
breakers can be added), shared by every manager of that process that calls it
with the same settings. Their state is in :func:`breaker_status` and in the
``extra["breaker"]`` of the status of tasks in this process.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from kservice import (
    CallBatch,
    ServiceAddress,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    ServiceUnavailableError,
    Setting,
    hookimpl,
)
from kservice._fork import renew_after_fork
from kservice.keys import AT_CAPACITY, CIRCUIT_OPEN, CONNECTION_CLOSED, HOST_REPLACING, REPLICA_DOWN, RETRYABLE

if TYPE_CHECKING:
    from kservice import BaseServiceTask, ServiceStatus

__all__ = [
    "CircuitBreaker",
    "CircuitOpenError",
    "breaker_state",
    "breaker_status",
    "reset_breaker",
]

BreakerState = Literal["closed", "open", "half_open"]

#: Runtime errors that say the service could not serve: these trip the breaker.
FAILURE_TYPES = frozenset({"ServiceUnavailableError", "ServiceOverloadedError", "ServiceTimeoutError"})

_CLOSED: BreakerState = "closed"
_OPEN: BreakerState = "open"
_HALF_OPEN: BreakerState = "half_open"
#: Sub-windows of the failure-rate window: the rate is exact to one bucket's width.
_BUCKETS = 10


class CircuitOpenError(ServiceUnavailableError):
    """The service's circuit breaker is open: the call was refused without reaching the service.

    ``probe_at`` is the breaker clock's time (``time.monotonic()`` by default)
    from which a probe call is let through, in the process whose breaker
    refused (a rejection a service relays carries it, like any exception's
    attributes); 0.0 when unknown.
    """

    #: the class default covers instances built without ``__init__`` (the core's error rebuilding)
    probe_at: float = 0.0

    def __init__(self, message: str, probe_at: float = 0.0) -> None:
        super().__init__(message)
        self.probe_at = probe_at


#: ``CircuitOpenError.__new__``: exceptions inherit BaseException's, which sets ``args``.
_new_exception = BaseException.__new__


def _not_an_outcome(response: ServiceResponse) -> bool:
    """A refusal that says nothing of how the service serves: at its admission limit, while its host is
    replaced, or by a connection closed for good (it says where the service is not)."""
    metadata = response.metadata
    return bool(metadata.get(AT_CAPACITY) or metadata.get(HOST_REPLACING) or metadata.get(CONNECTION_CLOSED))


def _circuit_open_error(message: str, probe_at: float) -> CircuitOpenError:
    """``CircuitOpenError(message, probe_at)`` without the Python-level ``__init__`` call.

    ``BaseException.__new__`` already sets ``args`` to ``(message,)``, which is
    all ``__init__`` adds besides ``probe_at``; skipping the two Python frames
    (``__init__`` and ``super().__init__``) saves ~0.25 µs per rejected call.
    """
    error = _new_exception(CircuitOpenError, message)
    error.probe_at = probe_at
    return error


class CircuitBreaker(ServiceMiddleware):
    """The breaker of one service; also the middleware that applies it.

    ``settings`` is the effective ``breaker`` section. ``clock`` returns
    monotonic seconds (tests drive it). Thread-safe: state changes happen
    under a lock; the closed-state success path takes no lock.
    """

    def __init__(
        self,
        service_name: str,
        settings: dict[str, Any],
        *,
        instance: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service_name = service_name
        self.instance = instance
        self.settings = dict(settings)
        self.failure_threshold: int = settings["failure_threshold"]
        self.failure_rate: float | None = settings["failure_rate"]
        self.minimum_calls: int = settings["minimum_calls"]
        self.window: float = settings["window"]
        self.cooldown: float = settings["cooldown"]
        self.half_open_probes: int = settings["half_open_probes"]
        self.count_service_errors: bool = settings["count_service_errors"]
        self._clock = clock
        self._lock = threading.Lock()
        renew_after_fork(self, "_lock")
        self.state: BreakerState = _CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_at = 0.0
        self._open_message = ""
        #: where callers' calls go (the last route compiled), and where they went when the breaker opened
        self._address: ServiceAddress | None = None
        self._opened_on: ServiceAddress | None = None
        #: closed-state successes need no bookkeeping unless a failure-rate window is kept
        self._fast = self.failure_rate is None
        # ServiceMiddleware.hooks_idle: closed, no failure counted, no window to count successes into. The
        # chain then skips admit/before_call and the after_call of successes (kept by _settle_idle).
        self.hooks_idle = self._fast
        self._probes_out: set[str] = set()
        self._probes_ok = 0
        self._probes_started_at = 0.0
        self.opened_total = 0
        self.rejected_total = 0
        self.last_failure = ""
        # Failure-rate window: ring of (calls, failures) per bucket, only when failure_rate is set.
        self._bucket_width = self.window / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS
        self._bucket_epoch = [0] * _BUCKETS

    # ------------------------------------------------------------ middleware

    def before_call(self, request: ServiceRequest) -> ServiceResponse | None:
        state = self.state
        if state is _CLOSED:
            return None
        if state is _OPEN and self._clock() < self._probe_at:
            # The flood path: fail fast without the lock (a stale read only sends this call down the locked path).
            self.rejected_total += 1  # approximate under races; status only
            return self._rejection(request)
        return self._admit(request)

    def admit(self, service_name: str, method_name: str) -> BaseException | None:
        """The open breaker's flood path: refuse before a request is built (no lock; a stale read admits)."""
        if self.state is _OPEN and self._clock() < self._probe_at:
            self.rejected_total += 1  # approximate under races; status only
            return _circuit_open_error(self._open_message, self._probe_at)
        return None

    def on_refused(self, service_name: str, method_name: str, error: BaseException) -> None:
        """A refusal is not an outcome of the service: nothing to record."""

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if self._fast and response.success and self.state is _CLOSED:
            if self._consecutive:
                self._end_run()
            return
        if not response.success and _not_an_outcome(response):
            self._not_an_outcome(request.request_id)
            return
        self.record(self._is_failure(response), request.request_id, response)

    def admit_batch(self, batch: CallBatch) -> BaseException | None:
        """A chunk of a map, as ``before_call`` admits one call: closed, it goes; open, every call is refused.

        Half-open, the chunk is one probe when a probe slot is free (its
        outcome, every call together, decides as a probe call's does), else
        refused. A refused chunk counts ``batch.count`` rejections.
        """
        state = self.state
        if state is _CLOSED:
            return None
        if state is _OPEN and self._clock() < self._probe_at:
            self.rejected_total += batch.count  # approximate under races; status only
            return _circuit_open_error(self._open_message, self._probe_at)
        if self._let_through(batch.batch_id, batch.count):
            return None
        return _circuit_open_error(self._open_message, self._probe_at)

    def after_batch(self, batch: CallBatch) -> None:
        """A chunk's outcome, counted as its calls' outcomes in item order would be (see :meth:`record_batch`)."""
        if batch.refused is not None:
            return  # refused before it was sent: not an outcome of the service
        if self._fast and not batch.failures and self.state is _CLOSED:
            if self._consecutive:
                self._end_run()
            return
        self.record_batch(batch)

    # ----------------------------------------------------------------- logic

    def _end_run(self) -> None:
        """A success after counted failures ends their run; the breaker is idle again.

        Under the lock, unlike the rest of the closed-state success path: the
        chain stops calling ``after_call`` for successes once ``hooks_idle`` is set,
        so ``hooks_idle`` must never be set beside a failure counted meanwhile.
        While idle the chain does not call this, so it runs once per run of
        failures.
        """
        with self._lock:
            if self.state is _CLOSED:
                self._consecutive = 0
                self._settle_idle()

    def _is_failure(self, response: ServiceResponse) -> bool:
        if response.success:
            return False
        if response.metadata.get(REPLICA_DOWN):
            # A transport with replicas (ray) took the failing replica out of rotation and
            # others serve: isolating it is per-replica breaking; the service is not failing.
            return False
        origin = response.error_origin
        if origin == "runtime":
            return response.error_type in FAILURE_TYPES
        return origin == "service" and self.count_service_errors

    def _not_an_outcome(self, probe_id: str) -> None:
        """A call the service refused at its admission limit: nothing is counted; a probe's slot is freed."""
        if self.state is _HALF_OPEN:
            with self._lock:
                self._probes_out.discard(probe_id)

    def _admit(self, request: ServiceRequest) -> ServiceResponse | None:
        """Open or half-open: let a probe through, or answer with a fail-fast rejection."""
        if self._let_through(request.request_id, 1):
            return None
        return self._rejection(request)

    def _let_through(self, probe_id: str, count: int) -> bool:
        """Open or half-open: whether ``probe_id`` goes as a probe (or the breaker closed meanwhile); else ``count`` rejections are counted."""
        with self._lock:
            now = self._clock()
            if self.state is _OPEN and now - self._opened_at >= self.cooldown:
                self.state = _HALF_OPEN
                self._probes_out.clear()
                self._probes_ok = 0
                self._probes_started_at = now
            if self.state is _HALF_OPEN:
                if self._probes_out and now - self._probes_started_at >= self.cooldown:
                    # A probe's outcome never came back (a cancelled call): give up on it.
                    self._probes_out.clear()
                    self._probes_started_at = now
                if len(self._probes_out) + self._probes_ok < self.half_open_probes:
                    self._probes_out.add(probe_id)
                    return True
            elif self.state is _CLOSED:
                return True
            self.rejected_total += count
        return False

    def _rejection(self, request: ServiceRequest) -> ServiceResponse:
        """A fresh fail-fast answer to ``request``.

        Each rejection gets its own response and exception: callers raise the
        exception (a shared one would collect every raiser's traceback) and
        the retry policy annotates it. What is shared is prepared when the
        breaker opens: the message, built once per open period.
        """
        message = self._open_message
        return ServiceResponse(
            False,
            None,
            message,
            request.request_id,
            "CircuitOpenError",
            "runtime",
            "",
            {RETRYABLE: False, CIRCUIT_OPEN: True},
            False,
            _circuit_open_error(message, self._probe_at),
        )

    def record(self, failed: bool, request_id: str = "", response: ServiceResponse | None = None) -> None:
        """Count one outcome; may open, close or re-open the breaker."""
        with self._lock:
            now = self._clock()
            if failed and response is not None:
                self.last_failure = f"{response.error_type}: {response.error}"
            if self.state is _HALF_OPEN:
                self._probe_done(request_id, failed, now)
                return
            if self.state is _OPEN:
                return  # late outcomes of calls admitted before it opened
            if self.failure_rate is not None:
                self._count_in_window(now, failed)
                if failed and self._rate_exceeded(now):
                    self._open(now)
                    return
            if failed:
                self._consecutive += 1
                self.hooks_idle = False  # the next success must end the run
                if self._consecutive >= self.failure_threshold:
                    self._open(now)
            else:
                self._consecutive = 0
                self._settle_idle()

    def _probe_done(self, probe: str, failed: bool, now: float) -> None:
        """Half-open: the outcome of probe ``probe`` (a call's or a chunk's id); called under the lock."""
        if probe not in self._probes_out:
            return  # admitted before the breaker opened: not a probe
        self._probes_out.discard(probe)
        if failed:
            self._open(now)
        else:
            self._probes_ok += 1
            if self._probes_ok >= self.half_open_probes:
                self._close()

    def record_batch(self, batch: CallBatch) -> None:
        """Count a chunk's outcomes as ``batch.count`` calls finishing in item order would be counted.

        Closed: every call goes into the failure-rate window; consecutive
        failures run on across the chunk (and from the calls before it), so
        the breaker opens if any run of counted failures reaches
        ``failure_threshold``; a counted success (or a failure the breaker does
        not count) ends a run. Half-open, a chunk admitted as a probe is one
        probe: any counted failure re-opens the breaker, none is one probe
        passed. Open: late outcomes are ignored, as single calls' are.
        """
        is_failure = self._is_failure
        failures = batch.failures
        # Refusals at the service's admission limit are not outcomes (see the module docstring): skipped.
        skipped = {index for index, response in failures.items() if _not_an_outcome(response)}
        counted = sorted(index for index, response in failures.items() if index not in skipped and is_failure(response))
        with self._lock:
            now = self._clock()
            if counted:
                last = failures[counted[-1]]
                self.last_failure = f"{last.error_type}: {last.error}"
            if self.state is _HALF_OPEN:
                if not counted and len(skipped) == batch.count:
                    self._probes_out.discard(batch.batch_id)  # nothing was served: no verdict
                else:
                    self._probe_done(batch.batch_id, bool(counted), now)
                return
            if self.state is _OPEN:
                return
            if self.failure_rate is not None:
                index, epoch = self._bucket(now)
                if self._bucket_epoch[index] != epoch:
                    self._bucket_epoch[index] = epoch
                    self._calls[index] = 0
                    self._fails[index] = 0
                self._calls[index] += batch.count - len(skipped)
                self._fails[index] += len(counted)
                if counted and self._rate_exceeded(now):
                    self._open(now)
                    return
            run = self._consecutive
            counted_set = set(counted)
            following = 0  # the index that continues the run (skipped calls neither extend nor end it)
            for index in sorted(failures):
                if index in skipped:
                    if index == following:
                        following += 1
                    continue
                if index != following:
                    run = 0  # a success came between
                following = index + 1
                if index not in counted_set:
                    run = 0  # a failure the breaker does not count ends a run, as a success does
                    continue
                run += 1
                if run >= self.failure_threshold:
                    self._open(now)
                    return
            self._consecutive = run if following == batch.count else 0
            self._settle_idle()

    def _bucket(self, now: float) -> tuple[int, int]:
        epoch = int(now / self._bucket_width)
        return epoch % _BUCKETS, epoch

    def _count_in_window(self, now: float, failed: bool) -> None:
        index, epoch = self._bucket(now)
        if self._bucket_epoch[index] != epoch:
            self._bucket_epoch[index] = epoch
            self._calls[index] = 0
            self._fails[index] = 0
        self._calls[index] += 1
        if failed:
            self._fails[index] += 1

    def _window_counts(self, now: float) -> tuple[int, int]:
        _, epoch = self._bucket(now)
        calls = fails = 0
        for i in range(_BUCKETS):
            if epoch - self._bucket_epoch[i] < _BUCKETS:
                calls += self._calls[i]
                fails += self._fails[i]
        return calls, fails

    def _rate_exceeded(self, now: float) -> bool:
        calls, fails = self._window_counts(now)
        return calls >= self.minimum_calls and fails >= self.failure_rate * calls  # type: ignore[operator]

    def routed_to(self, address: ServiceAddress) -> None:
        """Callers now reach the service at ``address``: an open breaker whose failures were another address's probes at once.

        The failures that opened it said the old host could not serve (it
        died, or was stopping); a new host (a restarted ``kservice serve``, a
        service that moved) has not failed yet, and its first call is a
        half-open probe instead of waiting out the cool-down: before, every
        call failed fast for the whole cool-down although the new host served.
        A probe that fails re-opens the breaker as usual.
        """
        with self._lock:
            self._address = address
            if self.state is _OPEN and self._opened_on is not None and address != self._opened_on:
                now = self._clock()
                self._opened_at = now - self.cooldown
                self._probe_at = now

    def _open(self, now: float) -> None:
        self._opened_on = self._address
        self._opened_at = now
        self._probe_at = now + self.cooldown
        self._open_message = (
            f"circuit breaker of service {self.service_name!r} is open after {self.last_failure or 'failures'}; "
            f"failing fast without calling it (a probe call goes through {self.cooldown:g}s after it opened)"
        )
        self.state = _OPEN
        self.hooks_idle = False
        self._probes_out.clear()
        self._probes_ok = 0
        self.opened_total += 1

    def _close(self) -> None:
        self.state = _CLOSED
        self._consecutive = 0
        self._calls = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS
        self._bucket_epoch = [0] * _BUCKETS
        self._settle_idle()

    def _settle_idle(self) -> None:
        """Set ``hooks_idle`` from the state: closed, no failure counted, no failure-rate window (under the lock)."""
        self.hooks_idle = self._fast and self.state is _CLOSED and self._consecutive == 0

    def reset(self) -> None:
        """Close the breaker and forget every count (operators' override)."""
        with self._lock:
            self._close()
            self._probes_out.clear()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view: state, counts, seconds until the next probe."""
        with self._lock:
            now = self._clock()
            calls, fails = self._window_counts(now) if self.failure_rate is not None else (0, 0)
            return {
                "state": self.state,
                "consecutive_failures": self._consecutive,
                "window_calls": calls,
                "window_failures": fails,
                "opened_total": self.opened_total,
                "rejected_total": self.rejected_total,
                "retry_after": max(0.0, self.cooldown - (now - self._opened_at)) if self.state is _OPEN else 0.0,
                "last_failure": self.last_failure,
            }

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.service_name!r} {self.state}>"


# ------------------------------------------------------------------ registry

_breakers: weakref.WeakValueDictionary[tuple[str, str], CircuitBreaker] = weakref.WeakValueDictionary()
_breakers_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_breakers_lock")


def _breaker_for(service_name: str, settings: dict[str, Any], instance: str = "") -> CircuitBreaker:
    """The process's breaker of a service; a new one when its settings changed."""
    key = (service_name, instance)
    with _breakers_lock:
        breaker = _breakers.get(key)
        if breaker is None or breaker.settings != settings:
            breaker = CircuitBreaker(service_name, settings, instance=instance)
            _breakers[key] = breaker
        return breaker


def breaker_status(service_name: str | None = None) -> dict[str, dict[str, Any]]:
    """Snapshots of the breakers in this process by service name (one service, or all)."""
    with _breakers_lock:
        items = [(key, b) for key, b in _breakers.items() if service_name is None or key[0] == service_name]
    return {(name if not instance else f"{name}/{instance}"): b.snapshot() for (name, instance), b in sorted(items)}


def breaker_state(service_name: str) -> BreakerState | None:
    """``closed``, ``open`` or ``half_open``; None when no call to it has built a breaker in this process."""
    breaker = _breakers.get((service_name, ""))
    return None if breaker is None else breaker.snapshot()["state"]


def reset_breaker(service_name: str) -> bool:
    """Close a service's breaker now; False when it has none in this process."""
    breaker = _breakers.get((service_name, ""))
    if breaker is None:
        return False
    breaker.reset()
    return True


# --------------------------------------------------------------------- hooks


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "breaker",
        {
            "enabled": Setting((bool,), True, "Whether calls to the service go through a circuit breaker."),
            "failure_threshold": Setting((int,), 5, "Consecutive failures that open the breaker.", minimum=1),
            "failure_rate": Setting(
                (float,),
                None,
                "Open when this fraction of calls in the window failed (null: off).",
                nullable=True,
                minimum=0,
            ),
            "minimum_calls": Setting((int,), 20, "Calls the window needs before failure_rate applies.", minimum=1),
            "window": Setting((float,), 10.0, "Seconds of history failure_rate looks at.", minimum=0.001),
            "cooldown": Setting(
                (float,), 5.0, "Seconds an open breaker fails fast before letting probes through.", minimum=0
            ),
            "half_open_probes": Setting(
                (int,), 1, "Probe calls that must all succeed to close the breaker.", minimum=1
            ),
            "count_service_errors": Setting(
                (bool,),
                False,
                "Count exceptions raised by the method itself as failures (default: only runtime failures).",
            ),
        },
    )


@hookimpl(trylast=True)
def kservice_middleware(
    service_name: str, options: dict[str, Any], address: ServiceAddress | None
) -> ServiceMiddleware | None:
    # trylast: the breaker is the innermost policy, so fallback and cache (tryfirst) wrap it:
    # the fallback's after_call sees the breaker's rejection, and cache hits never count as probes.
    settings = options.get("breaker")
    if not settings or not settings["enabled"]:
        return None
    breaker = _breaker_for(service_name, settings)
    if address is not None:
        breaker.routed_to(address)
    return breaker


@hookimpl
def kservice_task_status(task: BaseServiceTask, status: ServiceStatus) -> None:
    breaker = _breakers.get((task.service_name, ""))
    if breaker is not None:
        status.extra["breaker"] = breaker.snapshot()


@hookimpl
def kservice_status_columns(status: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """The ``breaker`` column: the state word of ``extra["breaker"]``."""
    section = extra.pop("breaker", None)
    if section is None:
        return None
    return {"breaker": str(section.get("state", "?")) if isinstance(section, dict) else str(section)}
