"""Async submission over mmap never blocks its caller or an event loop, even on a full request ring.

The host is paused (SIGSTOP) and its request ring filled, as a slow host
would leave it. Before, each ``call_service_async`` waited in the caller's
thread for up to ``service.local.queue_timeout`` and ``await acall()`` froze
the event loop as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceOverloadedError
from kservice.plugins.mmap import codec
from kservice.plugins.mmap.ring import QueueFull, attach_queue
from kservice.testing import wait_for

from .services import KV, unique

pytestmark = pytest.mark.timeout(90)

NO_RETRIES = {"service_call": {"max_retries": 0}, "breaker": {"enabled": False}}
QUEUE_TIMEOUT = 1.5


@pytest.fixture
def small_ring() -> Iterator[tuple[ServiceEnvironment, ServiceManager, str]]:
    name = unique("slow")
    env = ServiceEnvironment("async-overload", NO_RETRIES)
    env.register_service(
        name,
        ServiceFactory(name, KV),
        kind="process",
        local={"queue_timeout": QUEUE_TIMEOUT},
        mmap={"request_queue_capacity": 4096},
    )
    with env:
        yield env, env.manager(), name


@contextlib.contextmanager
def paused_with_a_full_ring(env: ServiceEnvironment, manager: ServiceManager, name: str) -> Iterator[int]:
    """The host stopped (SIGSTOP) outside the ring's lock, its request ring full; resumed on exit."""
    child = env.get_task(name).pid  # type: ignore[union-attr]
    ring = attach_queue(manager.get_service_queue(name).queue_name)  # type: ignore[attr-defined]
    filler = codec.encode_status_request("filler", name, "nowhere", time.time() + 60)
    try:
        for _ in range(50):
            os.kill(child, signal.SIGSTOP)
            wait_for(
                lambda: psutil.Process(child).status() == psutil.STATUS_STOPPED,
                what="the host to stop",
                interval=0.001,
            )
            filled = 0
            while True:
                try:
                    ring.put_nowait(filler)
                    filled += 1
                except QueueFull:
                    break
            if filled and ring.qsize() >= filled:
                break  # stopped while not holding the ring's lock: the ring is really full
            os.kill(child, signal.SIGCONT)  # stopped inside a lock section: let it go on, try again
            time.sleep(0.01)  # deliberate: let it leave the lock section before stopping it again
        yield child
    finally:
        ring.close()
        os.kill(child, signal.SIGCONT)


def test_async_submissions_return_at_once_on_a_full_ring_and_fail_overloaded_after_the_queue_wait(
    small_ring: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    env, manager, name = small_ring
    with paused_with_a_full_ring(env, manager, name):
        started = time.monotonic()
        futures = [manager.call_service_async(name, "echo", (i,), timeout=20) for i in range(20)]
        submitted = time.monotonic() - started
        assert submitted < 0.5 * QUEUE_TIMEOUT, f"20 async submissions took {submitted:.2f}s"
        for future in futures:
            error = future.exception(20)
            assert isinstance(error, ServiceOverloadedError), error
            assert "never sent" in str(error)
        waited = time.monotonic() - started
        assert 0.8 * QUEUE_TIMEOUT < waited < QUEUE_TIMEOUT + 8  # the documented wait, off the caller's thread
    assert manager.call_service_sync(name, "echo", ("next",)) == "next"


def test_async_submissions_on_a_full_ring_are_sent_in_order_when_room_comes_back(
    small_ring: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    env, manager, name = small_ring
    with paused_with_a_full_ring(env, manager, name):
        started = time.monotonic()
        futures = [manager.call_service_async(name, "echo", (i,), timeout=20) for i in range(20)]
        assert time.monotonic() - started < 0.5 * QUEUE_TIMEOUT
        time.sleep(0.2)  # deliberate: time for a deferred call to complete early, which it must not
        assert not any(f.done() for f in futures)
    # Resumed within the queue wait: every deferred request is sent and answered.
    assert [f.result(20) for f in futures] == list(range(20))


def test_acall_on_a_full_ring_keeps_the_event_loop_ticking(
    small_ring: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    env, manager, name = small_ring

    async def scenario() -> tuple[float, BaseException | None]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        outcome: BaseException | None = None
        try:
            await asyncio.gather(*(manager.acall(name, "echo", (i,), timeout=20) for i in range(10)))
        except ServiceOverloadedError as exc:
            outcome = exc
        stop.set()
        await ticking
        return max(gaps), outcome

    with paused_with_a_full_ring(env, manager, name):
        longest_gap, outcome = asyncio.run(scenario())
    assert isinstance(outcome, ServiceOverloadedError)
    assert longest_gap < 0.5 * QUEUE_TIMEOUT, f"the event loop stalled for {longest_gap:.2f}s"
    assert manager.call_service_sync(name, "echo", ("next",)) == "next"
