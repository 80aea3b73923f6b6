"""Tests of the shared-memory ring queue with real processes and real shared memory."""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ring_worker.py"


from kservice.plugins.mmap import ring  # noqa: E402
from kservice.testing import wait_for  # noqa: E402

from .services import private_queue_dir  # noqa: E402

TAG = struct.Struct("<II")

try:  # pytest-timeout when present; the alarm fixture below otherwise
    import pytest_timeout  # noqa: F401

    pytestmark = [pytest.mark.timeout(60)]
except ImportError:
    pytestmark = []


# --------------------------------------------------------------------------- fixtures


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if int(fields[1]) == me and fields[0] not in (b"Z", b"X"):
            out.append(int(entry))
    return out


RING_PATHS = ["compiled", "pure"]


@pytest.fixture(autouse=True, params=RING_PATHS)
def ring_path(request, monkeypatch) -> str:
    """Run every test once with the compiled put/pop and once with the pure-Python code.

    Worker processes take the other path (see ``Procs.start``), so that every
    cross-process test also checks that the two implementations interoperate.
    """
    if request.param == "compiled":
        if ring._ringfast is None:
            pytest.skip("the _ringfast extension is not built")
        monkeypatch.delenv(ring.PURE_ENV, raising=False)
    else:
        monkeypatch.setenv(ring.PURE_ENV, "1")
    return request.param


def _other_path_env() -> dict[str, str]:
    """This process's environment, with the ring path the opposite of ours (when both exist)."""
    env = os.environ.copy()
    if os.environ.get(ring.PURE_ENV) == "1":
        env.pop(ring.PURE_ENV, None)
    else:
        env[ring.PURE_ENV] = "1"
    return env


@pytest.fixture(autouse=True)
def qdir(monkeypatch):
    """A private queue directory per test; afterwards: no files left, no children left."""
    children_before = set(_children())  # a session's Ray, say, is not this test's
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    with private_queue_dir(monkeypatch) as d:
        try:
            yield d
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    leaked_children = sorted(set(_children()) - children_before)
    assert not leaked_children, f"test leaked child processes: {leaked_children}"


def _alarm(signum, frame):
    raise TimeoutError("test took longer than 60 s")


