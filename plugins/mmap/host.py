"""Hosting services in their own process: ``kservice serve`` and the ``process`` task kind.

``kservice serve [-c config.yaml] [SERVICE ...]`` hosts services in this
process, each a LocalServiceTask listening on ``inproc`` and ``mmap`` and
published by name in the per-user registry, and prints one line per service
when it is ready (``serving kv on mmap queue svc.kv.1234.ab12cd (pid 1234)``).
SIGTERM, SIGINT or SIGHUP stops accepting calls, lets those in flight finish,
unlinks the queues and exits 0; a second SIGINT/SIGTERM exits at once (status
130), a second SIGHUP changes nothing.

The ``process`` task kind starts a fresh ``python`` running :func:`main` (a
fresh interpreter, never a fork) hosting one service; the task's start returns
once the child serves, or raises ServiceUnavailableError with the tail of the
child's stderr. Its stop sends SIGTERM, waits for the drain, then kills. The
child also stops when its parent dies (it watches its stdin for EOF, and
whether its parent changed, since a process the parent forked keeps the pipe
open); it
ignores SIGINT and SIGHUP, which a terminal sends to the whole process group
(the parent decides what a Ctrl-C means). The
child is an isolated interpreter (``python -I``) whose ``sys.path`` is the
parent's, passed explicitly (:func:`_child_sys_path`): nothing is imported
from the child's working directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from typing import IO, Any, ClassVar

from kservice import (
    BaseServiceTask,
    Config,
    ConfigError,
    LocalServiceTask,
    ServiceAddress,
    ServiceEnvironment,
    ServiceFactory,
    ServiceMiddleware,
    ServiceStatus,
    ServiceUnavailableError,
    TaskContext,
)
from kservice import Listener as _Listener
from kservice._task import stop_timeout

from .registry import reclaim

__all__ = ["ProcessServiceTask", "reclaim", "serve"]


def __getattr__(name: str) -> Any:
    # The click commands live in .commands (imported only by the CLI); these names stay importable from here.
    if name in ("serve_command", "cleanup_command"):
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Seconds a stopping host gives calls in flight before answering the rest unavailable.
DRAIN_TIMEOUT = 30.0
#: Seconds between a host's looks at whether its parent died while a child of the parent keeps its stdin open.
PARENT_CHECK = 1.0
_LENGTH = struct.Struct("<Q")
#: What a stopping parent writes on the child's stdin: ``stop <seconds>\n``, the child's drain budget.
_STOP_LINE = b"stop %.6f\n"
# Run with ``python -I``: neither the working directory nor PYTHON* variables add to sys.path, which is
# set from argv[1] (the parent's, see _child_sys_path) before kservice is imported.
_CHILD_COMMAND = (
    "import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
    "from kservice.plugins.mmap.host import main; sys.exit(main())"
)


def _child_sys_path() -> list[str]:
    """The sys.path a process task's child gets: this process's, with relative entries made absolute and moved last.

    A relative entry (the ``''`` that ``python -c`` or an interactive
    interpreter puts first) means "the working directory": made absolute and
    searched last, a module this process imported from there (the service's
    own) still imports in the child, but a file there never shadows the
    standard library or an installed package. Absolute entries (the script's
    directory, PYTHONPATH, site-packages) keep their order.
    """
    absolute = [entry for entry in sys.path if os.path.isabs(entry)]
    try:
        relative = [os.path.abspath(entry) for entry in sys.path if not os.path.isabs(entry)]
    except OSError:  # the working directory was removed: nothing to resolve against
        relative = []
    return list(dict.fromkeys([*absolute, *relative]))


# =========================================================================== serving


def _with_mmap(entry: dict[str, Any]) -> dict[str, Any]:
    entry = dict(entry)
    entry["kind"] = "local"
    entry["transports"] = list(dict.fromkeys([*entry.get("transports", []), "mmap"]))
    return entry


def _hosted_as_declared(name: str, entry: dict[str, Any], host_locally: bool, notes: list[str]) -> dict[str, Any]:
    """The entry ``kservice serve`` hosts for a declared service: one local instance over mmap, or ConfigError.

    ``serve`` hosts each service as one instance in its own process. A service
    declared with another kind or more than one replica is refused (naming it
    and what to do) unless ``host_locally`` is set; then a note saying what is
    hosted instead is added to ``notes``. An unknown kind is always refused.
    """
    from kservice._plugins import task_kinds

    kind = entry.get("kind", "local")
    replicas = entry.get("replicas", 1)
    if kind == "local" and replicas == 1:
        return _with_mmap(entry)
    kinds = sorted(task_kinds())
    if kind not in kinds:
        import difflib

        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"services.{name}.kind: no task kind {kind!r} is registered{hint} (registered: {', '.join(kinds)}); nothing was started"
        )
    declared = f"kind: {kind}" + (f", replicas: {replicas}" if replicas != 1 else "")
    if not host_locally:
        raise ConfigError(
            f"services.{name} is declared {declared}, but 'kservice serve' hosts each service as one instance in its own "
            f"process; set kind: local and replicas: 1 for it, start it from a program with ServiceEnvironment, or pass "
            f"--host-locally to host one local instance instead; nothing was started"
        )
    notes.append(
        f"note: {name} is declared {declared}; hosting one local instance in this process instead (--host-locally)"
    )
    return _with_mmap(entry)


def _service_entries(
    config: Config, services: Sequence[str], host_locally: bool = False, notes: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The ``services:`` entries to host: the named ones (config names, entry points, import paths) or all.

    Raises ConfigError for a declared service that cannot be hosted as declared (see _hosted_as_declared).
    """
    notes = notes if notes is not None else []
    declared = {name: config.service_entry(name) or {} for name in config.service_names()}
    if not services:
        if not declared:
            raise ConfigError("nothing to serve: name services on the command line or declare them under 'services:'")
        return {name: _hosted_as_declared(name, entry, host_locally, notes) for name, entry in declared.items()}
    chosen: dict[str, dict[str, Any]] = {}
    for spec in services:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if ":" in path:
            chosen[name or path.rpartition(":")[2]] = _with_mmap({"class": path})
        elif path in declared:
            chosen[name or path] = _hosted_as_declared(path, declared[path], host_locally, notes)
        else:
            ServiceEnvironment.load_entry_point_service(path)  # ConfigError naming the known ones
            chosen[name or path] = _with_mmap({"entry_point": path})
    return chosen


