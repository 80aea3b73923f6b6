"""Discovery: which services run on this host, and at which request queue.

One JSON record per served name in a per-user directory beside the queue
directory (``<queue directory>-services``, mode 0700, see
:func:`~kservice.plugins.mmap.ring.default_queue_directory`; the variable
``KSERVICE_REGISTRY_DIR`` overrides it). Record files are 0600 and hold the
service name, request-queue name, host pid and the pid's start time (so a
recycled pid is not mistaken for the host), transport, start time, host name
and the service's queue timeout.

A name has at most one live host on a host machine: :func:`publish` refuses a
second live claimant with :class:`ServiceNameTaken` (the first keeps serving),
and replaces a record whose host died. Lookups ignore and remove records of
dead hosts. Records and directories owned by another user are never read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from kservice import ServiceError

from . import codec
from .ring import (
    RuntimeDirectoryError,
    _boot_id,
    _pid_alive,
    _proc_stat,
    add_janitor,
    default_private_directory,
    entries_of,
    is_private_file,
    locked,
    locked_directory,
    private_directory,
    queue_directory,
    reclaim_stale_queues,
)

__all__ = [
    "ServiceNameTaken",
    "lookup",
    "process_alive",
    "process_start_time",
    "publish",
    "reclaim",
    "reclaim_records",
    "registry_directory",
    "running_services",
    "withdraw",
]

_SUFFIX = ".json"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ServiceNameTaken(ServiceError):
    """Another live process on this host already serves that name."""


@functools.cache
def _boot_time() -> float | None:
    """The system's boot time in epoch seconds (``btime`` of ``/proc/stat``), None without procfs."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def process_start_time(pid: int) -> float:
    """The start time of ``pid`` in epoch seconds (0.0 when it does not exist).

    Read from procfs as psutil computes ``create_time()`` on Linux (boot time plus
    the start tick), without importing psutil on a caller's first lookup; psutil
    where there is no procfs.
    """
    boot = _boot_time()
    if boot is not None:
        info = _proc_stat(pid) if pid > 0 else None
        if info is None or not info[1]:
            return 0.0
        return boot + info[1] / _CLOCK_TICKS
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


def process_alive(pid: int, start_time: float = 0.0) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``start_time`` is given, is the same process."""
    if pid <= 0:
        return False
    boot = _boot_time()
    if boot is not None:
        info = _proc_stat(pid)
        if info is None:
            return False
        state, ticks = info
        if state in ("Z", "X", "x"):
            return False
        if not start_time or not ticks:
            return True  # exists (perhaps not inspectable): assume alive rather than steal its name
        return abs(boot + ticks / _CLOCK_TICKS - start_time) < 0.5
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return not start_time or abs(proc.create_time() - start_time) < 0.5
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # exists but not inspectable: assume alive rather than steal its name


def registry_directory(*, sweep: bool = True) -> Path:
    """The per-user registry directory (see :func:`~kservice.plugins.mmap.ring.private_directory`).

    Like :func:`~kservice.plugins.mmap.ring.queue_directory`, runs the janitors
    the first time this process uses the directories, unless ``sweep`` is false.
    """
    queues = queue_directory(sweep=sweep)
    override = os.environ.get("KSERVICE_REGISTRY_DIR")
    if override:
        return private_directory(Path(override), "service registry")
    if os.environ.get("KSERVICE_QUEUE_DIR"):
        return private_directory(queues.with_name(queues.name + "-services"), "service registry")
    return default_private_directory("-services", "service registry")


def _path(directory: Path, name: str) -> Path:
    return directory / (quote(name, safe="") + _SUFFIX)


def _read(path: Path) -> dict[str, Any] | None:
    """A record, or None when it is missing, unreadable, not ours or not a record."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not is_private_file(st):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            record = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if (
        not isinstance(record, dict)
        or type(record.get("pid")) is not int
        or not isinstance(record.get("queue"), str)
        # The liveness fields, when present (a damaged file, one edited by hand or written by another program,
        # is no record: read as one, it raised in every listing and janitor, and kservice serve could not start).
        or type(record.get("pid_start", 0.0)) not in (int, float)
        or type(record.get("pid_start_ticks", 0)) is not int
        or type(record.get("boot_id", "")) is not str
    ):
        return None
    return record


def _alive(record: dict[str, Any]) -> bool:
    """Whether the host that wrote ``record`` still runs.

    By its start in clock ticks since boot, when the record was written
    during this boot: that never changes while the process lives, whereas
    its start in wall-clock seconds moves with every step of the clock (NTP,
    a virtual machine resumed), and a step of more than half a second would
    make every live host look dead. Records without it (an older kservice)
    are judged by the wall-clock start, as before.
    """
    ticks = record.get("pid_start_ticks")  # its type, and boot_id's, checked by _read
    boot = record.get("boot_id")
    if ticks and boot and boot == _boot_id():
        return _pid_alive(record["pid"], ticks)
    return process_alive(record["pid"], float(record.get("pid_start") or 0.0))


