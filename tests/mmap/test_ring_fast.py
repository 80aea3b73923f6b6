"""The compiled put/pop (``_ringfast``) against the pure-Python reference in ring.py.

The two implementations must be interchangeable on one queue: the same bytes
in shared memory for the same operations, the same records out, the same
errors.  (test_ring.py runs every ring test with each path, and its worker
processes with the other path.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kservice.plugins.mmap import ring

from .services import private_queue_dir

fast = ring._ringfast
needs_fast = pytest.mark.skipif(fast is None, reason="the _ringfast extension is not built")

#: Header words that put/pop change, by offset and width; the rest of the header
#: (static fields, the mutex) is either identical by construction or per-queue.
SHARED_WORDS = {
    "closed": (ring._OFF_CLOSED, "I"),
    "recoveries": (ring._OFF_RECOVERIES, "I"),
    "tail": (ring._OFF_TAIL, "Q"),
    "data_seq": (ring._OFF_DATA_SEQ, "I"),
    "asleep": (ring._OFF_ASLEEP, "I"),
    "head": (ring._OFF_HEAD, "Q"),
    "space_seq": (ring._OFF_SPACE_SEQ, "I"),
    "space_waiters": (ring._OFF_SPACE_WAITERS, "I"),
}


@pytest.fixture(autouse=True)
def qdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private queue directory per test, removed afterwards (and no queue file may be left)."""
    monkeypatch.delenv(ring.PURE_ENV, raising=False)
    with private_queue_dir(monkeypatch) as d:
        yield d


def _create(name: str, capacity: int, *, pure: bool) -> ring.ShmQueue:
    os.environ[ring.PURE_ENV] = "1" if pure else "0"
    try:
        return ring.create_queue(name, capacity)
    finally:
        del os.environ[ring.PURE_ENV]


def _attach(name: str, *, pure: bool) -> ring.ShmQueue:
    os.environ[ring.PURE_ENV] = "1" if pure else "0"
    try:
        return ring.attach_queue(name)
    finally:
        del os.environ[ring.PURE_ENV]


def _state(q: ring.ShmQueue) -> tuple[dict[str, int], bytes]:
    words = {name: struct.unpack_from("=" + fmt, q._mm, off)[0] for name, (off, fmt) in SHARED_WORDS.items()}
    return words, bytes(q._mm[ring.HEADER_SIZE :])


def _drop(*queues: ring.ShmQueue) -> None:
    for q in queues:
        q.unlink()
        q.close()


def test_extension_is_built_where_a_compiler_exists() -> None:
    if fast is None and (shutil.which(sysconfig.get_config_var("CC").split()[0]) or shutil.which("cc")):
        pytest.fail("a C compiler exists but kservice.plugins.mmap._ringfast was not built (run `make setup`)")
    if fast is not None:
        assert fast.LAYOUT == ring._RINGFAST_LAYOUT


def test_pure_env_selects_the_python_path() -> None:
    pure = _create("pure", 4096, pure=True)
    default = ring.attach_queue("pure")
    try:
        assert pure._fast is None
        assert (default._fast is None) == (fast is None)
    finally:
        default.close()
        _drop(pure)


@needs_fast
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.one_of(
            st.integers(min_value=0, max_value=4096 - 8),  # a put of that many bytes
            st.just(-1),  # a get
            st.integers(min_value=2, max_value=9).map(lambda k: -k),  # a get_many(k)
        ),
        max_size=120,
    ),
    seed=st.integers(min_value=0, max_value=255),
)
def test_both_paths_leave_byte_identical_rings(ops: list[int], seed: int, qdir: Path) -> None:
    compiled = _create("compiled", 4096, pure=False)
    pure = _create("pure", 4096, pure=True)
    assert compiled._fast is not None and pure._fast is None
    try:
        for i, op in enumerate(ops):
            if op >= 0:
                record = bytes((seed + i + j) & 0xFF for j in range(op))
                outcomes = []
                for q in (compiled, pure):
                    try:
                        q.put_nowait(record if i % 3 else bytearray(record))
                        outcomes.append("stored")
                    except ring.QueueFull:
                        outcomes.append("full")
                assert outcomes[0] == outcomes[1]
            else:
                got = []
                for q in (compiled, pure):
                    try:
                        got.append(q.get_nowait() if op == -1 else q.get_many(-op, timeout=0))
                    except ring.QueueEmpty:
                        got.append("empty")
                assert got[0] == got[1]
            assert _state(compiled) == _state(pure)
    finally:
        _drop(compiled, pure)