def serve(
    config: str | os.PathLike[str] | dict[str, Any] | None,
    services: Sequence[str] = (),
    *,
    out: IO[str] | None = None,
    stop: threading.Event | None = None,
    drain_timeout: float = DRAIN_TIMEOUT,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    host_locally: bool = False,
) -> int:
    """Host services until SIGTERM/SIGINT/SIGHUP (or ``stop`` is set); returns the exit status.

    Prints one ``serving NAME on mmap queue Q (pid P)`` line per service once
    all are ready, and ``stopped serving NAME, ... (pid P)`` once they have
    drained. With ``metrics_port`` the process's Prometheus metrics are served
    at ``http://metrics_host:port/metrics`` (port 0: a free one) from before the
    services start until they have stopped.

    Raises ConfigError for an unknown service or a bad config, and for a
    declared service it cannot host as declared (another kind, replicas > 1)
    unless ``host_locally`` (then a note on stderr says what is hosted
    instead); ServiceError (ServiceNameTaken) when another live host serves one
    of the names; MetricsPortError when the metrics port cannot be bound.
    Nothing is served before these checks pass.
    """
    out = out or sys.stdout
    reclaim()
    loaded = Config.load(config)
    raw = loaded.as_dict()
    notes: list[str] = []
    raw["services"] = _service_entries(loaded, services, host_locally, notes)
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    # Bound before anything is served: a port in use is an error, not a host without metrics.
    exposition = _start_metrics(metrics_host, metrics_port) if metrics_port is not None else None
    environment = ServiceEnvironment("serve", raw)
    stop = stop or threading.Event()
    restore = _install_signal_handlers(stop, environment)
    try:
        environment.start()
        for task in environment:
            queue = next((a.target for a in task.addresses if a.transport == "mmap"), "?")
            print(f"serving {task.service_name} on mmap queue {queue} (pid {os.getpid()})", file=out, flush=True)
        if exposition is not None:
            host, port = exposition.server_address[:2]
            print(f"metrics on http://{host}:{port}/metrics", file=out, flush=True)
        stop.wait()
    finally:
        names = ", ".join(environment.service_names())
        environment.stop(drain_timeout)
        restore()
        if exposition is not None:
            exposition.shutdown()
            exposition.server_close()
    # The terminal may be gone (a hangup stopped us): every write to it fails, and the drain already succeeded.
    with contextlib.suppress(OSError):
        print(f"stopped serving {names} (pid {os.getpid()})", file=out, flush=True)
    return 0