def publish(name: str, queue: str, **extra: Any) -> dict[str, Any]:
    """Record that this process serves ``name`` on request queue ``queue``; returns the record.

    Raises ServiceNameTaken, naming the other host's pid, when a live process
    already serves ``name``. A dead host's record is replaced.
    """
    pid = os.getpid()
    stat = _proc_stat(pid)
    record = {
        "name": name,
        "queue": queue,
        "pid": pid,
        "pid_start": process_start_time(pid),
        # What says it is this process for as long as it lives, whatever the wall clock does (see _alive).
        "pid_start_ticks": stat[1] if stat is not None else 0,
        "boot_id": _boot_id(),
        "transport": "mmap",
        "started_at": time.time(),
        "host": os.uname().nodename,  # gethostname(), without importing socket at start
        **extra,
    }
    with locked_directory(registry_directory) as directory:
        path = _path(directory, name)
        existing = _read(path)
        if existing is not None and _alive(existing):
            raise ServiceNameTaken(
                f"service {name!r} is already served on this host by pid {existing['pid']} "
                f"(queue {existing['queue']}); stop that host first or serve this one under another name"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale or unreadable: its host is gone
        tmp = directory / f".tmp-{pid}-{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            # link() publishes the complete file atomically (readers never see a partial record).
            os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return record


def withdraw(name: str, queue: str) -> None:
    """Remove this process's record of ``name`` (only if it still names ``queue``)."""
    with contextlib.suppress(OSError):
        directory = registry_directory()
        with locked(directory):
            path = _path(directory, name)
            record = _read(path)
            if record is not None and record["queue"] == queue and record["pid"] == os.getpid():
                os.unlink(path)


def lookup(name: str) -> dict[str, Any] | None:
    """The live record of ``name``, or None; a dead host's record is removed.

    Raises RuntimeDirectoryError when another user's path is in the way: no
    name can be found there, and the caller learns why.
    """
    try:
        directory = registry_directory()
    except RuntimeDirectoryError:
        raise
    except OSError:
        return None
    path = _path(directory, name)
    record = _read(path)
    if record is None:
        return None
    if _alive(record):
        return record
    _remove_if_stale(directory, path)
    return None


def _remove_if_stale(directory: Path, path: Path) -> bool:
    with locked(directory):
        record = _read(path)  # read again under the lock: a new host may have taken the name
        if record is not None and not _alive(record):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
    return False


def running_services() -> list[dict[str, Any]]:
    """Records of every live service of this user on this host, by name (RuntimeDirectoryError as :func:`lookup`)."""
    try:
        directory = registry_directory()
    except RuntimeDirectoryError:
        raise
    except OSError:
        return []
    found = []
    for entry in sorted(entries_of(directory), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.endswith(_SUFFIX):
            continue
        record = _read(Path(entry.path))
        if record is None:
            continue
        if _alive(record):
            found.append(record)
        else:
            _remove_if_stale(directory, Path(entry.path))
    return found


def reclaim_records() -> list[str]:
    """Remove records of dead hosts and temporary files of dead writers; returns the names removed."""
    removed: list[str] = []
    try:
        directory = registry_directory(sweep=False)  # the first-use sweep would run this and take its result
    except RuntimeDirectoryError:
        raise  # another user's path in the way: say so (kservice cleanup, serve)
    except OSError:
        return removed
    for entry in entries_of(directory):
        if entry.name.startswith(".tmp-"):
            pid = entry.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            continue
        if entry.name.endswith(_SUFFIX):
            record = _read(Path(entry.path))
            # A live host's record (most of them) is left without taking the lock to read it again.
            if record is not None and not _alive(record) and _remove_if_stale(directory, Path(entry.path)):
                removed.append(unquote(entry.name[: -len(_SUFFIX)]))
    return sorted(removed)


def reclaim() -> dict[str, list[str]]:
    """Remove what dead processes left: request/response rings, registry records, out-of-band segments."""
    return {
        "queues": reclaim_stale_queues(),
        "records": reclaim_records(),
        "segments": codec.reclaim_segments(process_alive),
    }


def _reclaim_records_and_segments() -> None:
    reclaim_records()
    codec.reclaim_segments(process_alive)


# Any process that uses the mmap plugin (this module is loaded with it), not only the CLI and hosts,
# reclaims what dead processes left when it first uses a queue directory (the rings themselves are
# reclaimed by the ring module).
add_janitor(_reclaim_records_and_segments)
