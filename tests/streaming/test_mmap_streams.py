"""Streams over mmap: items through the caller's stream ring, flow control, early exit, faults."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import kservice
import pytest
from kservice.plugins.mmap import reclaim
from kservice.testing import wait_for

from tests.conftest import SHM_DIR
from tests.mmap.services import hosting, unique
from tests.streaming.services import EndMetadata, TokenModel

pytestmark = pytest.mark.timeout(120)


def test_a_host_dying_mid_stream_ends_it_unavailable() -> None:
    name = unique("model")
    with (
        hosting(f"{name}=tests.streaming.services:TokenModel"),
        kservice.ServiceManager(config={"service_call": {"max_retries": 0}}) as manager,
    ):
        got: list[int] = []
        began = time.monotonic()
        with pytest.raises(kservice.ServiceUnavailableError):
            for item in manager.stream(name, "die_after", (5,), timeout=30):
                got.append(item)
        assert got == [0, 1, 2, 3, 4]
        assert time.monotonic() - began < 10
    reclaim()  # what the killed host left


def test_a_host_dying_in_the_step_after_a_quick_item_still_delivers_that_item() -> None:
    """Items made quickly may travel together; one made before a step that never returns is still sent."""
    name = unique("model")
    with (
        hosting(f"{name}=tests.streaming.services:TokenModel"),
        kservice.ServiceManager(config={"service_call": {"max_retries": 0}}) as manager,
    ):
        for _ in range(3):  # the host learns the generator is quick: its items are made in place
            assert list(manager.stream(name, "quick_then_die", (5, False))) == [0, 1, 2, 3, 4]
        got: list[int] = []
        with pytest.raises(kservice.ServiceUnavailableError):
            for item in manager.stream(name, "quick_then_die", (5, True), timeout=30):
                got.append(item)
        assert got == [0, 1, 2, 3, 4]
    reclaim()  # what the killed host left


@pytest.fixture(scope="module")
def env() -> Iterator[kservice.ServiceEnvironment]:
    environment = kservice.ServiceEnvironment("streams-mmap", {"service_call": {"max_retries": 0}})
    environment.register_service("model", kservice.ServiceFactory("model", TokenModel), kind="process")
    with environment:
        yield environment


@pytest.fixture
def manager(env: kservice.ServiceEnvironment) -> Iterator[kservice.ServiceManager]:
    with kservice.ServiceManager(env) as m:
        yield m


def _closed(manager: kservice.ServiceManager, tag: str, timeout: float = 5.0) -> None:
    wait_for(
        lambda: tag in manager.call_service_sync("model", "report")["closed"],
        timeout=timeout,
        what=f"generator {tag!r} to close",
    )


@pytest.mark.allow_leaks  # the module's host process outlives each test
def test_items_cross_the_process_in_order_and_complete(manager: kservice.ServiceManager) -> None:
    assert list(manager.stream("model", "count", (20_000,))) == list(range(20_000))
    assert list(manager.stream("model", "acount", (500,))) == list(range(500))
    blobs = list(manager.stream("model", "blobs", (6, 300_000)))  # out of band, as large results
    assert [len(b) for b in blobs] == [300_000] * 6 and [b[0] for b in blobs] == list(range(6))
    assert list(manager.proxy("model").tokens.stream("a b c")) == ["a", "b", "c"]


@pytest.mark.allow_leaks
def test_flow_control_bounds_the_host_and_break_closes_its_generator(manager: kservice.ServiceManager) -> None:
    stream = manager.stream("model", "count", (1_000_000, "mmap-bp"), window=8)
    assert [next(stream) for _ in range(5)] == list(range(5))
    time.sleep(0.3)  # deliberate: room for the host to run ahead, if the window did not stop it
    produced = manager.call_service_sync("model", "report")["produced"]["mmap-bp"]
    assert produced <= 5 + 8 + 1, produced
    stream.close()
    _closed(manager, "mmap-bp")
    for item in manager.stream("model", "acount", (1_000_000, "mmap-break")):
        if item == 3:
            break
    gc.collect()
    _closed(manager, "mmap-break")


@pytest.mark.allow_leaks
def test_errors_mid_stream_arrive_typed_after_the_items(manager: kservice.ServiceManager) -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="broke after 4"):
        for item in manager.stream("model", "broken", (4,)):
            got.append(item)
    assert got == [0, 1, 2, 3]
    got_any: list[Any] = []
    with pytest.raises(TypeError, match=r"not picklable.*lock"):
        for item in manager.stream("model", "unpicklable"):
            got_any.append(item)
    assert got_any == [1]
    assert manager.call_service_sync("model", "echo", ("serving",)) == "serving"
    with pytest.raises(TypeError, match="stream"):
        manager.call_service_sync("model", "count", (3,))


@pytest.mark.allow_leaks
def test_the_deadline_ends_a_stream_and_closes_the_generator(manager: kservice.ServiceManager) -> None:
    got: list[int] = []
    with pytest.raises(kservice.ServiceTimeoutError):
        for item in manager.stream("model", "slow", (1000, 0.05, "mmap-deadline"), timeout=0.5):
            got.append(item)
    assert 2 <= len(got) < 20
    _closed(manager, "mmap-deadline")


@pytest.mark.allow_leaks
def test_a_thousand_abandoned_streams_leak_nothing(manager: kservice.ServiceManager) -> None:
    before = manager.call_service_sync("model", "report")
    for i in range(1000):
        stream = manager.stream("model", "count", (1_000_000, f"m{i}"), window=4)
        next(stream)
        if i % 2:
            stream.close()
        del stream
    gc.collect()
    wait_for(
        lambda: len(manager.call_service_sync("model", "report")["closed"]) >= len(before["closed"]) + 1000,
        timeout=20,
        what="the host to close the 1,000 abandoned streams",
    )
    rings = [p.name for p in SHM_DIR.iterdir() if p.name.startswith("str.")]
    assert len(rings) <= 8, rings  # the pool, not one ring per stream
    assert list(manager.stream("model", "count", (3,))) == [0, 1, 2]


def test_a_consumer_dying_mid_stream_stops_the_hosts_generator() -> None:
    import subprocess
    import sys

    from tests.mmap.services import child_env

    name = unique("model")
    with hosting(f"{name}=tests.streaming.services:TokenModel"), kservice.ServiceManager() as manager:
        consumer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, kservice\n"
                "m = kservice.ServiceManager()\n"
                f"s = m.stream({name!r}, 'count', (10**9, 'orphan'), window=4, timeout=120)\n"
                "next(s); print('reading', flush=True); sys.stdin.read()\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            assert consumer.stdout is not None and consumer.stdout.readline().strip() == "reading"
            consumer.kill()
            consumer.wait(10)
            wait_for(
                lambda: "orphan" in manager.call_service_sync(name, "report")["closed"],
                timeout=10,
                what="the host to stop producing for a dead consumer",
            )
            assert manager.call_service_sync(name, "report")["produced"]["orphan"] <= 4 + 2
        finally:
            if consumer.poll() is None:
                consumer.kill()
                consumer.wait()
    reclaim()  # the killed consumer's rings


@pytest.mark.allow_leaks
def test_a_consumer_that_never_reads_big_items_never_stalls_the_hosts_listener(
    manager: kservice.ServiceManager,
) -> None:
    # Items of 200 kB travel inline: five fill the stream ring. Streamed once, the method is known fast.
    assert len(list(manager.stream("model", "blobs", (3, 200_000)))) == 3
    idle = manager.stream("model", "blobs", (1000, 200_000), timeout=20)
    time.sleep(0.3)  # the host has filled the ring by now and waits for room
    began = time.monotonic()
    assert manager.call_service_sync("model", "echo", ("still serving",), timeout=10) == "still serving"
    assert time.monotonic() - began < 2.0
    assert len(next(idle)) == 200_000
    idle.close()


@pytest.mark.allow_leaks
def test_async_consumers_and_cancelled_ones_never_lose_the_next_streams_items(manager: kservice.ServiceManager) -> None:
    import asyncio

    async def consume_then_cancel() -> None:
        async def slow_reader() -> None:
            async for _ in manager.astream("model", "slow", (1000, 0.01, "acancel")):
                pass

        for _ in range(10):
            reader = asyncio.ensure_future(slow_reader())
            await asyncio.sleep(0.05)
            reader.cancel()  # its receive may still wait on the stream ring in a thread
            with pytest.raises(asyncio.CancelledError):
                await reader
            # The next stream, at once: it must get every item (a pooled ring is never shared).
            assert [i async for i in manager.astream("model", "count", (300,))] == list(range(300))
            assert list(manager.stream("model", "count", (300,))) == list(range(300))

    asyncio.run(consume_then_cancel())
    _closed(manager, "acancel")


#: a host with no server middleware for the service: its plain success ends have no metadata
NO_SERVER_MIDDLEWARE = {"metrics": {"enabled": False}, "tracing": {"enabled": False}}


def test_a_plain_end_travels_as_one_short_record_and_an_error_end_in_full() -> None:
    # Without server middleware the end of a stream is a plain success: it travels as
    # (request_id, None, PLAIN_END), a record as short as a call's reply; the caller makes the end
    # itself (no "kservice.stream.end" marker: the full end record was not used).
    observer = EndMetadata()
    name = unique("model")
    environment = kservice.ServiceEnvironment("streams-mmap-last", {"service_call": {"max_retries": 0}})
    environment.add_middleware(observer)
    environment.register_service(
        name, kservice.ServiceFactory(name, TokenModel), kind="process", **NO_SERVER_MIDDLEWARE
    )
    with environment, kservice.ServiceManager(environment) as manager:
        for _ in range(20):  # the first streams are timed in a stream thread; then they run in place
            assert list(manager.stream(name, "count", (1,))) == [0]
        observer.ends.clear()
        for _ in range(20):
            assert list(manager.stream(name, "count", (2,))) == [0, 1]
        assert len(observer.ends) == 20
        assert all("kservice.stream.end" not in end for end in observer.ends)  # each in one short record
        with pytest.raises(ValueError, match="broke after 1"):
            list(manager.stream(name, "broken", (1,)))  # an error end still travels in full
        # In full: with the metadata a short end record cannot carry (the error's arguments, for the caller).
        assert "kservice.error_state" in observer.ends[-1]
        assert list(manager.stream(name, "count", (3,))) == [0, 1, 2]
        assert manager.call_service_sync(name, "echo", ("still serving",)) == "still serving"
