"""The health plugin's monitor: its scheduler thread, its check pool and the checks (see ``health.py``).

Imported when the first task starts in this process (``kservice_task_started``):
a process that only calls services never loads it.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from kservice import get_plugin_manager

from .health import RECOVERY_DRAIN_TIMEOUT

if TYPE_CHECKING:
    from kservice import BaseServiceTask, ServiceStatus

__all__ = ["HealthSettings"]

log = logging.getLogger("kservice.health")

#: Most threads the check pool grows to (threads held by hung checks included).
POOL_CAP = 32

HealthCheck = Callable[["BaseServiceTask"], "str | None"]


def _callers_still_wait(status: ServiceStatus) -> bool:
    """Whether the calls the pool runs are all within their deadlines: it is busy, not stuck.

    A call running longer than ``stuck_after`` whose caller still waits for it
    (a batch job, a model run given a long timeout) is work, and recovering the
    task would cut it ("may have run"). Once the latest deadline has passed,
    every caller gave up and the workers are held for nothing.
    """
    until = status.running_until
    return until is not None and time.time() <= until


@dataclass(frozen=True)
class HealthSettings:
    """The ``health`` section of one service, validated by the config loader."""

    enabled: bool = True
    period: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    max_restarts: int = 3
    stuck_after: float | None = 60.0
    drain_timeout: float = RECOVERY_DRAIN_TIMEOUT
    max_queue_depth: int | None = None

    @classmethod
    def of(cls, task: BaseServiceTask) -> HealthSettings:
        section = (getattr(task, "options", None) or {}).get("health") or {}
        return cls(**{key: section[key] for key in cls.__dataclass_fields__ if key in section})


# ------------------------------------------------------------------ the checks


def _check_listeners(task: BaseServiceTask) -> str | None:
    dead = [listener.address.transport for listener in task.listeners if not listener.alive]
    return f"listener(s) stopped receiving: {', '.join(dead)}" if dead else None


def _interpret(outcome: Any, what: str) -> str | None:
    """None when ``outcome`` of a service health check means healthy, else the reason."""
    if isinstance(outcome, str):
        return f"{what} reported: {outcome}" if outcome else f"{what} returned an empty reason"
    if outcome is None or outcome:
        return None
    return f"{what} returned {outcome!r}"


def _check_service(task: BaseServiceTask) -> str | None:
    remote = getattr(task, "check_service_health", None)
    if callable(remote):
        return _interpret(remote(), "check_health()")
    method = getattr(task.service, "check_health", None)
    if not callable(method):
        return None
    outcome = method()
    if inspect.iscoroutine(outcome):
        outcome = _awaited(task, outcome, "check_health()")
    return _interpret(outcome, "check_health()")


def _awaited(task: BaseServiceTask, outcome: Any, what: str) -> Any:
    """An ``async def`` check's answer (its coroutine is none): awaited on the task's event loop, within ``timeout``.

    A task without a loop awaits it on a private one. Raises what the check
    raises, or TimeoutError naming ``what``: a failed check either way.
    """
    from kservice._aio import awaited  # with asyncio: only for a check that needs it

    return awaited(outcome, getattr(task, "_aio", None), HealthSettings.of(task).timeout, what)


class _Monitored:
    """What the monitor knows of one task (fields guarded by the monitor's lock)."""

    def __init__(self, task: BaseServiceTask, settings: HealthSettings) -> None:
        self.task = task
        self.settings = settings
        self.checks: list[tuple[str, HealthCheck]] | None = None  # None: collect before the next round
        self.state = "pending"  # pending | healthy | unhealthy | recovering | failed
        self.consecutive = 0
        self.rounds = 0
        self.failures = 0
        self.recoveries = 0
        self.last_failure = ""
        self.last_recovery = ""
        self.job: int | None = None  # the round running within its timeout
        self.job_started = 0.0
        self.current_check = ""
        self.abandoned: int | None = None  # a round that timed out and has not returned yet
        self.abandoned_check = ""
        self.abandoned_since = 0.0
        self.removed = False
        # Progress of the worker pool, for the stuck check.
        self.seen_total = -1
        self.progress_at = 0.0
        # requests_total when the last round found the pool stuck (None: it was not), and when a recovery
        # started for that stuck episode: until a call completes (or none is in flight) the same episode
        # is reported, but not recovered again.
        self.stuck_total: int | None = None
        self.recovered_stuck_total: int | None = None
        # The report of a round whose only failure is an episode already recovered (see _check_workers).
        self.held_reason = ""

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "monitored": True,
            "state": self.state,
            "consecutive_failures": self.consecutive,
            "failure_threshold": s.failure_threshold,
            "rounds": self.rounds,
            "failures": self.failures,
            "recoveries": self.recoveries,
            "max_restarts": s.max_restarts,
            "last_failure": self.last_failure,
            "last_recovery": self.last_recovery,
            "period_s": s.period,
            "timeout_s": s.timeout,
        }


