"""``kservice serve`` on SIGHUP (a closed terminal or ssh session): it drains as on SIGTERM, with and without --reload."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import termios
import uuid
from pathlib import Path

import pytest

from .helpers import KSERVICE, cli_env, run_cli
from .test_serve_operator import _SLEEPER, Host, _call, _module, _start_call


def _fresh_env(tmp_path: Path) -> dict[str, str]:
    """The service's module on PYTHONPATH; queue and registry directories of this test alone, to look into."""
    return cli_env(
        PYTHONPATH=str(tmp_path),
        KSERVICE_QUEUE_DIR=str(tmp_path / "queues"),
        KSERVICE_REGISTRY_DIR=str(tmp_path / "registry"),
    )


def _left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reload", [False, True], ids=["serve", "serve-reload"])
def test_sighup_drains_calls_in_flight_and_removes_queue_and_record(tmp_path: Path, reload: bool) -> None:
    name = f"hup-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "hupsvc", _SLEEPER)
    env = _fresh_env(tmp_path)
    host = Host(f"{name}=hupsvc:Sleeper", *(["--reload"] if reload else []), cwd=tmp_path, env=env)
    caller = None
    try:
        host.wait_line(host.out, f"serving {name}")
        assert _left(tmp_path / "registry"), "the host published no record"
        caller = _start_call(name, tmp_path / "started", 3, env, tmp_path)

        host.process.send_signal(signal.SIGHUP)
        # A second hangup (the shell passes its own on, then the kernel sends one when the shell exits) does
        # not cut the drain short as a second Ctrl-C would.
        host.process.send_signal(signal.SIGHUP)
        out, err = caller.communicate(timeout=60)
        assert caller.returncode == 0, err
        assert out.strip() == "3"
        status = host.process.wait(60)
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait()
        host.stop()
    assert status == 0, host.err
    assert any(line.startswith(f"stopped serving {name}") for line in host.out), host.out
    # Removed on the way out, not left for the next cleanup sweep.
    assert _left(tmp_path / "queues") == []
    assert _left(tmp_path / "registry") == []
    # The name no longer answers.
    assert _call(name, "hello", env, tmp_path).startswith("error ")


def _on_new_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is the pty on its stdin."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reload", [False, True], ids=["serve", "serve-reload"])
def test_closing_the_terminal_drains_and_exits_0(tmp_path: Path, reload: bool) -> None:
    # The terminal goes away: the kernel sends SIGHUP, and every later write to the terminal fails (EIO).
    name = f"hup-{uuid.uuid4().hex[:8]}"
    _module(tmp_path, "hupsvc", _SLEEPER)
    env = _fresh_env(tmp_path)
    controller, terminal = pty.openpty()
    caller: subprocess.Popen[str] | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        process = subprocess.Popen(
            [KSERVICE, "serve", f"{name}=hupsvc:Sleeper", *(["--reload"] if reload else [])],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            preexec_fn=_on_new_terminal,
        )
        os.close(terminal)
        seen = b""
        while b"serving" not in seen:
            chunk = os.read(controller, 4096)
            assert chunk, seen
            seen += chunk
        caller = _start_call(name, tmp_path / "started", 3, env, tmp_path)
        os.close(controller)
        controller = -1
        out, err = caller.communicate(timeout=60)
        assert caller.returncode == 0, err
        assert out.strip() == "3"
        status = process.wait(60)
    finally:
        if controller != -1:
            os.close(controller)
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    assert status == 0
    assert _left(tmp_path / "queues") == []
    assert _left(tmp_path / "registry") == []


def test_help_says_sighup_drains() -> None:
    assert "SIGHUP" in run_cli("serve", "--help").stdout