@needs_fast
def test_wrap_around_records_are_identical_on_both_paths() -> None:
    compiled = _create("compiled", 4096, pure=False)
    pure = _create("pure", 4096, pure=True)
    try:
        for q in (compiled, pure):
            q.put(b"w" * 3000)  # move the counters near the end of the ring
            q.get()
        for n in (2000, 0, 1, 4096 - 8 - 2000 - 8 - 8 - 8 - 8):
            payload = os.urandom(n)
            compiled.put(payload)
            pure.put(payload)
            assert _state(compiled) == _state(pure)
        assert compiled.get_many(10) == pure.get_many(10)
        assert _state(compiled) == _state(pure)
        assert compiled._w64[ring._TAIL] > compiled.capacity  # the test did wrap
    finally:
        _drop(compiled, pure)


@needs_fast
@pytest.mark.parametrize("producer_pure", [False, True])
def test_handles_of_both_paths_share_one_queue(producer_pure: bool) -> None:
    owner = _create("shared", 4096, pure=not producer_pure)
    producer = _attach("shared", pure=producer_pure)
    try:
        assert (producer._fast is None) is producer_pure and (owner._fast is None) is not producer_pure
        records = [os.urandom(n) for n in (0, 5, 700, 1500, 1, 2000, 999)]
        received = []
        for r in records * 4:  # several laps of the ring
            producer.put(r)
            received.append(owner.get())
        assert received == records * 4
        for r in records[:4]:
            producer.put(r)
        assert owner.get_many(2) == records[:2]
        assert owner.get_many(10) == records[2:4]
    finally:
        producer.close()
        _drop(owner)


@needs_fast
@pytest.mark.parametrize("pure", [False, True])
def test_corruption_is_reported_the_same_way(pure: bool) -> None:
    q = _create("bad", 4096, pure=pure)
    try:
        for r in (b"one", b"two", b"three"):
            q.put(r)
        head = q._w64[ring._HEAD]
        second = ring.HEADER_SIZE + head + ring.FRAME + 8
        q._mm[second : second + 4] = struct.pack("=I", 77)  # the second frame's length
        assert q.get_many(10) == [b"one"]  # the good record first
        with pytest.raises(
            ring.QueueCorrupted, match=rf"undecodable frame at position {head + 16} \(length 77, .*dropped 32 bytes"
        ):
            q.get_many(10)
        q.put(b"fresh")
        assert q.get() == b"fresh"
    finally:
        _drop(q)


@needs_fast
def test_compiled_put_declines_without_writing() -> None:
    q = _create("declines", 4096, pure=False)
    ring_object = q._fast
    try:
        assert ring_object.put(b"x" * 4089) == fast.PUT_TOO_LARGE
        assert ring_object.put(12) == fast.PUT_NOT_BUFFER
        assert ring_object.put(memoryview(b"abcdef")[::2]) == fast.PUT_NOT_BUFFER
        while ring_object.put(b"f" * 500) == fast.PUT_OK:
            pass
        before = _state(q)
        assert ring_object.put(b"f" * 500) == fast.PUT_FULL
        assert _state(q) == before
        q.get_many(100)
        q.mark_closed()
        before = _state(q)
        assert ring_object.put(b"late") == fast.PUT_CLOSED
        assert _state(q) == before
        # and the public API still raises what the pure-Python path raises
        with pytest.raises(ring.QueueClosed):
            q.put(b"late")
        with pytest.raises(TypeError):
            q.put(memoryview(b"abcdef")[::2])
    finally:
        _drop(q)


