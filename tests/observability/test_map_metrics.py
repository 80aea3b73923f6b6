"""Metrics of ``ServiceManager.map`` with every installed plugin at its defaults: compact chunks, every call counted.

The host is a real child process (``kind="process"``) reached over shared memory; the
client side is read from this process's recorder, the server side from the host's.
"""

from __future__ import annotations

from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceFactory
from kservice.middleware import metrics
from kservice.plugins.mmap.transport import CHUNK_CALLS_IN_LOOP

from tests.mmap.batch_services import count_chunk_records

pytestmark = pytest.mark.timeout(120)


def _method(summary: dict[str, Any], method: str) -> dict[str, Any]:
    return summary.get("methods", {}).get(method, {"calls": 0, "errors_by_type": {}, "latency_sum_s": 0.0})


def test_map_with_the_default_plugins_sends_compact_chunks_and_both_sides_count_every_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "items-map-metrics"
    # Tracing's default joins the chain only once an OpenTelemetry provider is configured (other tests
    # of the session do): off here, as it is by default in a process that configures none.
    env = ServiceEnvironment("map-metrics", {"health": {"enabled": False}, "tracing": {"enabled": False}})
    env.register_service(name, ServiceFactory(name, "tests.mmap.batch_services:Items"), kind="process")
    with env:
        manager = env.manager()
        assert manager.call_service_sync(name, "check", (1,)) == 1  # its cost is known: the host runs chunks in a loop
        chain = manager._route(name).chain
        kinds = {type(m).__name__ for m in manager.client_middlewares(name)}
        assert {"ClientMetrics", "CircuitBreaker", "RetryBudgetCounter"} <= kinds, kinds
        assert chain is not None and chain.batch  # every default middleware has the batch hooks
        chunks = count_chunk_records(monkeypatch)
        client_before = _method(metrics.snapshot()["client"].get(name, {}), "check")
        count = 1000
        results = list(
            manager.map(name, "check", range(count), kwargs={"bad": 7}, chunk_size=100, return_exceptions=True)
        )
        failed = [i for i in range(count) if i % 7 == 0]
        assert [i for i, r in enumerate(results) if isinstance(r, ValueError)] == failed
        assert [r for i, r in enumerate(results) if i % 7] == [i for i in range(count) if i % 7]
        assert chunks == [100] * 10  # ten compact records carried the thousand calls
        status = manager._route(name).connection.remote_status()  # type: ignore[attr-defined]
        assert status[CHUNK_CALLS_IN_LOOP] > 0  # the host ran them in its loop, server metrics and all

        client = _method(metrics.snapshot()["client"][name], "check")
        assert client["calls"] - client_before["calls"] == count
        assert client["errors_by_type"].get("ValueError", 0) - client_before["errors_by_type"].get(
            "ValueError", 0
        ) == len(failed)
        assert client["latency_sum_s"] > client_before["latency_sum_s"]

        server = _method(manager.call_service_sync(name, "server_metrics", (name,)), "check")
        assert server["calls"] == count + 1  # and the warm-up call
        assert server["errors_by_type"] == {"ValueError": len(failed)}
        assert server["latency_sum_s"] > 0
        assert manager.call_service_sync(name, "count") == count + 1  # each call ran once


def test_a_chunk_of_durations_counts_exactly_as_its_calls_one_by_one() -> None:
    """The batch hook's bucketing shortcuts (one bucket for the chunk, counting in C) lose nothing."""
    import random
    from bisect import bisect_right

    from kservice import CallBatch

    for durations in (
        [random.uniform(1e-8, 9e-7) for _ in range(256)],  # trivial calls: one bucket
        [random.choice([1e-7, 3.3e-6, 9.99e-5, 1e-4, 1e-3, 0.99999e-3, 2.5e-3, 0.7]) for _ in range(5000)],
    ):
        recorder = metrics.ServiceRecorder("server", "chunked")
        batch = CallBatch("chunked", "m", len(durations), "id")
        batch.durations = durations
        metrics.ServerMetrics(recorder).observe_handle_batch(batch)
        expected = [0] * (len(metrics.BUCKET_BOUNDS) + 1)
        for seconds in durations:
            expected[bisect_right(metrics.BUCKET_BOUNDS, seconds)] += 1
        stats = recorder.cumulative()["m"]
        assert stats.buckets == expected
        assert stats.calls == len(durations) and stats.seconds == pytest.approx(sum(durations))
