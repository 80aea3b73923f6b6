"""Service classes the core tests register (importable by path from config and child processes)."""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import kservice


class KeyValue:
    """A small thread-safe key-value store."""

    def __init__(self, initial: dict[str, Any] | None = None, *, prefix: str = "") -> None:
        self._data = dict(initial or {})
        self._lock = threading.Lock()
        self.prefix = prefix
        self.setup_called = False
        self.cleaned_up = False

    def setup(self) -> None:
        self.setup_called = True

    def cleanup(self) -> None:
        self.cleaned_up = True

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[self.prefix + key] = value

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._data.get(self.prefix + key, default)

    def require(self, key: str) -> Any:
        with self._lock:
            return self._data[self.prefix + key]

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)

    def reserved_names(self, timeout: float = 0.0, method: str = "", service_name: str = "") -> dict[str, Any]:
        """Parameters named like call options must reach the method verbatim."""
        return {"timeout": timeout, "method": method, "service_name": service_name}

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def remaining(self) -> float | None:
        return kservice.remaining_time()

    def unpicklable_result(self) -> Any:
        return threading.Lock()

    def _secret(self) -> str:
        raise AssertionError("a private method must never run")


class Recorder:
    """Records what ran, in order, for concurrency and drain tests."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def work(self, tag: str, seconds: float = 0.0) -> str:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.events.append(f"start {tag}")
        time.sleep(seconds)
        with self.lock:
            self.active -= 1
            self.events.append(f"end {tag}")
        return tag

    def ran(self) -> list[str]:
        """What ran so far."""
        with self.lock:
            return list(self.events)

    def wait_for(self, event: threading.Event, seconds: float) -> bool:
        """Runs until ``event`` is set (an in-process caller passes it) or ``seconds`` pass."""
        return event.wait(seconds)


@kservice.service(thread_safe=False)
class NotThreadSafe(Recorder):
    """Declared not thread-safe: one request at a time."""


class FailsToStart:
    def setup(self) -> None:
        raise RuntimeError("database unreachable")


class ClosesOnStop:
    closed: ClassVar[list[str]] = []

    def close(self) -> None:
        ClosesOnStop.closed.append("closed")

    def ping(self) -> str:
        return "pong"


class CodedError(Exception):
    """An exception whose constructor takes two arguments and keeps them as attributes (as HTTP errors do)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class LockedError(Exception):
    """An exception holding something that cannot be pickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class NeedsArguments(Exception):
    """An exception whose ``__new__`` takes its arguments (as ``ExceptionGroup``'s does)."""

    def __new__(cls, code: int, reason: str) -> NeedsArguments:
        error = super().__new__(cls, code, reason)
        error.code = code
        return error


class Raiser:
    """Raises what it is asked to, for the typed-error tests."""

    def group(self, message: str) -> None:
        raise ExceptionGroup(message, [ValueError("bad value"), KeyError("k")])

    def unpicklable_group(self, message: str) -> None:
        raise ExceptionGroup(message, [LockedError("held")])

    def needs_arguments(self, code: int) -> None:
        raise NeedsArguments(code, "refused")

    def coded(self, code: int, detail: str) -> None:
        raise CodedError(code, detail)

    def missing(self, key: str) -> None:
        raise KeyError(key)

    def locked(self, message: str) -> None:
        raise LockedError(message)

    def open_missing(self, path: str) -> None:
        with open(path):
            pass

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8")


def _logged(function: Any) -> Any:
    """A decorator that hides what it wraps (no ``functools.wraps``): an ``async def`` looks like a plain method."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


class HiddenAsync:
    """An ``async def`` method behind a decorator that hides it, beside a plain one."""

    def __init__(self) -> None:
        self.fetched = 0

    @_logged
    async def fetch(self, x: int) -> int:
        self.fetched += 1
        return x * 2

    def times_fetched(self) -> int:
        return self.fetched
