"""Raw floor of the shared-memory ring beside multiprocessing.Pipe and multiprocessing.Queue.

A client process sends a payload to an echo server process and waits for it to
come back (sync round trip), then keeps a window of requests in flight
(pipelined).  Payloads are raw bytes (no pickling on the ring and the Pipe;
``multiprocessing.Queue`` pickles them, as it always does).  The ring is
measured twice: with its compiled put/pop (``_ringfast``, when built) and with
the pure-Python code (``KSERVICE_RING_PURE=1``, client and server alike), then
both again with every wait sleeping on the futex at once (no spin, as on a busy
machine), which compares the compiled sleep with the Python one.  A
second table gives the interpreter cost of one put plus one get in a single
process (best of several repeats, the steadiest figure on a noisy machine).
All mechanisms are measured in the same run, because this kind of machine is
noisy.

Run ``python tests/benchmarks/bench_ring.py [--quick]``; the suite calls
:func:`run`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
import timeit
import uuid
from collections.abc import Iterator
from pathlib import Path

from kservice.plugins.mmap import ring

HERE = Path(__file__).resolve().parent
WINDOW = 256
SIZES = (90, 64 * 1024)
#: Ring implementations measured: (label, value of KSERVICE_RING_PURE).
RING_PATHS = (("compiled put/pop", "0"), ("pure Python", "1"))


@contextlib.contextmanager
def _ring_path(pure: str) -> Iterator[None]:
    """Handles created (and processes spawned) inside use the given ring path."""
    old = os.environ.get(ring.PURE_ENV)
    os.environ[ring.PURE_ENV] = pure
    try:
        yield
    finally:
        if old is None:
            del os.environ[ring.PURE_ENV]
        else:
            os.environ[ring.PURE_ENV] = old


# --------------------------------------------------------------------------- servers (child processes)


def ring_server(req_name: str, resp_name: str, ready, sleeping: bool = False) -> None:
    req = ring.create_queue(req_name, 1 << 22)
    if sleeping:
        req.set_spin_limit(0)
    resp = ring.attach_queue(resp_name)
    ready.set()
    try:
        while True:
            for rec in req.get_many(WINDOW):
                if rec == b"stop":
                    return
                resp.put(rec)
    finally:
        resp.close()
        req.unlink()
        req.close()


def pipe_server(conn) -> None:
    while True:
        b = conn.recv_bytes()
        if b == b"stop":
            return
        conn.send_bytes(b)


def queue_server(qin, qout) -> None:
    while True:
        b = qin.get()
        if b is None:
            return
        qout.put(b)


# --------------------------------------------------------------------------- measurement


def _sync(send, recv, payload: bytes, n: int) -> tuple[float, float]:
    for _ in range(min(200, n)):
        send(payload)
        recv()
    pc = time.perf_counter
    times = []
    for _ in range(n):
        t = pc()
        send(payload)
        recv()
        times.append(pc() - t)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def _pipelined(send, recv_some, payload: bytes, n: int) -> float:
    sent = received = 0
    t = time.perf_counter()
    while received < n:
        while sent < n and sent - received < WINDOW:
            send(payload)
            sent += 1
        received += recv_some()
    return n / (time.perf_counter() - t)


def _bench_ring(ctx, n: int, n_pipe: int, label: str, pure: str, sleeping: bool = False) -> list[dict]:
    """The ring's rows; ``sleeping``: both sides sleep on the futex at every wait (no spin), 90 B only."""
    tag = uuid.uuid4().hex[:8]
    with _ring_path(pure):
        resp = ring.create_queue(f"bench-resp-{tag}", 1 << 22)
        if sleeping:
            resp.set_spin_limit(0)
        ready = ctx.Event()
        server = ctx.Process(target=ring_server, args=(f"bench-req-{tag}", resp.name, ready, sleeping), daemon=True)
        server.start()
    rows = []
    try:
        if not ready.wait(30):
            raise RuntimeError("ring echo server did not start")
        with _ring_path(pure):
            req = ring.attach_queue(f"bench-req-{tag}")
    except BaseException:
        server.kill()
        server.join()
        resp.unlink()
        resp.close()
        raise
    try:
        for size in SIZES[:1] if sleeping else SIZES:
            med, p99 = _sync(req.put, resp.get, b"r" * size, n)
            mechanism = f"shm ring, {label}" + (", sleeping waits" if sleeping else "")
            row = {"mechanism": mechanism, "payload": size, "median_us": med, "p99_us": p99}
            if size == SIZES[0] and not sleeping:
                row["pipelined_per_s"] = _pipelined(req.put, lambda: len(resp.get_many(WINDOW)), b"r" * size, n_pipe)
            rows.append(row)
        req.put(b"stop")
        server.join(30)
    finally:
        req.close()
        resp.unlink()
        resp.close()
        if server.is_alive():
            server.kill()
            server.join()
    return rows


def _bench_pipe(ctx, n: int, n_pipe: int) -> list[dict]:
    a, b = ctx.Pipe()
    server = ctx.Process(target=pipe_server, args=(b,), daemon=True)
    server.start()
    rows = []
    try:
        for size in SIZES:
            med, p99 = _sync(a.send_bytes, a.recv_bytes, b"p" * size, n)
            row = {"mechanism": "multiprocessing.Pipe", "payload": size, "median_us": med, "p99_us": p99}
            if size == SIZES[0]:
                row["pipelined_per_s"] = _pipelined(a.send_bytes, lambda: (a.recv_bytes(), 1)[1], b"p" * size, n_pipe)
            rows.append(row)
        a.send_bytes(b"stop")
        server.join(30)
    finally:
        if server.is_alive():
            server.kill()
            server.join()
        a.close()
        b.close()
    return rows


