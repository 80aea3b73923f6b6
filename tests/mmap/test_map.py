"""ServiceManager.map over mmap: a chunk travels as one ring record, each call keeps its own outcome.

The host is a real child process (``kind="process"``) reached over shared memory.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import ServiceCallError, ServiceEnvironment, ServiceFactory, ServiceManager
from kservice.plugins.mmap import codec
from kservice.plugins.mmap.transport import MmapConnection

from tests.core.faulty import Counter
from tests.mmap.services import KV, SerialLedger

pytestmark = pytest.mark.timeout(120)

QUIET: dict[str, Any] = {"service_call": {"max_retries": 0}, "breaker": {"enabled": False}, "health": {"enabled": False}}


@pytest.fixture
def host() -> Iterator[tuple[ServiceEnvironment, ServiceManager]]:
    env = ServiceEnvironment("map-mmap", QUIET)
    env.register_service("kv", ServiceFactory("kv", KV), kind="process")
    env.register_service("one", ServiceFactory("one", Counter), kind="process", local={"max_workers": 1})
    env.register_service("ledger", ServiceFactory("ledger", SerialLedger), kind="process")
    with env:
        manager = env.manager()
        yield env, manager


def test_a_chunk_leaves_as_one_record_and_every_call_gets_its_own_answer(
    host: tuple[ServiceEnvironment, ServiceManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manager = host
    assert manager.call_service_sync("kv", "pid") != os.getpid()
    records: list[int] = []
    encode = codec.encode_request_batch

    def counting(requests: Any, *args: Any) -> bytes | None:
        records.append(len(requests))
        return encode(requests, *args)

    monkeypatch.setattr(codec, "encode_request_batch", counting)
    assert list(manager.map("kv", "add", [(i, 1) for i in range(1000)], chunk_size=100)) == [i + 1 for i in range(1000)]
    assert records == [100] * 10  # ten records carried the thousand calls
    assert sorted(manager.map("kv", "echo", range(3000), ordered=False)) == list(range(3000))


def test_an_item_that_cannot_be_pickled_fails_alone_with_a_type_error_naming_it(host: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = host
    lock = threading.Lock()
    results = list(manager.map("kv", "echo", [1, lock, 3], return_exceptions=True))
    assert results[0] == 1 and results[2] == 3
    error = results[1]
    assert isinstance(error, TypeError)
    assert "not picklable" in str(error) and "kv.echo" in str(error)
    assert "item 1 of map over kv.echo" in " ".join(error.__notes__)
    with pytest.raises(TypeError, match="not picklable"):
        list(manager.map("kv", "echo", [1, lock]))
    assert manager.call_service_sync("kv", "echo", ("still serving",)) == "still serving"


def test_an_item_the_host_cannot_decode_fails_alone_and_the_others_run(host: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = host
    module = types.ModuleType("kservice_test_only_in_the_caller")
    exec("class OnlyHere:\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        results = list(manager.map("kv", "echo", [1, module.OnlyHere(), 3], return_exceptions=True))
    finally:
        del sys.modules[module.__name__]
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ServiceCallError) and isinstance(results[1], TypeError), results
    assert "could not decode the arguments" in str(results[1]) and "did not run" in str(results[1])
    assert manager.call_service_sync("kv", "echo", (4,)) == 4


def test_closing_early_cancels_the_calls_the_host_has_not_started(
    host: tuple[ServiceEnvironment, ServiceManager], tmp_path: Any
) -> None:
    _, manager = host
    ledger = tmp_path / "ledger"
    results = manager.map("ledger", "record", [(str(ledger), str(i), 0.05) for i in range(100)], chunk_size=10, max_in_flight=40)
    assert next(results) > 0
    results.close()
    ran = len(ledger.read_text().splitlines())
    time.sleep(0.6)
    after = len(ledger.read_text().splitlines())
    # One at a time, 50 ms each: without the cancel notices the 40-odd calls sent would run for 2 s more.
    assert after <= ran + 2, (ran, after)
    assert after < 40
    assert manager.call_service_sync("ledger", "pid") > 0


def test_a_slow_item_times_out_on_its_own_and_is_never_started_late(host: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = host
    started = time.monotonic()
    results = list(manager.map("one", "sleep", [0.0, 1.0, 0.0, 0.0], timeout=0.4, return_exceptions=True))
    assert results[0] == 0.0
    assert all(type(r).__name__ == "ServiceTimeoutError" for r in results[1:]), results  # queued behind the slow one
    assert time.monotonic() - started < 5
    connection = manager.get_service_queue("one")
    assert isinstance(connection, MmapConnection)
    assert manager.call_service_sync("one", "echo", (1,), timeout=10) == 1
