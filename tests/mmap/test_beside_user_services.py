"""The test suite runs beside a user's own services: a ``kservice serve`` in the default directories is left alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.cli.helpers import KSERVICE, run_cli
from tests.mmap.services import REPO_ROOT
from tests.mmap.test_runtime_directory import default_environ

#: A handful of the hosting tests: they start hosts, kill them, and run the janitor.
SUBSET = (
    "test_serve_is_found_by_name_from_another_process or test_second_host_of_one_name_is_refused"
    " or test_stale_registry_record_is_ignored_and_removed or test_janitor_reclaims_what_a_killed_host_left"
    " or test_host_killed_mid_call_is_unavailable_fast or test_cli_lists_running_hosted_services"
)


def _files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in directory.iterdir()} if directory.is_dir() else {}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_nested_suite_passes_while_a_users_own_host_runs_in_the_default_directories() -> None:
    env = default_environ()  # the user's own environment: no KSERVICE_QUEUE_DIR / KSERVICE_REGISTRY_DIR
    name = f"users-own-{uuid.uuid4().hex[:8]}"
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kservice.plugins.mmap import ring, registry; print(ring.queue_directory(), registry.registry_directory())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    queues, records = map(Path, where.stdout.split())
    assert "-test-" not in queues.name  # really the default, not this session's
    host = subprocess.Popen(
        [KSERVICE, "serve", f"{name}=tests.mmap.services:KV"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith(f"serving {name}"), line + (
            host.stderr.read() if host.stderr and host.poll() is not None else ""
        )
        mine = {n: i for n, i in _files(queues).items() if f".{host.pid}." in n}
        assert mine, "the host's request ring is in the default queue directory"
        record = _files(records)[f"{name}.json"]

        nested = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/mmap/test_hosting.py",
                "-k",
                SUBSET,
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert nested.returncode == 0, nested.stdout[-4000:] + nested.stderr[-2000:]
        assert re.search(r"\b6 passed", nested.stdout), nested.stdout[-2000:]

        # The user's host and its files were not touched, and it still serves.
        assert host.poll() is None
        assert {n: i for n, i in _files(queues).items() if f".{host.pid}." in n} == mine
        assert _files(records).get(f"{name}.json") == record
        called = run_cli("call", name, "add", "[2, 3]", env=env)
        assert called.returncode == 0 and called.stdout.strip() == "5", called
    finally:
        host.send_signal(signal.SIGINT)
        try:
            assert host.wait(30) == 0
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
            for stream in (host.stdout, host.stderr):
                if stream is not None:
                    stream.close()
    assert not [n for n in _files(queues) if f".{host.pid}." in n]  # the host removed its own
    # Left empty, the default directories go with the last process using them (another process of
    # this user may still hold files there: then they stay).
    for directory in (queues, records):
        assert not os.path.isdir(directory) or os.listdir(directory), f"{directory} was left empty"
