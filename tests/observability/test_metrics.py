"""Metrics and load: counters, latency histograms, Prometheus text, status load, configuration."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import kservice
import pytest
from kservice import ServiceMiddleware, ServiceRequest, ServiceResponse, hookimpl
from kservice.middleware import metrics
from kservice.middleware.metrics import ClientMetrics, ServerMetrics, ServiceRecorder
from kservice.testing import wait_for
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.conftest import client_chain, server_chain
from tests.observability.services import Echo

NO_HEALTH = {"health": {"enabled": False}}


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def methods(side: str, service: str) -> dict[str, Any]:
    return metrics.snapshot()[side][service]["methods"]  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
def test_calls_and_errors_are_counted_per_method_on_both_sides() -> None:
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        for i in range(5):
            assert manager.call_service_sync("echo", "echo", (i,)) == i
        for _ in range(2):
            with pytest.raises(ValueError):
                manager.call_service_sync("echo", "fail")
        with pytest.raises(kservice.MethodNotFoundError):
            manager.call_service_sync("echo", "nope")
        for side in ("client", "server"):
            got = methods(side, "echo")
            assert got["echo"]["calls"] == 5 and got["echo"]["errors"] == 0
            assert got["fail"]["calls"] == 2 and got["fail"]["errors_by_type"] == {"ValueError": 2}
            # Names the service does not have share one entry: callers cannot grow the state without bound.
            assert "nope" not in got
            assert got[metrics.OTHER_METHODS]["errors_by_type"] == {"MethodNotFoundError": 1}
            total = metrics.snapshot()[side]["echo"]
            assert total["calls"] == 8 and total["errors"] == 3


@pytest.mark.timeout(30)
def test_async_calls_are_counted_when_they_complete() -> None:
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        futures = [manager.call_service_async("echo", "echo", (i,)) for i in range(20)]
        assert [f.result(5) for f in futures] == list(range(20))
        wait_for(lambda: methods("client", "echo")["echo"]["calls"] == 20, what="20 client records")
        assert methods("server", "echo")["echo"]["calls"] == 20


@pytest.mark.timeout(30)
def test_latency_percentiles_follow_the_method_duration() -> None:
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        for _ in range(5):
            manager.call_service_sync("echo", "sleep", (0.02,))
        for side in ("client", "server"):
            got = methods(side, "echo")["sleep"]
            assert 19.0 <= got["latency_p50_ms"] <= 40.0, got
            assert got["latency_p50_ms"] <= got["latency_p90_ms"] <= got["latency_p99_ms"]
            assert got["latency_sum_s"] >= 0.1


def test_percentiles_of_a_recorder_interpolate_within_buckets() -> None:
    recorder = ServiceRecorder("server", "direct", clock=lambda: 0.0)
    for value in [0.001] * 90 + [0.1] * 10:
        recorder.record("m", value, now=0.0)
    summary = recorder.summary()["methods"]["m"]
    assert summary["calls"] == 100
    assert summary["latency_p50_ms"] == pytest.approx(1.0, rel=0.25)
    assert summary["latency_p99_ms"] == pytest.approx(100.0, rel=0.25)


def test_load_window_slides_with_the_clock() -> None:
    now = [0.0]
    recorder = ServiceRecorder("server", "windowed", window=60.0, clock=lambda: now[0])
    for _ in range(120):
        recorder.record("get", 0.002, now=now[0])
    now[0] = 30.0
    load = recorder.load()
    assert load["calls"] == 120 and load["calls_per_s"] == pytest.approx(4.0)
    assert load["methods"]["get"]["p50_ms"] == pytest.approx(2.0, rel=0.25)
    # Two windows later nothing was called: the rate falls to zero, the totals stay.
    now[0] = 200.0
    recorder.load()
    now[0] = 261.0
    load = recorder.load()
    assert load["calls"] == 0 and load["calls_per_s"] == 0.0 and load["methods"] == {}
    assert recorder.summary()["calls"] == 120


@pytest.mark.timeout(30)
def test_status_reports_load_with_in_flight_calls() -> None:
    release = threading.Event()
    try:
        with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
            task = env.register_service("echo", Echo)
            manager = env.manager()
            for i in range(10):
                manager.call_service_sync("echo", "echo", (i,))
            blocked = manager.call_service_async("echo", "wait", (release,))
            load = wait_for(
                lambda: (s := task.get_service_status().extra["load"])["in_flight"] == 1 and s, what="in flight"
            )
            assert load["queue_depth"] == 0
            assert load["calls"] == 10 and load["calls_per_s"] > 0
            assert set(load["methods"]) == {"echo"}
            assert {"p50_ms", "p90_ms", "p99_ms", "calls_per_s"} <= set(load["methods"]["echo"])
            assert manager.get_service_status("echo").extra["load"]["calls"] == 10  # type: ignore[union-attr]
            release.set()
            assert blocked.result(5) is True
    finally:
        release.set()


@pytest.mark.timeout(30)
def test_degraded_responses_are_counted(register_plugin: Callable[[Any, str], None]) -> None:
    class Fallback(ServiceMiddleware):
        def before_call(self, request: ServiceRequest) -> ServiceResponse | None:
            if request.method_name == "fail":
                return ServiceResponse(True, "fallback", None, request.request_id, degraded=True)
            return None

    class Plugin:
        @hookimpl(trylast=True)
        def kservice_middleware(self, service_name: str, options: dict[str, Any]) -> ServiceMiddleware:
            return Fallback()

    register_plugin(Plugin(), "test-fallback")
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        assert manager.call_service_sync("echo", "fail") == "fallback"
        got = methods("client", "echo")["fail"]
        assert got["degraded"] == 1 and got["calls"] == 1 and got["errors"] == 0
        assert "fail" not in metrics.snapshot()["server"].get("echo", {}).get("methods", {})


@pytest.mark.timeout(30)
def test_prometheus_text_on_a_dedicated_registry() -> None:
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        for i in range(3):
            manager.call_service_sync("echo", "echo", (i,))
        with pytest.raises(ValueError):
            manager.call_service_sync("echo", "fail")
        text = metrics.prometheus_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    key = (("method", "echo"), ("service", "echo"), ("side", "server"))
    assert samples[("kservice_calls_total", key)] == 3
    assert samples[("kservice_call_duration_seconds_count", key)] == 3
    assert samples[("kservice_call_duration_seconds_bucket", (("le", "+Inf"), *key))] == 3
    error_key = (("error_type", "ValueError"), ("method", "fail"), ("service", "echo"), ("side", "client"))
    assert samples[("kservice_call_errors_total", error_key)] == 1
    assert families["kservice_call_duration_seconds"].type == "histogram"
    assert "kservice_in_flight" in families and "kservice_queue_depth" in families
    # The application's global registry is left alone.
    assert not any(m.name.startswith("kservice") for m in REGISTRY.collect())
    assert metrics.registry() is not REGISTRY


@pytest.mark.timeout(30)
def test_metrics_disabled_by_config_is_not_in_any_chain() -> None:
    config = {
        **NO_HEALTH,
        "metrics": {"server": False},
        "services": {"quiet": {"class": "tests.observability.services:Echo", "metrics": {"enabled": False}}},
    }
    with kservice.ServiceEnvironment("m", config) as env:
        loud = env.register_service("loud", Echo)
        manager = env.manager()
        manager.call_service_sync("quiet", "echo", (1,))
        manager.call_service_sync("loud", "echo", (1,))
        quiet_task = env.get_task("quiet")
        assert quiet_task is not None
        for chain in (server_chain(quiet_task), client_chain(manager, "quiet")):
            assert not any(isinstance(m, (ClientMetrics, ServerMetrics)) for m in chain)
        assert any(isinstance(m, ClientMetrics) for m in client_chain(manager, "loud"))
        assert not any(isinstance(m, ServerMetrics) for m in server_chain(loud))
        snap = metrics.snapshot()
        assert "quiet" not in snap["client"] or snap["client"]["quiet"]["calls"] == 0
        assert snap["client"]["loud"]["calls"] == 1
        assert "loud" not in snap["server"] or snap["server"]["loud"]["calls"] == 0
        # Without server-side metrics the load still has what the task knows.
        load = loud.get_service_status().extra["load"]
        assert load["in_flight"] == 0 and load["calls_per_s"] is None


class Exploding(ServiceMiddleware):
    """Raises from the server-side hooks for the methods named in ``where``."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}

    def before_handle(self, request: ServiceRequest) -> None:
        if self.where.get(request.method_name) == "before":
            raise KeyError("before_handle exploded")

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if self.where.get(request.method_name) == "after":
            raise LookupError("after_handle exploded")


