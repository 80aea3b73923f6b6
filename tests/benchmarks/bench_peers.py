"""kservice beside the tools a user would pick instead, measured in the same run.

``python tests/benchmarks/bench_peers.py [--quick] [--no-busy] [--no-cold] [--cold-only]``

(``--cold-only``: only the cold-start table.)

A 90-byte echo to another process on this host, for every mechanism:

- kservice over mmap with the core plugins only (``inproc``, ``mmap``) and with
  every installed plugin at its defaults (each in its own process, as
  ``bench_mmap.py`` does); and the core plugins with the ring's waits as they
  were before a spin that lost its CPU paused spinning
  (``KSERVICE_RING_SPIN_WHEN_BUSY=1``, see ``ring.note_lost_cpu``);
- ``multiprocessing.connection`` Listener/Client over a unix socket;
- a faster-fifo queue pair (``pip install faster-fifo``);
- pyzmq DEALER/ROUTER over ``ipc://`` (``pip install pyzmq``);
- Pyro5 over a unix socket (``pip install Pyro5``);
- the bare shared-memory ring under kservice (the floor, no framework).

The optional peers come with ``pip install 'kservice[bench]'`` (``make bench``
installs it); a missing one is a row saying so. Columns: the sync median and
p99 (interleaved rounds), pipelined calls/s (many in flight; Pyro5, which has
no pipelining, uses four threads with a proxy each), and each kservice row's
ratios against ``multiprocessing.connection`` and faster-fifo of its own run.
The all-plugins row's ``median_x_core`` is the median ratio over several
pairs of processes measured back to back (core plugins, then all plugins):
one pair alone moves with the machine.

The same table is measured again on a busy machine: the benchmark starts one
busy-loop process per usable CPU for those rows and stops them afterwards.

Cold start: from a new process to its first answer (the parent's clock from
before the process is started to the child's report of the answer, median of
several starts), for a kservice caller of a service hosted by ``kservice
serve``, for ``kservice call`` (wall clock until it exits), for each peer's
client, and for a bare ``python -c pass`` (the interpreter's own share); and
the caller and the bare interpreter again with kservice installed from its
wheel in a virtual environment of its own, as users install it (this
checkout's editable install adds an import hook to every interpreter of its
environment: see ``_installed_interpreter``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
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

from _timing import interleaved, print_table  # noqa: E402

PAYLOAD = b"x" * 90
_OPTIONAL = {"faster-fifo": "faster_fifo", "pyzmq": "zmq", "Pyro5": "Pyro5"}


def _missing(package: str) -> str | None:
    """A note when ``package`` is not installed, else None."""
    import importlib.util

    if importlib.util.find_spec(_OPTIONAL[package]) is None:
        return f"not installed: pip install 'kservice[bench]' (or {package})"
    return None


# --------------------------------------------------------------------------- peer servers (spawned)


def _connection_server(address: str, ready: Any) -> None:
    from multiprocessing.connection import Listener

    with Listener(address, family="AF_UNIX") as listener:
        ready.set()
        while True:
            with listener.accept() as conn:
                try:
                    while True:
                        item = conn.recv()
                        if item is None:
                            return
                        conn.send(item)
                except EOFError:
                    continue  # a cold-start client left: wait for the next one


def _fifo_server(requests: Any, responses: Any) -> None:
    while True:
        item = requests.get(timeout=1e9)
        if item is None:
            return
        responses.put(item, timeout=10)


def _zmq_server(address: str, ready: Any) -> None:
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.bind(address)
    ready.set()
    while True:
        ident, body = socket.recv_multipart(copy=False)
        if bytes(body) == b"stop":
            break
        socket.send_multipart([ident, body], copy=False)
    socket.close(0)
    context.term()


class PyroEcho:
    def echo(self, value: Any) -> Any:
        return value


def _pyro_server(path: str, ready: Any) -> None:
    import Pyro5
    import Pyro5.api

    Pyro5.config.SERIALIZER = "marshal"  # the fastest of Pyro5's serializers that echoes bytes
    Pyro5.config.SERVERTYPE = "thread"
    daemon = Pyro5.api.Daemon(unixsocket=path)
    daemon.register(Pyro5.api.expose(PyroEcho), "echo")
    ready.set()
    daemon.requestLoop()


# --------------------------------------------------------------------------- peer clients


class Peer:
    """One mechanism's echo server (a spawned process) and its client side."""

    name: str

    def round_trip(self) -> Any:
        raise NotImplementedError

    def pipelined(self, n: int) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConnectionPeer(Peer):
    name = "multiprocessing.connection"

    def __init__(self, workdir: str) -> None:
        from multiprocessing.connection import Client

        ctx = mp.get_context("spawn")
        self.address = os.path.join(workdir, "mpc.sock")
        ready = ctx.Event()
        self.process = ctx.Process(target=_connection_server, args=(self.address, ready), daemon=True)
        self.process.start()
        ready.wait(30)
        self.conn = Client(self.address, family="AF_UNIX")

    def round_trip(self) -> Any:
        self.conn.send(PAYLOAD)
        return self.conn.recv()

    def pipelined(self, n: int) -> float:
        # A socket cannot take every send before the first receive (its buffers fill): windows of 256.
        start = time.perf_counter()
        sent = got = 0
        while got < n:
            while sent < n and sent - got < 256:
                self.conn.send(PAYLOAD)
                sent += 1
            self.conn.recv()
            got += 1
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.conn.send(None)
        self.conn.close()
        self.process.join(10)


