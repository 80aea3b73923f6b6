"""``kservice serve`` as an operator runs it: logging, start and stop lines, a metrics endpoint, reload on change."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from kservice.testing import WaitTimeoutError, wait_for

from .helpers import KSERVICE, assert_user_error, cli_env, run_cli


class Host:
    """A ``kservice serve`` subprocess whose stdout and stderr lines are collected as they come."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [KSERVICE, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_line(self, lines: list[str], fragment: str, timeout: float = 20.0) -> str:
        try:
            found: str = wait_for(lambda: next((line for line in lines if fragment in line), None), timeout=timeout)
        except WaitTimeoutError:
            pytest.fail(f"no line with {fragment!r} within {timeout}s; stdout {self.out}, stderr {self.err}")
        return found  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"kservice serve did not stop within {timeout}s of SIGINT; stderr {self.err}")
        for reader in self._readers:
            reader.join(5)
        return status


def _module(directory: Path, name: str, body: str) -> None:
    path = directory / f"{name}.py"
    path.write_text(body)


def _greeter(word: str) -> str:
    return f"class Greeter:\n    def hello(self):\n        return {word!r}\n"


def _call(name: str, method: str, env: dict[str, str], cwd: Path) -> str:
    result = run_cli("call", name, method, env=env, cwd=cwd, timeout=30)
    return result.stdout.strip() if result.returncode == 0 else f"error {result.stderr.strip()}"


@pytest.mark.timeout(60)
def test_log_level_shows_call_log_records_and_lines_say_what_is_served_and_when_it_stopped(tmp_path: Path) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "opsvc", _greeter("hi"))
    (tmp_path / "services.yaml").write_text(f"call_log:\n  enabled: true\nservices:\n  {name}: opsvc:Greeter\n")
    env = cli_env(PYTHONPATH=str(tmp_path))
    host = Host("-c", "services.yaml", "--log-level", "info", cwd=tmp_path, env=env)
    try:
        started = host.wait_line(host.out, "serving")
        assert started.startswith(f"serving {name} on mmap queue ") and f"(pid {host.process.pid})" in started
        assert _call(name, "hello", env, tmp_path) == '"hi"'
        record = host.wait_line(host.err, "kservice.calls")
        assert "INFO" in record and f"{name}.hello ok in" in record
    finally:
        status = host.stop()
    assert status == 0
    assert host.out[-1] == f"stopped serving {name} (pid {host.process.pid})"


@pytest.mark.timeout(60)
def test_default_log_level_keeps_call_log_records_quiet(tmp_path: Path) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "opsvc", _greeter("hi"))
    (tmp_path / "services.yaml").write_text(f"call_log:\n  enabled: true\nservices:\n  {name}: opsvc:Greeter\n")
    env = cli_env(PYTHONPATH=str(tmp_path))
    host = Host("-c", "services.yaml", cwd=tmp_path, env=env)
    try:
        host.wait_line(host.out, "serving")
        assert _call(name, "hello", env, tmp_path) == '"hi"'
    finally:
        assert host.stop() == 0
    assert not [line for line in host.err if "kservice.calls" in line], host.err


