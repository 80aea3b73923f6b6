"""CPU time per pipelined async call over mmap, on each side, with the core plugins and with every plugin.

``python tests/benchmarks/bench_pipelined_cpu.py [--quick] [--base TREE] [--reps N]``

Calls per second move with everything else the machine runs; the CPU time a
call costs each process moves much less, and it is what bounds the pipelined
rate (the calling process is the busier side). For each plugin set, in a
process of its own, a 90-byte echo to a ``kind="process"`` service:

- ``caller_us``: the calling process's CPU per call, over rounds of 50,000
  calls with 5,000 in flight (as ``bench_peers.py``'s pipelined column);
- ``submit_us``: the submitting thread's CPU per ``call_service_async`` while
  the host is paused (nothing is answered meanwhile);
- ``dispatch_us``: the response dispatcher thread's CPU per answer when those
  calls are then answered;
- ``gc_us``: the garbage collector's share of ``caller_us`` (``gc.callbacks``);
- ``host_us``: the host process's CPU per call while its request ring is never
  empty (the calls queued while it was paused): a host left to wait between
  calls spins, which a process CPU figure would count.

Medians over the rounds, with the range. ``--base TREE`` measures a second
kservice source tree (a checkout whose ``plugins/mmap`` holds the built ring
extension) in alternating processes of the same run, so both sides of a change
are measured alike.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for entry in (str(ROOT), str(Path(__file__).resolve().parent)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _timing import print_table  # noqa: E402

PAYLOAD = b"x" * 90
FIELDS = ("caller_us", "submit_us", "dispatch_us", "gc_us", "host_us", "calls_s")


def _thread_cpu(native_id: int, pid: int | None = None) -> float:
    """Seconds of CPU of one thread (``pid`` None: of this process), from the scheduler's nanosecond count."""
    with open(f"/proc/{pid or 'self'}/task/{native_id}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9


def _process_cpu(pid: int) -> float:
    """Seconds of CPU of every thread of process ``pid`` (those alive now)."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += _thread_cpu(int(tid), pid)
        except OSError:  # a thread that ended meanwhile
            pass
    return total


def _wait_stopped(pid: int) -> None:
    """Return once process ``pid`` is stopped (a signal takes effect when the process is next scheduled)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.001)


