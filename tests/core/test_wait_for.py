"""kservice.testing.wait_for: returns as soon as the state is reached, fails naming what never happened."""

from __future__ import annotations

import threading
import time

import pytest
from kservice.testing import WaitTimeoutError, wait_for

pytestmark = pytest.mark.timeout(30)


def test_returns_the_first_truthy_value_as_soon_as_it_comes() -> None:
    arrived = threading.Event()
    timer = threading.Timer(0.05, arrived.set)
    timer.start()
    began = time.monotonic()
    try:
        assert wait_for(lambda: arrived.is_set() and "landed", timeout=10, what="the event") == "landed"
    finally:
        timer.join()
    assert time.monotonic() - began < 5  # returned on the state, not at the timeout


def test_times_out_with_a_message_naming_what_and_the_last_value() -> None:
    queue = [1]
    with pytest.raises(
        WaitTimeoutError, match=r"timed out after 0.05s waiting for the queue to drain \(last value: False\)"
    ):
        wait_for(lambda: not queue, timeout=0.05, what="the queue to drain")
    # A test failure to pytest, a TimeoutError to code that catches that.
    assert issubclass(WaitTimeoutError, AssertionError) and issubclass(WaitTimeoutError, TimeoutError)


def test_an_exception_in_the_predicate_propagates_at_once() -> None:
    def broken() -> bool:
        raise KeyError("no such service")

    began = time.monotonic()
    with pytest.raises(KeyError):
        wait_for(broken, timeout=10)
    assert time.monotonic() - began < 5


def test_refuses_a_negative_timeout_or_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="timeout >= 0 and interval > 0"):
        wait_for(lambda: True, timeout=-1)
    with pytest.raises(ValueError, match="timeout >= 0 and interval > 0"):
        wait_for(lambda: True, interval=0)
