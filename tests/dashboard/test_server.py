"""The dashboard's server without a browser: its API, clients that vanish mid-stream, a port in use, import cost."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from tests.cli.helpers import assert_user_error, cli_env, run_cli

from .conftest import Running


def _open_stream(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


def _read_until(sock: socket.socket, marker: bytes, count: int = 1, limit: float = 10.0) -> bytes:
    """Read from ``sock`` until ``marker`` was seen ``count`` times."""
    data = b""
    end = time.monotonic() + limit
    while data.count(marker) < count:
        assert time.monotonic() < end, f"no {marker!r} x{count} within {limit}s: {data[:500]!r}"
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream: {data[:500]!r}"
        data += chunk
    return data


def _state(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url + "api/state", timeout=10) as answer:
        assert answer.status == 200
        return json.load(answer)  # type: ignore[no-any-return]


@pytest.mark.timeout(60)
def test_api_state_lists_the_running_service(served: tuple[str, Running], dashboard: tuple[str, Running]) -> None:
    name, host = served
    url, _ = dashboard
    from kservice.testing import wait_for

    state = wait_for(
        lambda: [s for s in _state(url)["services"] if s["service"] == name],  # type: ignore[index, union-attr]
        timeout=15,
        what="the served service to appear in /api/state",
    )
    (row,) = state
    assert row["pid"] == host.process.pid and row["transport"] == "mmap" and row["state"] == "running"
    assert isinstance(row["requests_total"], int)
    # The page and its assets come from the package itself.
    for path in ("", "static/dashboard.js", "static/dashboard.css"):
        with urllib.request.urlopen(url + path, timeout=10) as answer:
            assert answer.status == 200
            body = answer.read().decode().replace("http://www.w3.org/2000/svg", "")  # a namespace name, not fetched
            assert "http://" not in body and "https://" not in body, f"{path} refers to another site"


@pytest.mark.timeout(60)
def test_browsers_that_disconnect_mid_stream_do_not_disturb_the_server(dashboard: tuple[str, Running]) -> None:
    url, running = dashboard
    # Clients that read one event and vanish: some close politely, some reset the connection.
    for index in range(6):
        sock = _open_stream(url)
        data = _read_until(sock, b"event: snapshot")
        assert b"200 OK" in data.split(b"\r\n", 1)[0]
        if index % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        sock.close()
    # One that goes away before the first event.
    early = _open_stream(url)
    early.close()
    # The server still serves: a new stream keeps receiving events, the API answers.
    survivor = _open_stream(url)
    try:
        _read_until(survivor, b"event: snapshot", count=3)
        assert "plugins" in _state(url)
    finally:
        survivor.close()
    assert running.process.poll() is None
    # The fixture then stops it with SIGINT: exit 0, "stopped", no traceback on stderr.


@pytest.mark.timeout(30)
def test_a_port_in_use_is_one_line_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli("dashboard", "--port", str(port), timeout=20)
    assert_user_error(result, f"port {port}", "--port", status=1)


def test_import_kservice_does_not_load_the_web_stack() -> None:
    code = (
        "import sys, kservice, kservice.cli; "
        "loaded = sorted(m for m in ('kservice.dashboard', 'starlette', 'uvicorn', 'sse_starlette', 'watchfiles') if m in sys.modules); "
        "print(loaded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.timeout(60)
def test_collector_samples_rows_history_and_errors_of_a_published_service() -> None:
    import uuid

    import kservice
    from kservice.dashboard import Collector
    from kservice.dashboard._collector import _finite

    name = f"dash-local-{uuid.uuid4().hex[:8]}"
    with kservice.ServiceEnvironment("dash", {"health": {"enabled": False}}) as env:
        env.register_service(name, kservice.ServiceFactory(name, _Failing), transports=["mmap"])
        collector = Collector(kservice.Config.load(None), interval=0.1)
        with kservice.ServiceManager(env) as manager:
            assert manager.call_service_sync(name, "ok", ()) == 1
            with pytest.raises(ZeroDivisionError):
                manager.call_service_sync(name, "fail", ())
            collector.sample(manager)
            collector.sample(manager)
        version, snapshot = collector.latest()
    assert version == 2
    (row,) = [r for r in snapshot["services"] if r["service"] == name]
    assert row["requests_total"] == 2 and row["errors_total"] == 1 and row["transport"] == "mmap"
    (error,) = [e for e in snapshot["errors"] if e["service"] == name]
    assert error["error_type"] == "ZeroDivisionError" and "1 / 0" in error["traceback"]
    assert len(collector.history()[name]) == 2
    json.dumps(snapshot, allow_nan=False)  # what the page parses: no NaN
    assert _finite({"a": [float("nan"), float("inf"), 1.5]}) == {"a": [None, None, 1.5]}


class _Failing:
    def ok(self) -> int:
        return 1

    def fail(self) -> float:
        return 1 / 0
