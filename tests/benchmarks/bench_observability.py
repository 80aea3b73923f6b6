"""Per-call cost of the metrics, tracing and call-log middleware, beside the baselines.

Run: ``python -m tests.benchmarks.bench_observability`` (``--quick`` for a smoke run).

Two tables:

1. the hooks alone: each middleware's before/after pair called directly on one
   request, in ns per call (min of repeated runs: the machine is noisy, the
   minimum is the cost without interference);
2. an in-process sync call end to end, in µs (median and p99 of 5,000 calls,
   median over interleaved rounds), with this module's middleware off, with
   the defaults (metrics on both sides; tracing stays out of the chain while
   no tracer provider is set), and with other switches, beside ``ThreadPoolExecutor.submit().result()``
   (the BASELINES.md row an in-process call that crosses threads compares to).
   Other installed plugins' middleware are in every row alike.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kservice
from kservice import ServiceRequest, ServiceResponse
from kservice.middleware import calllog, metrics, tracing


class Echo:
    def echo(self, value: Any) -> Any:
        return value


def _best_ns(fn: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def hook_costs(quick: bool) -> list[tuple[str, float]]:
    number, repeat = (2_000, 5) if quick else (20_000, 40)
    request = ServiceRequest("bench-1", "svc", "echo", (1,), {}, "", None, {})
    response = ServiceResponse(True, 1, None, "bench-1")
    client = metrics.ClientMetrics(metrics.ServiceRecorder("client", "bench"))
    server = metrics.ServerMetrics(metrics.ServiceRecorder("server", "bench"))
    client_span, server_span = tracing.ClientTracing(), tracing.ServerTracing()
    quiet_log = calllog.CallLogMiddleware("server", logger=logging.getLogger("bench.quiet"))
    logging.getLogger("bench.quiet").setLevel(logging.WARNING)
    null_logger = logging.getLogger("bench.null")
    null_logger.addHandler(logging.NullHandler())
    null_logger.setLevel(logging.INFO)
    null_logger.propagate = False
    loud_log = calllog.CallLogMiddleware("server", logger=null_logger)

    def empty_pair() -> None:
        pass

    rows = [
        ("empty function (loop overhead)", _best_ns(empty_pair, number, repeat)),
        (
            "metrics client: observe_call",
            _best_ns(lambda: client.observe_call(request, response, 2e-6), number, repeat),
        ),
        (
            "metrics server: observe_handle",
            _best_ns(lambda: server.observe_handle(request, response, 2e-6), number, repeat),
        ),
        (
            "tracing client, enabled: true, no provider set",
            _best_ns(
                lambda: (client_span.before_call(request), client_span.after_call(response, request)), number, repeat
            ),
        ),
        (
            "tracing server, enabled: true, no provider set",
            _best_ns(
                lambda: (server_span.before_handle(request), server_span.after_handle(response, request)),
                number,
                repeat,
            ),
        ),
        (
            "call log on, level filtered out",
            _best_ns(lambda: quiet_log.observe_handle(request, response, 2e-6), number, repeat),
        ),
        (
            "call log on, record to a NullHandler",
            _best_ns(lambda: loud_log.observe_handle(request, response, 2e-6), number // 4, repeat),
        ),
    ]
    try:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        registry = CollectorRegistry()
        histogram = Histogram("bench_seconds", "d", ["service", "method"], registry=registry)
        counter = Counter("bench_calls", "d", ["service", "method"], registry=registry)

        def prometheus_per_call() -> None:
            start = time.perf_counter()
            histogram.labels("svc", "echo").observe(time.perf_counter() - start)
            counter.labels("svc", "echo").inc()

        rows.append(
            (
                "(alternative) prometheus-client Histogram+Counter per call",
                _best_ns(prometheus_per_call, number, repeat),
            )
        )
    except ImportError:
        pass
    return rows


def _round_trips(call: Callable[[], Any], n: int) -> list[float]:
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        call()
        samples.append((clock() - start) * 1e6)
    return samples


def end_to_end(quick: bool) -> list[tuple[str, float, float]]:
    n, rounds = (500, 1) if quick else (5_000, 3)
    off = {"metrics": {"enabled": False}, "tracing": {"enabled": False}, "call_log": {"enabled": False}}
    configs = {
        "kservice, observability middleware off": off,
        "kservice, defaults (metrics both sides; no tracer provider)": {},
        "kservice, metrics server side only": {"metrics": {"client": False}},
        "kservice, defaults + tracing forced on, no provider": {"tracing": {"enabled": True}},
        "kservice, defaults + call log (level filtered out)": {"call_log": {"enabled": True}},
    }
    logging.getLogger(calllog.LOGGER_NAME).setLevel(logging.WARNING)
    calls: dict[str, Callable[[], Any]] = {}
    envs = []
    pool = ThreadPoolExecutor(1)
    calls["baseline: ThreadPoolExecutor.submit().result()"] = lambda: pool.submit(Echo().echo, 1).result()
    for label, config in configs.items():
        env = kservice.ServiceEnvironment(label, {"health": {"enabled": False}, **config})
        env.register_service("echo", Echo)
        env.start()
        envs.append(env)
        manager = env.manager()
        calls[label] = lambda manager=manager: manager.call_service_sync("echo", "echo", (1,))
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in calls}
    try:
        for call in calls.values():
            _round_trips(call, n // 5)  # warm-up
        for _ in range(rounds):
            for label, call in calls.items():  # interleaved: drift hits every row alike
                samples = sorted(_round_trips(call, n))
                results[label].append((statistics.median(samples), samples[int(len(samples) * 0.99)]))
    finally:
        for env in envs:
            env.stop()
        pool.shutdown()
    return [
        (label, statistics.median(m for m, _ in rows), statistics.median(p for _, p in rows))
        for label, rows in results.items()
    ]


def run(quick: bool = False) -> dict[str, Any]:
    """Measure and print both tables; returns the numbers."""
    hooks = hook_costs(quick)
    print("\nPer-call cost of the hooks alone (ns, min of repeats)")
    print(f"| {'hooks':<62} | {'ns/call':>8} |")
    print(f"|{'-' * 64}|{'-' * 10}|")
    for label, ns in hooks:
        print(f"| {label:<62} | {ns:>8.0f} |")
    e2e = end_to_end(quick)
    print("\nIn-process sync call end to end (µs)")
    print(f"| {'configuration':<62} | {'median':>8} | {'p99':>8} |")
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 10}|")
    for label, median, p99 in e2e:
        print(f"| {label:<62} | {median:>8.1f} | {p99:>8.1f} |")
    return {"hooks": hooks, "end_to_end": e2e}


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