@pytest.mark.timeout(30)
def test_server_middleware_that_raises_gives_a_typed_error_and_service_keeps_serving(
    register_plugin: Callable[[Any, str], None],
) -> None:
    exploding = Exploding()

    class Plugin:
        @hookimpl(trylast=True)
        def kservice_middleware(self, service_name: str, options: dict[str, Any]) -> ServiceMiddleware:
            return exploding

    register_plugin(Plugin(), "test-exploding")
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        exploding.where = {"echo": "before"}
        with pytest.raises(KeyError, match="before_handle exploded") as before:
            manager.call_service_sync("echo", "echo", (1,))
        assert isinstance(before.value, kservice.ServiceCallError)
        exploding.where = {"echo": "after"}
        with pytest.raises(LookupError, match="after_handle exploded") as after:
            manager.call_service_sync("echo", "echo", (1,))
        assert isinstance(after.value, kservice.ServiceCallError)
        exploding.where = {}
        assert manager.call_service_sync("echo", "echo", (2,)) == 2
        got = methods("server", "echo")["echo"]
        assert got["calls"] == 3 and got["errors_by_type"] == {"KeyError": 1, "LookupError": 1}


@pytest.mark.timeout(30)
def test_status_lists_the_last_failed_calls_with_their_tracebacks() -> None:
    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        task = env.register_service("echo", Echo)
        manager = env.manager()
        manager.call_service_sync("echo", "echo", (1,))
        assert "recent_errors" not in task.get_service_status().extra  # success adds nothing
        for i in range(metrics.RECENT_ERRORS + 5):
            with pytest.raises(ValueError):
                manager.call_service_sync("echo", "fail", (f"failure {i}",))
        with pytest.raises(kservice.MethodNotFoundError):
            manager.call_service_sync("echo", "nope")
        errors = task.get_service_status().extra["recent_errors"]
        assert len(errors) == metrics.RECENT_ERRORS  # bounded: the oldest are dropped
        newest, previous = errors[0], errors[1]
        assert (newest["method"], newest["error_type"], newest["traceback"]) == ("nope", "MethodNotFoundError", "")
        assert previous["service"] == "echo" and previous["method"] == "fail"
        assert previous["error_type"] == "ValueError" and previous["error"] == f"failure {metrics.RECENT_ERRORS + 4}"
        assert "Traceback (most recent call last)" in previous["traceback"] and "ValueError" in previous["traceback"]
        assert previous["time"] >= errors[-1]["time"]
        assert manager.call_service_sync("echo", "echo", (2,)) == 2  # and it keeps serving


