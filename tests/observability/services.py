"""Service classes the observability tests run (importable by path from child processes)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import kservice


class Echo:
    """Echoes, fails on demand, sleeps."""

    def echo(self, value: Any) -> Any:
        return value

    def fail(self, message: str = "no") -> None:
        raise ValueError(message)

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def wait(self, event: threading.Event, timeout: float = 10.0) -> bool:
        return event.wait(timeout)


class Poisonable:
    """Healthy until ``poison()`` is called; a new instance is healthy again."""

    instances = 0

    def __init__(self) -> None:
        Poisonable.instances += 1
        self.poisoned = False

    def poison(self) -> None:
        self.poisoned = True

    def is_poisoned(self) -> bool:
        return self.poisoned

    def check_health(self) -> str | None:
        return "poisoned by a test" if self.poisoned else None


class AsyncPoisonable:
    """:class:`Poisonable` whose ``check_health`` is ``async def`` (it awaits, as one asking a database would)."""

    def __init__(self) -> None:
        self.poisoned = False

    def poison(self) -> None:
        self.poisoned = True

    def is_poisoned(self) -> bool:
        return self.poisoned

    async def check_health(self) -> str | None:
        await asyncio.sleep(0.001)
        return "poisoned by a test" if self.poisoned else None


class AlwaysSick:
    """Every instance reports itself unhealthy."""

    def ping(self) -> str:
        return "pong"

    def check_health(self) -> bool:
        return False


class HangingCheck:
    """check_health blocks until ``release`` is set (a check that hangs)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def ping(self) -> str:
        return "pong"

    def check_health(self) -> None:
        self.release.wait(30)


class Nested:
    """Calls another service from inside its method (A -> B)."""

    def __init__(self, manager: kservice.ServiceManager, target: str) -> None:
        self.manager = manager
        self.target = target

    def relay(self, value: Any) -> Any:
        return self.manager.call_service_sync(self.target, "echo", (value,))