@needs_fast
def test_compiled_put_is_set_only_while_the_compiled_path_can_take_it() -> None:
    """``ShmQueue._compiled_put``: the compiled put of a live handle, None for a pure one or once closed."""
    q = _create("public-put", 4096, pure=False)
    pure = _attach(q.name, pure=True)
    try:
        assert pure._compiled_put is None
        assert q._compiled_put is not None and q._compiled_put(b"published") == fast.PUT_OK
        assert pure.get(0) == b"published"
        assert q._compiled_put(b"x" * 4089) == fast.PUT_TOO_LARGE  # declined, nothing written
        assert pure.qsize() == 0
    finally:
        _drop(q)
        pure.close()
    assert q._compiled_put is None


@contextlib.contextmanager
def _lock_held_by_another_thread(q: ring.ShmQueue) -> Iterator[None]:
    """The producers' lock of ``q``, held by another thread for the duration of the block."""
    holding, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        q._lock(None)
        holding.set()
        release.wait(10)
        ring._unlock(q._lock_arg)

    t = threading.Thread(target=hold_lock)
    t.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        release.set()
        t.join(10)


@needs_fast
def test_compiled_put_declines_while_another_thread_holds_the_lock() -> None:
    q = _create("busy", 4096, pure=False)
    with _lock_held_by_another_thread(q):
        before = _state(q)
        assert q._fast.put(b"x") == fast.PUT_BUSY
        assert _state(q) == before
    try:
        q.put(b"x")
        assert q.get() == b"x"
    finally:
        _drop(q)


@needs_fast
def test_released_ring_object_refuses_and_close_unmaps() -> None:
    q = _create("released", 4096, pure=False)
    ring_object = q._fast
    q.unlink()
    q.close()  # would raise BufferError if the ring object still pinned the mapping
    assert q._fast is None
    with pytest.raises(ValueError, match="released"):
        ring_object.put(b"x")
    with pytest.raises(ValueError, match="released"):
        ring_object.pop(0)
    with pytest.raises(ring.QueueClosed):
        q.put(b"x")


@needs_fast
def test_compiled_spin_sees_a_record_and_lets_other_threads_run() -> None:
    """spin() sets bit 1 when a record lands, returns when its time is up; it waits without the GIL.

    (Bit 2 says it lost its CPU and stopped early: possible on a loaded machine, so allowed here;
    test_ring_contention makes it happen on purpose.)
    """
    q = _create("spin", 4096, pure=False)
    try:
        head = q._w64[ring._HEAD]
        began = time.monotonic()
        spun = q._fast.spin(head, 0.02, 256)
        assert not spun & ring._SPIN_ARRIVED
        assert spun & ring._SPIN_LOST_CPU or time.monotonic() - began >= 0.02

        # Another Python thread makes progress while this one spins (the GIL is released),
        # and its put ends the spin.
        counted = []

        def count_then_put() -> None:
            n = 0
            stop = time.monotonic() + 0.05
            while time.monotonic() < stop:
                n += 1
            counted.append(n)
            q.put(b"landed")

        thread = threading.Thread(target=count_then_put)
        thread.start()
        deadline = time.monotonic() + 10
        while not q._fast.spin(head, 5.0, 256) & ring._SPIN_ARRIVED:  # again if it lost its CPU
            assert time.monotonic() < deadline, "the put did not end the spin"
        thread.join()
        assert counted and counted[0] > 1000
        assert q.get(0) == b"landed"
    finally:
        _drop(q)


