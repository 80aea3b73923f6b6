"""``kservice serve`` hosts, discovery through the registry, and crash safety, with real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from kservice import ServiceManager, ServiceNotFoundError, ServiceUnavailableError
from kservice.plugins.mmap import reclaim, registry, running_services
from kservice.plugins.mmap.ring import queue_directory
from kservice.testing import wait_for

from .services import Host, child_env, hosting, unique

pytestmark = pytest.mark.timeout(90)

NO_RETRIES = {"service_call": {"max_retries": 0}}


def _files_of(pid: int) -> list[str]:
    """Queue, segment and registry files that name ``pid``."""
    found = [p.name for p in queue_directory().iterdir() if f".{pid}." in p.name or f"-{pid}-" in p.name]
    for path in registry.registry_directory().iterdir():
        try:
            if json.loads(path.read_text()).get("pid") == pid:
                found.append(path.name)
        except (OSError, ValueError):
            pass
    return found


def _run_client(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=child_env(), timeout=timeout
    )


def test_serve_is_found_by_name_from_another_process() -> None:
    name = unique("kv")
    with hosting(f"{name}=tests.mmap.services:KV") as host:
        assert f"serving {name} on mmap queue svc." in host.lines[0]
        client = _run_client(
            f"""
            import os
            from kservice import ServiceManager
            with ServiceManager() as m:
                m.call_service_sync({name!r}, "put", ("k", "v"))
                print(m.call_service_sync({name!r}, "get", ("k",)), m.call_service_sync({name!r}, "pid"), os.getpid())
            """
        )
        assert client.returncode == 0, client.stderr
        value, served_by, client_pid = client.stdout.split()
        assert value == "v" and int(served_by) == host.pid and int(client_pid) != host.pid
        assert name in ServiceManager().known_services()
        assert any(r["name"] == name and r["pid"] == host.pid for r in running_services())
        # the CLI sees it too
        listed = subprocess.run(
            [sys.executable, "-m", "kservice.cli", "call", name, "get", '["k"]'],
            capture_output=True,
            text=True,
            env=child_env(),
        )
        assert listed.stdout.strip() == '"v"', listed.stderr


def test_second_host_of_one_name_is_refused() -> None:
    name = unique("kv")
    with hosting(f"{name}=tests.mmap.services:KV") as first:
        second = Host(f"{name}=tests.mmap.services:KV")
        assert second.process.wait(30) == 1
        err = second.stderr()
        second.stop()
        assert f"already served on this host by pid {first.pid}" in err
        with ServiceManager() as manager:
            assert manager.call_service_sync(name, "pid") == first.pid


def test_stale_registry_record_is_ignored_and_removed() -> None:
    name = unique("stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = registry.registry_directory() / f"{name}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"name": name, "queue": f"svc.{name}.{dead.pid}.000000", "pid": dead.pid}, f)
    with ServiceManager() as manager, pytest.raises(ServiceNotFoundError):
        manager.call_service_sync(name, "get", ("a",))
    assert not path.exists()
    # and a new host can take the name
    with hosting(f"{name}=tests.mmap.services:KV") as host, ServiceManager() as manager:
        assert manager.call_service_sync(name, "pid") == host.pid


@pytest.mark.parametrize(
    "damage",
    [{"pid_start": "yesterday"}, {"pid_start": [1]}, {"pid_start_ticks": "soon"}, {"pid": True}],
)
def test_a_damaged_registry_record_is_no_record_and_hides_no_other_service(damage: dict[str, Any]) -> None:
    """A record whose fields are of the wrong type (damaged on disk, edited by hand, written by another
    program). Before, reading its liveness raised: ``kservice serve`` of any name died at its start (its
    janitor read every record), a call by that name failed PluginError naming the mmap plugin, and every
    listing of running services (``kservice services --running``, ``status``, the dashboard) lost all of
    them. Now it is no record: its name is not found, the others are served and listed."""
    name, damaged = unique("kv"), unique("damaged")
    path = registry.registry_directory() / f"{damaged}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"name": damaged, "queue": f"svc.{damaged}.1.000000", "pid": 1, "pid_start": 0.0, **damage}, f)
    try:
        with hosting(f"{name}=tests.mmap.services:KV") as host:
            assert name in [record["name"] for record in running_services()]
            with ServiceManager() as manager:
                assert manager.call_service_sync(name, "pid") == host.pid
                assert name in manager.known_services()
                with pytest.raises(ServiceNotFoundError):
                    manager.call_service_sync(damaged, "pid", timeout=5)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("step", [3.0, -3.0])
def test_a_live_hosts_record_survives_a_step_of_the_wall_clock(step: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a host's liveness was its start time in wall-clock seconds (the kernel's boot time plus its start
    tick), so a step of the clock by more than half a second (NTP, a virtual machine resumed) made every
    process judge every running host dead: looking a name up removed the live host's record, and calls by name
    failed ServiceNotFoundError while the host ran. Seen beside a user's own ``kservice serve``."""
    name = unique("clock")
    with hosting(f"{name}=tests.mmap.services:KV") as host:
        path = registry.registry_directory() / f"{name}.json"
        assert path.exists()
        # The kernel's boot time as this process reads it after the step (a boundary kservice does not own).
        booted = registry._boot_time()
        assert booted is not None
        monkeypatch.setattr(registry, "_boot_time", lambda: booted + step)
        assert registry.lookup(name) is not None, "the live host was taken for dead"
        assert name in [record["name"] for record in registry.running_services()]
        assert name not in reclaim()["records"]
        assert path.exists()
        with ServiceManager() as manager:
            assert manager.call_service_sync(name, "pid") == host.pid


