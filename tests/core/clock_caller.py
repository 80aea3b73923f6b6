"""A caller whose wall clock steps mid-call (run as ``python -m tests.core.clock_caller KIND CASE STEP FILE``).

Started with :func:`tests.clockstep.environ`, so that this process reads the
clock file FILE, and so does a ``kservice serve`` it starts. It serves
``tests.core.faulty:SlowAfterAWhile`` in KIND (``local``: an in-process
task; ``serve``: a ``kservice serve`` host, whose clock steps with the
caller's as on one machine), makes one call of CASE with a 2 s timeout,
steps the wall clock by STEP seconds 0.1 s after the call begins (while the
call waits), and prints ``{"elapsed": monotonic seconds the call took,
"error": its exception's type, "message": its message}``.

- ``retry``: a sync call whose first attempt fails after 0.3 s (its method
  is idempotent, so the default policy retries it) and whose retry hangs 4 s;
- ``async-retry``, ``map-retry``: the same call made with ``call_service_async``, and as a map's one item;
- ``hung-hook`` (``local`` only): an async call answered at once whose client
  ``after_call`` hangs 4 s (it ends "held by its middleware" 0.25 s after
  its deadline);
- ``stream``: a stream whose first item comes at once and whose second hangs 4 s.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceMiddleware

from tests.clockstep import step
from tests.core.faulty import SlowAfterAWhile
from tests.mmap.services import hosting, unique

TIMEOUT = 2.0
STEP_AFTER = 0.1
HANG = 4.0  # past the timeout and its slack in the test, so that a wait to the end is seen


class _HangsAfterQuick(ServiceMiddleware):
    """A client middleware whose ``after_call`` of ``quick`` blocks (a hook waiting on an endpoint that stopped answering)."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def after_call(self, response: Any, request: Any) -> Any:
        if request.method_name == "quick":
            self.released.wait(HANG)
        return None


@contextlib.contextmanager
def _serving(kind: str, hook: ServiceMiddleware) -> Iterator[tuple[str, ServiceManager]]:
    if kind == "serve":
        name = unique("slow")
        with hosting(f"{name}=tests.core.faulty:SlowAfterAWhile"), ServiceManager() as manager:
            yield name, manager
        return
    with ServiceEnvironment("clock") as environment:
        environment.add_middleware(hook)
        environment.register_service("slow", ServiceFactory("slow", SlowAfterAWhile), kind=kind)
        with ServiceManager(environment) as manager:
            yield "slow", manager


def main(kind: str, case: str, offset: float, clock: Path) -> None:
    outcome: dict[str, object] = {"error": None, "message": ""}
    hook = _HangsAfterQuick()
    with _serving(kind, hook) as (name, manager):
        stepper = threading.Timer(STEP_AFTER, step, (clock, offset))
        began = time.monotonic()
        stepper.start()
        try:
            if case == "retry":
                manager.call_service_sync(name, "fails_then_hangs", (0.3, HANG), timeout=TIMEOUT)
            elif case == "async-retry":
                manager.call_service_async(name, "fails_then_hangs", (0.3, HANG), timeout=TIMEOUT).result()
            elif case == "hung-hook":
                manager.call_service_async(name, "quick", timeout=TIMEOUT).result()
            elif case == "map-retry":
                list(manager.map(name, "fails_then_hangs", [(0.3, HANG)], timeout=TIMEOUT))
            else:
                for _ in manager.stream(name, "one_then_hangs", (HANG,), timeout=TIMEOUT):
                    pass
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome.update(error=type(exc).__name__, message=str(exc))
        outcome["elapsed"] = time.monotonic() - began
        stepper.join()
        step(clock, 0.0)  # the stop waits by the clock as it reads now
        hook.released.set()
        manager.call_service_sync(name, "release", timeout=30)
    print(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]))
