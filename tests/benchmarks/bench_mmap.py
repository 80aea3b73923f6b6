"""The mmap transport, full stack, beside multiprocessing baselines measured in the same run.

``python tests/benchmarks/bench_mmap.py [--quick]``

kservice: ServiceManager -> mmap -> a ``process`` task's method -> back, for a
90-byte and a 64 KiB argument (sync median/p99), a 16 MiB argument round trip
(GB/s of payload), pipelined async calls (20,000 in flight; the median of five
rounds) and the idle CPU of the hosting child. Baselines: a ``multiprocessing.Queue`` request/response
pair and a ``multiprocessing.Pipe`` echo server with the same payloads, and the
bare shared-memory ring (one ring each way, pickled payloads, no kservice) as
the floor.

The stack is measured twice, each in its own process interleaved with its own
baselines: with the core plugins only (``inproc`` and ``mmap``; every other
plugin is blocked through ``KSERVICE_DISABLE_PLUGINS``, in the caller and in
the hosting child), which is the framework's own cost, and with every installed
plugin at its defaults (metrics, tracing, breaker, retry... middleware
included). The baseline rows printed are those of the core run; each kservice
row's ratios are against the baselines of its own run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for entry in (str(ROOT), str(Path(__file__).resolve().parent)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _timing import interleaved, print_table  # noqa: E402

SMALL = b"x" * 90
MEDIUM = b"x" * (64 * 1024)
BIG = b"x" * (16 << 20)


# --------------------------------------------------------------------------- baselines (child sides)


def _queue_server(requests: Any, responses: Any) -> None:
    while True:
        item = requests.get()
        if item is None:
            return
        responses.put(item)


def _pipe_server(conn: Any) -> None:
    while True:
        item = conn.recv()
        if item is None:
            return
        conn.send(item)


def _ring_server(request_name: str, response_name: str, ready: Any) -> None:
    from kservice.plugins.mmap.ring import attach_queue, create_queue

    requests = create_queue(request_name, 4 << 20)
    ready.set()
    responses = attach_queue(response_name)
    while True:
        for record in requests.get_many(64):
            if record == b"stop":
                requests.close()
                requests.unlink()
                return
            responses.put(record)


class _Baseline:
    """An echo server in a spawned process and a client-side round trip."""

    def __init__(self, kind: str) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        if kind == "mp.Queue pair":
            self.requests, self.responses = ctx.Queue(), ctx.Queue()
            self.process = ctx.Process(target=_queue_server, args=(self.requests, self.responses), daemon=True)
        elif kind == "mp.Pipe":
            self.conn, child = ctx.Pipe()
            self.process = ctx.Process(target=_pipe_server, args=(child,), daemon=True)
        else:
            from kservice.plugins.mmap.ring import create_queue

            tag = f"{os.getpid()}.{time.monotonic_ns() % 10**9}"
            self.responses_ring = create_queue(f"bench.rsp.{tag}", 4 << 20)
            ready = ctx.Event()
            self.process = ctx.Process(
                target=_ring_server, args=(f"bench.req.{tag}", self.responses_ring.name, ready), daemon=True
            )
        self.process.start()
        if kind == "bare ring":
            from kservice.plugins.mmap.ring import attach_queue

            ready.wait(30)
            self.requests_ring = attach_queue(f"bench.req.{tag}")

    def round_trip(self, payload: bytes) -> Any:
        import pickle

        if self.kind == "mp.Queue pair":
            self.requests.put(payload)
            return self.responses.get()
        if self.kind == "mp.Pipe":
            self.conn.send(payload)
            return self.conn.recv()
        self.requests_ring.put(pickle.dumps(payload, 5))
        return pickle.loads(self.responses_ring.get())

    def pipelined(self, payload: bytes, n: int) -> float:
        import pickle

        start = time.perf_counter()
        if self.kind == "mp.Queue pair":
            for _ in range(n):
                self.requests.put(payload)
            for _ in range(n):
                self.responses.get()
        elif self.kind == "mp.Pipe":
            # A pipe cannot take 20,000 sends before the first receive (the buffers fill): windows of 256.
            sent = got = 0
            while got < n:
                while sent < n and sent - got < 256:
                    self.conn.send(payload)
                    sent += 1
                self.conn.recv()
                got += 1
        else:
            record = pickle.dumps(payload, 5)
            sent = got = 0
            while got < n:
                while sent < n and sent - got < 4096:
                    self.requests_ring.put(record)
                    sent += 1
                got += len(self.responses_ring.get_many(256))
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        if self.kind == "mp.Queue pair":
            self.requests.put(None)
        elif self.kind == "mp.Pipe":
            self.conn.send(None)
        else:
            self.requests_ring.put(b"stop")
        self.process.join(10)
        if self.kind == "bare ring":
            self.requests_ring.close()
            self.responses_ring.close()
            self.responses_ring.unlink()


# --------------------------------------------------------------------------- kservice


def _idle_cpu(pid: int, seconds: float) -> float:
    import psutil

    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    return ((after.user + after.system) - (before.user + before.system)) / seconds


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure everything; returns one row per (mechanism, payload)."""
    from kservice import ServiceEnvironment, ServiceFactory

    from tests.mmap.services import KV

    n = 1500 if quick else 6000
    in_flight = 5000 if quick else 20000
    environment = ServiceEnvironment("bench-mmap")
    environment.register_service("kv", ServiceFactory("kv", KV), kind="process")
    environment.start()
    baselines = {kind: _Baseline(kind) for kind in ("mp.Queue pair", "mp.Pipe", "bare ring")}
    rows: list[dict[str, Any]] = []
    try:
        manager = environment.manager()
        call, call_async = manager.call_service_sync, manager.call_service_async
        for payload, label in ((SMALL, "90 B"), (MEDIUM, "64 KiB")):
            subjects = {
                "kservice mmap": lambda p=payload: call("kv", "echo", (p,)),
                **{kind: (lambda b=b, p=payload: b.round_trip(p)) for kind, b in baselines.items()},
            }
            measured = interleaved(subjects, n if payload is SMALL else n // 3)
            for kind, (median, p99) in measured.items():
                rows.append({"mechanism": kind, "payload": label, "median_us": median, "p99_us": p99})

        def pipelined_kservice(count: int) -> float:
            start = time.perf_counter()
            futures = [call_async("kv", "echo", (SMALL,), timeout=120) for _ in range(count)]
            for future in futures:
                future.result()
            return count / (time.perf_counter() - start)

        # Medians of five rounds each: a round's rate moves with the machine's scheduling (and with
        # whether the collector ran a full pass in it), more than the code changes it.
        rounds = 3 if quick else 5
        pipelined = {"kservice mmap": statistics.median(pipelined_kservice(in_flight) for _ in range(rounds))}
        for kind, baseline in baselines.items():
            pipelined[kind] = statistics.median(baseline.pipelined(SMALL, in_flight) for _ in range(rounds))
        for row in rows:
            if row["payload"] == "90 B":
                row["pipelined_calls_s"] = pipelined[row["mechanism"]]

        big_rounds = 3 if quick else 7
        for kind, round_trip in (
            ("kservice mmap", lambda: call("kv", "echo", (BIG,))),
            *((k, (lambda b=b: b.round_trip(BIG))) for k, b in baselines.items() if k != "bare ring"),
        ):
            round_trip()
            times = []
            for _ in range(big_rounds):
                start = time.perf_counter()
                round_trip()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append(
                {"mechanism": kind, "payload": "16 MiB", "median_us": seconds * 1e6, "gb_s": len(BIG) / seconds / 1e9}
            )

        child = environment.get_task("kv").pid  # type: ignore[union-attr]
        rows.append(
            {
                "mechanism": "kservice mmap",
                "payload": "idle host",
                "idle_cpu_pct": 100 * _idle_cpu(child, 1.0 if quick else 3.0),
            }
        )
    finally:
        for baseline in baselines.values():
            baseline.close()
        environment.stop()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up of kservice over each baseline, per payload (latency ratio, or throughput ratio)."""
    by = {(r["mechanism"], r["payload"]): r for r in rows}
    for payload in ("90 B", "64 KiB", "16 MiB"):
        ours = by.get(("kservice mmap", payload))
        if ours is None:
            continue
        for kind, key in (
            ("mp.Queue pair", "x_vs_mp_queue"),
            ("mp.Pipe", "x_vs_mp_pipe"),
            ("bare ring", "x_vs_bare_ring"),
        ):
            other = by.get((kind, payload))
            if other is not None:
                ours[key] = other["median_us"] / ours["median_us"]
        if payload == "90 B":
            ours["pipelined_x_vs_mp_queue"] = (
                ours["pipelined_calls_s"] / by[("mp.Queue pair", "90 B")]["pipelined_calls_s"]
            )


#: Plugins that are part of the transport path itself; the "core" run blocks every other one.
CORE_PLUGINS = ("inproc", "mmap")


def _optional_plugins() -> list[str]:
    from kservice import get_plugin_manager

    return sorted(name for name, _ in get_plugin_manager().list_name_plugin() if name not in CORE_PLUGINS)


def run_both(quick: bool = False) -> list[dict[str, Any]]:
    """Both stacks, each in a fresh process (plugins load once per process); rows of both."""
    import json
    import subprocess

    optional = _optional_plugins()
    rows: list[dict[str, Any]] = []
    for label, disabled in (("core plugins", ",".join(optional)), ("all plugins", "")):
        env = {**os.environ, "KSERVICE_DISABLE_PLUGINS": disabled}
        argv = [sys.executable, str(Path(__file__).resolve()), "--json", *(["--quick"] if quick else [])]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=1800).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        for row in measured:
            if row["mechanism"] == "kservice mmap":
                row["mechanism"] = f"kservice ({label})"
                rows.append(row)
            elif label == "core plugins":
                rows.append(row)
    order = {"kservice (core plugins)": 0, "kservice (all plugins)": 1}
    payloads = ["90 B", "64 KiB", "16 MiB", "idle host"]
    rows.sort(key=lambda r: (payloads.index(r["payload"]), order.get(r["mechanism"], 2)))
    return rows


COLUMNS = [
    "mechanism",
    "payload",
    "median_us",
    "p99_us",
    "pipelined_calls_s",
    "gb_s",
    "idle_cpu_pct",
    "x_vs_mp_queue",
    "x_vs_mp_pipe",
    "x_vs_bare_ring",
    "pipelined_x_vs_mp_queue",
]


def main() -> None:
    quick = "--quick" in sys.argv
    if "--json" in sys.argv:
        import json

        print(json.dumps(run(quick=quick)))
        return
    rows = run_both(quick=quick)
    print_table(
        "mmap transport, full stack, beside baselines (x_vs_*: times faster than that baseline; <1 is slower)",
        [{c: row.get(c) for c in COLUMNS} for row in rows],
    )


if __name__ == "__main__":
    main()