def test_the_fast_bucket_table_is_the_bisection_it_replaces() -> None:
    from bisect import bisect_right

    expected = [bisect_right(metrics.BUCKET_BOUNDS, step / 1e8) for step in range(10_000)]
    assert metrics._fast_bucket_table() == expected


def test_a_recorded_call_lands_in_the_bucket_bisection_gives_at_every_duration() -> None:
    # The per-call record looks fast durations up in a table and bisects the rest (pipelined calls,
    # queued behind thousands of others, take milliseconds): both must agree with the bisection,
    # at the table's edge too, and a first call of a method (no entry yet) counts like the others.
    from bisect import bisect_right

    recorder = ServiceRecorder("client", "buckets", clock=lambda: 0.0)
    observer = ClientMetrics(recorder)
    request = ServiceRequest("r", "buckets", "m")
    ok = ServiceResponse(True, None, request_id="r")
    edge = metrics._FAST_SECONDS
    durations = [0.0, 1e-6, 5e-6, 9.999e-5, edge, edge + 1e-12, 1e-4, 1.0001e-4, 1.3e-4, 5e-3, 0.07, 3.0, 250.0]
    expected = [0] * len(recorder.cumulative().get("m", metrics._MethodStats()).buckets)
    for seconds in durations:
        observer.observe_call(request, ok, seconds)
        expected[bisect_right(metrics.BUCKET_BOUNDS, seconds)] += 1
    stats = recorder.cumulative()["m"]
    assert stats.buckets == expected
    assert stats.calls == len(durations) and not stats.errors
    assert stats.seconds == pytest.approx(sum(durations))


@pytest.mark.timeout(90)
def test_the_status_of_a_process_task_reports_its_hosts_load() -> None:
    from tests.core.faulty import Counter

    with kservice.ServiceEnvironment("m", NO_HEALTH) as env:
        task = env.register_service("hosted", kservice.ServiceFactory("hosted", Counter), kind="process")
        manager = env.manager()
        for i in range(10):
            assert manager.call_service_sync("hosted", "echo", (i,)) == i
        slow = [manager.call_service_async("hosted", "sleep", (2.0,), timeout=30) for _ in range(2)]
        load = wait_for(
            lambda: (s := task.get_service_status().extra["load"])["in_flight"] == 2 and s,
            timeout=20,
            what="two calls in flight in the host",
        )
        # The host's window: before, this process's own (empty) window replaced it with 0 calls and 0 ms.
        assert load["calls"] >= 10 and load["calls_per_s"] > 0, load
        assert load["methods"]["echo"]["calls"] >= 10, load
        assert manager.get_service_status("hosted").extra["load"]["calls"] >= 10  # type: ignore[union-attr]
        families = {f.name: f for f in text_string_to_metric_families(metrics.prometheus_text())}
        in_flight = {s.labels["service"]: s.value for s in families["kservice_in_flight"].samples}
        assert in_flight["hosted"] == 2
        assert [s.result(30) for s in slow] == [2.0, 2.0]


