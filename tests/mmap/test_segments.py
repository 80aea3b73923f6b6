"""Pooled out-of-band segments: reuse, leases, copies, release and the janitor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kservice import ServiceRequest, ServiceResponse
from kservice.plugins.mmap import codec
from kservice.plugins.mmap.registry import process_alive

from .services import private_queue_dir

pytestmark = pytest.mark.timeout(60)

BIG = os.urandom(codec.OUT_OF_BAND_THRESHOLD + 12345)


@pytest.fixture
def qdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private queue directory; the pool is released afterwards and nothing may be left."""
    with private_queue_dir(monkeypatch, "test-seg") as d:
        codec.release_pool()
        try:
            yield d
        finally:
            codec.release_pool(wait=0)


def _pool_files(d: Path) -> list[str]:
    # A process that leaves the directory empty removes it at exit: no directory, no files.
    return sorted(n for n in os.listdir(d) if n.startswith("pool-")) if d.exists() else []


def _request(*args: object) -> ServiceRequest:
    return ServiceRequest("r-1", "svc", "echo", args, {}, "", time.time() + 30, {})


def _encode(*args: object) -> tuple[bytes, str | None]:
    return codec.encode_request(_request(*args), "rsp.x", os.getpid(), 1 << 18)


def test_a_segment_is_reused_once_its_record_was_read(qdir: Path) -> None:
    for i in range(5):
        record, token = _encode(BIG, i)
        assert record[:1] == b"P" and token and token.startswith("pool-")
        message = codec.decode(record)
        assert message[4] == (BIG, i)
        assert type(message[4][0]) is bytes
    assert len(_pool_files(qdir)) == 1
    assert not [n for n in os.listdir(qdir) if n.startswith("oob-")]


def test_a_leased_segment_is_not_reused_until_read(qdir: Path) -> None:
    first, _ = _encode(BIG)
    second, _ = _encode(BIG[::-1])
    assert len(_pool_files(qdir)) == 2
    assert codec.decode(second)[4] == (BIG[::-1],)
    assert codec.decode(first)[4] == (BIG,)
    # decoding the same record twice is refused: its lease is gone
    with pytest.raises(codec.DecodeError, match="does not hold this record"):
        codec.decode(first)


def test_a_full_pool_falls_back_to_one_shot_segments(qdir: Path) -> None:
    records = [_encode(BIG)[0] for _ in range(codec.POOL_SEGMENTS + 2)]
    assert [r[:1] for r in records].count(b"P") == codec.POOL_SEGMENTS
    assert [r[:1] for r in records].count(b"O") == 2
    for record in records:
        assert codec.decode(record)[4] == (BIG,)
    assert not [n for n in os.listdir(qdir) if n.startswith("oob-")]


def test_unqueued_and_discarded_records_give_their_lease_back(qdir: Path) -> None:
    _record, token = _encode(BIG)
    codec.unlink_segment(token)  # the sender could not queue it
    again, _ = _encode(BIG)
    assert _pool_files(qdir) == [token.partition("@")[0]]
    codec.discard(again)  # the receiver dropped it unread
    third, _ = _encode(BIG)
    assert len(_pool_files(qdir)) == 1
    assert codec.decode(third)[4] == (BIG,)


def test_other_buffers_get_a_private_copy(qdir: Path) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(codec.OUT_OF_BAND_THRESHOLD // 8 + 10, dtype=np.float64)
    record, _ = _encode(array)
    back = codec.decode(record)[4][0]
    # the segment is reused for another payload: the array received earlier must not change
    codec.decode(_encode(np.zeros_like(array))[0])
    assert (back == array).all()
    back[0] = 42.0  # writable
    assert len(_pool_files(qdir)) == 1


def test_big_results_and_batches(qdir: Path) -> None:
    record, _ = codec.encode_response(ServiceResponse(True, [BIG, 1], None, "r-9"), os.getpid(), 1 << 18)
    [message] = codec.decode_many(record)
    response = codec.response_from_message(message)
    assert response.success and response.result == [BIG, 1] and response.request_id == "r-9"
    small = [ServiceResponse(True, i, None, f"r-{i}") for i in range(3)]
    failed = ServiceResponse(False, None, "no", "r-3", "KeyError", "service", metadata={"x": 1})
    batch = codec.encode_response_batch([*small, failed], 1 << 18)
    assert batch is not None
    decoded = [codec.response_from_message(m) for m in codec.decode_many(batch)]
    assert [r.result for r in decoded[:3]] == [0, 1, 2] and [r.request_id for r in decoded[:3]] == ["r-0", "r-1", "r-2"]
    assert not decoded[3].success and decoded[3].error_type == "KeyError" and decoded[3].metadata == {"x": 1}
    # a batch never carries a buffer that must travel out of band
    assert codec.encode_response_batch([ServiceResponse(True, BIG, None, "r")], 1 << 30) is None
    assert codec.encode_response_batch([ServiceResponse(True, [1, BIG], None, "r")], 1 << 30) is None


def test_a_lease_of_a_dead_receiver_is_taken_back(qdir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record, _ = codec.encode_request(_request(BIG), "rsp.x", dead.pid, 1 << 18)
    assert record[:1] == b"P"
    # leased to a process that is gone: the next write takes the segment back
    record, _ = _encode(BIG)
    assert record[:1] == b"P"
    assert len(_pool_files(qdir)) == 1
    assert codec.decode(record)[4] == (BIG,)


def test_release_pool_unlinks_and_the_janitor_reclaims_dead_owners(qdir: Path) -> None:
    _encode(BIG)  # leased to ourselves, never read
    assert len(_pool_files(qdir)) == 1
    codec.release_pool(wait=0)
    assert _pool_files(qdir) == []
    # a pool segment whose owner was killed is reclaimed; a live owner's is not
    code = (
        "import os, sys, time\n"
        "from kservice import ServiceRequest\n"
        "from kservice.plugins.mmap import codec\n"
        "r = ServiceRequest('r', 's', 'm', (b'x' * (1 << 20),), {}, '', time.time() + 60, {})\n"
        "codec.encode_request(r, 'q', 1, 1 << 18)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        mine, _ = _encode(BIG)
        assert len(_pool_files(qdir)) == 2
        assert codec.reclaim_segments(process_alive) == []
        child.kill()
        child.wait()
        removed = codec.reclaim_segments(process_alive)
        assert len(removed) == 1 and f"pool-{child.pid}-" in removed[0]
        assert [n for n in _pool_files(qdir) if f"pool-{os.getpid()}-" in n]
        codec.discard(mine)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_pooled_segments_are_unlinked_at_exit(qdir: Path) -> None:
    code = (
        "import os, time\n"
        "from kservice import ServiceRequest\n"
        "from kservice.plugins.mmap import codec\n"
        "r = ServiceRequest('r', 's', 'm', (b'x' * (1 << 20),), {}, '', time.time() + 60, {})\n"
        "codec.decode(codec.encode_request(r, 'q', os.getpid(), 1 << 18)[0])\n"
        "assert [n for n in os.listdir(os.environ['KSERVICE_QUEUE_DIR']) if n.startswith('pool-')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=30)
    assert _pool_files(qdir) == []