@pytest.mark.timeout(60)
def test_metrics_port_serves_prometheus_exposition(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    name = f"op-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "opsvc", _greeter("hi"))
    env = cli_env(PYTHONPATH=str(tmp_path))
    host = Host(f"{name}=opsvc:Greeter", "--metrics-port", "0", cwd=tmp_path, env=env)
    try:
        line = host.wait_line(host.out, "metrics on ")
        url = line.split("metrics on ", 1)[1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        for _ in range(3):
            assert _call(name, "hello", env, tmp_path) == '"hi"'
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        calls = {
            (s.labels["side"], s.labels["service"], s.labels["method"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "kservice_calls"
            for s in family.samples
            if s.name == "kservice_calls_total"
        }
        assert calls[("server", name, "hello")] == 3
    finally:
        assert host.stop() == 0
    # Stopped with the host: the port no longer answers.
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


@pytest.mark.timeout(60)
def test_metrics_port_in_use_is_one_line_and_nothing_is_served(tmp_path: Path) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "opsvc", _greeter("hi"))
    env = cli_env(PYTHONPATH=str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", f"{name}=opsvc:Greeter", "--metrics-port", str(port), env=env, cwd=tmp_path, timeout=30
        )
    assert_user_error(result, f"port {port}", "--metrics-port", status=1)
    assert result.stdout == ""
    assert _call(name, "hello", env, tmp_path).startswith("error ")  # never served


@pytest.mark.timeout(120)
def test_reload_restarts_on_change_and_keeps_the_old_host_on_a_syntax_error(tmp_path: Path) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "reloadsvc", _greeter("v1"))
    env = cli_env(PYTHONPATH=str(tmp_path))
    host = Host(f"{name}=reloadsvc:Greeter", "--reload", cwd=tmp_path, env=env)
    try:
        host.wait_line(host.err, "reload: watching")
        host.wait_line(host.out, f"serving {name}")
        assert _call(name, "hello", env, tmp_path) == '"v1"'

        _module(tmp_path, "reloadsvc", _greeter("v2"))
        wait_for(
            lambda: _call(name, "hello", env, tmp_path) == '"v2"',
            timeout=30,
            what="the reloaded v2 to answer",
            interval=0.3,
        )

        # A syntax error: the error is shown, the old host keeps serving the old code.
        _module(tmp_path, "reloadsvc", _greeter("v3").replace("def hello(self):", "def hello(self)"))
        shown = host.wait_line(host.err, "not restarting")
        assert "the old host keeps serving" in shown and "reloadsvc" in shown and "expected ':'" in shown
        assert _call(name, "hello", env, tmp_path) == '"v2"'

        # The next good save reloads.
        _module(tmp_path, "reloadsvc", _greeter("v4"))
        wait_for(
            lambda: _call(name, "hello", env, tmp_path) == '"v4"',
            timeout=30,
            what="the reloaded v4 to answer",
            interval=0.3,
        )
        # Each replaced host drained and said so.
        assert len([line for line in host.out if line.startswith(f"stopped serving {name}")]) == 2
    finally:
        status = host.stop()
    assert status == 0
    assert host.out[-1].startswith(f"stopped serving {name}")
    # No host left behind: the name stops answering (the supervisor stopped its child).
    wait_for(
        lambda: _call(name, "hello", env, tmp_path).startswith("error "), timeout=10, what="no host to serve the name"
    )


@pytest.mark.timeout(120)
def test_reload_with_app_dir_restarts_on_change(tmp_path: Path) -> None:
    # The service's module is found only through --app-dir: not on PYTHONPATH, not in the working directory.
    name = f"op-{uuid.uuid4().hex[:8]}"
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    _module(app, "appdirsvc", _greeter("v1"))
    env = cli_env()
    host = Host(
        "--app-dir", str(app), "--reload", "--reload-dir", str(app), f"{name}=appdirsvc:Greeter", cwd=elsewhere, env=env
    )
    try:
        host.wait_line(host.err, "reload: watching")
        host.wait_line(host.out, f"serving {name}")
        assert _call(name, "hello", env, elsewhere) == '"v1"'

        _module(app, "appdirsvc", _greeter("v2"))
        host.wait_line(host.err, "checking the new code")
        _await_reload(host, name, '"v2"', env, elsewhere)
        assert _call(name, "hello", env, elsewhere) == '"v2"'
    finally:
        status = host.stop()
    assert status == 0


_SLEEPER = """import pathlib, time


class Sleeper:
    def hello(self):
        return "hi"

    def sleep(self, marker, seconds):
        pathlib.Path(marker).write_text("started")
        time.sleep(seconds)
        return seconds
"""


def _start_call(name: str, marker: Path, seconds: float, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """``kservice call NAME sleep`` in a subprocess, returned once the call runs in the host (``marker`` written)."""
    caller = subprocess.Popen(
        [KSERVICE, "call", name, "sleep", f'["{marker}", {seconds}]', "--timeout", str(max(60, seconds + 10))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    wait_for(marker.exists, timeout=30, what="the call to start")
    return caller


def _await_reload(host: Host, name: str, answer: str, env: dict[str, str], cwd: Path) -> None:
    """Wait until the reloaded service answers ``hello`` with ``answer``; fails if the supervisor refused the new code."""
    wait_for(
        lambda: _call(name, "hello", env, cwd) == answer or any("not restarting" in e for e in host.err),
        timeout=30,
        what="the reloaded code to answer",
        interval=0.3,
    )
    assert not [line for line in host.err if "not restarting" in line], host.err


@pytest.mark.timeout(120)
def test_reload_second_signal_exits_at_once_with_status_130(tmp_path: Path) -> None:
    # As without --reload: the first Ctrl-C drains, a second one stops the host at once (status 130).
    name = f"op-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "sleepersvc", _SLEEPER)
    env = cli_env(PYTHONPATH=str(tmp_path))
    host = Host(f"{name}=sleepersvc:Sleeper", "--reload", "--drain-timeout", "90", cwd=tmp_path, env=env)
    caller = None
    try:
        host.wait_line(host.err, "reload: watching")
        served = host.wait_line(host.out, f"serving {name}")
        child = int(served.rsplit("(pid ", 1)[1].rstrip(")"))
        caller = _start_call(name, tmp_path / "started", 100, env, tmp_path)

        host.process.send_signal(signal.SIGINT)
        # The host drains: it no longer takes calls, the long one still runs.
        wait_for(
            lambda: _call(name, "hello", env, tmp_path).startswith("error "),
            timeout=30,
            what="the host to stop taking calls",
            interval=0.3,
        )
        assert caller.poll() is None
        host.process.send_signal(signal.SIGINT)
        try:
            status = host.process.wait(30)  # the drain would take 90 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second SIGINT did not stop kservice serve --reload; stderr {host.err}")
        assert status == 130
        wait_for(lambda: not psutil.pid_exists(child), timeout=10, what="the host process to exit")
        _, error = caller.communicate(timeout=30)
        assert "ServiceUnavailableError" in error and "may have run" in error, error
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait()
        host.stop()