class MetricsPortError(ConfigError):
    """The ``--metrics-port`` of ``kservice serve`` could not be bound (in use, or not allowed)."""


def _start_metrics(host: str, port: int) -> Any:
    """prometheus-client's HTTP exposition of this process's kservice metrics, in a daemon thread."""
    try:
        from kservice.middleware.metrics import registry
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise ConfigError(f"--metrics-port needs prometheus-client: pip install 'kservice[metrics]' ({exc})") from None
    try:
        server, _ = start_http_server(port, addr=host, registry=registry())
    except OSError as exc:
        raise MetricsPortError(
            f"cannot serve metrics on {host} port {port}: {exc.strerror or exc} (choose another --metrics-port)"
        ) from None
    return server


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(level: str) -> None:
    """Send this process's log records (the call log's ``kservice.calls`` among them) to stderr at ``level``."""
    logging.basicConfig(level=level.upper(), format=_LOG_FORMAT, stream=sys.stderr)


def _install_signal_handlers(stop: threading.Event, environment: ServiceEnvironment) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            if signum == signal.SIGHUP:
                # A hangup is never "stop now": one terminal closing can deliver two (the shell passes its
                # own on, the kernel sends another once the shell exits), and the drain must still finish.
                return
            # Second signal: leave now, removing at least the request queues.
            for task in environment:
                for listener in task.listeners:
                    queue = getattr(listener, "queue", None)
                    if queue is not None:
                        with contextlib.suppress(Exception):
                            queue.unlink()
            os._exit(130)
        stop.set()

    # SIGHUP (the terminal or ssh session closed) drains as SIGTERM does: its default would end the
    # process at once, failing the calls in flight and leaving the queues and the registry record behind.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


# =========================================================================== the process task kind


class _ChildListener(_Listener):
    """The child's mmap address, seen from the parent."""

    def __init__(self, address: ServiceAddress, process: subprocess.Popen[bytes]) -> None:
        self.address = address
        self._process = process

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self) -> None:
        pass


def _unimportable_place(cls: type) -> str | None:
    """Where ``cls`` is defined when another process could not import it by reference (else None)."""
    module, qualname = getattr(cls, "__module__", ""), getattr(cls, "__qualname__", "")
    if module == "__main__":
        return "__main__ (the script being run)"
    if "<locals>" in qualname:
        return f"a function ({qualname})"
    return None


def _check_importable(factory: ServiceFactory) -> None:
    """ConfigError when the child process could not import the service class (it is sent by reference)."""
    cls = factory.service_class
    where = _unimportable_place(cls)
    if where is None:
        return
    raise ConfigError(
        f"service {factory.service_name!r}: class {cls.__name__} is defined in {where}, which the process "
        f"hosting a kind='process' service cannot import; move it into a module "
        f"(e.g. {cls.__name__.lower()}.py) and import it from there, or use kind='local'"
    )


#: The hooks a middleware runs in the service's process (see ServiceMiddleware); one with none of them
#: overridden is caller-side only and is never sent to the host.
_SERVICE_SIDE_HOOKS = ("before_handle", "after_handle", "observe_handle", "after_handle_batch", "observe_handle_batch")


