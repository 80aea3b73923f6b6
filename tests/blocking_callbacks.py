"""What every transport with one completing thread per process owes a caller whose done callback blocks it.

Used by the mmap and the Ray fault tests (each starts its own service with ``echo`` and ``sleep``).
"""

from __future__ import annotations

import threading
import time

import pytest
from kservice import ServiceManager, ServiceTimeoutError
from kservice.testing import wait_for


def check_a_blocking_done_callback_is_named(
    manager: ServiceManager, service: str, caplog: pytest.LogCaptureFixture, thread: str, within: float
) -> None:
    """A callback blocks ``thread`` for 1.5 s: another async call ends by its deadline (``within`` seconds of
    its start, not after the callback), the warning names the stall and what to do, and the service serves on."""
    release, blocking = threading.Event(), threading.Event()
    slow = manager.call_service_async(service, "sleep", (0.2,), timeout=30)
    # Added before the answer: the completing thread runs it.
    slow.add_done_callback(lambda _: blocking.set() or release.wait(1.5))
    assert blocking.wait(10)  # the answer came: the callback blocks the thread
    began = time.monotonic()
    with pytest.raises(ServiceTimeoutError):
        manager.call_service_async(service, "echo", (1,), timeout=0.5).result()
    assert time.monotonic() - began < within  # by its deadline, not after the callback
    wait_for(lambda: f"blocked {thread}" in caplog.text, timeout=10, what="the warning")
    assert "done callback" in caplog.text and "executor" in caplog.text, caplog.text
    assert manager.call_service_async(service, "echo", (2,), timeout=30).result() == 2