class Procs:
    """Starts worker processes; reaps (and reports) any left running."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, wait_ready: bool = True) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_other_path_env(),
        )
        self.procs.append(p)
        if wait_ready:
            line = p.stdout.readline()
            if not line.startswith("ready"):
                p.kill()
                out, err = p.communicate()
                raise AssertionError(f"worker {args} failed to start: {line}{out}{err}")
            p.ready_line = line
        return p

    def kill(self, p: subprocess.Popen) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()

    def reap(self) -> list[subprocess.Popen]:
        left = []
        for p in self.procs:
            if p.poll() is None:
                left.append(p)
                p.kill()
            p.wait()
            for s in (p.stdout, p.stderr):
                if s and not s.closed:
                    s.close()
        return left


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    left = ps.reap()
    assert not left, f"worker processes were still running: {[p.args for p in left]}"


@pytest.fixture
def q(ring_path):
    queue = ring.create_queue(f"q-{os.getpid()}", 1 << 16)
    assert (queue._fast is None) == (ring_path == "pure")
    yield queue
    queue.unlink()
    queue.close()


def _data_offset(queue, position: int) -> int:
    return ring.HEADER_SIZE + position % queue.capacity


# --------------------------------------------------------------------------- basics


def test_round_trip_fifo_and_nonblocking_forms(q):
    assert q.qsize() == 0
    with pytest.raises(ring.QueueEmpty):
        q.get_nowait()
    with pytest.raises(ring.QueueEmpty):
        q.get(timeout=0)
    items = [b"a", b"", bytearray(b"bc"), memoryview(b"def"), b"x" * 1000]
    for it in items:
        q.put(it)
    q.put_nowait(b"last")
    assert q.qsize() == 6
    assert [q.get() for _ in range(5)] == [bytes(i) for i in items]
    assert q.get_nowait() == b"last"
    assert q.qsize() == 0
    # fill to the brim: put_nowait raises QueueFull, the queue still works
    n = 0
    with pytest.raises(ring.QueueFull):
        while True:
            q.put_nowait(b"z" * 100)
            n += 1
    assert n == q.capacity // 112
    assert q.qsize() == n
    with pytest.raises(ring.QueueFull):
        q.put(b"z" * 9, timeout=0)  # 16 bytes are left; this needs 24
    assert len(q.get_many(max_items=10_000)) == n
    q.put(b"again")
    assert q.get(timeout=1) == b"again"


def test_get_many_batches(q):
    for i in range(100):
        q.put(b"%d" % i)
    first = q.get_many(64)
    assert first == [b"%d" % i for i in range(64)]
    assert q.get_many(64, timeout=1) == [b"%d" % i for i in range(64, 100)]
    with pytest.raises(ring.QueueEmpty):
        q.get_many(8, timeout=0.01)
    with pytest.raises(ValueError):
        q.get_many(0)


def test_timeouts_are_honoured(q):
    for call in (lambda: q.get(timeout=0.05), lambda: q.get_many(4, timeout=0.05)):
        t0 = time.monotonic()
        with pytest.raises(ring.QueueEmpty):
            call()
        assert 0.04 <= time.monotonic() - t0 <= 1.0
    while True:
        try:
            q.put_nowait(b"f" * 500)
        except ring.QueueFull:
            break
    t0 = time.monotonic()
    with pytest.raises(ring.QueueFull):
        q.put(b"f" * 500, timeout=0.05)
    assert 0.04 <= time.monotonic() - t0 <= 1.0


def test_blocking_get_is_woken_by_put_from_another_thread(q):
    def later():
        time.sleep(0.2)  # deliberate: the getter is blocked by then
        q.put(b"wake")

    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    assert q.get(timeout=10) == b"wake"
    assert time.monotonic() - t0 < 2.0
    t.join()


def test_blocked_put_is_woken_by_get(q):
    while True:
        try:
            q.put_nowait(b"f" * 1000)
        except ring.QueueFull:
            break
    done = []

    def producer():
        q.put(b"late" * 100, timeout=10)
        done.append(time.monotonic())

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.1)  # deliberate: time for the put to finish early, which it must not
    assert not done
    t0 = time.monotonic()
    q.get()
    t.join(5)
    assert done and done[0] - t0 < 1.0
    got = q.get_many(10_000)
    assert got[-1] == b"late" * 100


def test_close_and_unlink_are_idempotent(qdir):
    a = ring.create_queue("idem")
    b = ring.attach_queue("idem")
    a.unlink()
    a.unlink()
    # attached handles keep working after unlink
    b.put(b"still")
    assert a.get() == b"still"
    with pytest.raises(FileNotFoundError):
        ring.attach_queue("idem")
    a.close()
    a.close()
    with pytest.raises(ring.QueueClosed):
        a.put(b"x")
    with pytest.raises(ring.QueueClosed):
        a.get()
    b.unlink()
    b.close()
    b.close()


def test_create_existing_and_attach_missing(qdir):
    a = ring.create_queue("dup")
    with pytest.raises(FileExistsError, match="alive"):
        ring.create_queue("dup")
    with pytest.raises(FileNotFoundError, match="nope"):
        ring.attach_queue("nope")
    with pytest.raises(FileNotFoundError):
        ring.create_queue("nope", create=False)
    a.unlink()
    a.close()


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "../up", "sp ace", "x" * 201, "é", "a\0b"])
def test_names_are_validated(bad):
    with pytest.raises(ValueError, match="invalid queue name"):
        ring.create_queue(bad)
    with pytest.raises(ValueError, match="invalid queue name"):
        ring.attach_queue(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x17F), max_size=12) | st.sampled_from(["a\n", "-", "_x.", "a..b"]))
def test_a_name_is_valid_exactly_when_the_documented_pattern_matches_it(name):
    valid = len(name) <= ring.MAX_NAME and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) is not None
    try:
        ring._check_name(name)
    except ValueError:
        assert not valid, name
    else:
        assert valid, name


def test_mark_closed_wakes_waiters_and_refuses_puts(q):
    errors = []

    def waiter():
        try:
            q.get(timeout=10)
        except ring.QueueError as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)  # time for the waiter to block in get (nothing public shows it)
    t0 = time.monotonic()
    q.mark_closed()
    t.join(5)
    assert time.monotonic() - t0 < 1.0
    assert len(errors) == 1 and isinstance(errors[0], ring.QueueClosed)
    assert q.closed
    with pytest.raises(ring.QueueClosed):
        q.put(b"x")
    with pytest.raises(ring.QueueClosed):
        q.get(timeout=0.01)


def test_closed_queue_drains_before_reporting_closed(q):
    q.put(b"1")
    q.put(b"2")
    q.mark_closed()
    assert q.get() == b"1"
    assert q.get_many() == [b"2"]
    with pytest.raises(ring.QueueClosed):
        q.get(timeout=1)


# --------------------------------------------------------------------------- pickling


def test_pickled_handle_attaches_to_the_same_queue(q):
    copy = pickle.loads(pickle.dumps(q))
    try:
        assert copy.name == q.name and copy.path == q.path
        assert copy.owner_pid == q.owner_pid == os.getpid()
        copy.put(b"via the copy")
        assert q.get(timeout=1) == b"via the copy"
        # and a copy of the copy, at every protocol
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            again = pickle.loads(pickle.dumps(copy, protocol=proto))
            again.put(b"p%d" % proto)
            assert q.get(timeout=1) == b"p%d" % proto
            again.close()
        state = q.__getstate__()
        assert state == {"name": q.name}
    finally:
        copy.close()


def test_pickled_handle_attaches_in_another_process(q, procs):
    p = procs.start("unpickle_put", pickle.dumps(q).hex(), "from-child")
    assert p.ready_line.split() == ["ready", q.name]
    assert q.get(timeout=10) == b"from-child"
    p.wait(10)


# --------------------------------------------------------------------------- record sizes


def test_every_record_size_up_to_the_limit(qdir):
    q = ring.create_queue("sizes", 4096)
    try:
        assert q.capacity == 4096 and q.max_record == 4096 - 8
        rng = random.Random(1)
        for n in range(q.max_record + 1):
            data = rng.randbytes(n)
            q.put(data)
            assert q.get() == data
        # the limit is full-ring: it needs the ring empty
        q.put(b"x")
        with pytest.raises(ring.QueueFull):
            q.put(b"y" * q.max_record, timeout=0.01)
        q.get()
        for n in (q.max_record + 1, q.capacity, 10 * q.capacity):
            with pytest.raises(ring.RecordTooLarge, match=str(q.max_record)):
                q.put(b"z" * n)
            assert isinstance(ring.RecordTooLarge("x"), ValueError)
        q.put(b"after")
        assert q.get() == b"after"
        assert q.qsize() == 0
    finally:
        q.unlink()
        q.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.one_of(
            st.binary(max_size=3000),
            st.integers(min_value=0, max_value=4200),  # a random-size record
            st.just(None),  # a get
            st.integers(min_value=-8, max_value=-1),  # a get_many
        ),
        max_size=80,
    )
)
def test_random_sequences_round_trip_exactly(ops, qdir):
    q = ring.create_queue("hyp", 8192)
    model: deque[bytes] = deque()
    try:
        for op in ops:
            if op is None:
                if model:
                    assert q.get_nowait() == model.popleft()
                else:
                    with pytest.raises(ring.QueueEmpty):
                        q.get_nowait()
            elif isinstance(op, int) and op < 0:
                if model:
                    got = q.get_many(-op, timeout=0)
                    want = [model.popleft() for _ in range(min(-op, len(got)))]
                    assert got == want and len(got) == min(-op, len(got) + len(model))
                else:
                    with pytest.raises(ring.QueueEmpty):
                        q.get_many(-op, timeout=0)
            else:
                data = os.urandom(op) if isinstance(op, int) else op
                try:
                    q.put_nowait(data)
                except ring.QueueFull:
                    continue
                model.append(data)
            assert q.qsize() == len(model)
        while model:
            assert q.get_nowait() == model.popleft()
    finally:
        q.unlink()
        q.close()


# --------------------------------------------------------------------------- corruption


def test_corrupt_length_is_reported_and_the_queue_recovers(q):
    q.put(b"first")
    q.put(b"second")
    tail = q._w64[ring._TAIL]
    head = q._w64[ring._HEAD]
    off = _data_offset(q, head)
    q._mm[off : off + 4] = struct.pack("=I", 10**6)  # absurd length
    with pytest.raises(ring.QueueCorrupted, match=rf"undecodable frame.*dropped {tail - head} bytes"):
        q.get(timeout=1)
    assert q.qsize() == 0
    with pytest.raises(ring.QueueEmpty):
        q.get_nowait()
    q.put(b"fresh")
    assert q.get(timeout=1) == b"fresh"


def test_corrupt_counters_are_reported_and_the_queue_recovers(q):
    q.put(b"x")
    q._w64[ring._TAIL] = q._w64[ring._HEAD] + 3 * q.capacity
    with pytest.raises(ring.QueueCorrupted, match="counters out of range"):
        q.get()
    q.put(b"ok")
    assert q.get() == b"ok"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=600), min_size=1, max_size=20),
    where=st.integers(min_value=0, max_value=8191),
    garbage=st.binary(min_size=1, max_size=64),
)
def test_garbage_in_the_data_area_never_wedges_the_queue(sizes, where, garbage, qdir):
    q = ring.create_queue("garbage", 8192)
    try:
        q.put(b"warm-up" * 50)  # so records wrap sometimes
        q.get()
        records = [os.urandom(n) for n in sizes]
        for r in records:
            q.put_nowait(r)
        end = min(where + len(garbage), q.capacity)
        q._mm[ring.HEADER_SIZE + where : ring.HEADER_SIZE + end] = garbage[: end - where]
        got, errors = [], 0
        for _ in range(len(records) + 2):
            try:
                got.append(q.get_nowait())
            except ring.QueueCorrupted as exc:
                assert "remains usable" in str(exc)
                errors += 1
            except ring.QueueEmpty:
                break
        assert len(got) <= len(records)
        assert errors <= 1
        if not errors:  # the frames survived: payload bytes may differ, sizes may not
            assert [len(g) for g in got] == [len(r) for r in records]
        assert q.qsize() == 0
        q.put(b"after")
        assert q.get_nowait() == b"after"
    finally:
        q.unlink()
        q.close()


def _rewrite_header(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_garbage_magic_and_wrong_version_raise_layout_errors(qdir):
    q = ring.create_queue("layout")
    path = q.path
    q.close()
    _rewrite_header(path, 0, b"GARBAGE!")
    with pytest.raises(ring.QueueLayoutError, match=r"layout\.q is not a kservice queue: magic b'GARBAGE!'"):
        ring.attach_queue("layout")
    _rewrite_header(path, 0, ring.MAGIC)
    _rewrite_header(path, 8, struct.pack("=I", ring.LAYOUT_VERSION + 1))
    with pytest.raises(
        ring.QueueLayoutError, match=f"version {ring.LAYOUT_VERSION + 1}.*version {ring.LAYOUT_VERSION}"
    ):
        ring.attach_queue("layout")
    assert issubclass(ring.QueueLayoutError, ValueError)
    # a stale-looking but unreadable file is not silently replaced
    with pytest.raises(FileExistsError, match="not a usable queue"):
        ring.create_queue("layout")
    os.unlink(path)
    # a file that is not a queue at all
    fd = os.open(qdir / "tiny.q", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"hello")
    os.close(fd)
    with pytest.raises(ring.QueueLayoutError, match=r"tiny\.q"):
        ring.attach_queue("tiny")
    os.unlink(qdir / "tiny.q")


# --------------------------------------------------------------------------- permissions


def test_directory_and_file_modes(qdir):
    q = ring.create_queue("modes")
    try:
        d = ring.queue_directory()
        assert d == qdir
        st_d = os.lstat(d)
        assert st_d.st_mode & 0o777 == 0o700 and st_d.st_uid == os.getuid()
        st_f = os.stat(q.path)
        assert st_f.st_mode & 0o777 == 0o600 and st_f.st_uid == os.getuid()
        assert q.path == d / "modes.q"
    finally:
        q.unlink()
        q.close()


def test_foreign_files_and_loose_directories_are_refused(qdir):
    q = ring.create_queue("foreign")
    q.close()
    os.chown(qdir / "foreign.q", 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        ring.attach_queue("foreign")
    assert ring.reclaim_stale_queues() == []  # other users' files are left alone
    os.chown(qdir / "foreign.q", os.getuid(), os.getgid())
    os.chmod(qdir / "foreign.q", 0o644)
    with pytest.raises(PermissionError, match="0644"):
        ring.attach_queue("foreign")
    os.unlink(qdir / "foreign.q")
    os.chmod(qdir, 0o755)
    with pytest.raises(ring.RuntimeDirectoryError, match="mode 0755"):
        ring.queue_directory()
    os.chmod(qdir, 0o700)
    os.chown(qdir, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        ring.create_queue("any")
    os.chown(qdir, os.getuid(), os.getgid())


# --------------------------------------------------------------------------- processes


def _check_tagged(records: list[bytes], pad: int = 0) -> dict[int, list[int]]:
    seqs: dict[int, list[int]] = {}
    for r in records:
        assert len(r) == TAG.size + pad, f"malformed record of {len(r)} bytes"
        ident, seq = TAG.unpack_from(r)
        assert r[TAG.size :] == b"p" * pad
        seqs.setdefault(ident, []).append(seq)
    return seqs


def test_workers_take_the_other_ring_path(q, procs, ring_path):
    p = procs.start("which_path", q.name)
    other = "pure" if ring_path == "compiled" else ("compiled" if ring._ringfast is not None else "pure")
    assert p.ready_line.split() == ["ready", other]
    assert p.wait(10) == 0


def test_multi_producer_exactly_once_in_order(q, procs):
    workers = [procs.start("producer", q.name, str(i), "5000", "24") for i in range(4)]
    got: list[bytes] = []
    while len(got) < 20_000:
        got.extend(q.get_many(256, timeout=20))
    for w in workers:
        assert w.wait(20) == 0
    seqs = _check_tagged(got, pad=24)
    assert sorted(seqs) == [0, 1, 2, 3]
    for ident, s in seqs.items():
        assert s == list(range(5000)), f"producer {ident} lost or reordered records"
    with pytest.raises(ring.QueueEmpty):
        q.get_nowait()


def test_threads_of_one_process_can_share_a_producer_handle(q):
    def produce(ident):
        for i in range(2000):
            q.put(TAG.pack(ident, i))

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    got = []
    while len(got) < 8000:
        got.extend(q.get_many(128, timeout=10))
    for t in threads:
        t.join()
    assert all(s == list(range(2000)) for s in _check_tagged(got).values())


def test_producer_dying_while_holding_the_lock(q, procs):
    q.put(b"before")
    for scribble in ("0", "1"):
        p = procs.start("die_holding_lock", q.name, scribble)
        assert p.wait(10) == -signal.SIGKILL
        before = q.lock_recoveries
        q.put(b"after-" + scribble.encode(), timeout=5)  # EOWNERDEAD: recovered, no deadlock
        assert q.lock_recoveries == before + 1
    assert q.get_many(10, timeout=1) == [b"before", b"after-0", b"after-1"]


def test_killed_producers_never_corrupt_or_deadlock(q, procs):
    survivor = procs.start("producer", q.name, "999", "-1", "40")
    received: list[bytes] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def consume():
        try:
            while not stop.is_set():
                try:
                    received.extend(q.get_many(512, timeout=0.2))
                except ring.QueueEmpty:
                    pass
        except BaseException as exc:  # reported below
            failure.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    rng = random.Random(7)
    try:
        for i in range(20):
            victim = procs.start("producer", q.name, str(i), "-1", str(rng.randrange(0, 3000)), wait_ready=False)
            time.sleep(rng.uniform(0.0, 0.08))  # deliberate: kill it at a random point of its writes
            procs.kill(victim)
        n = len(received)
        wait_for(lambda: len(received) >= n + 1000, what="the surviving producer to go on writing")
    finally:
        procs.kill(survivor)
        time.sleep(0.3)  # deliberate: the consumer drains what is left before it stops
        stop.set()
        t.join(10)
    assert not failure, failure
    survivor_seqs = []
    victims: dict[int, list[int]] = {}
    for r in received:
        ident, seq = TAG.unpack_from(r)
        if ident == 999:
            assert len(r) == TAG.size + 40 and r[TAG.size :] == b"p" * 40
            survivor_seqs.append(seq)
        else:
            assert set(r[TAG.size :]) <= {ord("p")}
            victims.setdefault(ident, []).append(seq)
    assert survivor_seqs == list(range(len(survivor_seqs)))
    for ident, s in victims.items():
        assert s == list(range(len(s))), f"victim {ident} records out of order"
    q.put(b"still works", timeout=5)
    assert q.get_many(100_000, timeout=5)[-1] == b"still works"


def test_blocked_producer_gives_up_when_the_owner_dies(procs):
    owner = procs.start("owner", "orphan")
    blocked = procs.start("blocked_put", "orphan")
    time.sleep(0.3)  # time for it to block in put after saying ready (nothing public shows it)
    assert blocked.poll() is None
    t0 = time.monotonic()
    procs.kill(owner)
    line = blocked.stdout.readline().split()
    assert time.monotonic() - t0 < 2.5
    assert line[:2] == ["result", "QueueClosed"], line
    assert blocked.wait(10) == 0
    assert ring.reclaim_stale_queues() == ["orphan"]


def test_owner_alive_tracks_pid_and_zombies(procs):
    p = procs.start("owner", "alive")
    q = ring.attach_queue("alive")
    try:
        assert q.owner_pid == p.pid and q.owner_alive
        p.send_signal(signal.SIGKILL)
        wait_for(lambda: not q.owner_alive, timeout=5, what="the killed owner to count as dead")  # a zombie does
        p.wait()
    finally:
        q.unlink()
        q.close()


def test_janitor_reclaims_segments_of_killed_owners_only(qdir, procs):
    live = ring.create_queue("live-one")
    try:
        dead = procs.start("owner", f"svc-{uuid.uuid4().hex[:6]}")
        name = next(n[:-2] for n in os.listdir(qdir) if n.startswith("svc-"))
        procs.kill(dead)
        # a temp file of a creator killed mid-creation is also cleared
        (qdir / f".tmp-{dead.pid}-deadbeef").write_bytes(b"")
        assert ring.reclaim_stale_queues() == [name]
        assert sorted(os.listdir(qdir)) == ["live-one.q"]
        assert ring.reclaim_stale_queues() == []
        live.put(b"untouched")
        assert live.get() == b"untouched"
        # create over a stale name reclaims it
        again = procs.start("owner", "reborn")
        procs.kill(again)
        fresh = ring.create_queue("reborn")
        assert fresh.owner_pid == os.getpid()
        fresh.unlink()
        fresh.close()
    finally:
        live.unlink()
        live.close()


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_futex_wake_across_processes_and_idle_cpu(procs):
    p = procs.start("idle_get", "idle")
    q = ring.attach_queue("idle")
    try:
        time.sleep(0.2)  # past the spin phase
        c0, t0 = _cpu_ticks(p.pid), time.monotonic()
        time.sleep(2.0)  # deliberate: the window the idle CPU use is measured over
        used = (_cpu_ticks(p.pid) - c0) / os.sysconf("SC_CLK_TCK")
        elapsed = time.monotonic() - t0
        assert used / elapsed < 0.01, f"idle consumer used {used:.3f} s of CPU in {elapsed:.2f} s"
        t1 = time.monotonic()
        q.put(b"hello")
        assert p.stdout.readline().strip() == "got hello"
        assert time.monotonic() - t1 < 1.0
        assert p.wait(10) == 0
    finally:
        q.close()


def _round_trips(procs, cpu: str, n: int, size: int = 90) -> list[float]:
    resp = ring.create_queue("resp", 1 << 20)
    server = procs.start("echo", "req", "resp", cpu)
    req = ring.attach_queue("req")
    try:
        msg = b"m" * size
        times = []
        for _i in range(n):
            t = time.perf_counter()
            req.put(msg)
            assert resp.get(timeout=10) == msg
            times.append(time.perf_counter() - t)
        req.put(b"stop")
        assert server.wait(10) == 0
        return times
    finally:
        req.close()
        resp.unlink()
        resp.close()


def test_round_trips_between_processes(procs):
    times = _round_trips(procs, "-", 2000)
    assert statistics.median(times) < 0.002


def test_two_processes_sharing_one_core(procs):
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        q0 = ring.create_queue("one-core-check")
        assert q0._spin_checks == 1  # single CPU: yield on every check
        q0.unlink()
        q0.close()
        times = _round_trips(procs, "0", 500)
    finally:
        os.sched_setaffinity(0, old)
    assert statistics.median(times) < 0.002, f"median round trip {statistics.median(times) * 1e6:.0f} us"


# ----------------------------------------------------------- the directory itself

_USE_AND_LEAVE = """
from kservice.plugins.mmap import registry, ring
q = ring.create_queue("leaving", 4096)
registry.publish("leaving-svc", "leaving")
registry.withdraw("leaving-svc", "leaving")
q.unlink()
q.close()
"""


def test_a_process_removes_the_directories_it_leaves_empty_and_keeps_those_in_use(qdir: Path) -> None:
    registry_dir = qdir.with_name(qdir.name + "-registry")
    env = {**os.environ, "KSERVICE_QUEUE_DIR": str(qdir), "KSERVICE_REGISTRY_DIR": str(registry_dir)}
    subprocess.run([sys.executable, "-c", _USE_AND_LEAVE], env=env, check=True, timeout=30)
    assert not qdir.exists() and not registry_dir.exists()  # nothing left in them: gone with the process
    held = ring.create_queue("held", 4096)  # this process keeps a queue in the directory
    try:
        subprocess.run([sys.executable, "-c", _USE_AND_LEAVE], env=env, check=True, timeout=30)
        assert sorted(os.listdir(qdir)) == ["held" + ring.SUFFIX]
        assert not registry_dir.exists()
    finally:
        held.unlink()
        held.close()


def test_a_directory_removed_before_the_lock_is_made_again(qdir: Path) -> None:
    calls = 0

    def locate() -> Path:
        nonlocal calls
        calls += 1
        d = ring.queue_directory()
        if calls == 1:
            os.rmdir(d)  # an exiting process removed it right after it was made
        return d

    with ring.locked_directory(locate) as d:
        assert d == qdir and qdir.is_dir() and calls == 2
    held = ring.create_queue("after", 4096)
    held.unlink()
    held.close()
