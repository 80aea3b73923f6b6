"""Driving the real ``kservice`` console script in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import clean_environ

HERE = Path(__file__).resolve().parent
KSERVICE = str(Path(sys.executable).with_name("kservice"))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: sample services importable, no inherited kservice settings."""
    env = clean_environ()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


#: The sample key-value service the host tests serve (``NAME=`` then this).
KV_TARGET = "tests.mmap.services:KV"


def start_host(*services: str, env: dict[str, str] | None = None, app_dir: Path | None = None) -> subprocess.Popen[str]:
    """``kservice serve [--app-dir APP_DIR] NAME=TARGET...``; returns once it printed a serving line per service.

    ``env`` defaults to this session's (its directories), with the repository on the path. A host that
    does not start is killed and its stderr raised in an AssertionError.
    """
    host = subprocess.Popen(
        [KSERVICE, "serve", *(["--app-dir", str(app_dir)] if app_dir is not None else []), *services],
        env=env if env is not None else {**os.environ, "PYTHONPATH": str(HERE.parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert host.stdout is not None
    for service in services:
        line = host.stdout.readline()
        if not line.startswith(f"serving {service.partition('=')[0]}"):
            host.kill()
            _, err = host.communicate()
            raise AssertionError(f"kservice serve did not start: {line!r} {err}")
    return host


def stop_host(process: subprocess.Popen[str], timeout: float = 30) -> int:
    """Ctrl-C a ``kservice serve`` subprocess and reap it (killed if it outlives ``timeout``); its exit status."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    return process.returncode


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: str | Path | None = None
) -> Result:
    """Run ``kservice ARGS...`` (the installed console script) and capture its output."""
    done = subprocess.run(
        [KSERVICE, *args], capture_output=True, text=True, env=env or cli_env(), timeout=timeout, cwd=cwd
    )
    return Result(done.returncode, done.stdout, done.stderr)


def assert_user_error(result: Result, *fragments: str, status: int | None = None) -> None:
    """One actionable line on stderr, no traceback, a non-zero exit status."""
    assert result.returncode != 0, result
    if status is not None:
        assert result.returncode == status, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def run_many(commands: Sequence[Sequence[str]], env: dict[str, str] | None = None, timeout: float = 60) -> list[Result]:
    """Run several CLI invocations concurrently (they are independent); results in order."""
    processes = [
        subprocess.Popen(
            [KSERVICE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env()
        )
        for cmd in commands
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append(Result(process.returncode, out, err))
    return results


def marked_processes(mark: str, settle: float = 5.0) -> list[int]:
    """Live processes whose environment carries ``KSERVICE_TEST_MARK=mark`` (children inherit it).

    Polls for up to ``settle`` seconds: a process killed at teardown may take a moment to go.
    """
    end = time.monotonic() + settle
    while True:
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get("KSERVICE_TEST_MARK") == mark and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
            except (psutil.Error, OSError):
                continue
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.1)  # polls up to ``settle``: it returns what is left, so a timeout is an answer, not a failure


def run_main(*args: str) -> Result:
    """Run ``kservice.cli.main(args)`` in this process: the console script's own function, without a new interpreter.

    Used for the many error cases, where starting ~0.4 s interpreters would
    dominate the suite; each case also has a subprocess twin through the
    installed script.
    """
    import contextlib
    import io

    from kservice.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())