def _service_side_hooks(middleware: Any) -> list[str]:
    """The service-side hooks ``middleware``'s class defines (overrides of ServiceMiddleware's, or its own)."""
    cls = type(middleware)
    return [
        name
        for name in _SERVICE_SIDE_HOOKS
        if getattr(cls, name, None) is not None and getattr(cls, name) is not getattr(ServiceMiddleware, name, None)
    ]


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


def _check_middleware_importable(middleware: Any, service_name: str) -> None:
    """ConfigError when the child could not import the class of a middleware it must run (it is sent by reference)."""
    cls = type(middleware)
    where = _unimportable_place(cls)
    if where is None:
        return
    raise ConfigError(
        f"service {service_name!r}: middleware {cls.__name__} has service-side hooks "
        f"({', '.join(_service_side_hooks(middleware))}) that must run in the process hosting this "
        f"kind='process' service, but it is defined in {where}, which that process cannot import; move the "
        f"class into an importable module (e.g. {cls.__name__.lower()}.py) and import it from there, or use "
        "kind='local'"
    )


class ProcessServiceTask(BaseServiceTask):
    """A service hosted in a child process (a fresh interpreter) and reached over ``mmap``.

    Status comes from the child. The service class, its constructor
    arguments and the configuration must be picklable, and the class
    importable in the child (the parent's ``sys.path`` is passed on, see
    :func:`_child_sys_path`; the child's working directory is not searched).
    """

    kind: ClassVar[str] = "process"
    hosted_here: ClassVar[bool] = False  # its child runs the instance (and reports its load)
    default_transports: ClassVar[tuple[str, ...]] = ()

    def __init__(self, service_factory: ServiceFactory, ctx: TaskContext | None = None) -> None:
        _check_importable(service_factory)
        super().__init__(service_factory, ctx)
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Any = None
        self._stderr: IO[bytes] | None = None
        self._address: ServiceAddress | None = None
        #: why the last respawn failed ("" when the child runs)
        self._host_failure = ""

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._process.pid if self._process is not None else None

    def _child_config(self) -> dict[str, Any]:
        raw = self.ctx.resolved_config().as_dict()
        entry = dict(raw.get("services", {}).get(self.service_name) or {})
        entry.pop("class", None)
        entry.pop("entry_point", None)
        entry = _with_mmap(entry)
        mmap_options = dict(entry.get("mmap") or {})
        if mmap_options.get("publish") is None:
            mmap_options["publish"] = False  # private to this environment unless configured otherwise
        entry["mmap"] = mmap_options
        raw["services"] = {self.service_name: entry}
        return raw

    def host_instance(self) -> None:
        """Spawn the hosting process and wait (``mmap.start_timeout``) until it serves; raise what it reported."""
        payload = pickle.dumps(
            {
                "factory": self.service_factory,
                "config": self._child_config(),
                "environment": self.ctx.environment_name,
                "middlewares": self._portable_middlewares(),
                "parent": os.getpid(),
            },
            protocol=5,
        )
        spec = _LENGTH.pack(len(payload)) + payload
        timeout = float((self.options.get("mmap") or {}).get("start_timeout", 60.0))
        self._stderr = tempfile.TemporaryFile(prefix="kservice-host-")
        passed = os.dup(sys.stderr.fileno()) if _has_fileno(sys.stderr) else os.open(os.devnull, os.O_WRONLY)
        try:
            self._process = subprocess.Popen(
                # -c rather than -m: the package imports this module, and runpy would run a second copy.
                # -I: an isolated interpreter, whose sys.path is exactly the one passed (no working directory).
                [sys.executable, "-I", "-c", _CHILD_COMMAND, json.dumps(_child_sys_path()), "--child", str(passed)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                pass_fds=(passed,),
                close_fds=True,
            )
        finally:
            os.close(passed)
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(spec)
            process.stdin.flush()
        except OSError:
            pass  # the child died at once: reported below with its stderr
        ready = self._wait_ready(process, timeout)
        process.stdout.close()
        self._address = ServiceAddress(
            "mmap",
            self.service_name,
            ready["queue"],
            instance=ready["queue"],
            info={"pid": process.pid, "queue_timeout": ready["queue_timeout"]},
        )

    def open_listeners(self) -> list[_Listener]:
        """The child's own mmap listener, as seen from here (alive while the child runs)."""
        assert self._address is not None and self._process is not None
        return [_ChildListener(self._address, self._process)]

    def _portable_middlewares(self) -> list[tuple[str, bytes]]:
        """The environment's middleware with service-side hooks, pickled one by one for the child.

        Middleware with caller-side hooks only is not sent: it runs here, and
        the child need not import it. Middleware with service-side hooks whose
        class the child cannot import (defined in ``__main__`` or in a
        function) fails the start with ConfigError naming the class: its hooks
        would silently not run in the host. So does one that cannot be pickled
        (a guard must never be skipped without a word). Each travels as
        ``(class name, pickle)`` so the child can name the one it fails to load.
        """
        portable = []
        for middleware in self.ctx.current_middlewares():
            if not _service_side_hooks(middleware):
                continue
            _check_middleware_importable(middleware, self.service_name)
            try:
                pickled = pickle.dumps(middleware, protocol=5)
            except BaseException as exc:  # noqa: BLE001 - any pickling failure: it cannot reach the host
                raise ConfigError(
                    f"service {self.service_name!r}: middleware {type(middleware).__qualname__} has service-side "
                    f"hooks ({', '.join(_service_side_hooks(middleware))}) that must run in the process hosting "
                    f"this kind='process' service, but it cannot be pickled ({type(exc).__name__}: {exc}); "
                    "give it a __getstate__/__reduce__ that leaves out what cannot cross (locks, connections) "
                    "and rebuilds it there, or use kind='local'"
                ) from exc
            portable.append((_class_name(middleware), pickled))
        return portable

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        buffered = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"\n" not in buffered:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceUnavailableError(
                        f"the process hosting {self.service_name!r} was not ready within {timeout:.0f}s "
                        f"(mmap.start_timeout){self._stderr_tail()}"
                    )
                if not selector.select(min(remaining, 0.5)):
                    continue
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    process.wait(5)
                    raise ServiceUnavailableError(
                        f"the process hosting {self.service_name!r} exited with status {process.returncode} "
                        f"before serving{self._stderr_tail()}"
                    )
                buffered += chunk
        line = buffered.split(b"\n", 1)[0].decode(errors="replace")
        kind, _, payload = line.partition(" ")
        if kind != "ready":
            raise ServiceUnavailableError(
                f"the process hosting {self.service_name!r} failed: {payload}{self._stderr_tail()}"
            )
        return json.loads(payload)  # type: ignore[no-any-return]

    def _stderr_tail(self, limit: int = 4000) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError):
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            text = self._stderr.read().decode(errors="replace").strip()
            if text:
                return f"; its stderr ends with:\n{text}"
        return ""

    def release_instance(self, deadline: float) -> None:
        """Stop the child by ``deadline`` (monotonic): it drains, then answers what never started; kill it at ``deadline``.

        The child is told its budget (a little less than what is left, so it
        can answer and exit in time): calls running in it may finish until
        then; calls it had queued but not started are answered
        ServiceUnavailableError "stopped before the request could run"
        (``may_have_run`` False). A child still alive at ``deadline`` is
        killed, so this returns by the deadline (plus the time to reap it);
        its callers then learn the host died (``may_have_run`` True for calls
        it had read). What a child that did not stop cleanly left is reclaimed.
        """
        self._address = None
        process, self._process = self._process, None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if process is not None:
            remaining = deadline - time.monotonic()
            if not self._tell_child_to_stop(process, remaining):
                with contextlib.suppress(OSError):
                    process.send_signal(signal.SIGTERM)
            try:
                exit_status = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                exit_status = process.wait()
            if exit_status != 0:
                # A child that did not stop cleanly (killed, crashed) could not remove its queues.
                reclaim()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.close_listeners()

    @staticmethod
    def _tell_child_to_stop(process: subprocess.Popen[bytes], remaining: float) -> bool:
        """Write the child its drain budget on its stdin; False when it cannot be told (then use SIGTERM).

        The budget keeps back a margin for answering the calls that never
        started and for exiting: a quarter of what is left, between 50 ms and 1 s.
        """
        stdin = process.stdin
        if stdin is None or stdin.closed:
            return False
        margin = min(1.0, max(0.05, remaining * 0.25))
        try:
            stdin.write(_STOP_LINE % max(0.0, remaining - margin))
            stdin.flush()
        except (OSError, ValueError):  # the child is gone (a broken pipe), or the pipe was closed
            return False
        return True

    def recover(self, reason: str) -> str:
        """Health recovery: replace the hosting process (dead, or alive but failing its checks)."""
        with self._state_lock:
            if self.state != "running":
                return f"nothing: task is {self.state}"
            old_pid = self.pid
            self.rebuild_service()
            return f"respawned the hosting process (pid {old_pid} -> {self.pid})"

    def rebuild_service(self) -> None:
        """Replace the child process with a new one (health recovery).

        The old child drains first, as for a stop: calls running in it may
        finish for ``health.drain_timeout`` seconds (a stop's default drain,
        30 s, when unset), calls it queued but never started are answered
        "stopped before the request could run", and it is killed at the end of
        the drain (a call still running then: "died during the call"). A
        child that is already dead is replaced at once. Meanwhile calls are
        refused "being restarted" with nothing sent, and retries wait for the
        new child (see BaseServiceTask.host_replacement).
        """
        drain = stop_timeout((self.options.get("health") or {}).get("drain_timeout"))
        with self._state_lock, self.host_replacement():
            self.release_instance(time.monotonic() + drain)
            try:
                self.host_instance()
            except BaseException as exc:
                # Running without a host: check_service_health says so, so recovery tries again.
                self._host_failure = f"{type(exc).__name__}: {exc}"
                self.release_instance(time.monotonic())  # reap the child that failed, close its stderr
                raise
            self._host_failure = ""
            self.listeners = self.open_listeners()
            self.restarts += 1

    def check_service_health(self) -> str | None:
        """Health: a reason when the task runs without a hosting process (its respawn failed), else None.

        The service's own ``check_health()`` runs in the child, whose health
        monitor rebuilds an unhealthy instance there; this reports only what
        the parent alone can see.
        """
        if self.state == "running" and not self.listeners:
            return f"no process hosts the service: its restart failed ({self._host_failure or 'unknown cause'})"
        return None

    def report_status(self) -> ServiceStatus:
        """The child's own status (kind ``process``, its pid in ``extra``); the local view if it cannot answer."""
        if self.state == "running" and self.listeners:
            try:
                if self._connection is None:
                    from .transport import MmapConnection

                    self._connection = MmapConnection(self.listeners[0].address)
                remote = self._connection.remote_status(5.0)
            except ServiceUnavailableError as exc:
                status = super().report_status()
                status.healthy = False
                status.health_reason = str(exc)
                return status
            fields = {k: v for k, v in remote.items() if k in ServiceStatus.__dataclass_fields__}
            status = ServiceStatus(**fields)
            status.kind = self.kind
            status.restarts += self.restarts
            status.extra["pid"] = remote.get("pid")
            return status
        return super().report_status()


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