def _bench_queue(ctx, n: int, n_pipe: int) -> list[dict]:
    qin, qout = ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=queue_server, args=(qin, qout), daemon=True)
    server.start()
    rows = []
    try:
        for size in SIZES:
            med, p99 = _sync(qin.put, qout.get, b"q" * size, n)
            row = {"mechanism": "multiprocessing.Queue pair", "payload": size, "median_us": med, "p99_us": p99}
            if size == SIZES[0]:
                row["pipelined_per_s"] = _pipelined(qin.put, lambda: (qout.get(), 1)[1], b"q" * size, n_pipe)
            rows.append(row)
        qin.put(None)
        server.join(30)
    finally:
        if server.is_alive():
            server.kill()
            server.join()
        for q in (qin, qout):
            q.close()
            q.join_thread()
    return rows


def run(quick: bool = False) -> list[dict]:
    """Measure every mechanism; one dict per (mechanism, payload).

    Keys: mechanism, payload (bytes), median_us, p99_us, pipelined_per_s (90 B
    rows only), vs_queue (the Queue pair's median divided by this median).
    """
    # Spawned children import this module by name: make sure they can.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import bench_ring as this

    ctx = mp.get_context("spawn")
    n = 2000 if quick else 5000
    n_pipe = 5000 if quick else 20000
    rows = []
    for label, pure in RING_PATHS:
        if pure == "0" and ring._ringfast is None:
            continue  # not built here: the pure-Python row stands alone
        rows += this._bench_ring(ctx, n, n_pipe, label, pure)
    # The sleep itself (every wait a futex wait: a busy machine's regime): compiled announce/doze
    # against the Python path, the tuning ShmQueue._announce_sleep and _ringfast's doze stand for.
    for label, pure in RING_PATHS:
        if pure == "0" and ring._ringfast is None:
            continue
        rows += this._bench_ring(ctx, n, n_pipe, label, pure, sleeping=True)
    rows += this._bench_pipe(ctx, n, n_pipe) + this._bench_queue(ctx, n, n_pipe)
    base = {r["payload"]: r["median_us"] for r in rows if r["mechanism"].startswith("multiprocessing.Queue")}
    for r in rows:
        r["vs_queue"] = base[r["payload"]] / r["median_us"]
    return rows


def _payload_label(size: int) -> str:
    return "90 B" if size == 90 else f"{size // 1024} KiB"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| mechanism | payload | sync median µs | sync p99 µs | pipelined msgs/s | median vs Queue pair |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        payload = _payload_label(r["payload"])
        pipe = f"{r['pipelined_per_s'] / 1000:,.0f}k" if "pipelined_per_s" in r else "-"
        lines.append(
            f"| {r['mechanism']} | {payload} | {r['median_us']:.1f} | {r['p99_us']:.1f} | {pipe} | {r['vs_queue']:.1f}x |"
        )
    return "\n".join(lines)


def _put_get_cost(q: ring.ShmQueue, payload: bytes, batch: int, number: int, repeat: int) -> float:
    """µs of one put plus one get (batch 0) or get_many(batch), best of ``repeat`` runs."""
    put, get, get_many = q.put, q.get, q.get_many
    if batch:

        def op() -> None:
            put(payload)
            get_many(batch)
    else:

        def op() -> None:
            put(payload)
            get()

    return min(timeit.repeat(op, number=number, repeat=repeat)) / number * 1e6


def in_process_costs(quick: bool = False) -> list[dict]:
    """Interpreter cost of ring operations in one process, per path; one dict per (path, payload).

    Keys: path, payload (bytes), put_get_us (put then get), put_get_many_us (put
    then get_many), each the best of several repeats in microseconds.
    """
    number, repeat = (5000, 5) if quick else (20000, 9)
    tag = uuid.uuid4().hex[:8]
    rows = []
    for label, pure in RING_PATHS:
        if pure == "0" and ring._ringfast is None:
            continue
        with _ring_path(pure):
            q = ring.create_queue(f"bench-cost-{tag}", 1 << 20)
        try:
            for size in (90, 4096):
                rows.append(
                    {
                        "path": label,
                        "payload": size,
                        "put_get_us": _put_get_cost(q, b"c" * size, 0, number, repeat),
                        "put_get_many_us": _put_get_cost(q, b"c" * size, 64, number, repeat),
                    }
                )
        finally:
            q.unlink()
            q.close()
    return rows


def format_costs(rows: list[dict]) -> str:
    lines = [
        "| ring path, one process | payload | put + get µs | put + get_many µs |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        payload = _payload_label(r["payload"])
        lines.append(f"| {r['path']} | {payload} | {r['put_get_us']:.2f} | {r['put_get_many_us']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    if ring._ringfast is None:
        print("(the compiled ring path _ringfast is not built: pure-Python rows only)")
    print(format_table(run(quick=quick)))
    print()
    print(format_costs(in_process_costs(quick=quick)))