def measure(rounds: int, calls: int, in_flight: int) -> list[dict[str, float]]:
    """One row per round for this process's plugin set (see the module's docstring)."""
    from kservice import ServiceEnvironment, ServiceFactory

    from tests.mmap.services import KV

    environment = ServiceEnvironment("bench-pipelined-cpu")
    environment.register_service("kv", ServiceFactory("kv", KV), kind="process")
    environment.start()
    try:
        manager = environment.manager()
        for _ in range(2000):
            manager.call_service_sync("kv", "echo", (PAYLOAD,))
        call_async = manager.call_service_async
        call_async("kv", "echo", (PAYLOAD,)).result()
        host = environment.get_task("kv").pid  # type: ignore[union-attr]
        dispatcher = next(t for t in threading.enumerate() if t.name == "kservice-mmap-responses").native_id
        rows = []
        for _ in range(rounds):
            collecting = [0.0, 0.0]

            def timed(phase: str, info: dict[str, Any], collecting: list[float] = collecting) -> None:
                if phase == "start":
                    collecting[1] = time.thread_time()
                else:
                    collecting[0] += time.thread_time() - collecting[1]

            gc.callbacks.append(timed)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(calls // in_flight):
                futures = [call_async("kv", "echo", (PAYLOAD,), timeout=120) for _ in range(in_flight)]
                for future in futures:
                    future.result()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            gc.callbacks.remove(timed)
            del futures
            # Submitting alone, then the host answering a full ring.
            os.kill(host, signal.SIGSTOP)
            _wait_stopped(host)
            try:
                submit = time.thread_time()
                futures = [call_async("kv", "echo", (PAYLOAD,), timeout=120) for _ in range(in_flight)]
                submit = time.thread_time() - submit
            finally:
                os.kill(host, signal.SIGCONT)
            host_cpu, dispatch = _process_cpu(host), _thread_cpu(dispatcher)
            for future in futures:
                future.result()
            time.sleep(0.02)  # the dispatcher's last steps
            host_cpu, dispatch = _process_cpu(host) - host_cpu, _thread_cpu(dispatcher) - dispatch
            del futures
            rows.append(
                {
                    "caller_us": cpu / calls * 1e6,
                    "submit_us": submit / in_flight * 1e6,
                    "dispatch_us": dispatch / in_flight * 1e6,
                    "gc_us": collecting[0] / calls * 1e6,
                    "host_us": host_cpu / in_flight * 1e6,
                    "calls_s": calls / wall,
                }
            )
        return rows
    finally:
        environment.stop()


def _tree_path(tree: Path, workdir: Path) -> str:
    """A directory whose ``kservice`` package is source tree ``tree`` (the layout its install maps)."""
    package = workdir / "kservice"
    package.mkdir()
    for entry in (tree / "core").iterdir():
        if entry.name not in ("middleware", "plugins", "__pycache__"):
            (package / entry.name).symlink_to(entry)
    for sub in ("middleware", "plugins"):
        (package / sub).symlink_to(tree / sub)
    if not list((tree / "plugins" / "mmap").glob("_ringfast*.so")):
        print(f"note: {tree} has no built ring extension: its ring runs the pure-Python code", file=sys.stderr)
    return f"{workdir}{os.pathsep}{tree}"


def _child(disabled: str, quick: bool, tree: Path | None, pythonpath: str) -> list[dict[str, float]]:
    env = {**os.environ, "KSERVICE_DISABLE_PLUGINS": disabled}
    if tree is not None:
        env["PYTHONPATH"] = pythonpath  # the child and the host it starts import that tree's kservice
    argv = [sys.executable, str(Path(__file__).resolve()), "--json", *(["--quick"] if quick else [])]
    out = subprocess.run(
        argv, env=env, cwd=tree or ROOT, capture_output=True, text=True, check=True, timeout=1800
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def table(quick: bool, base: Path | None, reps: int) -> list[dict[str, Any]]:
    """Rows per (plugin set, tree), each the medians and ranges of every round of ``reps`` processes."""
    from bench_mmap import _optional_plugins

    optional = ",".join(_optional_plugins())
    workdir = Path(tempfile.mkdtemp(prefix="kservice-pipelined-cpu-"))
    try:
        pythonpath = ""
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if base is not None:
            base = base.resolve()
            pythonpath = _tree_path(base, workdir)
            trees.append(("base", base))
        samples: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(reps):  # alternating processes: what the machine does meanwhile hits both trees alike
            for plugins, disabled in (("core plugins", optional), ("all plugins", "")):
                for tree_name, tree in trees:
                    samples.setdefault((plugins, tree_name), []).extend(_child(disabled, quick, tree, pythonpath))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for (plugins, tree_name), values in samples.items():
        row: dict[str, Any] = {"plugins": plugins, "tree": tree_name}
        for field in FIELDS:
            column = [v[field] for v in values]
            scale = 1000 if field == "calls_s" else 1
            row[field] = (
                f"{statistics.median(column) / scale:.2f} ({min(column) / scale:.2f}-{max(column) / scale:.2f})"
            )
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    if "--json" in argv:
        print(json.dumps(measure(3 if quick else 5, 20000 if quick else 50000, 5000)))
        return
    base = Path(argv[argv.index("--base") + 1]) if "--base" in argv else None
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else (1 if quick else 2)
    rows = table(quick, base, reps)
    print_table(
        "\nCPU µs per pipelined 90-byte echo over mmap, median (range) over the rounds; calls_s in thousands"
        " (moves with the machine, unlike the CPU figures)",
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