# =========================================================================== the child


def _read_blob(stream: IO[bytes]) -> bytes:
    header = stream.read(_LENGTH.size)
    if len(header) != _LENGTH.size:
        raise EOFError("the parent closed the pipe before sending the service")
    (length,) = _LENGTH.unpack(header)
    return stream.read(length)


def _load_middlewares(sent: Sequence[tuple[str, bytes]]) -> tuple[Any, ...]:
    """The parent's service-side middleware, each unpickled on its own so a failure names its class."""
    loaded = []
    for name, pickled in sent:
        try:
            loaded.append(pickle.loads(pickled))
        except Exception as exc:
            raise ConfigError(
                f"middleware {name} could not be loaded in the process hosting the service "
                f"({type(exc).__name__}: {exc}); its class must be importable there under the same module name: "
                "move it into an importable module on sys.path"
            ) from exc
    return tuple(loaded)


def _child_main(output_fd: int) -> int:
    """Host one service for a ProcessServiceTask; the spec arrives on stdin."""
    stdin = sys.stdin.buffer
    stop = threading.Event()
    started = threading.Event()
    try:
        loaded = pickle.loads(_read_blob(stdin))
        threading.Thread(
            target=_exit_if_orphaned_before,
            args=(started, loaded.get("parent", os.getppid())),
            name="parent-watch-start",
            daemon=True,
        ).start()
        factory: ServiceFactory = loaded["factory"]
        config = Config.load(loaded["config"])
        task = LocalServiceTask(
            factory, TaskContext(loaded["environment"], config, _load_middlewares(loaded.get("middlewares", ())))
        )
        task.start_service()
        started.set()
    except BaseException as exc:  # reported to the parent, which raises it
        traceback.print_exc()
        sys.stderr.flush()
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        print(f"failed {message}", flush=True)
        return 1
    address = next(a for a in task.addresses if a.transport == "mmap")
    restore = _child_signals(stop)
    print(f"ready {json.dumps({'queue': address.target, 'queue_timeout': task.queue_timeout})}", flush=True)
    # From now on our output goes to the parent's stderr; the pipe is closed by the parent.
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)

    #: the drain budget: DRAIN_TIMEOUT, or what the parent's stop line gives (its stop_service timeout)
    drain = [DRAIN_TIMEOUT]

    parent = loaded.get("parent", os.getppid())

    def watch_parent() -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts interpreter exit.
        # The pipe's EOF alone does not say the parent died: a child it forked (a fork pool's worker)
        # holds the pipe's write end as long as it lives. So every PARENT_CHECK seconds without input,
        # whether this process was handed to another parent (the parent died) is looked at too.
        buffered = b""
        with contextlib.suppress(OSError), selectors.DefaultSelector() as selector:
            selector.register(0, selectors.EVENT_READ)
            while True:
                if not selector.select(PARENT_CHECK):
                    if os.getppid() != parent:
                        break
                    continue
                chunk = os.read(0, 65536)
                if not chunk:
                    break
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                budget = next((b for b in map(_stop_budget, lines) if b is not None), None)
                if budget is not None:
                    drain[0] = budget
                    break
        stop.set()  # the parent asked to stop, closed the pipe or died

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    try:
        stop.wait()
    finally:
        task.stop_service(drain[0])
        restore()
    return 0