def test_the_janitor_and_the_listing_take_a_directory_removed_under_them_for_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process of the user removes a directory it emptied when it exits (see ring.locked_directory).

    Before: one removed between finding the directory and reading it made ``reclaim()`` raise
    FileNotFoundError, and ``kservice serve`` (which reclaims first) died with a traceback; seen when a
    ``kservice config show`` exited beside a starting ``kservice serve``. Here the removal happens
    exactly there: each directory is made, then removed, as it is found.
    """
    from kservice.plugins.mmap import codec

    def found_then_removed(find: Any) -> Any:
        def find_and_lose(*args: Any, **kwargs: Any) -> Path:
            gone = tmp_path / f"gone-{find.__name__}"
            gone.mkdir(mode=0o700)
            gone.rmdir()
            return gone

        return find_and_lose

    monkeypatch.setattr(codec, "queue_directory", found_then_removed(codec.queue_directory))
    monkeypatch.setattr(registry, "registry_directory", found_then_removed(registry.registry_directory))
    assert codec.reclaim_segments(lambda pid: True) == []
    assert registry.reclaim_records() == []
    assert registry.running_services() == []


def test_janitor_reclaims_what_a_killed_host_left() -> None:
    name = unique("killed")
    host = Host(f"{name}=tests.mmap.services:KV")
    host.wait_ready()
    with ServiceManager() as manager:
        assert manager.call_service_sync(name, "make_bytes", (1 << 20,)) == b"\x07" * (1 << 20)
    # a segment addressed to the host that it will never read
    segment = queue_directory() / f"oob-{os.getpid()}-{host.pid}-0123456789abcdef.seg"
    fd = os.open(segment, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    host.process.kill()
    host.stop()
    assert _files_of(host.pid)
    removed = reclaim()
    assert any(name == r for r in removed["records"])
    assert any(str(host.pid) in q for q in removed["queues"])
    assert segment.name in removed["segments"]
    assert not _files_of(host.pid)


def test_host_killed_mid_call_is_unavailable_fast() -> None:
    name = unique("victim")
    host = Host(f"{name}=tests.mmap.services:KV")
    try:
        host.wait_ready()
        with ServiceManager(config=NO_RETRIES) as manager:
            manager.call_service_sync(name, "echo", (1,))
            threading.Timer(0.3, host.process.kill).start()
            started = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="died"):
                manager.call_service_sync(name, "sleep", (20,), timeout=30)
            assert time.monotonic() - started < 2.5
    finally:
        host.stop()
        reclaim()


def test_async_calls_to_a_killed_host_are_unavailable_fast() -> None:
    name = unique("victim")
    host = Host(f"{name}=tests.mmap.services:KV")
    try:
        host.wait_ready()
        with ServiceManager(config=NO_RETRIES) as manager:
            futures = [manager.call_service_async(name, "sleep", (20,), timeout=30) for _ in range(3)]
            wait_for(lambda: manager.get_service_status(name)["in_flight"] >= 1, what="a call running in the host")
            host.process.kill()
            started = time.monotonic()
            for future in futures:
                with pytest.raises(ServiceUnavailableError):
                    future.result(10)
            assert time.monotonic() - started < 2.5
    finally:
        host.stop()
        reclaim()


def test_client_killed_mid_call_leaves_the_service_serving() -> None:
    name = unique("survivor")
    with hosting(f"{name}=tests.mmap.services:KV") as host:
        code = (
            "from kservice import ServiceManager\n"
            "m = ServiceManager()\n"
            f"m.call_service_sync({name!r}, 'echo', (1,))\n"
            "print('calling', flush=True)\n"
            f"m.call_service_sync({name!r}, 'sleep', (1.0,))\n"
        )
        client = subprocess.Popen([sys.executable, "-c", code], env=child_env(), stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "calling"
        with ServiceManager() as manager:
            wait_for(lambda: manager.get_service_status(name)["in_flight"] >= 1, what="the client's call to run")
            assert any(f".{client.pid}." in p.name for p in queue_directory().iterdir())  # its response ring
            client.kill()
            client.wait()
            client.stdout.close()
            assert manager.call_service_sync(name, "add", (2, 2)) == 4
            # the dead client's call ends and its response is dropped
            wait_for(lambda: manager.get_service_status(name)["in_flight"] == 0, what="the dead client's call to end")
            assert manager.call_service_sync(name, "add", (3, 3)) == 6
        reclaim()
        assert not _files_of(client.pid)
        assert host.process.poll() is None


def test_sigterm_drains_in_flight_calls_then_exits_cleanly() -> None:
    name = unique("drain")
    host = Host(f"{name}=tests.mmap.services:KV")
    host.wait_ready()
    with ServiceManager(config=NO_RETRIES) as manager:
        manager.call_service_sync(name, "echo", (1,))
        slow = manager.call_service_async(name, "sleep", (1.0,), timeout=10)
        wait_for(lambda: manager.get_service_status(name)["in_flight"] >= 1, what="the slow call to run")
        host.process.send_signal(signal.SIGTERM)
        assert slow.result(10) == 1.0
        assert host.process.wait(10) == 0
        with pytest.raises((ServiceUnavailableError, ServiceNotFoundError)):
            manager.call_service_sync(name, "echo", (2,), timeout=5)
    host.stop()
    assert not _files_of(host.pid)


def test_process_task_child_stops_when_its_parent_dies() -> None:
    script = """
        import os, sys, time
        from kservice import ServiceEnvironment, ServiceFactory
        from tests.mmap.services import KV
        env = ServiceEnvironment("orphan")
        env.register_service("kv", ServiceFactory("kv", KV), kind="process")
        env.start()
        print(env.get_task("kv").pid, flush=True)
        time.sleep(60)
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    parent.stdout.close()
    psutil.Process(child).wait(10)  # it noticed EOF on its stdin and drained
    assert not _files_of(child)
    reclaim()


