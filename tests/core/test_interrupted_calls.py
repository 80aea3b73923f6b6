"""A sync call interrupted while it waits (Ctrl-C: KeyboardInterrupt) is cancelled, as a cancelled future is.

The request is queued behind a running one when the caller is interrupted;
before, it stayed queued and ran after the caller had given up (with the
default 30 s deadline, always), so a caller that tried again ran it twice.
The caller runs in a process of its own, which gets a real SIGINT.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import clean_environ

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

CALLER = """
import sys, time
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager
from tests.core.services import Recorder

kind = sys.argv[1]
config = {"service": {"local": {"max_workers": 1}}, "service_call": {"max_retries": 0}}
env = ServiceEnvironment("interrupted", config)
env.register_service("rec", ServiceFactory("rec", Recorder), kind=kind)
with env, ServiceManager(env) as manager:
    blocker = manager.call_service_async("rec", "work", ("blocker", 2.0))
    time.sleep(0.3)  # the blocker holds the only worker (asking would queue behind it)
    print("calling", flush=True)
    try:
        manager.call_service_sync("rec", "work", ("interrupted",), timeout=30)
        print("answered", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    blocker.result(10)
    time.sleep(0.5)  # a request left queued runs now, on the freed worker
    print("ran", manager.call_service_sync("rec", "ran", timeout=10), flush=True)
"""


@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_sync_call_interrupted_while_it_waits_in_the_queue_never_runs(kind: str) -> None:
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, kind],
        cwd=ROOT,
        env=clean_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert caller.stdout is not None
        first = caller.stdout.readline()
        assert first.strip() == "calling", first + caller.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.5)  # the call is queued behind the blocker
        caller.send_signal(signal.SIGINT)
        out, err = caller.communicate(timeout=60)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    lines = out.splitlines()
    assert lines[0] == "interrupted", out + err
    assert lines[1].startswith("ran "), out + err
    ran = ast.literal_eval(lines[1][len("ran ") :])
    assert ran[:2] == ["start blocker", "end blocker"]
    assert "start interrupted" not in ran, f"the interrupted call ran after its caller gave up: {ran}"
    assert caller.returncode == 0, err


TERMINAL_CALLER = """
import os, signal, time
from kservice import ServiceEnvironment, ServiceFactory, ServiceManager
from tests.core.services import Recorder

env = ServiceEnvironment("ctrl-c", {"service_call": {"max_retries": 0}})
env.register_service("rec", ServiceFactory("rec", Recorder), kind="process")
with env, ServiceManager(env) as manager:
    manager.call_service_sync("rec", "work", ("first",), timeout=30)
    running = manager.call_service_async("rec", "work", ("running", 1.0))
    time.sleep(0.3)
    try:
        os.killpg(0, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("running", running.result(10), flush=True)
    time.sleep(0.5)
    print("served by", manager.call_service_sync("rec", "ran", timeout=10), flush=True)
"""


def test_ctrl_c_in_the_callers_terminal_leaves_its_process_services_to_it() -> None:
    """A REPL user interrupting one call with Ctrl-C: the terminal sends SIGINT to the whole process group,
    and the hosts of the caller's ``process`` services stopped with it (every later call failed)."""
    caller = subprocess.Popen(
        [sys.executable, "-c", TERMINAL_CALLER],
        cwd=ROOT,
        env=clean_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        out, err = caller.communicate(timeout=90)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    # The same host served the call after the interrupt: its record holds the calls before it.
    expected = [
        "interrupted",
        "running running",
        "served by ['start first', 'end first', 'start running', 'end running']",
    ]
    assert out.splitlines() == expected, out + err
    assert caller.returncode == 0, err