@needs_fast
def test_closing_a_queue_releases_a_thread_spinning_on_it() -> None:
    q = _create("spin-close", 4096, pure=False)
    ring_object = q._fast
    head = q._w64[ring._HEAD]
    result: list[int] = []

    def spin_until_released() -> None:
        while True:  # again whenever it lost its CPU on a loaded machine
            try:
                spun = ring_object.spin(head, 30.0, 256)
            except ValueError:  # released between two spins
                spun = 0
            if not spun & ring._SPIN_LOST_CPU:
                result.append(spun)
                return

    spinner = threading.Thread(target=spin_until_released)
    spinner.start()
    time.sleep(0.05)  # time for the thread to start spinning (nothing public shows it)
    q.unlink()
    q.close()  # waits for the spinner to leave the mapping before unmapping it
    spinner.join(5)
    assert not spinner.is_alive() and result == [0]


@needs_fast
def test_compiled_announce_sets_the_asleep_flag_or_declines_without_changing_anything() -> None:
    q = _create("announce", 4096, pure=False)
    try:
        # The common case: the same words change as on the Python path (asleep set; data_seq returned).
        words, data = _state(q)
        seq = q._fast.announce()
        assert seq == words["data_seq"] and _state(q) == ({**words, "asleep": 1}, data)
        q._w32[ring._ASLEEP] = 0
        # A record arrived: nothing changes, the caller pops it.
        q.put(b"r")
        before = _state(q)
        assert q._fast.announce() == fast.ANNOUNCE_ARRIVED and _state(q) == before
        assert q.get(0) == b"r"
        # Producers waiting for space: declined, so the Python path wakes them before sleeping.
        q._w32[ring._SPACE_WAITERS] = 1
        before = _state(q)
        assert q._fast.announce() == fast.ANNOUNCE_DECLINED and _state(q) == before
        space_seq = q._w32[ring._SPACE_SEQ]
        assert q._announce_sleep() == q._w32[ring._DATA_SEQ]
        assert q._w32[ring._SPACE_WAITERS] == 0 and q._w32[ring._SPACE_SEQ] == (space_seq + 1) & 0xFFFFFFFF
        q._w32[ring._ASLEEP] = 0
        # Closed and drained: declined, and the Python path raises QueueClosed.
        q.mark_closed()
        before = _state(q)
        assert q._fast.announce() == fast.ANNOUNCE_DECLINED and _state(q) == before
        with pytest.raises(ring.QueueClosed):
            q._announce_sleep()
    finally:
        _drop(q)


@needs_fast
def test_compiled_announce_declines_while_another_thread_holds_the_lock() -> None:
    q = _create("announce-busy", 4096, pure=False)
    try:
        with _lock_held_by_another_thread(q):
            before = _state(q)
            assert q._fast.announce() == fast.ANNOUNCE_DECLINED
            assert _state(q) == before
    finally:
        _drop(q)


@needs_fast
def test_compiled_doze_returns_as_the_futex_does_and_releases_the_gil() -> None:
    q = _create("doze", 4096, pure=False)
    try:
        import errno

        seq = q._w32[ring._DATA_SEQ]
        assert q._fast.doze((seq + 1) & 0xFFFFFFFF, 1.0) == errno.EAGAIN  # the word already differs
        began = time.monotonic()
        assert q._fast.doze(seq, 0.02) == errno.ETIMEDOUT
        assert time.monotonic() - began >= 0.015
        # Another Python thread runs while this one sleeps, and its put wakes it.
        assert q._fast.announce() == seq
        woke: list[int] = []
        sleeper = threading.Thread(target=lambda: woke.append(q._fast.doze(seq, 10.0)))
        sleeper.start()
        time.sleep(0.05)  # deliberate: the sleeper must be inside the futex wait before the put
        q.put(b"wake")
        sleeper.join(10)
        assert woke == [0] and q.get(0) == b"wake"
    finally:
        _drop(q)


