"""A caller process for the fault suite: ``python -m tests.faults.caller SERVICE TAG OUTCOMES SECONDS``.

Makes sync calls and bursts of async calls to ``SERVICE.record`` until
SECONDS have passed, with the default retry policy, and appends one outcome
line per finished call to OUTCOMES (see :mod:`tests.faults.ledger`). A call in
flight when this process is killed leaves no line: for it only "at most once"
is checked.
"""

from __future__ import annotations

import random
import sys
import time

from kservice import ServiceManager

from tests.faults.ledger import outcome

#: how long the service works on a call (0: answers at once)
WORK = (0.0, 0.0, 0.0, 0.001, 0.01, 0.1)
SYNC_TIMEOUT = 1.0
ASYNC_TIMEOUT = 1.5
BURST = 8


def main(service: str, tag: str, outcomes_path: str, seconds: float) -> None:
    rng = random.Random(tag)
    end = time.monotonic() + seconds
    number = 0
    with open(outcomes_path, "a", buffering=1) as out, ServiceManager() as manager:
        while time.monotonic() < end:
            if rng.random() < 0.5:
                call_id = f"{tag}-{number}"
                number += 1
                began = time.monotonic()
                try:
                    value = manager.call_service_sync(
                        service, "record", (call_id, rng.choice(WORK)), timeout=SYNC_TIMEOUT
                    )
                except Exception as exc:  # noqa: BLE001 - every typed error is an outcome to check
                    out.write(outcome(call_id, began, SYNC_TIMEOUT, error=exc) + "\n")
                    time.sleep(0.01)  # deliberate: a host that is down answers at once, so do not spin
                else:
                    out.write(outcome(call_id, began, SYNC_TIMEOUT, value=value) + "\n")
                continue
            began = time.monotonic()
            burst = {}
            failed = False
            for _ in range(BURST):
                call_id = f"{tag}-{number}"
                number += 1
                try:
                    burst[call_id] = manager.call_service_async(
                        service, "record", (call_id, rng.choice(WORK)), timeout=ASYNC_TIMEOUT
                    )
                except Exception as exc:  # noqa: BLE001 - refused before it was sent (no such service)
                    out.write(outcome(call_id, began, ASYNC_TIMEOUT, error=exc) + "\n")
                    failed = True
            for call_id, future in burst.items():
                try:
                    value = future.result()
                except Exception as exc:  # noqa: BLE001
                    out.write(outcome(call_id, began, ASYNC_TIMEOUT, error=exc) + "\n")
                    failed = True
                else:
                    out.write(outcome(call_id, began, ASYNC_TIMEOUT, value=value) + "\n")
            if failed:
                time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
