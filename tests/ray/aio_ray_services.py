"""Services with coroutine and generator methods for Ray replicas (importable by module name in Ray's workers)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kservice


class AsyncReplica:
    """Coroutine methods beside sync ones, in a Ray async actor."""

    def __init__(self) -> None:
        self.setup_done = False
        self.cancelled: list[str] = []

    async def setup(self) -> None:
        await asyncio.sleep(0)
        self.setup_done = True

    async def hello(self, n: int) -> str:
        return f"hello {n * 2}"

    def plain(self, n: int) -> int:
        return n + 1

    async def where(self) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {
            "thread": threading.current_thread().name,
            "remaining": kservice.remaining_time(),
            "setup_done": self.setup_done,
            "pid": os.getpid(),
        }

    async def nap(self, seconds: float, tag: str = "") -> str:
        try:
            await asyncio.sleep(seconds)
            return tag
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def exit(self, code: int) -> None:
        raise SystemExit(code)  # the method's outcome: not the end of the replica's event loop

    def report(self) -> list[str]:
        return list(self.cancelled)

    async def acount(self, n: int, delay: float = 0.0, tag: str = "") -> AsyncIterator[int]:
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                yield i
        finally:
            if tag:
                self.cancelled.append(tag)


class StreamReplica:
    """Sync generator methods in a threaded Ray actor."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.produced: dict[str, int] = {}

    def count(self, n: int, tag: str = "") -> Iterator[int]:
        try:
            for i in range(n):
                self.produced[tag] = i + 1
                yield i
        finally:
            self.closed.append(tag)

    def produced_by(self, tag: str) -> int:
        return self.produced.get(tag, 0)

    def slow(self, n: int, delay: float, tag: str = "") -> Iterator[int]:
        try:
            for i in range(n):
                time.sleep(delay)
                yield i
        finally:
            self.closed.append(tag)

    def broken(self, good: int) -> Iterator[int]:
        yield from range(good)
        raise ValueError(f"broke after {good}")

    def items(self, n: int, size: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"x" * size

    def die_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        time.sleep(0.3)
        os._exit(3)

    def unpicklable(self) -> Iterator[Any]:
        yield 1
        yield threading.Lock()

    def report(self) -> list[str]:
        return list(self.closed)

    def pid(self) -> int:
        return os.getpid()


class AsyncClocks:
    """:class:`ray_services.Clocks` in a Ray async actor."""

    async def remaining(self) -> float | None:
        await asyncio.sleep(0)
        return kservice.remaining_time()

    async def remaining_items(self, count: int) -> AsyncIterator[float | None]:
        for _ in range(count):
            await asyncio.sleep(0)
            yield kservice.remaining_time()

    def hold(self, seconds: float) -> None:
        """A sync method: an async replica runs it in its task's pool, whose status says until when it is awaited."""
        time.sleep(seconds)


class AsyncChecked:
    """An async replica whose ``check_health`` is ``async def``: healthy until ``poison()``."""

    def __init__(self) -> None:
        self.poisoned = False

    def poison(self) -> None:
        self.poisoned = True

    async def is_poisoned(self) -> bool:
        return self.poisoned

    async def check_health(self) -> str | None:
        await asyncio.sleep(0.001)
        return "poisoned by a test" if self.poisoned else None
