"""The fault suite on Ray: replicas killed and the service scaled up and down at random moments under load.

Callers in this process keep async calls of a non-idempotent method in
flight while replicas are killed (``ray.kill``, restarted by Ray) and the
service is grown and shrunk (planned changes). Checked against the ledger the
service writes, as in ``tests/faults/test_fault_suite.py``: no call ran twice,
every success ran exactly once, no error that claims the call never ran hides
a run, no caller waited past its deadline, and a planned change failed nothing.
``KSERVICE_FAULT_SOAK=SECONDS`` makes it a longer soak that prints its figures.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from kservice import ServiceEnvironment
from kservice.plugins.ray import RayServiceTask
from test_ray_replicas import fault_config

from tests.faults.ledger import check, outcome

SOAK_SECONDS = float(os.environ.get("KSERVICE_FAULT_SOAK", "0") or 0)
RUN_SECONDS = SOAK_SECONDS or 8.0
TIMEOUT = 3.0
WORK = (0.0, 0.001, 0.005, 0.02)


def _caller(manager: Any, tag: str, out_path: Path, stop: threading.Event) -> None:
    """Bursts of async calls until ``stop``; one outcome line per call."""
    rng = random.Random(tag)
    number = 0
    with open(out_path, "a", buffering=1) as out:
        while not stop.is_set():
            began = time.monotonic()
            burst = {}
            for _ in range(16):
                call_id = f"{tag}-{number}"
                number += 1
                burst[call_id] = manager.call_service_async(
                    "ledger", "record", (call_id, rng.choice(WORK)), timeout=TIMEOUT
                )
            failed = False
            for call_id, future in burst.items():
                try:
                    value = future.result()
                except Exception as exc:  # noqa: BLE001 - every typed error is an outcome to check
                    out.write(outcome(call_id, began, TIMEOUT, error=exc) + "\n")
                    failed = True
                else:
                    out.write(outcome(call_id, began, TIMEOUT, value=value) + "\n")
            if failed:
                time.sleep(0.01)  # deliberate: an open breaker answers at once, so do not spin


@pytest.mark.slow
@pytest.mark.timeout(RUN_SECONDS * 3 + 120)
def test_replica_kills_and_scaling_lose_no_answer_and_run_nothing_twice(ray_cluster: Any, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    rng = random.Random(os.environ.get("KSERVICE_FAULT_SEED", uuid.uuid4().hex))
    kills: collections.Counter[str] = collections.Counter()
    config = fault_config("ledger", "LedgerService", [str(ledger)], replicas=2, max_restarts=-1, breaker=True)
    outcomes = [tmp_path / f"r{i}.jsonl" for i in range(2)]
    with ServiceEnvironment("ray-fault-suite", config) as env:
        task = env.get_task("ledger")
        assert isinstance(task, RayServiceTask) and task.replica_set is not None
        with env.manager() as manager:
            stop = threading.Event()
            callers = [
                threading.Thread(target=_caller, args=(manager, f"r{i}", path, stop), name=f"fault-caller-{i}")
                for i, path in enumerate(outcomes)
            ]
            for caller in callers:
                caller.start()
            try:
                end = time.monotonic() + RUN_SECONDS
                # At least three faults, however slow the machine makes a scale (bounded: the timeout above).
                latest = time.monotonic() + 2 * RUN_SECONDS
                while time.monotonic() < end or (sum(kills.values()) < 3 and time.monotonic() < latest):
                    time.sleep(rng.uniform(0.5, 1.5))  # deliberate: the next fault strikes at a random moment
                    action = rng.choice(["replica kill", "scale up", "scale down"])
                    live = task.replica_set.snapshot()
                    if action == "replica kill" and len(live) > 1:
                        ray.kill(rng.choice(live).handle, no_restart=False)
                    elif action == "scale up" and len(live) < 3:
                        task.scale(len(live) + 1)
                    elif action == "scale down" and len(live) > 1:
                        task.scale(len(live) - 1)
                    else:
                        continue
                    kills[action] += 1
            finally:
                stop.set()
                for caller in callers:
                    caller.join(60)
    figures = check(ledger, outcomes, kills)
    report = figures.table(f"fault suite, ray ({RUN_SECONDS:.0f} s)")
    if SOAK_SECONDS:
        print("\n" + report)
    assert figures.calls > 200, report
    assert sum(kills.values()) >= 3, report
    assert not figures.violations(), "\n".join([*figures.violations(), report])
