"""A consumer whose spin loses its CPU to another process stops spinning for a while (``ring.note_lost_cpu``).

The contention is real: a busy-loop process pinned to the CPU this test's thread
is pinned to, so the spin's ``sched_yield()`` hands the CPU to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kservice.plugins.mmap import ring

from .services import private_queue_dir


@pytest.fixture(autouse=True)
def qdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with private_queue_dir(monkeypatch) as d:
        yield d


@pytest.fixture
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's spin state as at start-up (the test's own copy)."""
    monkeypatch.setattr(ring, "_spin_pause", [0.0, ring.SPIN_PAUSE_MIN])
    monkeypatch.setattr(ring, "_SPIN_WHEN_BUSY", False)


@pytest.fixture
def shared_cpu() -> Iterator[int]:
    """This thread pinned to one CPU beside a busy-loop process pinned to the same CPU."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        yield cpu
    finally:
        os.sched_setaffinity(0, before)
        busy.kill()
        busy.wait(10)


class _CountingSpin:
    """The compiled ring, counting calls of its spin (everything else passes through)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.spins = 0

    def spin(self, *args: Any) -> Any:
        self.spins += 1
        return self._inner.spin(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _queue(pure: bool) -> ring.ShmQueue:
    os.environ[ring.PURE_ENV] = "1" if pure else "0"
    try:
        q = ring.create_queue(f"contention-{'pure' if pure else 'fast'}", 1 << 16)
    finally:
        del os.environ[ring.PURE_ENV]
    if not pure and q._fast is None:
        q.unlink()
        q.close()
        pytest.fail("the compiled ring is not built: run `make setup`")
    return q


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure-python"])
@pytest.mark.usefixtures("no_pause")
def test_a_spin_that_loses_its_cpu_to_a_busy_process_pauses_the_spins_of_this_process(
    shared_cpu: int, pure: bool
) -> None:
    q = _queue(pure)
    try:
        assert not ring.spin_paused()
        deadline = time.monotonic() + 20
        waits = 0
        # Each empty wait spins first (up to 50 µs, yielding every few µs): the busy process on the
        # same CPU takes it at a yield or a tick, and the spin notices it was away.
        while not ring.spin_paused():
            assert time.monotonic() < deadline, f"{waits} spins on a shared CPU never noticed losing it"
            with pytest.raises(ring.QueueEmpty):
                q.get(timeout=0.002)
            waits += 1
        # Paused: the next wait sleeps on the futex without spinning, and still gets its record.
        if not pure:
            counting = _CountingSpin(q._fast)
            q._fast = counting
            with pytest.raises(ring.QueueEmpty):
                q.get(timeout=0.001)
            assert counting.spins == 0
            q._fast = counting._inner
        q.put(b"after")
        assert q.get(timeout=5) == b"after"
    finally:
        q.unlink()
        q.close()


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("no_pause")
def test_once_the_pause_is_over_the_waits_spin_again() -> None:
    q = _queue(pure=False)
    counting = _CountingSpin(q._fast)
    q._fast = counting
    try:
        now = time.monotonic()
        ring.note_lost_cpu(now)
        assert ring.spin_paused(now) and ring.spin_paused(now + ring.SPIN_PAUSE_MIN / 2)
        assert not ring.spin_paused(now + ring.SPIN_PAUSE_MIN)
        ring._spin_pause[0] = time.monotonic() - 1e-3  # the pause just ended
        with pytest.raises(ring.QueueEmpty):
            q.get(timeout=0.01)
        assert counting.spins > 0
    finally:
        q._fast = counting._inner
        q.unlink()
        q.close()


@pytest.mark.usefixtures("no_pause")
def test_the_pause_doubles_while_the_first_spin_after_it_loses_again_and_resets_later() -> None:
    now = 1000.0
    ring.note_lost_cpu(now)
    assert ring._spin_pause == [now + ring.SPIN_PAUSE_MIN, ring.SPIN_PAUSE_MIN]
    pause = ring.SPIN_PAUSE_MIN
    for _ in range(12):  # each loss right after its pause ended: the machine stays busy
        now = ring._spin_pause[0] + 1e-4
        ring.note_lost_cpu(now)
        pause = min(pause * 2, ring.SPIN_PAUSE_MAX)
        assert ring._spin_pause == [now + pause, pause]
    assert pause == ring.SPIN_PAUSE_MAX
    # A loss long after the last pause ended: the machine was idle meanwhile, start short again.
    now = ring._spin_pause[0] + 10 * ring.SPIN_PAUSE_MAX
    ring.note_lost_cpu(now)
    assert ring._spin_pause == [now + ring.SPIN_PAUSE_MIN, ring.SPIN_PAUSE_MIN]


def test_spin_when_busy_keeps_spinning_whatever_happened(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring, "_spin_pause", [0.0, ring.SPIN_PAUSE_MIN])
    monkeypatch.setattr(ring, "_SPIN_WHEN_BUSY", True)  # KSERVICE_RING_SPIN_WHEN_BUSY=1, read at import
    ring.note_lost_cpu(time.monotonic())
    assert not ring.spin_paused()
