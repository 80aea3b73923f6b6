"""A task's status: lifecycle state, health and load."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["ServiceStatus"]

TaskState = Literal["created", "starting", "running", "stopping", "stopped", "failed"]


@dataclass
class ServiceStatus:
    """A snapshot of one task. ``extra`` holds what plugins add (breaker, load, health details).

    ``healthy`` is False while the task is not running, a listener stopped
    receiving, a worker thread is dead, or a health check failed
    (``health_reason`` says which).
    """

    service_name: str
    kind: str
    state: TaskState
    healthy: bool
    health_reason: str = ""
    last_health_check: float | None = None
    requests_total: int = 0
    errors_total: int = 0
    expired_total: int = 0
    in_flight: int = 0
    queue_depth: int = 0
    max_workers: int = 0
    restarts: int = 0
    started_at: float | None = None
    addresses: list[str] = field(default_factory=list)
    #: worker threads alive now (None: the task kind runs no pool in this process)
    workers_alive: int | None = None
    #: worker threads that died and were replaced since the task started
    workers_replaced: int = 0
    #: the latest deadline (epoch seconds) of the calls, coroutines and streams the task runs now: until then
    #: their callers still wait for them, so a task that completes nothing meanwhile is busy, not stuck (the
    #: health plugin's ``stuck_after``). None: it runs none, one has no deadline, or the kind runs none here.
    running_until: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)
