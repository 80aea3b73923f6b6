"""Services the policy tests call: each counts how often each method really ran."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import kservice
from kservice.plugins.fallback import fallback


class Flaky:
    """Methods that succeed, fail, or fail until told otherwise; ``calls`` counts executions."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failing = False
        self.gate = threading.Event()
        self.seen: list[Any] = []

    def ok(self, x: Any = None) -> Any:
        self.calls["ok"] += 1
        return x

    def fail(self) -> None:
        self.calls["fail"] += 1
        raise ConnectionError(f"fail #{self.calls['fail']}")

    @kservice.idempotent
    def fail_idempotent(self) -> None:
        self.calls["fail_idempotent"] += 1
        raise ConnectionError(f"fail_idempotent #{self.calls['fail_idempotent']}")

    @kservice.idempotent
    def succeed_on(self, n: int) -> int:
        self.calls["succeed_on"] += 1
        if self.calls["succeed_on"] < n:
            raise ConnectionError(f"not yet ({self.calls['succeed_on']})")
        return self.calls["succeed_on"]

    def toggle(self) -> str:
        self.calls["toggle"] += 1
        if self.failing:
            raise ConnectionError("toggle is failing")
        return "up"

    def key_error(self) -> None:
        self.calls["key_error"] += 1
        raise KeyError("missing")

    def sleep(self, seconds: float) -> float:
        self.calls["sleep"] += 1
        time.sleep(seconds)
        return seconds

    def wait_gate(self) -> str:
        self.calls["wait_gate"] += 1
        self.gate.wait(5)
        return "opened"

    @kservice.idempotent
    def square(self, x: Any) -> Any:
        self.calls["square"] += 1
        return x * x if isinstance(x, (int, float)) else x

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["lookup"] += 1
        return [args, kwargs]

    @fallback(value={"items": [], "source": "decorator"})
    def recommend(self, user: str) -> dict[str, Any]:
        self.calls["recommend"] += 1
        if self.failing:
            time.sleep(0.3)
        return {"items": [user], "source": "service"}

    def request_metadata(self) -> dict[str, Any]:
        request = kservice.current_request()
        return dict(request.metadata) if request else {}

    def timing(self) -> dict[str, Any]:
        self.calls["timing"] += 1
        request = kservice.current_request()
        return {"remaining": kservice.remaining_time(), "deadline": request.deadline if request else None}


class Relay:
    """Calls service ``b`` from inside a call: the nested call inherits this call's deadline."""

    def __init__(self, env: kservice.ServiceEnvironment) -> None:
        self.env = env
        self.outcomes: list[dict[str, Any]] = []

    def relay(self, sleep: float, inner_timeout: float) -> str:
        started = time.monotonic()
        with self.env.manager() as manager:
            try:
                manager.call_service_sync("b", "sleep_and_report", (sleep,), timeout=inner_timeout)
                outcome = "ok"
            except kservice.ServiceTimeoutError:
                outcome = "timeout"
        self.outcomes.append({"outcome": outcome, "elapsed": time.monotonic() - started})
        return outcome


class Sleeper:
    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    def sleep_and_report(self, seconds: float) -> float:
        self.remaining.append(kservice.remaining_time())
        time.sleep(seconds)
        return seconds
