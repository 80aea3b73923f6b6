"""Run inside a private mount namespace (``unshare``) by test_shm_faults: a 3 MiB tmpfs holds the queues.

Prints one line per check, ``name: outcome``; a SIGBUS kills it instead (what a
sparse ring on a full tmpfs did).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

directory = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", directory], check=True)
os.environ["KSERVICE_QUEUE_DIR"] = os.path.join(directory, "queues")
os.environ["KSERVICE_REGISTRY_DIR"] = os.path.join(directory, "registry")

from kservice import ServiceEnvironment, ServiceFactory, ServiceManager, ServiceUnavailableError  # noqa: E402
from kservice.plugins.mmap.ring import QueueFull, create_queue  # noqa: E402

from tests.mmap.services import KV  # noqa: E402


def report(name: str, outcome: str) -> None:
    print(f"{name}: {outcome}", flush=True)


# 1. A ring larger than the filesystem: an error at creation, never a signal when it fills.
try:
    ring = create_queue("too-big", 6 << 20)
except OSError as exc:
    report("big ring", f"{type(exc).__name__}: {exc}")
else:
    record = b"x" * 60000
    try:
        while True:
            ring.put(record, 0)
    except QueueFull:
        report("big ring", "filled without an error")
    ring.close()
    ring.unlink()

# 2. A whole call whose argument needs an out-of-band segment the filesystem cannot hold.
CONFIG = {"service_call": {"max_retries": 0}, "breaker": {"enabled": False}}
env = ServiceEnvironment("shm-full", CONFIG)
env.register_service("kv", ServiceFactory("kv", KV), transports=["mmap"], mmap={"request_queue_capacity": 256 << 10})
env.start()
try:
    with ServiceManager(config=CONFIG) as outsider:  # over mmap, found through the registry
        report("small call", repr(outsider.call_service_sync("kv", "echo", (1,), timeout=10)))
        started = time.monotonic()
        try:
            outsider.call_service_sync("kv", "size", (b"y" * (1900 << 10),), timeout=10)
            report("big call", "succeeded")
        except ServiceUnavailableError as exc:
            report("big call", f"{type(exc).__name__} after {time.monotonic() - started:.1f}s: {exc}")
        report("next call", repr(outsider.call_service_sync("kv", "echo", (2,), timeout=10)))
finally:
    env.stop()