class _Pool:
    """Daemon threads for check rounds and recoveries; grows only when every thread is busy.

    Not ThreadPoolExecutor: it joins its threads at interpreter exit, so one
    hung check would keep the process from exiting.
    """

    def __init__(self, cap: int) -> None:
        self._queue: SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._cap = cap
        self._alive = 0
        self._idle = 0
        self._closed = False
        self._names = itertools.count()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if self._idle:
                self._idle -= 1  # that idle thread takes this item
            elif self._alive < self._cap:
                self._alive += 1
                threading.Thread(
                    target=self._work, name=f"kservice-health-check-{next(self._names)}", daemon=True
                ).start()
            # else: it waits for a busy thread
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is not None:
                fn, args = item
                try:
                    fn(*args)
                except BaseException:  # noqa: BLE001 - a failing job (SystemExit included) must not kill the pool thread
                    log.exception("kservice health job failed")
            with self._lock:
                if item is None or self._closed:
                    self._alive -= 1
                    return
                self._idle += 1

    def close(self) -> None:
        """Idle threads exit now, busy ones when their job returns; never waits."""
        with self._lock:
            self._closed = True
            waiting = self._alive
        for _ in range(waiting):
            self._queue.put(None)


class _Monitor:
    """The scheduler thread, its pool, and every monitored task of this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._tasks: dict[int, _Monitored] = {}
        self._heap: list[tuple[float, int, str, _Monitored, int]] = []
        self._seq = itertools.count()
        self._jobs = itertools.count(1)
        self._closed = False
        self._pool = _Pool(POOL_CAP)
        self._thread = threading.Thread(target=self._run, name="kservice-health", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ membership

    def add(self, task: BaseServiceTask, settings: HealthSettings) -> None:
        with self._cond:
            if id(task) in self._tasks:
                return
            mon = _Monitored(task, settings)
            mon.progress_at = self.clock()
            self._tasks[id(task)] = mon
            self._push(self.clock() + settings.period, "check", mon, 0)

    def remove(self, task: BaseServiceTask) -> bool:
        """Stop monitoring ``task``; True when no task is left."""
        with self._cond:
            mon = self._tasks.pop(id(task), None)
            if mon is not None:
                mon.removed = True
            return not self._tasks

    def get(self, task: BaseServiceTask) -> _Monitored | None:
        return self._tasks.get(id(task))

    def tasks(self) -> list[BaseServiceTask]:
        with self._cond:
            return [mon.task for mon in self._tasks.values()]

    def invalidate_checks(self) -> None:
        with self._cond:
            for mon in self._tasks.values():
                mon.checks = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._pool.close()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    # ------------------------------------------------------------- schedule

    def _push(self, when: float, kind: str, mon: _Monitored, job: int) -> None:
        entry = (when, next(self._seq), kind, mon, job)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    _, _, kind, mon, job = heapq.heappop(self._heap)
                    if mon.removed or mon.state == "failed":
                        continue
                    if kind == "check":
                        self._due(mon, now)
                    elif mon.job == job:  # kind == "deadline": the round is still running
                        self._abandon(mon, job, now)
                self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - self.clock()))

    def _due(self, mon: _Monitored, now: float) -> None:
        """A round of ``mon`` is due (holding the lock)."""
        settings = mon.settings
        self._push(now + settings.period, "check", mon, 0)
        if mon.state == "recovering" or mon.job is not None:
            return  # recovery in progress, or the previous round is within its timeout
        if mon.abandoned is not None:
            self._apply(
                mon,
                f"health check {mon.abandoned_check!r} still hung after {now - mon.abandoned_since:.3f}s",
            )
            return
        job = next(self._jobs)
        mon.job = job
        mon.job_started = now
        mon.current_check = ""
        self._push(now + settings.timeout, "deadline", mon, job)
        self._pool.submit(self._round, mon, job)

    def _abandon(self, mon: _Monitored, job: int, now: float) -> None:
        """The round ``job`` passed its timeout (holding the lock)."""
        mon.job = None
        mon.abandoned = job
        mon.abandoned_check = mon.current_check or "?"
        mon.abandoned_since = mon.job_started
        self._apply(mon, f"health check {mon.abandoned_check!r} timed out after {mon.settings.timeout:g}s")

    # ---------------------------------------------------------------- rounds

    def _collect_checks(self, task: BaseServiceTask) -> list[tuple[str, HealthCheck]]:
        checks: list[tuple[str, HealthCheck]] = [
            ("listeners", _check_listeners),
            ("workers", self._check_workers),
            ("check_health", _check_service),
        ]
        for contributed in get_plugin_manager().hook.kservice_health_checks(task=task):
            for check in contributed or ():
                checks.append((getattr(check, "__qualname__", None) or repr(check), check))
        return checks

    def _check_workers(self, task: BaseServiceTask) -> str | None:
        mon = self.get(task)
        if mon is None:
            return None
        settings = mon.settings
        status = task.get_service_status()
        reasons = []
        dead = getattr(task, "dead_workers", 0)
        if dead:
            reasons.append(f"{dead} worker thread(s) are dead")
        if settings.max_queue_depth is not None and status.queue_depth > settings.max_queue_depth:
            reasons.append(
                f"queue depth {status.queue_depth} is over health.max_queue_depth={settings.max_queue_depth}"
            )
        now = self.clock()
        if status.in_flight == 0 or status.requests_total != mon.seen_total:
            mon.seen_total = status.requests_total
            mon.progress_at = now
            mon.stuck_total = None
            if status.in_flight == 0 or status.requests_total != mon.recovered_stuck_total:
                mon.recovered_stuck_total = None  # a call completed: the stuck episode is over
        elif (
            settings.stuck_after is not None
            and now - mon.progress_at > settings.stuck_after
            and not _callers_still_wait(status)
        ):
            stuck = (
                f"worker pool stuck: {status.in_flight} call(s) in flight and none completed for "
                f"{now - mon.progress_at:.3f}s (health.stuck_after={settings.stuck_after:g})"
            )
            if status.requests_total == mon.recovered_stuck_total:
                # Recovery already ran for this episode and cannot end a running call: another one
                # would only discard the instance again. Reported, not counted towards recovery.
                mon.held_reason = f"{stuck}; recovered once for these calls, not recovering again until one completes"
            else:
                mon.stuck_total = status.requests_total
                reasons.append(stuck)
        return "; ".join(reasons) or None

    def _round(self, mon: _Monitored, job: int) -> None:
        """One check round, in a pool thread."""
        task = mon.task
        reasons: list[str] = []
        mon.held_reason = ""
        try:
            checks = mon.checks
            if checks is None:
                checks = mon.checks = self._collect_checks(task)
            for name, check in checks:
                mon.current_check = name
                try:
                    reason = check(task)
                    if inspect.iscoroutine(reason):  # an ``async def`` check from the hook
                        reason = _awaited(task, reason, f"health check {name!r}")
                except BaseException as exc:  # noqa: BLE001 - a raising check is a failed check, whatever it raises
                    reason = f"health check {name!r} raised {type(exc).__name__}: {exc}"
                if reason:
                    reasons.append(str(reason))
        except BaseException as exc:  # noqa: BLE001 - e.g. a broken kservice_health_checks hook
            reasons.append(f"health checks could not run: {type(exc).__name__}: {exc}")
        with self._cond:
            if mon.abandoned == job:
                mon.abandoned = None  # returned at last; its late result is not used
                return
            if mon.job != job or mon.removed:
                return
            mon.job = None
            if not reasons and mon.held_reason:
                self._hold(mon, mon.held_reason)
                return
            if reasons and mon.held_reason:
                reasons.append(mon.held_reason)  # other checks failed too: those count, this is said
            self._apply(mon, "; ".join(reasons) or None)

    def _hold(self, mon: _Monitored, reason: str) -> None:
        """Report a round whose only failure was already recovered for: unhealthy, not counted (holding the lock)."""
        mon.rounds += 1
        mon.task.last_health_check = time.time()
        mon.failures += 1
        mon.last_failure = reason
        mon.state = "unhealthy"
        mon.task.health_reason = reason

    def _apply(self, mon: _Monitored, reason: str | None) -> None:
        """Count one round's result and start recovery when due (holding the lock)."""
        task = mon.task
        settings = mon.settings
        mon.rounds += 1
        task.last_health_check = time.time()
        if reason is None:
            mon.consecutive = 0
            mon.state = "healthy"
            task.health_reason = ""
            return
        mon.failures += 1
        mon.consecutive += 1
        mon.last_failure = reason
        mon.state = "unhealthy"
        task.health_reason = reason
        if mon.consecutive < settings.failure_threshold:
            return
        if mon.recoveries >= settings.max_restarts:
            mon.state = "failed"
            task.health_reason = (
                f"{reason}; left alone after {mon.recoveries} restart(s) (health.max_restarts={settings.max_restarts})"
            )
            log.error(
                "service %r is unhealthy and will not be recovered again: %s", task.service_name, task.health_reason
            )
            return
        mon.state = "recovering"
        mon.recoveries += 1
        mon.consecutive = 0
        # A recovery over stuck calls counts for that episode only once (see _check_workers).
        mon.recovered_stuck_total = mon.stuck_total
        self._pool.submit(self._recover, mon, reason)

    def _recover(self, mon: _Monitored, reason: str) -> None:
        """Recovery of one task, in a pool thread."""
        task = mon.task
        log.warning("recovering service %r (%s)", task.service_name, reason)
        try:
            action = task.recover(reason)
        except BaseException as exc:  # noqa: BLE001 - a failed recovery counts as used and is reported
            action = f"recovery failed: {type(exc).__name__}: {exc}"
            log.error("recovering service %r failed: %s", task.service_name, action)
        with self._cond:
            mon.last_recovery = action
            if mon.state == "recovering":
                mon.state = "unhealthy"  # until a round passes
            # Stop waiting for a hung round: the next round checks the recovered task.
            mon.abandoned = None
            # The recovered task gets a fresh stuck-detection window.
            mon.seen_total = -1
            mon.progress_at = self.clock()
