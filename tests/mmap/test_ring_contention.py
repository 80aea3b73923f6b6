"""A waiting consumer spins only while a CPU is idle (``ring.spinning_pays``); otherwise it sleeps at once."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    ("loadavg", "cpus", "fits"),
    [
        ("0.50 0.40 0.30 1/300 1234\n", 2, True),  # only the reader runs
        ("0.50 0.40 0.30 2/300 1234\n", 2, True),  # the reader and its partner: each has a CPU
        ("4.00 4.00 4.00 3/300 1234\n", 2, False),  # a runnable thread waits for a CPU
        ("8.00 8.00 8.00 9/300 1234\n", 8, False),
        ("garbage", 2, True),  # unreadable: behave as on an idle machine
    ],
)
def test_runnable_count_decides(loadavg: str, cpus: int, fits: bool) -> None:
    assert ring.runnable_fits(loadavg, cpus) is fits


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


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("pays", "misses", "spins"),
    [
        (True, 5, True),  # an idle CPU: spin, whatever the last spins did
        (False, 0, True),  # a busy machine, but the last spin found its record: the partner runs
        (False, 2, False),  # a busy machine and two spins in a row ran out: sleep at once
    ],
)
def test_a_consumer_sleeps_without_spinning_when_no_cpu_is_idle(
    monkeypatch: pytest.MonkeyPatch, pays: bool, misses: int, spins: bool
) -> None:
    q = ring.create_queue("contention", 1 << 16)
    try:
        if q._fast is None:
            pytest.skip("the compiled ring is not built: the pure-Python spin has no hook to count")
        counting = _CountingSpin(q._fast)
        q._fast = counting
        monkeypatch.setattr(ring, "_contention", [float("inf"), pays])  # the last look, valid for ever
        q._spin_misses = misses
        started = time.monotonic()
        with pytest.raises(ring.QueueEmpty):
            q.get(timeout=0.05)
        assert time.monotonic() - started < 5
        assert (counting.spins > 0) is spins
        assert q._spin_misses == (misses + 1 if spins else misses)  # the spin ran out: counted
        q.put(b"after")  # the queue keeps working
        assert q.get(timeout=5) == b"after"
    finally:
        q._fast = getattr(q._fast, "_inner", q._fast)
        q.unlink()
        q.close()
