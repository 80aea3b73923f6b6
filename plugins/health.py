"""Health checks with recovery for every service task of this process.

One scheduler thread per process (``kservice-health``) checks each monitored
task every ``health.period`` seconds. It starts with the first monitored task
(``kservice_task_started``) and stops when the last one stops. The checks of
one task run, one after another, in a small pool of daemon threads
(``kservice-health-check-N``) so that a check that hangs never blocks the
scheduler: it is abandoned after ``health.timeout`` and counted as a failure.

A check round reports the task unhealthy when any of these fails:

- every listener is ``alive`` (``Listener.alive``);
- every worker thread of the pool is alive (``task.dead_workers``; a pool
  replaces a dead worker by itself, so this fails only when it could not);
- the worker pool makes progress: calls in flight and none completed for
  longer than ``health.stuck_after`` (read from ``task.get_service_status()``),
  unless the calls, coroutine calls and streams the task runs are still
  within their deadlines (``ServiceStatus.running_until``): a long call or
  stream its caller waits for is work, not a hang, and recovery would cut it. Recovery runs once per stuck episode: while no call has completed since,
  the task is still reported unhealthy, but those rounds do not count towards
  another recovery (a rebuilt instance cannot end a running call);
- the queue depth is at most ``health.max_queue_depth`` (when set);
- the service's own ``check_health()``, when it defines one (an ``async def``
  one is awaited on the task's event loop, within ``timeout``): None or a truthy
  value is healthy; False, a falsy value or a string (the reason) is
  unhealthy; raising is unhealthy. A task kind whose instance lives in
  another process exposes ``task.check_service_health()`` to run it there;
- every check contributed through the ``kservice_health_checks`` hook
  (collected once per task, again after a plugin change).

After ``health.failure_threshold`` consecutive failed rounds the task is
recovered with ``task.recover(reason)`` (a local task restarts dead listeners
and replaces dead worker threads, keeping its instance and its state, and
rebuilds its instance only when every listener and worker was alive; other task kinds respawn their process, or
replace a broken replica, after draining it for ``health.drain_timeout``), at most ``health.max_restarts`` times. When the limit is reached the
task is reported unhealthy with state ``failed`` and left alone: no more
checks, no more recovery. The result shows in ``task.get_service_status()``
(``healthy``, ``health_reason``, ``last_health_check``, ``restarts``) and in
``status.extra["health"]``.

Python cannot kill a thread: a hung check keeps its pool thread until it
returns. A task never has more than one abandoned check at a time (while one
is still hung, later rounds count as failures without starting another), and
recovery stops waiting for it; the pool is capped at 32 threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kservice import Setting, get_plugin_manager, hookimpl

# The monitor (scheduler, check pool, checks) is in _health_monitor.py, imported when the first task
# starts here: a process that only calls services loads this plugin's schema and hooks, nothing more.

if TYPE_CHECKING:
    from kservice import BaseServiceTask, ServiceStatus

    from ._health_monitor import HealthSettings, _Monitor

__all__ = ["HealthSettings", "check_task", "monitored_tasks"]

#: Default seconds recovery drains a host it replaces: shorter than a stop's 30, since the host being
#: replaced is most often hung (it cannot drain, and the service is down until it is killed).
RECOVERY_DRAIN_TIMEOUT = 5.0


def __getattr__(name: str) -> Any:
    if name == "HealthSettings":
        from ._health_monitor import HealthSettings

        return HealthSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _schema() -> dict[str, Setting]:
    return {
        "enabled": Setting((bool,), True, "Check this service's health periodically and recover it when unhealthy."),
        "period": Setting((float,), 5.0, "Seconds between the starts of two check rounds of one task.", minimum=0.001),
        "timeout": Setting(
            (float,),
            2.0,
            "Seconds a check round may take; a round still running then is abandoned and counts as a failure.",
            minimum=0.001,
        ),
        "failure_threshold": Setting((int,), 3, "Consecutive failed rounds before the task is recovered.", minimum=1),
        "max_restarts": Setting(
            (int,),
            3,
            "Recoveries allowed; when used up the task is reported failed and left alone (0: never recover).",
            minimum=0,
        ),
        "stuck_after": Setting(
            (float,),
            60.0,
            "Seconds with calls in flight and none completing before the worker pool counts as stuck, once the "
            "deadlines of the calls, coroutines and streams it runs have passed (a long call or stream its "
            "caller still waits for is not stuck; null: never).",
            nullable=True,
            minimum=0.001,
        ),
        "drain_timeout": Setting(
            (float,),
            RECOVERY_DRAIN_TIMEOUT,
            "Seconds recovery lets the calls running in a host it replaces (a process task's child, a Ray "
            "replica) finish before killing it.",
            minimum=0,
        ),
        "max_queue_depth": Setting(
            (int,),
            None,
            "Queued calls above which the task counts as unhealthy (null: no limit).",
            nullable=True,
            minimum=0,
        ),
    }


_monitor: _Monitor | None = None
_monitor_lock = threading.Lock()
_subscribed = False


def _forget_after_fork() -> None:
    """In a forked child: the parent's scheduler thread did not come along, and its tasks are the parent's to check.

    The child's first monitored task starts a scheduler of its own.
    """
    global _monitor, _monitor_lock
    _monitor = None
    _monitor_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _on_plugins_changed() -> None:
    """Collect contributed checks again; stop everything if this plugin was unregistered."""
    import sys

    monitor = _monitor
    if monitor is None:
        return
    if not get_plugin_manager().is_registered(sys.modules[__name__]):
        _stop_all()
        return
    monitor.invalidate_checks()


def _stop_all() -> None:
    global _monitor
    with _monitor_lock:
        monitor, _monitor = _monitor, None
    if monitor is not None:
        monitor.close()


def monitored_tasks() -> list[BaseServiceTask]:
    """Tasks this process currently checks."""
    monitor = _monitor
    return [] if monitor is None else monitor.tasks()


def check_task(task: BaseServiceTask) -> str | None:
    """Run the built-in checks of ``task`` once in this thread, without timeout or recovery.

    Returns None when healthy, else the reasons. For diagnostics (the worker
    check needs the task to be monitored and is skipped otherwise).
    """
    from ._health_monitor import _check_listeners, _check_service

    reasons = []
    for name, check in (("listeners", _check_listeners), ("check_health", _check_service)):
        try:
            reason = check(task)
        except BaseException as exc:  # noqa: BLE001 - diagnostics report a raising check as its reason
            reason = f"health check {name!r} raised {type(exc).__name__}: {exc}"
        if reason:
            reasons.append(reason)
    return "; ".join(reasons) or None


# ----------------------------------------------------------------------- hooks


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register("health", _schema())


@hookimpl
def kservice_task_started(task: BaseServiceTask) -> None:
    global _monitor, _subscribed
    from ._health_monitor import HealthSettings, _Monitor

    settings = HealthSettings.of(task)
    if not settings.enabled:
        return
    with _monitor_lock:
        if _monitor is None:
            _monitor = _Monitor()
        _monitor.add(task, settings)
        if not _subscribed:
            get_plugin_manager().subscribe(_on_plugins_changed)
            _subscribed = True


def _forget(task: BaseServiceTask) -> None:
    global _monitor
    with _monitor_lock:
        monitor = _monitor
        if monitor is None or not monitor.remove(task):
            return
        _monitor = None
    # The last monitored task is gone: stop the scheduler and its pool.
    monitor.close()


@hookimpl
def kservice_task_stopping(task: BaseServiceTask) -> None:
    _forget(task)


@hookimpl
def kservice_task_stopped(task: BaseServiceTask) -> None:
    _forget(task)


@hookimpl
def kservice_task_failed(task: BaseServiceTask, error: BaseException) -> None:
    _forget(task)


@hookimpl
def kservice_task_status(task: BaseServiceTask, status: ServiceStatus) -> None:
    """``status.extra["health"]``: this process's view when it monitors the task.

    A task hosted elsewhere may bring its host's view; it is kept when this
    process does not monitor the task.
    """
    monitor = _monitor
    mon = monitor.get(task) if monitor is not None else None
    if mon is not None:
        status.extra["health"] = mon.as_dict()
    elif "health" not in status.extra:
        status.extra["health"] = {"monitored": False}


@hookimpl
def kservice_status_columns(status: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """``monitor=<state>`` under details when a process monitors the service (the health column is the core's)."""
    section = extra.pop("health", None)
    if isinstance(section, dict) and section.get("monitored"):
        return {"monitor": section.get("state", "?")}
    return None
