"""A replica whose machine's wall clock disagrees with its caller's (NTP broken on a node, a resumed virtual machine).

The caller here is a second driver whose wall clock is set ``SKEW`` seconds
off the cluster's (``tests/clockstep``). Deadlines travel as wall-clock
times; the replica now reads each on its own clock, from the caller's clock
when it sent the call (wire version 4).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kservice import ServiceEnvironment, ServiceManager
from ray_services import quiet_config, without_breaker

from tests.clockstep import clock_file, environ
from tests.conftest import clean_environ

TIMEOUT = 5.0
SKEW = 30.0

#: the second driver: calls each service's ``remaining`` in every form; prints what the methods saw, or the error
_CALLER = """
import json
import time
import ray
from kservice import ServiceManager

ray.init(address={address!r}, log_to_driver=False)
seen = {{}}
with ServiceManager() as manager:
    for name in ("clocks", "aclocks"):
        forms = {{
            "sync": lambda: [manager.call_service_sync(name, "remaining", timeout={timeout})],
            "async": lambda: [manager.call_service_async(name, "remaining", timeout={timeout}).result()],
            "map": lambda: list(manager.map(name, "remaining", [(), (), ()], timeout={timeout})),
            "stream": lambda: list(manager.stream(name, "remaining_items", (2,), timeout={timeout})),
        }}
        for form, call in forms.items():
            try:
                seen[f"{{name}} {{form}}"] = call()
            except Exception as exc:
                seen[f"{{name}} {{form}}"] = f"{{type(exc).__name__}}: {{exc}}"
    # The status says until when the replicas' running calls are awaited (the health monitor's "busy, not
    # stuck"): read on this driver's clock, that is within the call's timeout from now.
    held = manager.call_service_async("aclocks", "hold", (2.0,), timeout={timeout})
    time.sleep(0.5)
    until = manager.get_service_status("aclocks").get("running_until")
    seen["status"] = [until - time.time()] if isinstance(until, float) else f"running_until: {{until!r}}"
    held.result()
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def env(ray_cluster: Any) -> Iterator[ServiceEnvironment]:
    config = quiet_config(
        {
            "clocks": {"class": "ray_services:Clocks", "kind": "ray"},
            "aclocks": {"class": "aio_ray_services:AsyncClocks", "kind": "ray"},
            # One call at a time: a map's chunk leaves as one batch, whose calls the replica runs in turn.
            "napper": {
                "class": "ray_services:Napper",
                "kind": "ray",
                "ray": {"max_concurrency": 1},
                **without_breaker(),  # the timeouts are the point
            },
        }
    )
    config["service_call"] = {"max_retries": 0}
    environment = ServiceEnvironment("ray-clock-skew", config)
    with environment:  # started, and stopped after the module's tests
        yield environment


@pytest.mark.timeout(180)
@pytest.mark.parametrize("skew", [-SKEW, SKEW], ids=["caller-behind", "caller-ahead"])
def test_a_replica_gives_each_call_its_callers_timeout_whatever_the_clocks_skew(
    skew: float, env: ServiceEnvironment, ray_cluster: Any, tmp_path: Path
) -> None:
    """Before: with the caller's clock 30 s behind the replica's, every call, map and stream failed at once
    "passed its deadline (28 s ago) before it started; it did not run"; 30 s ahead, the method saw 35 s left
    of a 5 s call (and a nested call inherited them). Sync and async replicas, every call form; and the
    deployment's status, read by that caller, says until when its running call is awaited on the caller's
    clock."""
    clock = clock_file(tmp_path / "clock", skew)
    script = textwrap.dedent(_CALLER.format(address=ray_cluster.address, timeout=TIMEOUT))
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environ(clean_environ(), clock),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) == 9, seen
    for form, remaining in seen.items():
        assert isinstance(remaining, list), f"{form}: {remaining}"
        assert all(0 < left <= TIMEOUT for left in remaining), f"{form}: {remaining} s left of a {TIMEOUT} s call"


@pytest.mark.timeout(120)
def test_the_calls_of_a_batch_share_one_deadline_on_the_replica(env: ServiceEnvironment) -> None:
    """A map's calls travel to a replica as one batch and run there in turn, all by one deadline: each call
    sees the time the calls before it took gone. (A deadline read on the replica's clock is read once, on the
    batch's arrival: read as each call started, every call saw the whole timeout, and the replica would start
    a call after its caller had given up.)"""
    with ServiceManager(env) as manager:
        left = list(manager.map("napper", "nap", [(0.3,)] * 4, timeout=10.0))
    assert all(isinstance(seconds, float) for seconds in left), left
    assert left == sorted(left, reverse=True) and left[0] - left[-1] > 0.6, f"left after each 0.3 s nap: {left}"
