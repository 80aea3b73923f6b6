"""A step of the wall clock (NTP, a virtual machine resumed) while calls wait.

Deadlines travel as wall-clock times (``ServiceRequest.deadline``), but no
caller may wait past its timeout, or give up before it, because the clock
was set while it waited. Each case runs in a child process whose wall clock,
and its service hosts', follows a clock file the child steps mid-call
(``tests/clockstep``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clockstep import clock_file, environ
from tests.conftest import clean_environ

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0  # tests.core.clock_caller.TIMEOUT


def _call_across_a_step(kind: str, case: str, offset: float, tmp_path: Path) -> dict[str, object]:
    clock = clock_file(tmp_path / "clock")
    done = subprocess.run(
        [sys.executable, "-m", "tests.core.clock_caller", kind, case, str(offset), str(clock)],
        env=environ(clean_environ(), clock, str(ROOT)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


CASES = [
    (kind, case)
    for case in ("retry", "async-retry", "map-retry", "stream", "hung-hook")
    for kind in ("local", "serve")
    if not (case == "hung-hook" and kind == "serve")  # the serve's caller has no environment to add middleware to
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offset", [-5.0, 5.0], ids=["back", "forward"])
@pytest.mark.parametrize(("kind", "case"), CASES, ids=[f"{kind}-{case}" for kind, case in CASES])
def test_a_call_waiting_across_a_step_of_the_wall_clock_ends_at_its_own_timeout(
    kind: str, case: str, offset: float, tmp_path: Path
) -> None:
    """Before: a sync call retried after the clock stepped back 5 s, or a stream waiting for its next item,
    waited 7 s for its 2 s timeout; stepped forward, a sync or async call's retry was given up at once (its
    deadline looked passed: the first attempt's error after 0.3 s) and a stream ended after 0.1 s; stepped
    back, an async call whose after-hook hung waited for the hook (4 s) instead of ending 0.25 s after its
    deadline. The call's deadline is now read from the monotonic clock while the caller waits, and re-read
    from it for each attempt it sends."""
    outcome = _call_across_a_step(kind, case, offset, tmp_path)
    assert outcome["error"] == "ServiceTimeoutError", outcome
    elapsed = outcome["elapsed"]
    assert isinstance(elapsed, float)
    assert TIMEOUT - 0.1 <= elapsed <= TIMEOUT + 1.5, f"a {TIMEOUT} s call ended after {elapsed:.2f} s"
