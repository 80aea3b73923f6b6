"""Shared-memory faults: a full tmpfs is an error, never SIGBUS; a host whose ring is damaged still stops.

The full tmpfs is real: a 3 MiB tmpfs mounted in a private mount namespace
(``unshare``), so nothing outside the child process sees it and it vanishes
with the child. The corruption is what a process of the same user could do:
overwrite the ring's lock word, or its whole header after the static part.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kservice.plugins.mmap.ring import _OFF_CLOSED, _OFF_MUTEX, HEADER_SIZE, queue_directory

from .services import REPO_ROOT, Host, child_env, unique

pytestmark = pytest.mark.timeout(120)


def _private_mounts_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _private_mounts_work(), reason="needs unshare(1) and user/mount namespaces to mount a small tmpfs"
)
def test_a_full_tmpfs_is_an_error_naming_the_directory_and_the_size_never_a_sigbus() -> None:
    with tempfile.TemporaryDirectory() as mountpoint:
        child = subprocess.run(
            ["unshare", "-rm", sys.executable, "-m", "tests.mmap._shm_full_child", mountpoint],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=REPO_ROOT,
            timeout=90,
        )
    assert child.returncode == 0, f"status {child.returncode} (-7 is SIGBUS)\n{child.stdout}\n{child.stderr}"
    lines = dict(line.split(": ", 1) for line in child.stdout.splitlines() if ": " in line)
    queues = f"{mountpoint}/queues"
    big_ring = lines["big ring"]
    assert big_ring.startswith("SharedMemoryFull") and queues in big_ring and "6295552 bytes" in big_ring, big_ring
    big_call = lines["big call"]
    assert big_call.startswith("ServiceUnavailableError") and queues in big_call, big_call
    assert "out-of-band segment of 1945600 bytes" in big_call and "nothing was sent" in big_call, big_call
    assert lines["small call"] == "1" and lines["next call"] == "2"


def _damage(queue_name: str, offset: int, data: bytes) -> None:
    with open(queue_directory() / f"{queue_name}.q", "r+b") as f:
        f.seek(offset)
        f.write(data)


#: A lock word naming a thread that cannot exist (beyond the kernel's largest pid), never unlocked.
HELD_BY_NOBODY = (0x0FFFFFF0).to_bytes(4, "little")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param((_OFF_MUTEX, HELD_BY_NOBODY), id="lock-word"),
        pytest.param((_OFF_CLOSED, b"\xa5" * (HEADER_SIZE - _OFF_CLOSED)), id="whole-header"),
    ],
)
def test_a_host_whose_request_ring_is_damaged_stops_on_sigterm_and_names_the_ring(damage: tuple[int, bytes]) -> None:
    name = unique("damaged")
    host = Host(f"{name}=tests.mmap.services:KV")
    queue = ""
    try:
        host.wait_ready()
        queue = host.lines[-1].split(" on mmap queue ")[1].split()[0]
        offset, data = damage
        _damage(queue, offset, data)
        time.sleep(1.5)  # the listener wakes from its wait slice and meets the damage
        host.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            status = host.process.wait(25)
        except subprocess.TimeoutExpired:
            pytest.fail("a SIGTERM did not stop the host within 25 s of its ring being damaged")
        assert status == 0
        assert time.monotonic() - started < 25
        if offset == _OFF_MUTEX:
            stderr = host.stderr()
            assert queue in stderr and "lock" in stderr, stderr
    finally:
        host.stop()
        if queue:  # a host killed by the test's bound leaves its ring behind
            for leftover in Path(queue_directory()).glob(f"{queue}.q"):
                leftover.unlink()