def test_an_observer_reads_no_clock_per_call_and_every_call_is_counted_at_once() -> None:
    # The per-call record only appends the duration; durations are bucketed a batch at a time, and the
    # load window's clock is read once per batch. Readers still see every call at once, with its
    # bucket, before its batch is folded and after.
    from bisect import bisect_right

    reads = [0]

    def clock() -> float:
        reads[0] += 1
        return 0.0

    recorder = ServiceRecorder("client", "lazy", clock=clock)
    observer = ClientMetrics(recorder)
    request = ServiceRequest("r", "lazy", "m")
    ok = ServiceResponse(True, None, request_id="r")
    reads[0] = 0
    durations = [i * 1e-5 for i in range(metrics._PENDING_LIMIT - 1)]
    for seconds in durations:
        observer.observe_call(request, ok, seconds)
    assert reads[0] == len(durations) // metrics._TICK  # before: one clock read per call
    reads[0] = 0
    expected = [0] * metrics._NBUCKETS
    for seconds in durations:
        expected[bisect_right(metrics.BUCKET_BOUNDS, seconds)] += 1
    stats = recorder.cumulative()["m"]
    assert stats.buckets == expected and stats.calls == len(durations)
    assert stats.seconds == pytest.approx(sum(durations))
    more = [0.5, 0.0001, 3.0]
    for seconds in more:  # the batch fills and is folded: the same counts, one clock read
        observer.observe_call(request, ok, seconds)
        expected[bisect_right(metrics.BUCKET_BOUNDS, seconds)] += 1
    assert reads[0] <= 1  # the fold's batch: one tick
    assert recorder.summary()["methods"]["m"]["calls"] == len(durations) + len(more)
    assert recorder.cumulative()["m"].buckets == expected


@pytest.mark.parametrize("spread", ["one bucket", "a few slow", "wide", "edges"])
def test_durations_counted_together_land_where_bisection_puts_each(spread: str) -> None:
    # A map chunk's durations (the service's side) and an observer's pending batch are counted
    # together: the counts must be exactly those of bucketing each call alone.
    import random
    from bisect import bisect_right

    rng = random.Random(spread)
    bounds = metrics.BUCKET_BOUNDS
    durations = {
        "one bucket": [rng.uniform(1e-7, 9e-7) for _ in range(500)],
        "a few slow": [rng.uniform(1e-7, 9e-7) for _ in range(500)] + [3e-6, 0.2, 7.0],
        "wide": [10 ** rng.uniform(-7, 2.5) for _ in range(500)],
        "edges": [*bounds, *(b * (1 - 1e-15) for b in bounds), 0.0, 1e9] * 2,
    }[spread]
    stats = metrics._MethodStats()
    metrics._count_durations(stats, durations)
    expected = [0] * metrics._NBUCKETS
    for seconds in durations:
        expected[bisect_right(bounds, seconds)] += 1
    assert stats.buckets == expected
    assert stats.seconds == pytest.approx(sum(durations))


def test_an_observer_takes_load_marks_while_calls_come_without_a_read() -> None:
    # Load marks (the window's steps) are taken while calls are recorded, a tick at most
    # metrics._TICK calls late, not only when the load is read or a batch is folded.
    now = [0.0]
    recorder = ServiceRecorder("client", "marks", window=60.0, clock=lambda: now[0])
    observer = ClientMetrics(recorder)
    request = ServiceRequest("r", "marks", "m")
    ok = ServiceResponse(True, None, request_id="r")
    for step in range(1, 4):
        now[0] = 30.0 * step
        for _ in range(metrics._TICK):
            observer.observe_call(request, ok, 0.001)
    assert [when for when, _ in recorder._marks] == [30.0, 60.0, 90.0]  # the one at 0 is more than a window old
    assert recorder.load()["calls"] == metrics._TICK * 2  # the window's baseline: the mark at 30