@needs_fast
@pytest.mark.timeout(60)
@pytest.mark.parametrize("consumer_pure", [False, True])
def test_a_sleeping_consumer_is_woken_by_a_producer_of_the_other_path(consumer_pure: bool) -> None:
    """The compiled sleep (announce, doze) and the Python one follow one protocol: no wake-up is lost."""
    owner = _create("sleepers", 1 << 16, pure=consumer_pure)
    producer = _attach("sleepers", pure=not consumer_pure)
    owner.set_spin_limit(0)  # sleep on every wait, so every record crosses the protocol
    got: list[bytes] = []

    def consume() -> None:
        for _ in range(2000):
            got.append(owner.get(timeout=10))

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        for i in range(2000):
            producer.put(i.to_bytes(4, "little"))
            if i % 7 == 0:
                time.sleep(0)  # let the consumer fall asleep between some records
        consumer.join(30)
        assert not consumer.is_alive()
        assert got == [i.to_bytes(4, "little") for i in range(2000)]
    finally:
        producer.close()
        _drop(owner)


@needs_fast
@pytest.mark.timeout(60)
def test_the_compiled_primitives_answer_as_the_ctypes_ones() -> None:
    """With the extension, _futex takes its primitives from it (no ctypes); they behave as the ctypes ones do.

    Both implementations work on one mutex and one futex word here, so each sees what the other did.
    """
    import errno
    import mmap

    from kservice.plugins.mmap import _futex, _futex_ctypes, _futex_native

    assert _futex.NATIVE and _futex.futex_wait is _futex_native.futex_wait
    region = mmap.mmap(-1, 4096)  # MAP_SHARED and anonymous: shared with a forked child
    try:
        native, by_ctypes = _futex_native, _futex_ctypes
        base = native.buffer_address(region)
        assert base == by_ctypes.buffer_address(region) and base % 4096 == 0
        word, mutex = base, base + 256
        region[0:4] = (7).to_bytes(4, "little")
        for impl in (native, by_ctypes):
            assert impl.futex_wait(word, 8, 1.0) == errno.EAGAIN  # the word differs
            began = time.monotonic()
            assert impl.futex_wait(word, 7, 0.02) == errno.ETIMEDOUT
            assert time.monotonic() - began >= 0.015
            assert impl.futex_wake(word) == 0  # nobody waits
            impl.full_barrier()
        assert native.membarrier_register() == by_ctypes.membarrier_register()
        # A sleeper of one implementation is woken by the other's wake.
        woke: list[int] = []
        sleeper = threading.Thread(target=lambda: woke.append(native.futex_wait(word, 7, 10.0)))
        sleeper.start()
        deadline = time.monotonic() + 10
        while not by_ctypes.futex_wake(word) and time.monotonic() < deadline:
            time.sleep(0.001)
        sleeper.join(10)
        assert woke == [0]

        native.mutex_init(mutex)
        assert native.fast_trylock(native.pointer_arg(mutex)) == 0
        assert by_ctypes.mutex_trylock(mutex) == errno.EBUSY  # held: the other implementation sees it
        assert by_ctypes.mutex_lock(mutex, time.monotonic() + 0.05) == errno.ETIMEDOUT
        assert native.fast_unlock(native.pointer_arg(mutex)) == 0
        assert by_ctypes.mutex_lock(mutex, None) == 0
        assert native.mutex_lock(mutex, time.monotonic() + 0.05) == errno.ETIMEDOUT
        assert by_ctypes.mutex_unlock(mutex) == 0
        # A holder that dies: the next locker of either implementation is told, and repairs the lock.
        for impl in (native, by_ctypes):
            child = os.fork()
            if child == 0:  # pragma: no cover - the child only takes the lock and dies holding it
                os._exit(native.mutex_trylock(mutex))
            assert os.waitpid(child, 0)[1] == 0
            assert impl.mutex_lock(mutex, time.monotonic() + 5) == errno.EOWNERDEAD
            assert impl.mutex_consistent(mutex) == 0
            assert impl.mutex_unlock(mutex) == 0
        assert native.mutex_trylock(mutex) == 0 and native.mutex_unlock(mutex) == 0
    finally:
        region.close()
