"""What the dashboard shows: one snapshot of every reachable service per interval, and a short history.

The snapshot is gathered exactly as ``kservice status`` gathers its table
(:func:`kservice.cli.running_services`, the status of each, :func:`kservice.cli.status_rows`),
in one background thread with its own ServiceManager, so a slow or dead host
delays the next snapshot but never a web request.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._config import Config
from .._plugins import plugin_infos

__all__ = ["Collector"]

#: Errors listed on the page, newest first, across all services.
MAX_ERRORS = 20


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has no NaN; browsers refuse it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)


class Collector:
    """Samples every running service each ``interval`` seconds in a thread of its own.

    :meth:`latest` returns ``(version, snapshot)``; the version grows by one per
    sample. :meth:`history` holds ``[time, calls/s, p50 ms, p99 ms]`` per service
    for the last ``history_seconds``. A sample that fails as a whole (a plugin
    raising) keeps the previous rows and sets ``collector_error``; one service
    that cannot answer is a row in state ``unreachable``, as in ``kservice status``.
    """

    def __init__(self, config: Config, *, interval: float = 1.0, history_seconds: float = 300.0) -> None:
        self.config = config
        self.interval = interval
        self._points = max(2, int(history_seconds / interval))
        self._lock = threading.Lock()
        self._version = 0
        self._snapshot: dict[str, Any] = {
            "time": time.time(),
            "services": [],
            "errors": [],
            "plugins": [],
            "collector_error": "",
        }
        self._history: dict[str, deque[list[float | None]]] = {}
        self._previous: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start sampling (the first sample is taken at once)."""
        self._thread = threading.Thread(target=self._run, name="kservice-dashboard-collector", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sampling and wait up to ``timeout`` seconds for a sample in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from .._manager import ServiceManager
        from ..cli.status import _status_pool

        try:
            with ServiceManager(config=self.config) as manager, _status_pool() as pool:
                while not self._stop.is_set():
                    began = time.monotonic()
                    self.sample(manager, pool)
                    self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))
        except Exception as exc:  # noqa: BLE001 - the page says why it no longer updates
            with self._lock:
                self._snapshot = dict(
                    self._snapshot, time=time.time(), collector_error=f"sampling stopped: {type(exc).__name__}: {exc}"
                )
                self._version += 1

    # ------------------------------------------------------------ reading

    def latest(self) -> tuple[int, dict[str, Any]]:
        """The newest snapshot and its version (0 before the first sample)."""
        with self._lock:
            return self._version, self._snapshot

    def history(self) -> dict[str, list[list[float | None]]]:
        """Per service, ``[epoch seconds, calls/s, p50 ms, p99 ms]`` points, oldest first."""
        with self._lock:
            return {name: list(points) for name, points in self._history.items()}

    # ------------------------------------------------------------ sampling

    def sample(self, manager: Any, pool: ThreadPoolExecutor | None = None) -> None:
        """Take one snapshot with ``manager`` and publish it (services asked at once, in ``pool`` if given)."""
        from ..cli import _collect_statuses, running_services, status_rows

        now = time.time()
        notes: list[str] = []
        try:
            records = {str(r["name"]): r for r in running_services(notes)}
            statuses = _collect_statuses(manager, list(records), explicit=False, pool=pool)
            rows = status_rows(statuses, self._previous)
            plugins = [{"name": i.name, "origin": i.origin, "hooks": list(i.hooks)} for i in plugin_infos()]
        except Exception as exc:  # noqa: BLE001 - shown on the page; the next sample tries again
            with self._lock:
                self._snapshot = dict(self._snapshot, time=now, collector_error=f"{type(exc).__name__}: {exc}")
                self._version += 1
            return
        for gone in set(self._previous) - set(records):
            del self._previous[gone]
        errors: list[dict[str, Any]] = []
        for row, status in zip(rows, statuses, strict=True):
            record = records.get(row["service"], {})
            row["transport"] = record.get("transport", "?")
            row["pid"] = record.get("pid")
            row["address"] = record.get("address") or record.get("queue") or ""
            extra = status.get("extra") if isinstance(status, dict) else None
            found = (extra or {}).get("recent_errors") or []
            errors.extend(e for e in found if isinstance(e, dict))
            row["recent_errors"] = len(found)
        errors.sort(key=lambda e: e.get("time") or 0, reverse=True)
        snapshot = _finite(
            {
                "time": now,
                "services": rows,
                "errors": errors[:MAX_ERRORS],
                "plugins": plugins,
                "collector_error": "; ".join(notes),
            }
        )
        with self._lock:
            for row in snapshot["services"]:
                if row.get("state") == "unreachable":
                    continue
                points = self._history.setdefault(row["service"], deque(maxlen=self._points))
                points.append([now, row.get("calls_per_second"), row.get("p50_ms"), row.get("p99_ms")])
            for gone in set(self._history) - set(records):
                with contextlib.suppress(KeyError):
                    del self._history[gone]
            self._snapshot = snapshot
            self._version += 1
