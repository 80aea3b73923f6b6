"""Services that misbehave on purpose (importable by path from child processes: ``tests.core.faulty``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from kservice import idempotent


class UnprintableError(Exception):
    """An exception whose ``__str__`` and ``__repr__`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")


class UnprintableExit(SystemExit):
    """A SystemExit whose ``__str__`` raises a BaseException of its own."""

    def __str__(self) -> str:
        raise KeyboardInterrupt("even the message interrupts")


class Counter:
    """A counter with state to lose, and methods that raise what kills threads."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> int:
        with self._lock:
            self.count += n
            return self.count

    def value(self) -> int:
        return self.count

    def echo(self, value: Any) -> Any:
        return value

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def raise_system_exit(self) -> None:
        raise SystemExit(3)

    def raise_keyboard_interrupt(self) -> None:
        raise KeyboardInterrupt("pressed inside the method")

    def raise_generator_exit(self) -> None:
        raise GeneratorExit

    def raise_unprintable(self) -> None:
        raise UnprintableError

    def raise_unprintable_exit(self) -> None:
        raise UnprintableExit(1)


def _thread_killer(remote_type: str) -> BaseException:
    """A new instance of the exception ``remote_type`` names (one of ``THREAD_KILLERS`` in test_worker_faults)."""
    return {
        "SystemExit": lambda: SystemExit(3),
        "KeyboardInterrupt": lambda: KeyboardInterrupt("pressed inside the method"),
        "GeneratorExit": GeneratorExit,
        "tests.core.faulty.UnprintableError": UnprintableError,
        "tests.core.faulty.UnprintableExit": lambda: UnprintableExit(1),
    }[remote_type]()


class Raisers:
    """A coroutine method and generators (sync and async) that raise what kills threads and event loops.

    ``remote_type`` names the exception, as the caller's error will.
    """

    def __init__(self) -> None:
        self.runs = 0

    async def araise(self, remote_type: str) -> None:
        self.runs += 1
        raise _thread_killer(remote_type)

    def ran(self) -> int:
        """How many times ``araise`` ran."""
        return self.runs

    def stream_raise(self, remote_type: str) -> Any:
        yield "before"
        raise _thread_killer(remote_type)

    async def astream_raise(self, remote_type: str) -> Any:
        yield "before"
        raise _thread_killer(remote_type)

    async def aecho(self, value: Any) -> Any:
        return value

    async def acount(self, n: int) -> Any:
        for i in range(n):
            yield i


class ExitsInSetup:
    """A ``setup()`` that raises SystemExit (``async``: on the task's event loop)."""

    def setup(self) -> None:
        raise SystemExit("setup gave up")

    def echo(self, value: Any) -> Any:
        return value


class ExitsInAsyncSetup:
    async def setup(self) -> None:
        raise SystemExit("async setup gave up")

    async def echo(self, value: Any) -> Any:
        return value


class InterruptedInAsyncCleanup:
    """An ``async def cleanup()`` that raises KeyboardInterrupt (on the task's event loop)."""

    async def cleanup(self) -> None:
        raise KeyboardInterrupt("pressed in cleanup")

    async def echo(self, value: Any) -> Any:
        return value


class SlowAfterAWhile:
    """What a call or a stream does while the wall clock steps under it: first a while, then a long wait."""

    def __init__(self) -> None:
        self.attempts = 0
        self._released = threading.Event()

    @idempotent
    def fails_then_hangs(self, fail_after: float, hang: float) -> str:
        """The first attempt fails after ``fail_after`` s (a retry is due); the next one hangs ``hang`` s."""
        self.attempts += 1
        if self.attempts == 1:
            time.sleep(fail_after)
            raise RuntimeError("the first attempt fails")
        self._released.wait(hang)
        return "answered"

    def one_then_hangs(self, hang: float) -> Iterator[int]:
        yield 1
        self._released.wait(hang)
        yield 2

    def quick(self) -> str:
        return "done"

    def release(self) -> None:
        """End every hang now (the test has measured what it waited for: the service stops at once)."""
        self._released.set()
