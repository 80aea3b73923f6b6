"""Call metrics and service load, on both sides of every call.

Counts calls, errors by error type and degraded responses, and keeps latency
histograms, per service and method, separately for the caller's view
(``client``: each attempt, client middleware and transport included) and the
service's view (``server``: the method and server middleware only). Both are
observers (``observe_call``/``observe_handle``): the chain times the call once
for all of them and tells them the final response, so recording a call is a
few increments, with no table of start times. Everything is per process: a service hosted by
another process or a Ray actor counts its server side there and reports it
through its status.

Exposed as:

- :func:`snapshot`: a plain dict, for tests, logs and dashboards;
- :func:`prometheus_text` / :func:`registry`: Prometheus exposition through
  prometheus-client (``pip install kservice[metrics]``), on a dedicated
  ``CollectorRegistry`` so the application's global registry is left alone;
- ``status.extra["load"]`` of every task served in this process: in-flight
  calls, queue depth, calls/s and p50/p90/p99 latency per service and method
  over the last ``metrics.load_window`` seconds;
- ``status.extra["recent_errors"]``: the service's last failed calls with
  their tracebacks (recorded only when a call fails), shown by ``kservice dashboard``.

Why not prometheus-client's own Counter and Histogram on the call path: a
labelled ``Histogram.observe`` plus ``Counter.inc`` costs about 2 µs per call
on the reference machines, several times this module's whole per-call cost.
Calls are recorded into plain Python structures under one lock per service
and side, and rendered for Prometheus only when scraped (a custom collector).
The histogram has fixed log-spaced buckets (about 26 % apart, 1 µs to 100 s):
percentiles interpolated inside such a bucket are within a few percent, the
memory is fixed whatever the traffic, and Prometheus gets a coarser subset
(1, 2.5, 5 per decade) of the same boundaries.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from bisect import bisect_left, bisect_right
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kservice import CallBatch, ServiceMiddleware, ServiceRequest, ServiceResponse, Setting, hookimpl
from kservice._fork import renew_after_fork
from kservice.keys import STATUS_LOAD, STATUS_REPLICAS

if TYPE_CHECKING:
    from kservice import BaseServiceTask, ServiceStatus

__all__ = [
    "BUCKET_BOUNDS",
    "MAX_TRACKED_METHODS",
    "OTHER_METHODS",
    "ClientMetrics",
    "ServerMetrics",
    "ServiceRecorder",
    "load",
    "prometheus_text",
    "registry",
    "reset",
    "snapshot",
]

_MANTISSAS = (1.0, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 6.3, 8.0)
#: Upper bounds (seconds) of the latency buckets; one more bucket counts what is above the last.
BUCKET_BOUNDS: tuple[float, ...] = (
    *(round(m * 10.0**e, 12) for e in range(-6, 2) for m in _MANTISSAS),
    100.0,
)
#: Indices of the bounds exported to Prometheus (1, 2.5 and 5 per decade, and the last).
_PROMETHEUS_INDICES: tuple[int, ...] = (
    *(decade * len(_MANTISSAS) + j for decade in range(8) for j, m in enumerate(_MANTISSAS) if m in (1.0, 2.5, 5.0)),
    len(BUCKET_BOUNDS) - 1,
)
_NBUCKETS = len(BUCKET_BOUNDS) + 1
#: Bucket index of every duration under 100 µs in steps of 10 ns, the resolution at which every
#: bound below 100 µs is a whole number of steps, so ``_FAST_BUCKET[int(seconds * 1e8)]`` is
#: ``bisect_right(BUCKET_BOUNDS, seconds)`` (but for the float rounding of a value one bit below a
#: bound) at about half its cost; most calls are that fast.
_FAST_STEPS = 10_000


def _fast_bucket_table() -> list[int]:
    """``[bisect_right(BUCKET_BOUNDS, step / 1e8) for step in range(_FAST_STEPS)]``, built run by run.

    The list is filled a run of equal indices at a time (one per bound below
    100 µs) instead of by 10,000 bisections: that took 2.5 ms of every process
    start that loads this plugin.
    """
    table: list[int] = []
    for index, bound in enumerate(BUCKET_BOUNDS):
        first = min(int(bound * 1e8), _FAST_STEPS)  # the first step at or above the bound: int() is within one
        while first > 0 and (first - 1) / 1e8 >= bound:
            first -= 1
        while first < _FAST_STEPS and first / 1e8 < bound:
            first += 1
        table.extend([index] * (first - len(table)))
        if first == _FAST_STEPS:
            return table
    table.extend([len(BUCKET_BOUNDS)] * (_FAST_STEPS - len(table)))
    return table


_FAST_BUCKET: list[int] = _fast_bucket_table()
#: Durations below this many seconds have their bucket in ``_FAST_BUCKET`` (one step short of its end,
#: so that ``int(seconds * 1e8)`` cannot round up past the table).
_FAST_SECONDS = (_FAST_STEPS - 1) / 1e8
#: Marks per load window: rates and percentiles slide in steps of window / _MARKS.
_MARKS = 6
#: Failed calls each service keeps for ``status.extra["recent_errors"]`` (server side), newest last.
RECENT_ERRORS = 20
#: Characters kept of a recent error's message and of its traceback (the end, where the raise is).
_ERROR_CHARS = 2000
_TRACEBACK_CHARS = 8000

SIDES = ("client", "server")

#: Distinct method names one service and side counts on their own; calls of further names count
#: under OTHER_METHODS, so the state (and the Prometheus label set) stays bounded whatever names
#: callers try.
MAX_TRACKED_METHODS = 256
#: The shared entry of calls whose method does not exist (MethodNotFoundError, on either side) and
#: of names beyond MAX_TRACKED_METHODS.
OTHER_METHODS = "(other)"


def _schema() -> dict[str, Setting]:
    return {
        "enabled": Setting((bool,), True, "Record call metrics for this service (both sides unless turned off below)."),
        "client": Setting(
            (bool,), True, "Record the caller's view: each attempt, client middleware and transport included."
        ),
        "server": Setting((bool,), True, "Record the service's view and its load: the method and server middleware."),
        "load_window": Setting(
            (float,),
            60.0,
            "Seconds over which status.extra['load'] computes calls/s and latency percentiles.",
            minimum=1.0,
        ),
    }


class _MethodStats:
    """Cumulative counts of one method in one shard (written by one thread only).

    The call count is the sum of the buckets, so a call costs one increment less.
    ``errors`` counts by error type; in a shard it is a ``defaultdict(int)``, so
    counting a failed call is one ``+= 1`` (copies and sums are plain dicts).
    ``pending`` holds the durations of successful calls recorded by an observer
    and not yet counted into ``buckets`` and ``seconds`` (see
    :func:`_fold_pending`): readers count them through :meth:`copy` and
    :meth:`add`, so a reader never sees the difference.
    """

    __slots__ = ("buckets", "degraded", "errors", "items", "pending", "seconds", "streams")

    def __init__(self) -> None:
        self.degraded = 0
        #: streamed calls among the calls, and the items they delivered
        self.streams = 0
        self.items = 0
        self.seconds = 0.0
        self.errors: dict[str, int] = defaultdict(int)
        self.buckets = [0] * _NBUCKETS
        self.pending: list[float] = []

    @property
    def calls(self) -> int:
        return sum(self.buckets) + len(self.pending)

    def copy(self) -> _MethodStats:
        """A folded copy (nothing pending), safe to take while the owning thread records."""
        other = _MethodStats()
        other.degraded, other.seconds = self.degraded, self.seconds
        other.streams, other.items = self.streams, self.items
        other.errors = dict(self.errors)
        # Buckets before pending: the writer detaches its pending list before folding it in (see
        # _fold_pending), so a copy may miss a fold in progress but never counts a call twice.
        other.buckets = list(self.buckets)
        _count_durations(other, list(self.pending))
        return other

    def add(self, part: _MethodStats) -> None:
        self.degraded += part.degraded
        self.seconds += part.seconds
        self.streams += part.streams
        self.items += part.items
        for key, value in list(part.errors.items()):
            self.errors[key] = self.errors.get(key, 0) + value
        self.buckets = [a + b for a, b in zip(self.buckets, part.buckets, strict=True)]
        _count_durations(self, list(part.pending))


def _count_durations(stats: _MethodStats, durations: list[float]) -> None:
    """Count calls that took ``durations`` seconds into ``stats`` (exactly the per-call buckets).

    One C-speed pass finds the calls in the bucket of the fastest (most of
    them, for calls of one method close in time); only the others are
    bucketed one by one, and a wide spread of them is sorted and split by
    bisection, one bucket at a time.
    """
    if not durations:
        return
    stats.seconds += sum(durations)
    buckets = stats.buckets
    low = bisect_right(BUCKET_BOUNDS, min(durations))
    if low >= len(BUCKET_BOUNDS):
        buckets[low] += len(durations)
        return
    bound = BUCKET_BOUNDS[low]
    slower = [seconds for seconds in durations if seconds >= bound]
    buckets[low] += len(durations) - len(slower)
    if len(slower) < 16:
        for seconds in slower:
            buckets[bisect_right(BUCKET_BOUNDS, seconds)] += 1
        return
    slower.sort()
    start = 0
    while start < len(slower):
        index = bisect_right(BUCKET_BOUNDS, slower[start])
        end = len(slower) if index >= len(BUCKET_BOUNDS) else bisect_left(slower, BUCKET_BOUNDS[index], start)
        buckets[index] += end - start
        start = end


def _percentile(buckets: list[int], total: int, q: float) -> float:
    """The ``q`` quantile in seconds, linearly interpolated inside its bucket (0.0 with no samples)."""
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(BUCKET_BOUNDS):
                return BUCKET_BOUNDS[-1]
            low = BUCKET_BOUNDS[index - 1] if index else 0.0
            high = BUCKET_BOUNDS[index]
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return BUCKET_BOUNDS[-1]


def _summary(stats: _MethodStats) -> dict[str, Any]:
    calls = stats.calls
    return {
        "calls": calls,
        "errors": sum(stats.errors.values()),
        "errors_by_type": dict(stats.errors),
        "degraded": stats.degraded,
        "streams": stats.streams,
        "stream_items": stats.items,
        "latency_sum_s": stats.seconds,
        "latency_p50_ms": _percentile(stats.buckets, calls, 0.50) * 1e3,
        "latency_p90_ms": _percentile(stats.buckets, calls, 0.90) * 1e3,
        "latency_p99_ms": _percentile(stats.buckets, calls, 0.99) * 1e3,
    }


def _merge(parts: Iterable[_MethodStats]) -> _MethodStats:
    total = _MethodStats()
    for part in parts:
        total.add(part)
    return total


def _minus(now: _MethodStats, then: _MethodStats | None) -> _MethodStats:
    if then is None:
        return now
    delta = _MethodStats()
    delta.degraded = now.degraded - then.degraded
    delta.streams = now.streams - then.streams
    delta.items = now.items - then.items
    delta.seconds = now.seconds - then.seconds
    delta.errors = {k: v - then.errors.get(k, 0) for k, v in now.errors.items() if v - then.errors.get(k, 0)}
    delta.buckets = [a - b for a, b in zip(now.buckets, then.buckets, strict=True)]
    return delta


_Shard = dict[str, _MethodStats]


class ServiceRecorder:
    """Counts and latencies of one service on one side, in this process.

    Recording is the only per-call work and takes no lock: each thread counts
    into its own shard (a ``threading.local``), and readers add the shards up
    (a thread's shard is folded into the totals when the thread has ended).
    Readers may miss a call recorded while they read; no call is ever lost.
    Everything else (percentiles, windows, Prometheus) is computed when read.
    ``clock`` is a monotonic clock in seconds (``time.perf_counter``); tests
    pass their own to drive the load window.
    """

    def __init__(
        self, side: str, service_name: str, *, window: float = 60.0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.side = side
        self.service_name = service_name
        self.window = window
        self.clock = clock
        self.tls = threading.local()
        self.lock = threading.Lock()  # guards the shard list, the retired totals and the marks
        renew_after_fork(self, "lock")
        self._shards: list[tuple[weakref.ref[threading.Thread], _Shard]] = []
        self._retired: _Shard = {}
        self._names: set[str] = set()  # names counted on their own (at most MAX_TRACKED_METHODS)
        self._step = window / _MARKS
        self._marks: deque[tuple[float, _Shard]] = deque()
        self.next_mark = 0.0
        # The server side remembers its last failed calls (appended only on failure: no cost on success).
        self.recent_errors: deque[tuple[float, str, str, str, str]] | None = (
            deque(maxlen=RECENT_ERRORS) if side == "server" else None
        )
        self._mark(clock())

    def shard(self) -> _Shard:
        """This thread's shard (created on its first call)."""
        try:
            return self.tls.shard  # type: ignore[no-any-return]
        except AttributeError:
            shard: _Shard = {}
            with self.lock:
                self._shards.append((weakref.ref(threading.current_thread()), shard))
            self.tls.shard = shard
            return shard

    def stats_for(self, shard: _Shard, method: Any, unknown: bool = False) -> _MethodStats:
        """Where a call of ``method`` counts when ``shard`` has no entry for it yet (the slow path).

        ``unknown`` (the method does not exist), a name that is not a str, and
        names beyond ``MAX_TRACKED_METHODS`` count under ``OTHER_METHODS``.
        """
        key = OTHER_METHODS
        if not unknown and type(method) is str:
            with self.lock:
                if method in self._names or len(self._names) < MAX_TRACKED_METHODS:
                    self._names.add(method)
                    key = method
        stats = shard.get(key)
        if stats is None:
            stats = shard[key] = _MethodStats()
        return stats

    def record(
        self, method: str, seconds: float, error_type: str = "", degraded: bool = False, now: float | None = None
    ) -> None:
        """Count one call of ``method`` that took ``seconds`` (and ended at clock time ``now``)."""
        shard = self.shard()
        stats = shard.get(method)
        if stats is None:
            stats = self.stats_for(shard, method, error_type == "MethodNotFoundError")
        stats.seconds += seconds
        stats.buckets[bisect_right(BUCKET_BOUNDS, seconds)] += 1
        if error_type:
            stats.errors[error_type] = stats.errors.get(error_type, 0) + 1
        if degraded:
            stats.degraded += 1
        if now is None:
            now = self.clock()
        if now >= self.next_mark:
            self.mark(now)

    def mark(self, now: float) -> None:
        """Remember the cumulative counts at clock time ``now`` (the load window's steps)."""
        with self.lock:
            if now >= self.next_mark:
                self._mark(now)

    def _mark(self, now: float) -> None:
        self._marks.append((now, self._cumulative()))
        # Keep one mark at least a window old: it is the baseline of the window.
        while len(self._marks) > 1 and self._marks[1][0] <= now - self.window:
            self._marks.popleft()
        self.next_mark = now + self._step

    def _cumulative(self) -> _Shard:
        """The sum of every shard (holding the lock)."""
        live = []
        for ref, shard in self._shards:
            if ref() is None or not ref().is_alive():  # type: ignore[union-attr]
                # The thread has ended: nobody writes this shard any more.
                for method, stats in shard.items():
                    self._retired.setdefault(method, _MethodStats()).add(stats)
            else:
                live.append((ref, shard))
        self._shards = live
        total = {method: stats.copy() for method, stats in self._retired.items()}
        for _, shard in live:
            for method, stats in list(shard.items()):
                into = total.get(method)
                if into is None:
                    total[method] = stats.copy()
                else:
                    into.add(stats)
        return total

    def cumulative(self) -> dict[str, _MethodStats]:
        """Every method's cumulative counts."""
        with self.lock:
            return self._cumulative()

    def clear(self) -> None:
        """Forget everything recorded (a call recorded meanwhile may survive)."""
        with self.lock:
            for _, shard in self._shards:
                shard.clear()
            self._retired.clear()
            self._names.clear()
            self._marks.clear()
            if self.recent_errors is not None:
                self.recent_errors.clear()
            self._mark(self.clock())

    def errors(self) -> list[dict[str, Any]]:
        """The last failed calls (at most ``RECENT_ERRORS``), newest first, each a JSON-ready dict.

        Keys: ``time`` (epoch seconds), ``service``, ``method``, ``error_type``,
        ``error`` and ``traceback`` (the service's formatted traceback; empty for
        an error kservice raised, such as an unknown method), both cut to their end.
        """
        if self.recent_errors is None:
            return []
        return [
            {
                "time": when,
                "service": self.service_name,
                "method": method,
                "error_type": error_type,
                "error": error[-_ERROR_CHARS:],
                "traceback": traceback[-_TRACEBACK_CHARS:],
            }
            for when, method, error_type, error, traceback in reversed(list(self.recent_errors))
        ]

    def summary(self) -> dict[str, Any]:
        """Cumulative totals of the service and of each method (see :func:`snapshot`)."""
        methods = self.cumulative()
        out = _summary(_merge(methods.values()))
        out["methods"] = {name: _summary(stats) for name, stats in sorted(methods.items())}
        return out

    def load(self) -> dict[str, Any]:
        """Calls/s, errors/s and latency percentiles over the last window, per service and method.

        The window slides in steps of a sixth of its length: it covers between
        ``window`` and ``window`` plus one step (``window_s`` says how much).
        """
        with self.lock:
            now = self.clock()
            if now >= self.next_mark:
                self._mark(now)
            since, baseline = self._marks[0]
            current = self._marks[-1][1] if self._marks[-1][0] == now else self._cumulative()
        elapsed = max(now - since, 1e-9)
        deltas = {name: _minus(stats, baseline.get(name)) for name, stats in current.items()}

        def rates(delta: _MethodStats) -> dict[str, Any]:
            calls = delta.calls
            return {
                "calls": calls,
                "calls_per_s": calls / elapsed,
                "errors_per_s": sum(delta.errors.values()) / elapsed,
                "p50_ms": _percentile(delta.buckets, calls, 0.50) * 1e3,
                "p90_ms": _percentile(delta.buckets, calls, 0.90) * 1e3,
                "p99_ms": _percentile(delta.buckets, calls, 0.99) * 1e3,
            }

        out = rates(_merge(deltas.values()))
        out["window_s"] = elapsed
        out["methods"] = {name: rates(delta) for name, delta in sorted(deltas.items()) if delta.calls}
        return out


_recorders: dict[tuple[str, str], ServiceRecorder] = {}
_recorders_lock = threading.Lock()


def _recorder(side: str, service_name: str, window: float) -> ServiceRecorder:
    key = (side, service_name)
    found = _recorders.get(key)
    if found is None:
        with _recorders_lock:
            found = _recorders.get(key)
            if found is None:
                found = _recorders[key] = ServiceRecorder(side, service_name, window=window)
    return found


#: Durations an observer keeps per method and thread before it buckets them (:meth:`_Timed._fold_pending`):
#: bucketing a batch costs a fraction of bucketing each call. Readers count pending durations too.
_PENDING_LIMIT = 128
#: An observer reads the clock (a load mark may be due) once every this many calls of a method in a
#: thread, not on every call: a mark is taken at most _TICK - 1 calls late (a read of the load takes
#: one when due). _PENDING_LIMIT is a multiple of it.
_TICK = 16
_TICK_MASK = _TICK - 1

#: The latency bucket of a refused call (no time at all).
_REFUSED_BUCKET = bisect_right(BUCKET_BOUNDS, 0.0)


class _Timed(ServiceMiddleware):
    """Shared shape of both sides: one record per call, timed by the chain (``observe_*``)."""

    def __init__(self, recorder: ServiceRecorder) -> None:
        self.recorder = recorder
        self._clock = recorder.clock
        self._tls = recorder.tls
        self._recent = recorder.recent_errors

    def _record(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        # The per-call path: a lookup, an append and one test. The duration waits in the stats'
        # ``pending`` list and is bucketed with the others of its batch (_fold_pending), so a call
        # pays no bucket search and no float sum, and one call in _TICK reads the clock (_tick).
        # Failures, degraded answers and streams (whose responses carry metadata) take _record_rare.
        try:
            stats = self._tls.shard[request.method_name]
        except (AttributeError, KeyError):
            stats = self._stats_of(request, response)
        pending = stats.pending
        pending.append(seconds)
        if response.metadata or not response.success or response.degraded:
            self._record_rare(stats, request, response)
        if not len(pending) & _TICK_MASK:
            self._tick(stats)

    def _tick(self, stats: _MethodStats) -> None:
        """Every _TICK calls of a method in a thread: take a load mark when one is due; fold a full batch."""
        if len(stats.pending) >= _PENDING_LIMIT:
            self._fold_pending(stats)
        now = self._clock()
        if now >= self.recorder.next_mark:
            self.recorder.mark(now)

    def _fold_pending(self, stats: _MethodStats) -> None:
        """Count this thread's pending durations of ``stats`` into its buckets."""
        pending = stats.pending
        stats.pending = []  # detached before it is counted: a reader may miss these calls for a moment, never count them twice
        _count_durations(stats, pending)

    def _stats_of(self, request: ServiceRequest, response: ServiceResponse) -> _MethodStats:
        """Where a call counts when this thread has no shard yet or its shard no entry for the method."""
        shard = self.recorder.shard()
        stats = shard.get(request.method_name)
        if stats is None:
            stats = self.recorder.stats_for(
                shard, request.method_name, not response.success and response.error_type == "MethodNotFoundError"
            )
        return stats

    def _record_rare(self, stats: _MethodStats, request: ServiceRequest, response: ServiceResponse) -> None:
        """The parts of a record only some calls need: stream items, errors, degraded answers."""
        if response.metadata:
            items = response.metadata.get("kservice.stream.items")
            if items is not None:
                # A stream is one call lasting the whole stream; its items are counted beside it.
                stats.streams += 1
                stats.items += items
        if not response.success:
            # A shard's errors is a defaultdict: one += per failed call (an open breaker's flood).
            stats.errors[response.error_type or "unknown"] += 1
            recent = self._recent
            if recent is not None:
                recent.append(
                    (
                        time.time(),
                        request.method_name,
                        response.error_type,
                        response.error or "",
                        response.remote_traceback,
                    )
                )
        if response.degraded:
            stats.degraded += 1

    def _record_batch(self, batch: CallBatch) -> None:
        """Count a chunk of a map as ``batch.count`` calls: the same counts its calls would have made one by one.

        Each call's latency is its own run time where the batch has it
        (``durations``, the service's side), else the chunk's ``seconds`` (the
        caller's side: the chunk's round trip). Errors are counted by type,
        one per failed call; a refused chunk counts every call as refused
        (latency 0, as :meth:`ClientMetrics.on_refused` counts one).
        """
        shard = self.recorder.shard()
        method = batch.method_name
        failures = batch.failures
        count = batch.count
        stats = shard.get(method)
        if stats is None:
            unknown = len(failures) == count and any(
                response.error_type == "MethodNotFoundError" for response in failures.values()
            )
            stats = self.recorder.stats_for(shard, method, unknown)
        buckets = stats.buckets
        refused = batch.refused
        if refused is not None:
            buckets[_REFUSED_BUCKET] += count
            stats.errors[type(refused).__name__] += count
        else:
            durations = batch.durations
            if durations is None:
                seconds = batch.seconds
                stats.seconds += seconds * count
                buckets[_bucket_of(seconds)] += count
            else:
                # Bucketing each duration in a Python loop costs ~170 ns a call, as much as a trivial call
                # itself: the chunk's durations are counted together, exactly as one by one.
                _count_durations(stats, durations)
            if failures:
                recent = self._recent
                for response in failures.values():
                    stats.errors[response.error_type or "unknown"] += 1
                    if recent is not None:
                        recent.append(
                            (time.time(), method, response.error_type, response.error or "", response.remote_traceback)
                        )
        now = self._clock()
        if now >= self.recorder.next_mark:
            self.recorder.mark(now)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.recorder.service_name!r}>"


def _bucket_of(seconds: float) -> int:
    """The latency bucket of a call that took ``seconds``."""
    return _FAST_BUCKET[int(seconds * 1e8)] if seconds < _FAST_SECONDS else bisect_right(BUCKET_BOUNDS, seconds)


class ClientMetrics(_Timed):
    """The caller's side: each attempt, from before the first ``before_call`` to after the last ``after_call``."""

    # The hook is the shared body itself rather than a method calling it: one Python frame less per call.
    observe_call = _Timed._record
    #: a chunk of a map (see :meth:`_Timed._record_batch`): every call latency is the chunk's round trip
    observe_batch = _Timed._record_batch

    def on_refused(self, service_name: str, method_name: str, error: BaseException) -> None:
        """A call a middleware refused before it was sent (an open breaker): one failed call, answered at once."""
        try:
            shard = self._tls.shard
        except AttributeError:
            shard = self.recorder.shard()
        stats = shard.get(method_name)
        if stats is None:
            stats = self.recorder.stats_for(shard, method_name)
        stats.buckets[_REFUSED_BUCKET] += 1
        stats.errors[type(error).__name__] += 1
        now = self._clock()
        if now >= self.recorder.next_mark:
            self.recorder.mark(now)


class ServerMetrics(_Timed):
    """The service's side: from before the first ``before_handle`` to after the last ``after_handle``, method included."""

    observe_handle = _Timed._record
    #: the calls of a chunk run in one loop (see :meth:`_Timed._record_batch`), each with its own run time
    observe_handle_batch = _Timed._record_batch


# --------------------------------------------------------------------- reading


def snapshot() -> dict[str, dict[str, dict[str, Any]]]:
    """Every recorded service in this process: ``{side: {service: summary}}``.

    A summary has ``calls``, ``errors``, ``errors_by_type``, ``degraded``,
    ``streams`` and ``stream_items`` (streamed calls among the calls, and their items),
    ``latency_sum_s``, ``latency_p50_ms``/``p90``/``p99`` (since the process
    started recording) and the same per method under ``methods``. Sides with
    nothing recorded are present and empty.
    """
    with _recorders_lock:
        recorders = list(_recorders.values())
    out: dict[str, dict[str, dict[str, Any]]] = {side: {} for side in SIDES}
    for recorder in recorders:
        out[recorder.side][recorder.service_name] = recorder.summary()
    return out


def load(service_name: str) -> dict[str, Any] | None:
    """The server-side load of one service over the last window, or None when none was recorded here."""
    recorder = _recorders.get(("server", service_name))
    return None if recorder is None else recorder.load()


def reset() -> None:
    """Forget everything recorded in this process (tests, or after a configuration change)."""
    with _recorders_lock:
        recorders = list(_recorders.values())
    for recorder in recorders:
        recorder.clear()


_tasks: weakref.WeakSet[BaseServiceTask] = weakref.WeakSet()


class _Collector:
    """Renders the recorders for prometheus-client at scrape time."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        labels = ["side", "service", "method"]
        calls = CounterMetricFamily("kservice_calls", "Calls completed, per side, service and method.", labels=labels)
        errors = CounterMetricFamily(
            "kservice_call_errors", "Calls that failed, by error type.", labels=[*labels, "error_type"]
        )
        degraded = CounterMetricFamily(
            "kservice_degraded_responses", "Calls answered by a fallback (response.degraded).", labels=labels
        )
        latency = HistogramMetricFamily("kservice_call_duration_seconds", "Call latency in seconds.", labels=labels)
        streams = CounterMetricFamily(
            "kservice_streams", "Streamed calls completed (also counted in kservice_calls).", labels=labels
        )
        items = CounterMetricFamily("kservice_stream_items", "Items delivered by streamed calls.", labels=labels)
        with _recorders_lock:
            recorders = list(_recorders.values())
        for recorder in recorders:
            for method, stats in sorted(recorder.cumulative().items()):
                values = [recorder.side, recorder.service_name, method]
                calls.add_metric(values, stats.calls)
                degraded.add_metric(values, stats.degraded)
                streams.add_metric(values, stats.streams)
                items.add_metric(values, stats.items)
                for error_type, count in sorted(stats.errors.items()):
                    errors.add_metric([*values, error_type], count)
                buckets: list[tuple[str, float]] = []
                running = 0
                cursor = 0
                for index in _PROMETHEUS_INDICES:
                    running += sum(stats.buckets[cursor : index + 1])
                    cursor = index + 1
                    buckets.append((repr(BUCKET_BOUNDS[index]), running))
                buckets.append(("+Inf", running + sum(stats.buckets[cursor:])))
                latency.add_metric(values, buckets, stats.seconds)
        yield from (calls, errors, degraded, latency, streams, items)
        in_flight = GaugeMetricFamily(
            "kservice_in_flight", "Calls running in a task of this process.", labels=["service"]
        )
        queued = GaugeMetricFamily(
            "kservice_queue_depth", "Calls queued for a worker in a task of this process.", labels=["service"]
        )
        for task in list(_tasks):
            try:
                status = task.get_service_status()
            except Exception:  # a task stopping mid-scrape is skipped, not an error
                continue
            in_flight.add_metric([task.service_name], status.in_flight)
            queued.add_metric([task.service_name], status.queue_depth)
        yield from (in_flight, queued)


_registry: Any = None
_registry_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_recorders_lock", "_registry_lock")


def registry() -> Any:
    """The ``prometheus_client.CollectorRegistry`` holding kservice's metrics (created on first use).

    Serve it with ``prometheus_client.start_http_server(port, registry=registry())``.
    Raises ImportError naming the extra to install when prometheus-client is missing.
    """
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                try:
                    from prometheus_client import CollectorRegistry
                except ImportError as exc:
                    raise ImportError(
                        "Prometheus exposition needs prometheus-client: pip install 'kservice[metrics]' "
                        "(metrics.snapshot() works without it)"
                    ) from exc
                created = CollectorRegistry(auto_describe=False)
                created.register(_Collector())
                _registry = created
    return _registry


def prometheus_text() -> str:
    """Every metric in the Prometheus text exposition format; ImportError without prometheus-client."""
    collected = registry()  # raises the ImportError naming the extra
    from prometheus_client import generate_latest

    return generate_latest(collected).decode("utf-8")


# ----------------------------------------------------------------------- hooks


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register("metrics", _schema())


@hookimpl
def kservice_middleware(service_name: str, options: dict[str, Any]) -> list[ServiceMiddleware] | None:
    section = options.get("metrics") or {}
    if not section.get("enabled", True):
        return None
    window = float(section.get("load_window", 60.0))
    chosen: list[ServiceMiddleware] = []
    if section.get("client", True):
        chosen.append(ClientMetrics(_recorder("client", service_name, window)))
    if section.get("server", True):
        chosen.append(ServerMetrics(_recorder("server", service_name, window)))
    return chosen or None


@hookimpl
def kservice_task_started(task: BaseServiceTask) -> None:
    _tasks.add(task)


@hookimpl
def kservice_task_stopped(task: BaseServiceTask) -> None:
    _tasks.discard(task)


_UNKNOWN_WINDOW: dict[str, Any] = {"calls_per_s": None, "p50_ms": None, "p90_ms": None, "p99_ms": None}
_RATES = ("calls", "calls_per_s", "errors_per_s")
_PERCENTILES = ("p50_ms", "p90_ms", "p99_ms")


def _merged_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One window from the windows of several hosts (replicas): counts and rates summed, each percentile
    the highest any host with calls reported (an upper bound: histograms of other processes are not here)."""
    merged: dict[str, Any] = {key: sum(_number(w, key) or 0 for w in windows) for key in _RATES}
    merged["calls"] = int(merged["calls"])
    busy = [w for w in windows if w.get("calls")]
    for key in _PERCENTILES:
        merged[key] = max((_number(w, key) or 0.0 for w in busy), default=0.0)
    return merged


def _merged_load(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``load`` window of a service hosted by several processes, from each one's own ``load``."""
    merged = _merged_window(loads)
    merged["window_s"] = max((_number(load, "window_s") or 0.0 for load in loads), default=0.0)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for load in loads:
        methods = load.get("methods")
        if isinstance(methods, dict):
            for name, window in methods.items():
                if isinstance(window, dict):
                    by_method[name].append(window)
    merged["methods"] = {name: _merged_window(windows) for name, windows in sorted(by_method.items())}
    return merged


def _hosted_elsewhere(status: ServiceStatus) -> None:
    """``status.extra["load"]`` of a task whose service runs in other processes: its hosts' windows.

    A host that reports one ``load`` (a ``process`` task's child) brings it in
    ``extra`` as it is; replicas (``ray``) each bring theirs in their
    ``extra["replicas"]`` entry, summed here. With none, the window is unknown
    (None), never this process's empty one.
    """
    if isinstance(status.extra.get(STATUS_LOAD), dict):
        return
    replicas = status.extra.get(STATUS_REPLICAS)
    loads = [
        entry[STATUS_LOAD]
        for entry in (replicas if isinstance(replicas, list) else [])
        if isinstance(entry, dict) and isinstance(entry.get(STATUS_LOAD), dict)
    ]
    entry: dict[str, Any] = {"in_flight": status.in_flight, "queue_depth": status.queue_depth}
    entry.update(_merged_load(loads) if loads else {**_UNKNOWN_WINDOW, "methods": {}})
    status.extra[STATUS_LOAD] = entry


@hookimpl
def kservice_task_status(task: BaseServiceTask, status: ServiceStatus) -> None:
    """``status.extra["load"]``: in-flight and queued calls, and the server-side window.

    For a task whose service runs in this process (``task.hosted_here``) the
    window is this process's record. A task hosted elsewhere brings its
    host's ``load`` in its status (a ``process`` task), or each replica's (a
    ``ray`` task: summed, each percentile the highest a replica reported);
    this process's own server-side record of such a service is empty and is
    never reported in their place.
    """
    if not getattr(task, "hosted_here", True):
        _hosted_elsewhere(status)
        return
    section = (getattr(task, "options", None) or {}).get("metrics") or {}
    recorded_here = section.get("enabled", True) and section.get("server", True)
    found = load(task.service_name) if recorded_here else None
    recorder = _recorders.get(("server", task.service_name)) if recorded_here else None
    if recorder is not None and recorder.recent_errors:
        status.extra["recent_errors"] = recorder.errors()
    if found is None and "load" in status.extra:
        return
    entry: dict[str, Any] = {"in_flight": status.in_flight, "queue_depth": status.queue_depth}
    if found is None:
        entry.update(_UNKNOWN_WINDOW, methods={})
    else:
        entry.update(found)
    status.extra["load"] = entry


def _number(container: dict[str, Any], key: str) -> float | None:
    value = container.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@hookimpl
def kservice_status_columns(status: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """Calls/s and latency percentiles of ``extra["load"]``; ``recent_errors`` is shown by ``kservice errors``, not the table."""
    extra.pop("recent_errors", None)
    section = extra.pop("load", None)
    if not isinstance(section, dict):
        return None
    if section.get("calls") == 0:
        # No call in the metrics window: a percentile (or a rate) would be a made-up 0.
        return {"calls_per_second": _number(section, "calls_per_s")}
    return {
        "calls_per_second": _number(section, "calls_per_s"),
        "p50_ms": _number(section, "p50_ms"),
        "p99_ms": _number(section, "p99_ms"),
    }