def test_process_task_child_exits_when_its_parent_dies_while_the_services_setup_runs(tmp_path: Path) -> None:
    # Before: the host watched its parent only once serving; a setup that did not return kept it for good.
    script = """
        from kservice import ServiceEnvironment, ServiceFactory
        from tests.mmap.services import SlowSetup
        env = ServiceEnvironment("orphan-starting")
        env.register_service("slow", ServiceFactory("slow", SlowSetup), kind="process")
        env.start()
    """
    pid_file = tmp_path / "setup.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], env={**child_env(), "KSERVICE_TEST_SETUP_PID": str(pid_file)}
    )
    try:
        wait_for(pid_file.exists, timeout=30, what="the host to run the service's setup")
        wait_for(lambda: pid_file.read_text().strip().isdigit(), timeout=5, what="the host's pid")
        child = int(pid_file.read_text())
    finally:
        parent.kill()
        parent.wait()
    try:
        psutil.Process(child).wait(10)
    except psutil.TimeoutExpired:
        psutil.Process(child).kill()
        raise AssertionError("the host outlived its parent while the service's setup ran") from None
    reclaim()


def test_process_task_child_stops_when_its_parent_dies_while_a_forked_child_of_the_parent_lives() -> None:
    script = """
        import os, sys, time
        from kservice import ServiceEnvironment, ServiceFactory
        from tests.mmap.services import KV
        env = ServiceEnvironment("orphan")
        env.register_service("kv", ServiceFactory("kv", KV), kind="process")
        env.start()
        worker = os.fork()  # a fork pool's worker: it inherits the write end of the host's stdin pipe
        if worker == 0:
            time.sleep(60)
            os._exit(0)
        print(env.get_task("kv").pid, worker, flush=True)
        time.sleep(60)
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert parent.stdout is not None
    child, worker = map(int, parent.stdout.readline().split())
    try:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        # Before: the worker held the pipe open, so the host saw no EOF and outlived its parent as long
        # as the worker lived.
        psutil.Process(child).wait(10)
        assert not _files_of(child)
        assert psutil.pid_exists(worker)  # the worker itself is the application's: left alone
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    reclaim()


@pytest.mark.slow
def test_idle_host_with_20_services_uses_under_one_percent_of_a_core() -> None:
    specs = [f"{unique('idle')}=tests.mmap.services:KV" for _ in range(20)]
    with hosting(*specs, ready=20) as host, ServiceManager() as manager:
        for spec in specs:
            manager.call_service_sync(spec.split("=")[0], "echo", (1,))
        time.sleep(0.5)  # let spinning listeners settle into sleep
        process = psutil.Process(host.pid)
        before = process.cpu_times()
        time.sleep(3.0)  # deliberate: the window the idle CPU use is measured over
        after = process.cpu_times()
        used = (after.user + after.system) - (before.user + before.system)
        assert used / 3.0 < 0.01, f"idle host used {used / 3.0:.2%} of a core"


def test_cli_lists_running_hosted_services() -> None:
    name = unique("listed")
    with hosting(f"{name}=tests.mmap.services:KV") as host:
        listed = subprocess.run(
            [sys.executable, "-m", "kservice.cli", "services", "--running", "--json"],
            capture_output=True,
            text=True,
            env=child_env(),
        )
        assert listed.returncode == 0, listed.stderr
        assert f'"{name}"' in listed.stdout and str(host.pid) in listed.stdout