def _exit_if_orphaned_before(started: threading.Event, parent: int) -> None:
    """Exit the host at once if its parent dies before the service has started (``started`` set).

    A ``setup()`` that never returns (a download that stalled) would otherwise
    keep an orphaned host for good: the parent's ``mmap.start_timeout``, which
    kills it, died with the parent. Nothing is served yet, so nothing drains;
    what the host created is reclaimed by the next kservice process.
    """
    while not started.wait(PARENT_CHECK):
        if os.getppid() != parent:
            os._exit(1)


def _stop_budget(line: bytes) -> float | None:
    """The seconds of a ``stop <seconds>`` line from the parent, or None for any other line."""
    kind, _, value = line.partition(b" ")
    if kind != b"stop":
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0.0 else None  # NaN and negative budgets are not budgets


def _child_signals(stop: threading.Event) -> Any:
    """A process task's child: SIGTERM drains (a second one exits at once); SIGINT and SIGHUP are ignored.

    Why ignored: a terminal sends Ctrl-C (SIGINT) and its hang-up (SIGHUP)
    to the whole foreground process group, the child included. The parent
    decides what they mean (a REPL's Ctrl-C interrupts one call and goes on;
    before, it also stopped every process service of the caller). The child
    stops when the parent stops the task (its stop line, then SIGTERM) or dies
    (its stdin closes).
    """

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(130)
        stop.set()

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_signal),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    }
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -c <_CHILD_COMMAND> --child FD`` (used by the process task kind)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--child":
        return _child_main(int(args[1]))
    print(
        "usage: python -m kservice.plugins.mmap.host --child FD (use 'kservice serve' to host services)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
