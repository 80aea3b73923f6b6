"""Where the per-user queue and registry directories are, and that no other local user can take them first.

The cross-user cases create a second Unix user (tests/other_user.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kservice.plugins.mmap import ring

from tests.cli.helpers import KSERVICE, assert_user_error, cli_env, run_cli
from tests.conftest import REGISTRY_DIR, SHM_DIR
from tests.mmap.services import REPO_ROOT
from tests.other_user import other_user


def default_environ() -> dict[str, str]:
    """An environment without the test session's directories: the user's own defaults."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("KSERVICE_") and k != "XDG_RUNTIME_DIR"}
    env["KSERVICE_CACHE_DIR"] = os.environ["KSERVICE_CACHE_DIR"]  # the session's: nothing written under the home
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def fresh_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """This process resolves the default directories anew, with its home directory in ``tmp_path``."""
    monkeypatch.delenv("KSERVICE_QUEUE_DIR")
    monkeypatch.delenv("KSERVICE_REGISTRY_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(ring, "_home", lambda: tmp_path)
    ring._default_directory.cache_clear()
    yield tmp_path
    ring._default_directory.cache_clear()


# --------------------------------------------------------------------------- where


def test_the_users_runtime_directory_is_used_when_there_is_one(fresh_defaults: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)  # undone by the fixture's monkeypatch.delenv
    try:
        assert ring.default_queue_directory() == (runtime / "kservice", True)
        from kservice.plugins.mmap import registry

        assert registry.registry_directory() == runtime / "kservice-services"
        assert ring.queue_directory() == runtime / "kservice"
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
    # A runtime directory others can write is not one: the next choice is taken.
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    ring._default_directory.cache_clear()
    os.environ["XDG_RUNTIME_DIR"] = str(loose)
    try:
        path, unpredictable = ring.default_queue_directory()
        assert not str(path).startswith(str(loose)) and unpredictable
    finally:
        del os.environ["XDG_RUNTIME_DIR"]


def test_without_one_the_shm_name_comes_from_a_private_key_and_the_boot(fresh_defaults: Path) -> None:
    path, unpredictable = ring.default_queue_directory()
    key_file = fresh_defaults / ring.RUNTIME_KEY
    assert unpredictable and key_file.stat().st_mode & 0o777 == 0o600
    assert path.parent == Path("/dev/shm") and path.name.startswith(f"kservice-{os.getuid()}-")
    assert len(path.name.rsplit("-", 1)[1]) == 24  # 96 bits another user would have to guess
    # The same key gives the same name (every process of the user finds it); another key another name.
    ring._default_directory.cache_clear()
    assert ring.default_queue_directory() == (path, True)
    key_file.write_text("f" * 32)
    ring._default_directory.cache_clear()
    assert ring.default_queue_directory()[0] != path


def test_a_key_file_that_is_not_private_is_refused_with_one_line(fresh_defaults: Path) -> None:
    key_file = fresh_defaults / ring.RUNTIME_KEY
    key_file.parent.mkdir(parents=True)
    key_file.write_text("0" * 32)
    os.chmod(key_file, 0o644)
    with pytest.raises(ring.RuntimeDirectoryError, match=r"runtime-key.*delete it"):
        ring.default_queue_directory()


@pytest.mark.timeout(60)
def test_every_process_of_the_user_finds_the_same_directories() -> None:
    code = (
        "from kservice.plugins.mmap import ring, registry; print(ring.queue_directory(), registry.registry_directory())"
    )
    seen = set()
    for extra in ({}, {"HOME": "/nonexistent"}, {"XDG_CACHE_HOME": "/tmp"}):
        done = subprocess.run(
            [sys.executable, "-c", code], env={**default_environ(), **extra}, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        seen.add(done.stdout.strip())
    assert len(seen) == 1, seen
    queues, records = seen.pop().split()
    assert records == queues + "-services"


# --------------------------------------------------------------------------- squatting


@pytest.mark.timeout(120)
def test_another_user_cannot_stop_this_one_from_serving() -> None:
    """The paths another user could predict (the old ``/dev/shm/kservice-<uid>``) are not used."""
    name = f"squat-{uuid.uuid4().hex[:8]}"
    uid = os.getuid()
    with other_user() as user:
        planted = []
        for path, how in (
            (f"/dev/shm/kservice-{uid}", ["mkdir", "-m", "700"]),
            (f"/dev/shm/kservice-{uid}-services", ["ln", "-s", "/tmp"]),
        ):
            if not os.path.lexists(path):
                user.run([*how, path])
                planted.append(path)
        try:
            env = default_environ()
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
                called = run_cli("call", name, "add", "[2, 3]", env=env)
                assert called.returncode == 0 and called.stdout.strip() == "5", called
            finally:
                host.send_signal(signal.SIGINT)
                assert host.wait(30) == 0
                host.stdout.close()  # type: ignore[union-attr]
                host.stderr.close()  # type: ignore[union-attr]
        finally:
            for path in planted:
                subprocess.run(["rm", "-rf", path], check=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["KSERVICE_QUEUE_DIR", "KSERVICE_REGISTRY_DIR"])
@pytest.mark.parametrize("kind", ["directory", "symlink", "file"])
def test_a_squatted_directory_is_one_line_naming_it_and_what_to_do(which: str, kind: str) -> None:
    path = f"/dev/shm/kservice-squatted-{uuid.uuid4().hex[:8]}"
    with other_user() as user:
        how = {
            "directory": ["mkdir", "-m", "700", path],
            "symlink": ["ln", "-s", "/tmp", path],
            "file": ["touch", path],
        }[kind]
        user.run(how)
        try:
            env = cli_env(**{which: path})
            for argv in (("serve", "kv=sample_services:KV"), ("cleanup",), ("status",), ("call", "kv", "get", "[1]")):
                result = run_cli(*argv, env=env, timeout=30)
                assert_user_error(result, path, f"uid {user.uid}", "KSERVICE_QUEUE_DIR", status=1)
                assert result.stdout == ""
            assert not any(Path("/tmp").glob("*.q"))  # nothing was written through a symlink
        finally:
            subprocess.run(["rm", "-rf", path], check=False)


# --------------------------------------------------------------------------- crash leftovers


@pytest.mark.timeout(120)
def test_a_program_using_only_the_library_reclaims_what_a_killed_host_left() -> None:
    name = f"crashed-{uuid.uuid4().hex[:8]}"
    host = subprocess.Popen(
        [KSERVICE, "serve", f"{name}=sample_services:KV"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert host.stdout is not None
    assert host.stdout.readline().startswith(f"serving {name}")
    from kservice import ServiceManager

    with ServiceManager() as manager:  # a large answer: the host writes it to a pooled segment of its own
        manager.call_service_sync(name, "put", ("big", b"x" * (1 << 20)))
        assert len(manager.call_service_sync(name, "get", ("big",))) == 1 << 20
    host.kill()
    host.wait()
    host.stdout.close()
    host.stderr.close()  # type: ignore[union-attr]
    left = [p.name for p in SHM_DIR.iterdir() if f".{host.pid}." in p.name]
    assert left, "the killed host left its request ring"
    assert any(f"-{host.pid}-" in p.name for p in SHM_DIR.iterdir()), "the killed host left its segment"
    assert (REGISTRY_DIR / f"{name}.json").exists()
    # A program that never runs the CLI, calling some other service by name.
    code = (
        "from kservice import ServiceManager, ServiceNotFoundError\n"
        "with ServiceManager() as m:\n"
        "    try:\n"
        "        m.call_service_sync('no-such-service', 'get', ('k',), timeout=5)\n"
        "    except ServiceNotFoundError:\n"
        "        print('not found')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "not found", done.stderr
    left = (
        [p.name for p in SHM_DIR.iterdir() if f".{host.pid}." in p.name or f"-{host.pid}-" in p.name]
        if SHM_DIR.exists()
        else []
    )
    assert not left  # (the directory itself goes when the last process leaves it empty)
    assert not (REGISTRY_DIR / f"{name}.json").exists()


@pytest.mark.timeout(60)
def test_a_default_name_another_user_took_after_seeing_it_gets_the_user_a_new_key(fresh_defaults: Path) -> None:
    """Default directories go once emptied; ``/dev/shm`` can be listed, so the name may be taken after that."""
    from kservice.plugins.mmap import registry

    seen, keyed = ring.default_queue_directory()
    assert keyed and not seen.exists()
    key_before = (fresh_defaults / ring.RUNTIME_KEY).read_text()
    with other_user() as user:
        user.run(["mkdir", "-m", "700", str(seen)])
        try:
            queues = ring.queue_directory(sweep=False)
            records = registry.registry_directory(sweep=False)
            assert queues != seen and queues.parent == seen.parent
            assert records == queues.with_name(queues.name + "-services")
            assert queues.stat().st_uid == os.getuid() and records.stat().st_uid == os.getuid()
            assert (fresh_defaults / ring.RUNTIME_KEY).read_text() != key_before  # every process finds the new name
            assert os.stat(seen).st_uid == user.uid  # the other user's directory is left alone
        finally:
            subprocess.run(["rm", "-rf", str(seen)], check=False)
            now = ring.default_queue_directory()[0]
            for directory in (now, now.with_name(now.name + "-services")):
                with contextlib.suppress(OSError):
                    directory.rmdir()


@pytest.mark.timeout(60)
def test_a_process_that_used_only_the_defaults_leaves_nothing_in_dev_shm(fresh_defaults: Path) -> None:
    code = (
        "from kservice.plugins.mmap import ring, registry\n"
        f"ring._home = lambda: __import__('pathlib').Path({str(fresh_defaults)!r})\n"
        "q = ring.create_queue('left-behind', 1 << 16); q.put(b'x'); q.unlink(); q.close()\n"
        "print(ring.queue_directory(), registry.registry_directory())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=default_environ(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    queues, records = map(Path, done.stdout.split())
    assert str(queues).startswith("/dev/shm/") and not queues.exists() and not records.exists()
