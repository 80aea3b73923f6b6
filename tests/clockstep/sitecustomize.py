"""A wall clock the test steps: ``time.time`` and ``time.time_ns`` plus the offset in a shared file.

On ``PYTHONPATH`` with ``KSERVICE_TEST_CLOCK_FILE`` naming an 8-byte file (a
native double, seconds), every process started so (a caller, the service
hosts it starts) reads the same offset, so writing it is a step of the
system clock as they all see it: NTP stepping the clock, a virtual machine
resumed. Processes given different files see clocks that disagree (hosts of
a cluster whose clocks are skewed). The monotonic clock is untouched, as in
a real step. The clock is a boundary kservice does not own; nothing else is
changed.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

_path = os.environ.get("KSERVICE_TEST_CLOCK_FILE")
if _path:
    with open(_path, "r+b") as _file:
        _offset = mmap.mmap(_file.fileno(), 8)
    _unpack = struct.Struct("d").unpack_from
    _real_time, _real_time_ns = time.time, time.time_ns

    def _stepped_time() -> float:
        return _real_time() + _unpack(_offset)[0]

    def _stepped_time_ns() -> int:
        return _real_time_ns() + int(_unpack(_offset)[0] * 1e9)

    time.time = _stepped_time
    time.time_ns = _stepped_time_ns
