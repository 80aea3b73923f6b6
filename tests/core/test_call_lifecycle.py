"""In-process calls: cancelling reaches the service, and close() never lets a call outlive its deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from kservice import ServiceEnvironment, ServiceManager, ServiceStoppedError, ServiceTimeoutError
from kservice.testing import wait_for

from tests.core.services import KeyValue
from tests.mmap.services import SerialLedger

pytestmark = pytest.mark.timeout(60)


def tags(path: Path) -> list[str]:
    """The tags of the runs the ledger file recorded, in order."""
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def ledger_env() -> ServiceEnvironment:
    environment = ServiceEnvironment("lifecycle")
    environment.register_service("ledger", SerialLedger)
    with environment:
        yield environment  # type: ignore[misc]


def test_cancelling_a_queued_future_means_the_call_never_runs(ledger_env: ServiceEnvironment, tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    with ledger_env.manager() as manager:
        busy = manager.call_service_async("ledger", "record", (str(path), "busy", 1.0), timeout=30)
        wait_for(lambda: tags(path) == ["busy"], what="the busy call to start")
        queued = manager.call_service_async("ledger", "record", (str(path), "queued", 0.0), timeout=30)
        started = time.monotonic()
        assert queued.cancel()
        assert queued.cancelled()
        assert time.monotonic() - started < 0.5  # cancel() does not wait for the service
        busy.result(10)
        # The service serves the next call; the cancelled one never started, before it or after.
        assert manager.call_service_sync("ledger", "record", (str(path), "next", 0.0), timeout=10) > 0
        time.sleep(0.1)  # deliberate: room for the cancelled call to run late, which it must not
        assert tags(path) == ["busy", "next"]


def test_cancelling_a_running_call_lets_it_finish_and_drops_its_result(
    ledger_env: ServiceEnvironment, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.txt"
    with ledger_env.manager() as manager:
        running = manager.call_service_async("ledger", "record", (str(path), "running", 0.5), timeout=30)
        wait_for(lambda: tags(path) == ["running"], what="the call to start")
        assert running.cancel()
        # A thread cannot be interrupted: it runs to the end, then the service takes the next call.
        assert manager.call_service_sync("ledger", "record", (str(path), "next", 0.0), timeout=10) > 0
        assert tags(path) == ["running", "next"]
        assert running.cancelled()


def test_cancelling_the_task_awaiting_acall_means_the_call_never_runs(
    ledger_env: ServiceEnvironment, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.txt"

    async def scenario(manager: ServiceManager) -> None:
        busy = asyncio.ensure_future(manager.acall("ledger", "record", (str(path), "busy", 1.0), timeout=30))
        while tags(path) != ["busy"]:
            await asyncio.sleep(0.01)
        # asyncio.wait_for cancels the awaiting task at its timeout ...
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(manager.acall("ledger", "record", (str(path), "wait_for", 0.0), timeout=30), 0.1)
        # ... and so does cancelling the task itself (what a TaskGroup does when a sibling fails).
        task = asyncio.ensure_future(manager.acall("ledger", "record", (str(path), "task", 0.0), timeout=30))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(BaseExceptionGroup):
            async with asyncio.TaskGroup() as group:
                group.create_task(manager.acall("ledger", "record", (str(path), "group", 0.0), timeout=30))

                async def fail_soon() -> None:
                    await asyncio.sleep(0.1)
                    raise RuntimeError("a sibling failed")

                group.create_task(fail_soon())
        await busy
        await manager.acall("ledger", "record", (str(path), "next", 0.0), timeout=10)

    with ledger_env.manager() as manager:
        asyncio.run(scenario(manager))
        time.sleep(0.1)  # deliberate: room for the cancelled call to run late, which it must not
        assert tags(path) == ["busy", "next"]


def test_close_fails_async_calls_in_flight_at_once() -> None:
    with ServiceEnvironment("closing") as env:
        env.register_service("kv", KeyValue, {"a": 1})
        env.start()
        manager = env.manager()
        short = manager.call_service_async("kv", "sleep", (1.5,), timeout=0.3)
        long = manager.call_service_async("kv", "sleep", (1.5,), timeout=30)
        task = env.get_task("kv")
        assert task is not None
        wait_for(lambda: task.get_service_status().in_flight == 2, what="both calls to run")
        started = time.monotonic()
        manager.close()
        for future in (short, long):
            with pytest.raises(ServiceStoppedError, match="closed"):
                future.result(5)
        assert time.monotonic() - started < 1.0  # at once: not at 1.5 s when the method returns
        with pytest.raises(ServiceStoppedError):
            manager.call_service_async("kv", "get", ("a",))
        # The service keeps its state and serves the next caller.
        with env.manager() as other:
            assert other.call_service_sync("kv", "get", ("a",), timeout=10) == 1


def test_a_sync_call_in_flight_at_close_ends_by_its_deadline() -> None:
    with ServiceEnvironment("closing") as env:
        env.register_service("kv", KeyValue)
        env.start()
        manager = env.manager()
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                manager.call_service_sync("kv", "sleep", (2.0,), timeout=0.3)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome.append(exc)

        caller = threading.Thread(target=call)
        started = time.monotonic()
        caller.start()
        task = env.get_task("kv")
        assert task is not None
        wait_for(lambda: task.get_service_status().in_flight == 1, what="the sync call to run")
        manager.close()
        caller.join(5)
        assert isinstance(outcome[0], ServiceTimeoutError)
        assert time.monotonic() - started < 1.5
