"""Services with coroutine and generator methods (importable by path from child processes)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kservice


class AsyncGreeter:
    """Coroutine methods beside sync ones; records what cancellation and the lifecycle did."""

    def __init__(self) -> None:
        self.setup_loop: str = ""
        self.cleaned_up = False
        self.cancelled: list[str] = []
        self.running = 0
        self.most_running = 0
        self.events: list[str] = []

    async def setup(self) -> None:
        await asyncio.sleep(0)
        self.setup_loop = threading.current_thread().name

    async def cleanup(self) -> None:
        await asyncio.sleep(0)
        self.cleaned_up = True

    async def hello(self, n: int) -> str:
        return f"hello {n * 2}"

    def plain_hello(self, n: int) -> str:
        return f"hello {n * 2}"

    async def where(self) -> dict[str, Any]:
        await asyncio.sleep(0)
        request = kservice.current_request()
        return {
            "thread": threading.current_thread().name,
            "request_id": request.request_id if request else None,
            "remaining": kservice.remaining_time(),
            "pid": os.getpid(),
        }

    def sync_where(self) -> str:
        return threading.current_thread().name

    async def nap(self, seconds: float, tag: str = "") -> str:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(seconds)
            return tag
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        finally:
            self.running -= 1

    async def fail(self, message: str) -> None:
        await asyncio.sleep(0)
        raise ValueError(message)

    async def stats(self) -> dict[str, Any]:
        return {"cancelled": list(self.cancelled), "most_running": self.most_running, "setup_loop": self.setup_loop}


@kservice.service(thread_safe=False)
class SerialAsync:
    """Not thread-safe, with a coroutine and a sync method touching the same state."""

    def __init__(self) -> None:
        self.inside = 0
        self.overlaps = 0

    async def step(self, seconds: float) -> int:
        self.inside += 1
        if self.inside > 1:
            self.overlaps += 1
        await asyncio.sleep(seconds)
        self.inside -= 1
        return self.overlaps

    async def steps(self, n: int, seconds: float) -> AsyncIterator[int]:
        for _ in range(n):
            self.inside += 1
            if self.inside > 1:
                self.overlaps += 1
            await asyncio.sleep(seconds)
            self.inside -= 1
            yield self.overlaps

    def sync_step(self, seconds: float) -> int:
        self.inside += 1
        if self.inside > 1:
            self.overlaps += 1
        time.sleep(seconds)
        self.inside -= 1
        return self.overlaps


class TokenModel:
    """A stand-in streaming model: generators, async generators, and what their early exits did."""

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

    async def acount(self, n: int, tag: str = "", delay: float = 0.0) -> AsyncIterator[int]:
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                self.produced[tag] = i + 1
                yield i
        finally:
            self.closed.append(tag)

    def slow(self, n: int, delay: float, tag: str = "") -> Iterator[int]:
        try:
            for i in range(n):
                time.sleep(delay)
                self.produced[tag] = i + 1
                yield i
        finally:
            self.closed.append(tag)

    def broken(self, good: int) -> Iterator[int]:
        yield from range(good)
        raise ValueError(f"broke after {good}")

    def blobs(self, n: int, size: int) -> Iterator[bytes]:
        for i in range(n):
            yield bytes([i % 256]) * size

    def unpicklable(self) -> Iterator[Any]:
        yield 1
        yield threading.Lock()

    def tokens(self, text: str, delay: float = 0.0) -> Iterator[str]:
        for word in text.split():
            if delay:
                time.sleep(delay)
            yield word

    def threads(self, n: int, slow_from: int = -1, delay: float = 0.0, tag: str = "") -> Iterator[int]:
        """The id of the thread that made each item; items from ``slow_from`` on take ``delay`` seconds."""
        try:
            for i in range(n):
                if i == slow_from:
                    time.sleep(delay)
                yield threading.get_ident()
        finally:
            self.closed.append(tag)

    def report(self) -> dict[str, Any]:
        return {"closed": list(self.closed), "produced": dict(self.produced)}

    def echo(self, value: Any) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    def die_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        time.sleep(0.2)
        os._exit(3)

    def quick_then_die(self, n: int, die: bool) -> Iterator[int]:
        """Quick items (so the host learns it is quick), then, with ``die``, a pause and the process's end."""
        yield from range(n)
        if die:
            time.sleep(0.2)
            os._exit(3)


class EndMetadata(kservice.ServiceMiddleware):
    """Client middleware keeping the metadata of each stream's end (importable: a process host loads it too)."""

    def __init__(self) -> None:
        self.ends: list[dict[str, Any]] = []

    def observe_call(
        self, request: kservice.ServiceRequest, response: kservice.ServiceResponse, seconds: float
    ) -> None:
        self.ends.append(dict(response.metadata))


class SelfCaller:
    """A coroutine method that calls another coroutine method of its own service, synchronously or awaited."""

    def __init__(self, environment: kservice.ServiceEnvironment, name: str) -> None:
        self.manager = environment.manager()
        self.name = name

    async def outer(self, awaited: bool) -> str:
        if awaited:
            return str(await self.manager.acall(self.name, "inner", timeout=10))
        return str(self.manager.call_service_sync(self.name, "inner", timeout=10))

    async def inner(self) -> str:
        await asyncio.sleep(0.01)
        return "inner"