class FifoPeer(Peer):
    name = "faster-fifo queue pair"

    def __init__(self, workdir: str) -> None:
        import faster_fifo

        ctx = mp.get_context("spawn")
        self.requests = faster_fifo.Queue(max_size_bytes=16 << 20)
        self.responses = faster_fifo.Queue(max_size_bytes=16 << 20)
        self.process = ctx.Process(target=_fifo_server, args=(self.requests, self.responses), daemon=True)
        self.process.start()

    def round_trip(self) -> Any:
        self.requests.put(PAYLOAD, timeout=10)
        return self.responses.get(timeout=10)

    def pipelined(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.requests.put(PAYLOAD, timeout=10)
        got = 0
        while got < n:
            got += len(self.responses.get_many(timeout=10, max_messages_to_get=1000))
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.requests.put(None, timeout=10)
        self.process.join(10)


class ZmqPeer(Peer):
    name = "pyzmq DEALER/ROUTER ipc"

    def __init__(self, workdir: str) -> None:
        import zmq

        ctx = mp.get_context("spawn")
        self.address = f"ipc://{workdir}/zmq.sock"
        ready = ctx.Event()
        self.process = ctx.Process(target=_zmq_server, args=(self.address, ready), daemon=True)
        self.process.start()
        ready.wait(30)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.connect(self.address)

    def round_trip(self) -> Any:
        self.socket.send(pickle.dumps(PAYLOAD, 5), copy=False)
        return pickle.loads(self.socket.recv(copy=False))

    def pipelined(self, n: int) -> float:
        record = pickle.dumps(PAYLOAD, 5)
        start = time.perf_counter()
        sent = got = 0
        while got < n:
            while sent < n and sent - got < 4096:
                self.socket.send(record, copy=False)
                sent += 1
            pickle.loads(self.socket.recv(copy=False))
            got += 1
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.socket.send(b"stop")
        self.process.join(10)
        self.socket.close(0)
        self.context.term()


class PyroPeer(Peer):
    name = "Pyro5 unix socket"

    def __init__(self, workdir: str) -> None:
        import Pyro5
        import Pyro5.api

        Pyro5.config.SERIALIZER = "marshal"
        ctx = mp.get_context("spawn")
        self.uri = f"PYRO:echo@./u:{workdir}/pyro.sock"
        ready = ctx.Event()
        self.process = ctx.Process(target=_pyro_server, args=(f"{workdir}/pyro.sock", ready), daemon=True)
        self.process.start()
        if not ready.wait(30):
            raise RuntimeError("the Pyro5 daemon did not start")
        self.proxy = Pyro5.api.Proxy(self.uri)

    def round_trip(self) -> Any:
        return self.proxy.echo(PAYLOAD)

    def pipelined(self, n: int) -> float:
        import Pyro5.api

        threads = 4
        per = n // threads

        def run() -> None:
            with Pyro5.api.Proxy(self.uri) as proxy:
                for _ in range(per):
                    proxy.echo(PAYLOAD)

        workers = [threading.Thread(target=run) for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return per * threads / (time.perf_counter() - start)

    def close(self) -> None:
        self.proxy._pyroRelease()
        self.process.terminate()
        self.process.join(10)


class RingPeer(Peer):
    name = "bare shm ring (floor)"

    def __init__(self, workdir: str) -> None:
        from bench_mmap import _Baseline

        self.baseline = _Baseline("bare ring")

    def round_trip(self) -> Any:
        return self.baseline.round_trip(PAYLOAD)

    def pipelined(self, n: int) -> float:
        return float(self.baseline.pipelined(PAYLOAD, n))

    def close(self) -> None:
        self.baseline.close()


PEERS: dict[str, tuple[type[Peer], str | None]] = {
    "multiprocessing.connection": (ConnectionPeer, None),
    "faster-fifo queue pair": (FifoPeer, "faster-fifo"),
    "pyzmq DEALER/ROUTER ipc": (ZmqPeer, "pyzmq"),
    "Pyro5 unix socket": (PyroPeer, "Pyro5"),
    "bare shm ring (floor)": (RingPeer, None),
}


# --------------------------------------------------------------------------- one measuring process


def measure(quick: bool, with_peers: bool) -> list[dict[str, Any]]:
    """kservice (this process's plugin set) and, with ``with_peers``, every peer: one row each."""
    from kservice import ServiceEnvironment, ServiceFactory

    from tests.mmap.services import KV

    n = 1500 if quick else 6000
    in_flight = 5000 if quick else 20000
    rounds = 3 if quick else 5
    workdir = tempfile.mkdtemp(prefix="kservice-peers-")
    environment = ServiceEnvironment("bench-peers")
    environment.register_service("kv", ServiceFactory("kv", KV), kind="process")
    environment.start()
    peers: dict[str, Peer] = {}
    rows: dict[str, dict[str, Any]] = {}
    try:
        if with_peers:
            for name, (cls, package) in PEERS.items():
                note = _missing(package) if package else None
                if note:
                    rows[name] = {"mechanism": name, "note": note}
                    continue
                try:
                    peers[name] = cls(workdir)
                except Exception as exc:  # noqa: BLE001 - a peer that cannot start is a row saying why
                    rows[name] = {"mechanism": name, "note": f"could not start: {type(exc).__name__}: {exc}"}
        manager = environment.manager()
        call, call_async = manager.call_service_sync, manager.call_service_async
        subjects = {"kservice mmap": lambda: call("kv", "echo", (PAYLOAD,))}
        subjects.update({name: peer.round_trip for name, peer in peers.items()})
        deadline = time.monotonic() + 0.3  # past the first milliseconds a new host shares its parent's CPU
        while time.monotonic() < deadline:
            for subject in subjects.values():
                subject()
        for name, (median, p99) in interleaved(subjects, n).items():
            rows[name] = {"mechanism": name, "median_us": median, "p99_us": p99}

        def pipelined_kservice(count: int) -> float:
            start = time.perf_counter()
            futures = [call_async("kv", "echo", (PAYLOAD,), timeout=120) for _ in range(count)]
            for future in futures:
                future.result()
            return count / (time.perf_counter() - start)

        rates: dict[str, list[float]] = {name: [] for name in subjects}
        for _ in range(rounds):  # interleaved rounds, the median of each
            rates["kservice mmap"].append(pipelined_kservice(in_flight))
            for name, peer in peers.items():
                if "note" in rows[name]:
                    continue
                try:
                    rates[name].append(peer.pipelined(in_flight if name != "Pyro5 unix socket" else in_flight // 10))
                except Exception as exc:  # noqa: BLE001 - a peer that fails is a row saying why
                    rows[name]["note"] = f"pipelined failed: {type(exc).__name__}: {exc}"
        for name, values in rates.items():
            if values:
                rows[name]["pipelined_calls_s"] = statistics.median(values)
    finally:
        for peer in peers.values():
            with contextlib.suppress(Exception):
                peer.close()
        environment.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return list(rows.values())


# --------------------------------------------------------------------------- busy machine


def _busy_loop() -> None:  # pragma: no cover - runs until terminated
    while True:
        pass


@contextlib.contextmanager
def busy_machine() -> Any:
    """One busy-loop process per usable CPU for the duration of the block."""
    ctx = mp.get_context("spawn")
    loops = [ctx.Process(target=_busy_loop, daemon=True) for _ in range(len(os.sched_getaffinity(0)))]
    for loop in loops:
        loop.start()
    try:
        time.sleep(0.3)
        yield
    finally:
        for loop in loops:
            loop.terminate()
        for loop in loops:
            loop.join(10)


def _run_child(quick: bool, disabled: str, with_peers: bool, **extra_env: str) -> list[dict[str, Any]]:
    env = {**os.environ, "KSERVICE_DISABLE_PLUGINS": disabled, **extra_env}
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--json",
        *(["--quick"] if quick else []),
        *(["--peers"] if with_peers else []),
    ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


#: extra back-to-back (core plugins, all plugins) pairs for the all-plugins ratio, quick and full runs
PAIRS_QUICK = 2
PAIRS = 4


def _ours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The kservice row of a child's rows."""
    return next(row for row in rows if row["mechanism"] == "kservice mmap")


def table(quick: bool) -> list[dict[str, Any]]:
    """kservice with core plugins (beside every peer) and with all plugins: rows with ratios."""
    from bench_mmap import _optional_plugins

    optional = ",".join(_optional_plugins())
    core = _run_child(quick, optional, True)
    full = _run_child(quick, "", False)
    # The ring's waits as they were before ring.note_lost_cpu(): spin before every sleep, however busy.
    spin = _run_child(quick, optional, False, KSERVICE_RING_SPIN_WHEN_BUSY="1")
    # The cost of the default plugins is a ratio of two processes measured seconds apart, which a noisy
    # machine moves by more than the cost itself: more pairs, each measured back to back (core first, then
    # all plugins), and the median of their ratios.
    pair_ratios = [_ours(full)["median_us"] / _ours(core)["median_us"]]
    for _ in range(PAIRS_QUICK if quick else PAIRS):
        pair_core = _ours(_run_child(quick, optional, False))
        pair_ratios.append(_ours(_run_child(quick, "", False))["median_us"] / pair_core["median_us"])
    rows = []
    for row in core:
        if row["mechanism"] == "kservice mmap":
            rows.append({**row, "mechanism": "kservice mmap (core plugins)"})
    for row in full:
        if row["mechanism"] == "kservice mmap":
            rows.append({**row, "mechanism": "kservice mmap (all plugins)"})
    for row in spin:
        if row["mechanism"] == "kservice mmap":
            rows.append({**row, "mechanism": "kservice mmap (core, always spins)"})
    rows += [r for r in core if r["mechanism"] != "kservice mmap"]
    by = {r["mechanism"]: r for r in rows}
    for ours in (
        "kservice mmap (core plugins)",
        "kservice mmap (all plugins)",
        "kservice mmap (core, always spins)",
    ):
        row = by[ours]
        for other, key in (("multiprocessing.connection", "mpc"), ("faster-fifo queue pair", "fifo")):
            base = by.get(other, {})
            if base.get("median_us"):
                row[f"median_x_{key}"] = row["median_us"] / base["median_us"]
            if base.get("pipelined_calls_s"):
                row[f"pipelined_x_{key}"] = row["pipelined_calls_s"] / base["pipelined_calls_s"]
    full_row = by["kservice mmap (all plugins)"]
    full_row["median_x_core"] = statistics.median(pair_ratios)
    full_row["note"] = f"x_core: median of {len(pair_ratios)} pairs, {min(pair_ratios):.2f}-{max(pair_ratios):.2f}"
    for row in rows:
        if row.get("median_us"):
            row["p99_x_median"] = row["p99_us"] / row["median_us"]
    return rows


# --------------------------------------------------------------------------- cold start

_KSERVICE_CALLER = """
import time
from kservice import ServiceManager
answer = ServiceManager().call_service_sync("kv", "echo", ("hi",))
assert answer == "hi", answer
print(time.time())
"""

_CONNECTION_CALLER = """
import sys, time
from multiprocessing.connection import Client
with Client(sys.argv[1], family="AF_UNIX") as conn:
    conn.send(b"hi")
    assert conn.recv() == b"hi"
print(time.time())
"""

_ZMQ_CALLER = """
import sys, time
import zmq
socket = zmq.Context.instance().socket(zmq.DEALER)
socket.connect(sys.argv[1])
socket.send(b"hi")
assert socket.recv() == b"hi"
print(time.time())
socket.close(0)
"""

_PYRO_CALLER = """
import sys, time
import Pyro5, Pyro5.api
Pyro5.config.SERIALIZER = "marshal"
with Pyro5.api.Proxy(sys.argv[1]) as proxy:
    assert proxy.echo(b"hi") == b"hi"
print(time.time())
"""


def _first_answer_ms(argv: list[str], env: dict[str, str]) -> float:
    """Milliseconds from before starting ``argv`` to the answer time it prints."""
    start = time.time()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60).stdout
    return (float(out.strip().splitlines()[-1]) - start) * 1e3


def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
    return (time.perf_counter() - start) * 1e3


def _installed_interpreter(workdir: str) -> tuple[str | None, str]:
    """A Python whose kservice is installed from its wheel, as users install it: (its path, or None; a note).

    This checkout's editable install answers every import through setuptools'
    import hook (the package's directories are not those of its modules), and
    every interpreter of its environment imports the hook at startup
    (``pathlib``, ``urllib.parse``, ``importlib.util``: several ms). A virtual
    environment of its own holds kservice built from this tree; its other
    packages (pluggy, PyYAML, ...) come from this environment's site-packages
    through a ``.pth`` path entry, which adds the directory without running
    the ``.pth`` files in it (the editable hook among them).
    """
    venv = os.path.join(workdir, "venv")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, capture_output=True)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                site,
                str(ROOT),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"could not install kservice into a virtual environment: {exc}"
    import sysconfig

    Path(site, "kservice-bench-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # As an install done a while ago: a directory changed in the last two seconds is never cached (see
    # kservice._entrypoints), and the starts measured here would read every distribution's metadata.
    long_ago = time.time() - 60
    os.utime(site, (long_ago, long_ago))
    return python, ""


def cold_start(quick: bool) -> list[dict[str, Any]]:
    """Median milliseconds from a new process to its first answer, per mechanism."""
    starts = 5 if quick else 11
    workdir = tempfile.mkdtemp(prefix="kservice-cold-")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "KSERVICE_DISABLE_PLUGINS")}
    env["KSERVICE_QUEUE_DIR"] = os.path.join(workdir, "queues")
    env["KSERVICE_REGISTRY_DIR"] = os.path.join(workdir, "registry")
    kservice_bin = str(Path(sys.executable).with_name("kservice"))
    python = sys.executable
    rows: list[dict[str, Any]] = []
    servers: list[Any] = []
    ctx = mp.get_context("spawn")
    try:
        serve = subprocess.Popen(
            [kservice_bin, "serve", "--app-dir", str(ROOT), "kv=tests.mmap.services:KV"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        servers.append(serve)
        if "serving kv" not in (serve.stdout.readline() if serve.stdout else ""):
            raise RuntimeError("kservice serve did not start")
        subjects: dict[str, tuple[list[str], Any]] = {
            "python -c pass (the interpreter alone)": (
                [python, "-c", "print(__import__('time').time())"],
                _first_answer_ms,
            ),
            "kservice caller (ServiceManager, first call)": ([python, "-c", _KSERVICE_CALLER], _first_answer_ms),
            "kservice call kv echo (wall, until exit)": ([kservice_bin, "call", "kv", "echo", '["hi"]'], _wall_ms),
        }
        installed, why = _installed_interpreter(workdir)
        if installed is None:
            rows.append({"mechanism": "kservice installed from its wheel", "note": why})
        else:
            subjects["python -c pass, kservice's wheel installed (no editable hook)"] = (
                [installed, "-c", "print(__import__('time').time())"],
                _first_answer_ms,
            )
            subjects["kservice caller, installed from its wheel (what users run)"] = (
                [installed, "-c", _KSERVICE_CALLER],
                _first_answer_ms,
            )
        address = os.path.join(workdir, "mpc.sock")
        ready = ctx.Event()
        process = ctx.Process(target=_connection_server, args=(address, ready), daemon=True)
        process.start()
        servers.append(process)
        ready.wait(30)
        subjects["multiprocessing.connection Client"] = ([python, "-c", _CONNECTION_CALLER, address], _first_answer_ms)
        if _missing("pyzmq") is None:
            zaddress = f"ipc://{workdir}/zmq.sock"
            ready = ctx.Event()
            process = ctx.Process(target=_zmq_server, args=(zaddress, ready), daemon=True)
            process.start()
            servers.append(process)
            ready.wait(30)
            subjects["pyzmq DEALER"] = ([python, "-c", _ZMQ_CALLER, zaddress], _first_answer_ms)
        else:
            rows.append({"mechanism": "pyzmq DEALER", "note": _missing("pyzmq")})
        if _missing("Pyro5") is None:
            ready = ctx.Event()
            process = ctx.Process(target=_pyro_server, args=(f"{workdir}/pyro.sock", ready), daemon=True)
            process.start()
            servers.append(process)
            ready.wait(30)
            subjects["Pyro5 Proxy"] = (
                [python, "-c", _PYRO_CALLER, f"PYRO:echo@./u:{workdir}/pyro.sock"],
                _first_answer_ms,
            )
        else:
            rows.append({"mechanism": "Pyro5 Proxy", "note": _missing("Pyro5")})
        samples: dict[str, list[float]] = {name: [] for name in subjects}
        for name, (argv, how) in list(subjects.items()):
            try:
                how(argv, env)  # warm the page cache and write the bytecode caches
            except subprocess.CalledProcessError as exc:
                rows.append({"mechanism": name, "note": f"failed: {(exc.stderr or '').strip().splitlines()[-1:]}"})
                del subjects[name]
        for _ in range(starts):  # interleaved, so a busy moment hits every mechanism alike
            for name, (argv, how) in subjects.items():
                samples[name].append(how(argv, env))
        for name, values in samples.items():
            rows.append({"mechanism": name, "cold_start_ms": statistics.median(values), "best_ms": min(values)})
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            if isinstance(server, subprocess.Popen):
                server.communicate(timeout=30)
            else:
                server.join(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- main

COLUMNS = [
    "mechanism",
    "median_us",
    "p99_us",
    "p99_x_median",
    "pipelined_calls_s",
    "median_x_mpc",
    "pipelined_x_mpc",
    "median_x_fifo",
    "pipelined_x_fifo",
    "median_x_core",
    "note",
]


def main() -> None:
    quick = "--quick" in sys.argv
    if "--json" in sys.argv:
        print(json.dumps(measure(quick, "--peers" in sys.argv)))
        return
    if "--cold-only" in sys.argv:
        print_table(
            "cold start: a new process to its first answer, ms (median; best)",
            [{c: row.get(c) for c in ("mechanism", "cold_start_ms", "best_ms", "note")} for row in cold_start(quick)],
        )
        return
    rows = table(quick)
    print_table(
        "90-byte echo to another process, idle machine (x_mpc / x_fifo: kservice's figure divided by that peer's; "
        "a median ratio < 1 and a pipelined ratio > 1 favour kservice)",
        [{c: row.get(c) for c in COLUMNS} for row in rows],
    )
    if "--no-busy" not in sys.argv:
        with busy_machine():
            rows = table(quick)
        print_table(
            f"same, busy machine ({len(os.sched_getaffinity(0))} busy-loop processes, one per CPU)",
            [{c: row.get(c) for c in COLUMNS} for row in rows],
        )
    if "--no-cold" not in sys.argv:
        print_table(
            "cold start: a new process to its first answer, ms (median; best)",
            [{c: row.get(c) for c in ("mechanism", "cold_start_ms", "best_ms", "note")} for row in cold_start(quick)],
        )


if __name__ == "__main__":
    main()
