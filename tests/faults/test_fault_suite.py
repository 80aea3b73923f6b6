"""The fault suite: hosts and callers killed at random moments under load, checked against the service's ledger.

A ``kservice serve`` host of a non-idempotent service is killed (SIGKILL),
drained (SIGTERM) and restarted under the same name while caller processes
make sync calls and bursts of async calls with the default configuration
(retry policy and circuit breaker included);
callers are killed and replaced too. Afterwards every call is checked:

- no call ran twice (every method here is non-idempotent);
- every success ran exactly once and returned its own value;
- no error that claims the call never ran hides a run;
- no caller waited past its deadline (plus a slack for a loaded machine);
- nothing leaked (the suite's ``no_leaks`` guard: processes, segments).

``KSERVICE_FAULT_SOAK=SECONDS`` makes it a longer soak that prints its figures
(``make soak``).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.faults.ledger import LEDGER_VARIABLE, check
from tests.mmap.services import child_env

SOAK_SECONDS = float(os.environ.get("KSERVICE_FAULT_SOAK", "0") or 0)
RUN_SECONDS = SOAK_SECONDS or 10.0
CALLERS = 2


class _Fleet:
    """The host and caller processes of one run, and what was done to them."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"ledger-{uuid.uuid4().hex[:8]}"
        self.ledger = tmp_path / "ledger.txt"
        self.tmp_path = tmp_path
        # Callers run with the default configuration, breaker included: its cool-down does not keep them
        # off a restarted host (an open breaker probes a new host at once), so most calls reach a host.
        self.env = {**child_env(), LEDGER_VARIABLE: str(self.ledger)}
        self.host: subprocess.Popen[str] | None = None
        self.callers: list[subprocess.Popen[bytes]] = []
        self.outcomes: list[Path] = []
        self.kills: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(os.environ.get("KSERVICE_FAULT_SEED", uuid.uuid4().hex))

    def start_host(self) -> None:
        self.host = subprocess.Popen(
            [sys.executable, "-m", "kservice.cli", "serve", f"{self.name}=tests.faults.ledger:Ledger"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env,
            text=True,
        )
        assert self.host.stdout is not None
        line = self.host.stdout.readline()
        assert line.startswith("serving "), f"host did not start: {line!r} (exit {self.host.poll()})"

    def stop_host(self, sig: int, wait: float = 20.0) -> None:
        host = self.host
        if host is None:
            return
        self.host = None
        if host.poll() is None:
            host.send_signal(sig)
        try:
            host.wait(wait)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
            pytest.fail(f"host {host.pid} did not stop within {wait} s of signal {sig}")
        finally:
            assert host.stdout is not None
            host.stdout.close()

    def start_caller(self, seconds: float) -> None:
        tag = f"c{len(self.outcomes)}"
        path = self.tmp_path / f"{tag}.jsonl"
        self.outcomes.append(path)
        self.callers.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.faults.caller", self.name, tag, str(path), str(seconds)],
                env=self.env,
                stderr=subprocess.DEVNULL,
            )
        )

    def kill_a_caller(self, seconds_left: float) -> None:
        live = [c for c in self.callers if c.poll() is None]
        if not live:
            return
        victim = self.rng.choice(live)
        victim.kill()
        victim.wait()
        self.kills["caller SIGKILL"] += 1
        self.start_caller(seconds_left)

    def close(self) -> None:
        for caller in self.callers:
            if caller.poll() is None:
                caller.kill()
            caller.wait()
        self.stop_host(signal.SIGTERM)


def _reclaim_leftovers(env: dict[str, str]) -> None:
    """What killed processes left in the session's directories is reclaimed by the next kservice process."""
    subprocess.run(
        [sys.executable, "-m", "kservice.cli", "services", "--running"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(RUN_SECONDS * 3 + 90)
def test_no_call_runs_twice_no_answer_is_lost_no_caller_waits_past_its_deadline(tmp_path: Path) -> None:
    fleet = _Fleet(tmp_path)
    try:
        fleet.start_host()
        for _ in range(CALLERS):
            fleet.start_caller(RUN_SECONDS)
        end = time.monotonic() + RUN_SECONDS
        while time.monotonic() < end - 1.0:
            time.sleep(fleet.rng.uniform(0.4, 1.2))  # deliberate: the next fault strikes at a random moment
            host_faults = fleet.kills["host SIGKILL"] + fleet.kills["host SIGTERM"]
            # The first three faults strike the host (the run must see at least three, however slow a
            # restart is on a loaded machine); then callers too.
            choices = ["host SIGKILL", "host SIGKILL", "host SIGTERM"] + (
                ["caller SIGKILL"] if host_faults >= 3 else []
            )
            action = fleet.rng.choice(choices)
            if action == "caller SIGKILL":
                fleet.kill_a_caller(max(1.0, end - time.monotonic()))
                continue
            fleet.stop_host(signal.SIGKILL if action == "host SIGKILL" else signal.SIGTERM)
            fleet.kills[action] += 1
            time.sleep(fleet.rng.uniform(0.05, 0.4))  # deliberate: a random gap in which no host serves the name
            fleet.start_host()
        for caller in fleet.callers:
            caller.wait(RUN_SECONDS + 30)
    finally:
        fleet.close()
        _reclaim_leftovers(fleet.env)
    figures = check(fleet.ledger, fleet.outcomes, fleet.kills)
    report = figures.table(f"fault suite, mmap ({RUN_SECONDS:.0f} s, {len(fleet.outcomes)} callers)")
    if SOAK_SECONDS:
        print("\n" + report)
    assert figures.calls > 100, report  # the run really made calls
    assert figures.kills["host SIGKILL"] + figures.kills["host SIGTERM"] >= 3, report
    assert not figures.violations(), "\n".join([*figures.violations(), report])
