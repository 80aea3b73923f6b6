"""Many callers in many processes against one hosted service: every call answered once, with its own result."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from kservice.plugins.mmap.ring import queue_directory

from .services import child_env, hosting, unique

CLIENT = """
    import os, sys, threading
    from kservice import ServiceManager

    name, threads, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    errors = []
    answered = [0] * threads

    def run(t):
        try:
            for i in range(calls):
                token = (os.getpid(), t, i, "x" * (i % 50))
                if i % 2:
                    got = manager.call_service_sync(name, "echo", (token,), timeout=30)
                else:
                    got = manager.call_service_async(name, "echo", (token,), timeout=30).result(30)
                if got != token:
                    errors.append((token, got))
                answered[t] += 1
        except Exception as exc:
            errors.append(repr(exc))

    with ServiceManager() as manager:
        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    print(sum(answered), len(errors), errors[:3])
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_four_processes_of_four_threads_each_get_their_own_answers() -> None:
    name = unique("load")
    processes, threads, calls = 4, 4, 2000
    with hosting(f"{name}=tests.mmap.services:KV"):
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(CLIENT), name, str(threads), str(calls)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
            )
            for _ in range(processes)
        ]
        results = [client.communicate(timeout=150) for client in clients]
        pids = [client.pid for client in clients]
    for (out, err), client in zip(results, clients, strict=True):
        assert client.returncode == 0, err
        answered, errors, sample = out.split(" ", 2)
        assert int(answered) == threads * calls, (out, err)
        assert int(errors) == 0, sample
    # every client unlinked its response rings and nothing went out of band and stayed
    leftovers = [p.name for p in queue_directory().iterdir() if any(str(pid) in p.name for pid in pids)]
    assert leftovers == []
