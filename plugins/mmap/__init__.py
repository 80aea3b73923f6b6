"""The ``mmap`` plugin: services in other processes of this host, reached by name over shared memory.

Contributes the ``mmap`` transport, the ``process`` task kind (a service hosted
in a child process), discovery of services hosted by ``kservice serve`` (the
``kservice_resolve_service`` hook), the ``mmap`` configuration section and the
``kservice serve`` and ``kservice cleanup`` commands. See docs/mmap.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kservice import ServiceAddress, Setting, Transport, hookimpl

from .registry import ServiceNameTaken, lookup, reclaim, running_services
from .transport import MmapConnection, MmapListener, MmapTransport

if TYPE_CHECKING:
    import click
    from kservice import BaseServiceTask, ServiceFactory, TaskContext

    from .host import ProcessServiceTask

__all__ = [
    "MmapConnection",
    "MmapListener",
    "MmapTransport",
    "ProcessServiceTask",
    "ServiceNameTaken",
    "reclaim",
    "reclaimed_at_start",
    "running_services",
]

_transport = MmapTransport()


def _register_membarrier_early() -> None:
    """Register for ``membarrier(2)`` now if this process has one thread (see ``ring``'s fences).

    Registering is a quick system call in a process of one thread, and takes
    the kernel several milliseconds (an RCU grace period) in one of several.
    A caller's rings are opened where its calls find their route, in a thread
    of their own (``ServiceManager``'s route builds), so it is done here,
    while the plugin loads, typically before any other thread runs. A process
    already running threads registers with its first ring, as before.
    """
    import threading

    if threading.active_count() == 1:
        from ._futex import membarrier_register

        membarrier_register()


_register_membarrier_early()


def __getattr__(name: str) -> Any:
    # The hosting side (pickle, json, signals, the worker pool) is imported when it is first
    # used: a process that only calls services does not pay for it at start.
    if name == "ProcessServiceTask":
        from . import host

        return getattr(host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_process_task(factory: ServiceFactory, ctx: TaskContext) -> BaseServiceTask:
    from .host import ProcessServiceTask

    return ProcessServiceTask(factory, ctx)


@hookimpl
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    register(_transport)


@hookimpl
def kservice_register_task_kinds(register: Callable[..., None]) -> None:
    register("process", _make_process_task)


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "mmap",
        {
            "request_queue_capacity": Setting(
                (int,),
                4 << 20,
                "Bytes of a service's request ring (mmap transport; allocated in shared memory when the task starts).",
                minimum=4096,
                maximum=1 << 30,
            ),
            "inline_limit": Setting(
                (float,),
                0.0002,
                "Seconds under which a method observed fast runs in the mmap listener thread instead of the "
                "worker pool (saves a thread wake-up per call); 0 sends every call to the pool.",
                minimum=0,
            ),
            "publish": Setting(
                (bool,),
                None,
                "Whether the service's name is published in the per-user registry so any process can call it "
                "(default: yes for 'kservice serve' and local tasks, no for 'process' tasks).",
                nullable=True,
            ),
            "start_timeout": Setting(
                (float,), 60.0, "Seconds a 'process' task waits for its child to be ready.", minimum=0
            ),
            "caller_ring_check": Setting(
                (float,),
                5.0,
                "Seconds between a host's looks for callers gone: the response rings and pooled segments of "
                "callers that ended (or removed them) are unmapped, so their shared memory is freed, at most this long after.",
                minimum=0.01,
            ),
        },
    )


@hookimpl
def kservice_resolve_service(service_name: str) -> list[ServiceAddress] | None:
    record = lookup(service_name)
    if record is None:
        return None
    return [ServiceAddress("mmap", service_name, record["queue"], instance=record["queue"], info=record)]


@hookimpl
def kservice_known_services() -> list[str]:
    return [record["name"] for record in running_services()]


@hookimpl
def kservice_running_services() -> list[dict[str, Any]]:
    return [
        {
            "name": record["name"],
            "transport": "mmap",
            "pid": record["pid"],
            "address": record["queue"],
            "kind": "local",
            "host": record.get("host", ""),
            "started_at": record.get("started_at"),
            "class": record.get("cls", ""),
        }
        for record in running_services()
    ]


@hookimpl
def kservice_task_stopping(task: BaseServiceTask) -> None:
    # Refuse new calls at once (callers see ServiceUnavailableError and re-resolve)
    # while the task drains the calls it already accepted.
    for listener in task.listeners:
        if isinstance(listener, MmapListener):
            listener.stop_accepting()


@hookimpl
def kservice_register_commands(cli: click.Group) -> None:
    lazy = getattr(cli, "lazy_commands", None)
    if isinstance(lazy, dict):  # kservice's own group: the commands (and the host) load when used
        lazy.update(serve=f"{__name__}.commands:serve_command", cleanup=f"{__name__}.commands:cleanup_command")
    else:
        from .commands import cleanup_command, serve_command

        cli.add_command(serve_command)
        cli.add_command(cleanup_command)
    # Every kservice command starts here: reclaim what dead processes left behind (kept, so that
    # `kservice cleanup` reports what this sweep removed too, not only what was left after it).
    with contextlib.suppress(Exception):
        _reclaimed_at_start.append(reclaim())


#: What the sweep at the start of this ``kservice`` command removed (see ``kservice_register_commands``).
_reclaimed_at_start: list[dict[str, list[str]]] = []


def reclaimed_at_start() -> list[dict[str, list[str]]]:
    """What the sweep at the start of this ``kservice`` command removed, as :func:`reclaim` returned it."""
    return list(_reclaimed_at_start)
