"""Service classes for the mmap tests, importable by child processes (``tests.mmap.services``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kservice import current_request, idempotent, service


class KV:
    """A small thread-safe key-value store."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[self.prefix + key] = value

    def get(self, key: str) -> Any:
        with self._lock:
            return self._data[self.prefix + key]  # KeyError when missing

    def echo(self, value: Any) -> Any:
        return value

    def size(self, value: Any) -> int:
        return len(value)

    def add(self, a: int, b: int) -> int:
        return a + b

    def pid(self) -> int:
        return os.getpid()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def slow_bytes(self, size: int, seconds: float) -> bytes:
        """``size`` bytes, after ``seconds``."""
        time.sleep(seconds)
        return b"x" * size

    def thread_name(self) -> str:
        return threading.current_thread().name

    def unpicklable(self) -> Any:
        return threading.Lock()

    def host_only(self, value: Any = None) -> Any:
        """An object of a class only this process can import (a module it made up): callers cannot unpickle it."""
        import types

        module = sys.modules.get("kservice_host_only")
        if module is None:
            module = types.ModuleType("kservice_host_only")
            exec("class HostOnly:\n    def __init__(self, value):\n        self.value = value\n", module.__dict__)
            sys.modules["kservice_host_only"] = module
        return module.HostOnly(value)

    def make_bytes(self, n: int) -> bytes:
        return b"\x07" * n

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def tag(self, key: str) -> list[str]:
        """Writes ``key`` into the request's metadata (the service's own dict) and returns its keys."""
        metadata = current_request().metadata
        metadata[key] = True
        return sorted(metadata)


class Ledger:
    """Each run appends ``tag pid`` to a file before sleeping: the file counts how often a call ran."""

    def record(self, path: str, tag: str, seconds: float) -> int:
        with open(path, "a") as ledger:
            ledger.write(f"{tag} {os.getpid()}\n")
        time.sleep(seconds)
        return os.getpid()

    @idempotent
    def record_idempotent(self, path: str, tag: str, seconds: float) -> int:
        return self.record(path, tag, seconds)

    def pid(self) -> int:
        return os.getpid()


@service(thread_safe=False)
class SerialLedger(Ledger):
    """A Ledger that runs one request at a time: a second call waits in the queue behind the first."""


class Broken:
    """A service whose constructor raises."""

    def __init__(self) -> None:
        raise RuntimeError("constructor exploded on purpose")


@service(thread_safe=False)
class Serial:
    """Not thread-safe: runs one request at a time; records overlapping calls."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0

    def work(self, seconds: float) -> int:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        time.sleep(seconds)
        self.active -= 1
        return self.max_active

    def block(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


# --------------------------------------------------------------------------- helpers for the tests


REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The environment for child Python processes: this one, plus the repository root on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@contextlib.contextmanager
def private_queue_dir(monkeypatch: Any, label: str = "test") -> Iterator[Path]:
    """A queue directory of its own for one test (``KSERVICE_QUEUE_DIR``); afterwards it is
    removed and the test fails if it left a file in it."""
    d = Path(f"/dev/shm/kservice-{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("KSERVICE_QUEUE_DIR", str(d))
    try:
        yield d
    finally:
        left = sorted(os.listdir(d)) if d.exists() else []
        for name in left:
            os.unlink(d / name)
        if d.exists():
            os.rmdir(d)
        assert not left, f"test left files in its queue directory: {left}"


def unique(name: str) -> str:
    """A service name no other test (or concurrent test run) uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


class Host:
    """A ``kservice serve`` subprocess."""

    def __init__(self, *specs: str, extra_args: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kservice.cli", "serve", *extra_args, *specs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            text=True,
        )
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Read stdout until ``count`` "serving ..." lines; raises with stderr if the host exits first."""
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while sum(line.startswith("serving ") for line in self.lines) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"host not ready: {self.lines}")
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"host exited ({self.process.wait()}): {self.stderr()}")
            self.lines.append(line.strip())
        return self.lines

    def stderr(self) -> str:
        assert self.process.stderr is not None
        with contextlib.suppress(Exception):
            self.process.wait(10)
        return self.process.stderr.read()

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def hosting(*specs: str, ready: int = 1) -> Iterator[Host]:
    host = Host(*specs)
    try:
        host.wait_ready(ready)
        yield host
    finally:
        host.stop()


class FailsToStartWhile:
    """Its constructor raises while the file ``flag`` exists (a host that cannot be restarted for a while)."""

    def __init__(self, flag: str) -> None:
        if os.path.exists(flag):
            raise RuntimeError(f"told to fail by {flag}")

    def pid(self) -> int:
        return os.getpid()


class SlowSetup:
    """A ``setup()`` that writes its process id to ``$KSERVICE_TEST_SETUP_PID`` and then takes a minute."""

    def setup(self) -> None:
        Path(os.environ["KSERVICE_TEST_SETUP_PID"]).write_text(str(os.getpid()))
        time.sleep(60)

    def echo(self, value: object) -> object:
        return value


def _load_bomb(kind: str, made_in: int) -> str:
    """Unpickled anywhere but in process ``made_in``, raise what ends threads (``kind``: exit or interrupt)."""
    if os.getpid() != made_in:
        raise SystemExit(12) if kind == "exit" else KeyboardInterrupt("raised while unpickling")
    return "loaded where it was made"


class LoadBomb:
    """A value whose unpickling raises SystemExit or KeyboardInterrupt in any process but the one that made it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_bomb, (self.kind, os.getpid()))


class Bombs:
    """Answers a LoadBomb (made in the host: it goes off in the caller), or echoes one (made in the caller)."""

    def bomb(self, kind: str) -> LoadBomb:
        return LoadBomb(kind)

    def echo(self, value: object) -> object:
        return value


class PickleBomb:
    """A value whose pickling raises SystemExit or KeyboardInterrupt (``kind``: exit or interrupt)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(13) if self.kind == "exit" else KeyboardInterrupt("raised while pickling")


class PickleBombs:
    """Answers, streams and takes values whose pickling raises what ends threads."""

    def __init__(self) -> None:
        self.bombs = 0

    def bomb(self, kind: str) -> PickleBomb:
        self.bombs += 1
        return PickleBomb(kind)

    def bombs_made(self) -> int:
        return self.bombs

    def stream_bomb(self, kind: str) -> Iterator[object]:
        yield "before"
        yield PickleBomb(kind)

    def echo(self, value: object) -> object:
        return value
