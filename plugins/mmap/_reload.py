"""``kservice serve --reload``: a development supervisor that restarts the host when its code changes.

The supervisor imports no service code. It runs ``kservice serve`` with the
same arguments (less the reload options) in a child process and watches
directories with watchfiles. As without ``--reload``, the child (and the check
below) searches the working directory only when ``--app-dir`` names it. On a
change to a ``.py`` file (or the config file) it first imports the services in
a fresh interpreter; if that fails the error is printed and the old host keeps serving. Otherwise the old host is
stopped with SIGTERM (it stops accepting calls, lets those in flight finish
within ``--drain-timeout``) and a new one is started. The host's names are
free again only once the old host has stopped, so the two never serve at once.

The child dies with the supervisor (``PR_SET_PDEATHSIG``), so killing the
supervisor outright leaves no host behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import click

__all__ = ["check_importable", "serve_with_reload"]

# Both run as `python -P -c`: plain `-c` would put the working directory first on sys.path, so the host
# (and the check) would import a service module, or a json.py, from it, which `kservice serve` never does
# unless told to with --app-dir.
_SAFE_PATH = "-P"
_SERVE_COMMAND = "import sys; from kservice.cli import main; main()"
_CHECK_COMMAND = "import sys; from kservice.plugins.mmap._reload import check_main; sys.exit(check_main(sys.argv[1]))"
_PR_SET_PDEATHSIG = 1


def _child_argv(ctx: click.Context) -> list[str]:
    """``serve``, every option given to this command less ``--reload``/``--reload-dir``, ``--``, then the arguments.

    Built from the command's own parameters, so an option added to ``serve`` later is passed on too.
    """
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        value = ctx.params.get(name)
        if name in ("reload", "reload_dirs") or value is None:
            continue
        if isinstance(param, click.Argument):
            arguments += [str(v) for v in (value if isinstance(value, (list, tuple)) else (value,))]
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if getattr(param, "is_flag", False):
            if value:
                options.append(flag)
        elif getattr(param, "multiple", False):
            for item in value:
                options += [flag, str(item)]
        else:
            options += [flag, str(value)]
    # "--" before the arguments: a service spec is never read as an option.
    return [ctx.info_name or "serve", *options, "--", *arguments]


def check_main(spec: str) -> int:
    """Import every service to serve (``spec``: JSON of config path, services and app dir); 0, or 1 and the error on stderr."""
    from kservice import Config, ServiceEnvironment
    from kservice._task import import_service_class

    from .host import _service_entries

    loaded = json.loads(spec)
    if loaded.get("app_dir"):
        # Searched first, as the host searches it: a module found only there must import here too.
        sys.path.insert(0, loaded["app_dir"])
    try:
        config = Config.load(loaded["config"])
        for entry in _service_entries(config, loaded["services"]).values():
            if entry.get("class"):
                import_service_class(str(entry["class"]))
            elif entry.get("entry_point"):
                ServiceEnvironment.load_entry_point_service(str(entry["entry_point"]))
    except BaseException as exc:  # noqa: BLE001 - any failure to import is what the supervisor reports
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


def check_importable(
    config_path: str | None, services: Sequence[str], timeout: float = 60.0, app_dir: str | None = None
) -> str:
    """Import the services in a fresh interpreter (``app_dir`` searched first, as ``--app-dir``); the error as one line, or "" when they import."""
    spec = json.dumps({"config": config_path, "services": list(services), "app_dir": app_dir})
    try:
        done = subprocess.run(
            [sys.executable, _SAFE_PATH, "-c", _CHECK_COMMAND, spec],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"importing the services took longer than {timeout:.0f}s"
    if done.returncode == 0:
        return ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"the check exited with status {done.returncode}"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervisor dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Host:
    """The child ``kservice serve`` process."""

    def __init__(self, argv: list[str], drain_timeout: float) -> None:
        self.argv = argv
        self.drain_timeout = drain_timeout
        self.process: subprocess.Popen[bytes] | None = None
        #: the process :meth:`stop` is waiting for, so a second signal can reach it
        self.stopping: subprocess.Popen[bytes] | None = None
        self.reported_exit = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, _SAFE_PATH, "-c", _SERVE_COMMAND, *self.argv],
            stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches only the supervisor, which stops the host once
            # (a second signal would make the host exit without draining).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.reported_exit = False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        self.stopping = process
        try:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.drain_timeout + 15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            self.stopping = None

    def terminate(self) -> None:
        """Send SIGTERM to the running or stopping host: its second one makes it exit at once (status 130)."""
        process = self.process or self.stopping
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


def serve_with_reload(
    ctx: click.Context,
    config_path: str | None,
    services: Sequence[str],
    directories: Sequence[str],
    *,
    err: IO[str] | None = None,
) -> int:
    """Run ``kservice serve`` in a child and replace it whenever watched code changes.

    Returns 0 once a SIGINT/SIGTERM/SIGHUP has drained and stopped the host; a second SIGINT or SIGTERM stops
    the host at once (calls in flight then fail as when a host dies) and returns 130.
    """
    try:
        import watchfiles
    except ImportError as exc:
        raise click.ClickException(f"--reload needs watchfiles: pip install 'kservice[reload]' ({exc})") from None
    err = err or sys.stderr
    watched = [str(Path(d).resolve()) for d in directories]
    config_file = str(Path(config_path).resolve()) if config_path else None
    if config_file and not any(config_file.startswith(d + os.sep) for d in watched):
        watched.append(str(Path(config_file).parent))

    python_files = watchfiles.PythonFilter()

    def wanted(change: Any, path: str) -> bool:
        return path == config_file or python_files(change, path)

    def say(message: str) -> None:
        with contextlib.suppress(OSError):  # the terminal closed (SIGHUP): the host must still be stopped
            print(f"reload: {message}", file=err, flush=True)

    stop = threading.Event()
    interrupted = False
    host = _Host(_child_argv(ctx), float(ctx.params.get("drain_timeout") or 30.0))

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if stop.is_set() and signum != signal.SIGHUP:  # a second hangup still lets the host drain
            # A second signal: as `kservice serve` without --reload, stop now, not after the drain. The host
            # is in its own session (the terminal's signal never reaches it), so pass it on: with the SIGTERM
            # that stop() sends, that is the host's second signal, and it exits at once.
            interrupted = True
            host.terminate()
        stop.set()

    # SIGHUP too (the terminal closed): it would end the supervisor at once, and the host with it.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        host.start()
        say(f"watching {', '.join(watched)} for changes (pid {os.getpid()})")
        for changes in watchfiles.watch(
            *watched,
            watch_filter=wanted,
            stop_event=stop,
            rust_timeout=500,
            yield_on_timeout=True,
            debounce=300,
            raise_interrupt=False,
        ):
            status = host.exited()
            if status is not None and not host.reported_exit:
                host.reported_exit = True
                say(f"the host exited with status {status}; fix the error above, the next change starts it again")
            if not changes:
                continue
            paths = sorted({os.path.relpath(path) for _, path in changes})
            say(f"{', '.join(paths[:3])}{' and more' if len(paths) > 3 else ''} changed; checking the new code")
            error = check_importable(config_path, services, app_dir=ctx.params.get("app_dir"))
            if error:
                keeping = "the old host keeps serving" if host.exited() is None else "no host is running"
                say(f"not restarting, {keeping}: {error}")
                continue
            say("restarting the host (calls in flight finish first)")
            host.stop()
            host.start()
    finally:
        host.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if interrupted else 0
