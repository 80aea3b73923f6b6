"""A named, multi-producer / single-consumer ring of byte records in shared memory.

This is the low-level queue under the ``mmap`` transport.  It knows nothing about
services: it moves length-prefixed byte strings between processes of the same
user, with blocking and non-blocking forms, precise timeouts, and survival of
producers killed at any instruction.

Where queues live
-----------------
Each queue is one file ``<name>.q`` in the per-user directory
:func:`queue_directory` (mode 0700, owner checked on every use), which no other
user can create first: ``$XDG_RUNTIME_DIR/kservice`` (or ``/run/user/<uid>/kservice``),
else ``/dev/shm/kservice-<uid>-<digest>`` whose digest derives from a key kept
in the user's home and the boot id (see :func:`default_queue_directory`); the
environment variable ``KSERVICE_QUEUE_DIR`` overrides the path, which tests
use for isolation.  A path in the way (another user's, a symlink, a file) is
a :class:`RuntimeDirectoryError` naming it and what to do.  The first time a
process uses a directory it removes what dead processes left there
(:func:`add_janitor`).  Files are created 0600 and a file owned by
another user, or readable by group/others, is refused with ``PermissionError``
before it is mapped.  Names are letters, digits and ``._-`` (not starting with a
dot), at most 200 characters.

The *owner* of a queue is its consumer.  Its pid and its kernel start time
(``/proc/<pid>/stat`` field 22, so a recycled pid is not mistaken for the owner)
are stored in the header.  Service queues also carry the owner pid in their
name, but only the header is authoritative: :func:`reclaim_stale_queues` and
``create_queue(create=True)`` remove a segment when the process recorded in its
header is gone (or is a zombie).  Creation builds the complete segment under a
temporary name and renames it into place while holding an ``flock`` on the
directory, so an attacher never sees a half-initialised queue and two creators
or a creator and the janitor never race on the same name.  A name always means
the same queue or fails loudly: there is no anonymous fallback, and a pickled
handle carries only the name, so unpickling attaches to that same file.

Layout
------
A 4096-byte header followed by ``capacity`` bytes of ring data.  Header words
(native byte order, naturally aligned; offsets are the ``_OFF_*`` constants)::

    0    magic b"KSVRING\\0", layout version, header size
    16   capacity, max record size, owner pid, owner start time, creation time
    64   closed flag, lock recoveries counter
    128  tail (committed write position, u64)
    144  data_seq (futex word the consumer sleeps on), consumer_asleep flag
    192  head (read position, u64)
    208  space_seq (futex word full-queue producers sleep on), space_waiters flag
    256  process-shared robust pthread mutex (producers' lock)

``head`` and ``tail`` are free-running byte counters (``tail - head`` bytes are
in use; positions are taken modulo ``capacity``).  A record is an 8-byte frame
header (u32 length, u32 check word derived from the length and the record's
position; together one aligned u64 word) followed by the payload, padded to 8 bytes.  Payloads may wrap around
the end of the ring; frame headers never do (everything is 8-aligned).  The
largest record is ``capacity - 8`` bytes (one record may fill the whole ring);
anything larger raises :class:`RecordTooLarge` at once, naming the limit, so a
huge record can never wedge the queue; the transport carries such payloads out
of band.  Empty records are allowed.

Publishing and crash safety
---------------------------
Producers serialise on the robust mutex.  Under it a producer reads ``head`` and
``tail``, writes the frame header and payload into free space, and only then
publishes the record by storing the new ``tail`` (one aligned 8-byte store).  A
producer killed before that store leaves bytes beyond ``tail`` that nobody will
ever read; killed after it, it has published a complete record.  Either way the
next locker gets ``EOWNERDEAD`` from the kernel's robust-futex list, finds the
ring consistent by construction (nothing to roll back: the dead producer's
partial record is simply overwritten), calls ``pthread_mutex_consistent`` and
carries on.  No lock is ever held while waiting.

The consumer does not take the lock to read.  It loads ``tail``, copies the
record out, then stores the new ``head``.  Memory ordering relies on x86-64 TSO:
stores become visible in program order and loads are not reordered with older
loads, so a consumer that sees the new ``tail`` also sees the record bytes
written before it, and a producer that sees the new ``head`` knows the consumer
has finished copying the bytes it is about to overwrite.  Shared words are read
and written through ``memoryview`` casts of the mapping (``"Q"``/``"I"``), whose
item access copies one naturally aligned native word: a single ``mov``, so it
cannot tear.  ``struct.pack_into`` is never used on shared words because it
zero-fills its target before writing (a concurrent reader could see 0).
Store-then-load orderings (the
Dekker patterns of the sleep protocols below) are made safe by taking the mutex
or by :func:`full_barrier` (a locked instruction); the futex system call and the
mutex operations are full barriers too.

Waiting
-------
A waiting consumer first spins for an adaptive budget (at most 50 µs with two or
more usable CPUs, 20 µs with one), re-reading ``tail`` and calling
``sched_yield()`` every few checks, which releases the GIL for the process's
other threads and hands the CPU to the producer when both share one core.  The
budget doubles when a wait would have been served within the maximum spin and
halves after a wait twenty times longer (the queue was idle), so an idle
consumer soon spins only briefly while a busy pair stays awake.  A spin that
finds it was off its CPU for 250 µs or more (a ``sched_yield()`` that handed
the CPU to another process for its time slice, or a preemption) stops at once,
and the process's waits then sleep without spinning for 20 ms, doubling up to
2 s while the first spin after a pause loses its CPU again
(:func:`note_lost_cpu`): on a machine whose CPUs are all busy, spinning turned
every wait into a lost time slice.  Then it sleeps (compiled, when built:
``announce`` and ``doze``): under the mutex it re-checks for data, reads
``data_seq`` and sets ``consumer_asleep``; it releases the mutex and waits
(``FUTEX_WAIT``) on ``data_seq`` with the remaining timeout (at most one second
per wait, so liveness and signals are re-checked).  A producer reads ``consumer_asleep`` under the same
mutex right after publishing; only when it is set does it clear it, bump
``data_seq`` and, after unlocking, make the ``FUTEX_WAKE`` system call.  Because
both sides touch the flag under the mutex and the consumer waits on the value
it read there, a wake-up cannot be lost; a producer pays for a system call only
when the consumer really sleeps.

A producer facing a full ring sets ``space_waiters`` under the mutex (reading
``space_seq``), unlocks, re-checks the free space, and waits (``FUTEX_WAIT``) on
``space_seq``.  After advancing ``head`` the consumer reads ``space_waiters``;
only when set does it take the mutex, clear it, bump ``space_seq`` and wake the
producers.  That pair is a Dekker pattern (each side stores, then loads what the
other stored), which needs a full barrier on both sides: the producer's is its
unlock (a locked instruction) plus a ``membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)``
call, which executes a barrier on the consumer's behalf, so the consumer's hot
path needs none (the asymmetric fence of userspace RCU).  Where membarrier is
unavailable the consumer fences after every head store instead, and producers
also re-check every 10 ms.  Before sleeping the consumer also wakes any
registered producer under the mutex.  Sleeping producers check that the owner
(consumer) is still alive whenever a wait slice (0.25 s) passes without
progress, and raise :class:`QueueClosed` when it is gone, so a producer of a
dead consumer gives up within about half a second.

Corruption
----------
Every frame header is checked (length within the committed bytes, check word
matching length and position).  On a mismatch the consumer cannot find the next
record boundary, so it discards everything committed so far (sets ``head`` to
``tail``), wakes blocked producers and raises :class:`QueueCorrupted` saying how
many bytes were dropped.  The queue stays usable: records put afterwards are
received normally.  Payload bytes are not checksummed; decoding failures of a
payload are reported by the layer that decodes it.  A header with the wrong
magic, version, size or geometry raises :class:`QueueLayoutError` on attach.

A lock that stays held is treated as corruption too: a producer holds it for
microseconds, so one that cannot be taken for :data:`LOCK_STUCK` seconds (its
word overwritten, or its holder stopped) raises :class:`QueueWedged` naming the
queue and the thread the lock word names, instead of waiting for ever. Closing
(:meth:`ShmQueue.mark_closed`) sets the closed flag and wakes every waiter even
when the lock cannot be taken, and a consumer sees the closed flag without
taking the lock, so the owner of a damaged queue can always stop.

Reserved space
--------------
Queue files are allocated in full when they are created (``posix_fallocate``),
not sized sparse: on a full tmpfs a write through the mapping to a page that
was never allocated kills the process with SIGBUS. Creating a queue on a full
tmpfs raises :class:`SharedMemoryFull` (an ``OSError`` with ``errno.ENOSPC``)
naming the directory and the size instead.

Compiled fast path
------------------
``put`` and the consumer's pop run compiled code when the optional C extension
``_ringfast`` (``_ringfast.c`` beside this module) was built at install time;
otherwise, or when the environment variable ``KSERVICE_RING_PURE=1`` was set when
the handle was created or attached, they run the Python code of this module,
which is the reference.  The extension implements exactly the protocol and
layout above (the same lock and recovery, frame check words, publishing order,
asleep flag and wake-ups, space waiters and fences), so handles of either kind,
in any processes, share one queue.  Whenever it meets anything unusual (the
lock busy, the ring full, the queue closed, an oversized record, a frame that
does not check) it has changed nothing and the Python code performs the whole
operation, so waiting, errors and corruption recovery are those described
here.  A build whose layout constants differ from this module's is ignored.
The consumer's spin phase runs compiled too: ``spin`` watches ``tail`` with the
PAUSE instruction and without the GIL (so the process's other threads run while
it waits), calls ``sched_yield()`` every ``16 * spin checks`` turns and checks
the clock there; a record is seen within tens of nanoseconds instead of after a
Python loop turn or a ``sched_yield()`` (measured: the bare ring's round trip
went from ~9 µs to ~2 µs). ``close()`` waits for a spinning thread to leave the
mapping before unmapping it.

Threads
-------
A handle may be shared by threads: producers serialise on the mutex and the
consumer side of one handle is guarded by a per-handle lock.  There must be only
one consuming *handle* per queue (the owner's).  Do not ``close()`` a handle
while other threads are still using it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import pwd
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kservice import ServiceError
from kservice._fork import renew_after_fork

from . import _futex

__all__ = [
    "LAYOUT_VERSION",
    "QueueClosed",
    "QueueCorrupted",
    "QueueEmpty",
    "QueueError",
    "QueueFull",
    "QueueLayoutError",
    "QueueWedged",
    "RecordTooLarge",
    "RuntimeDirectoryError",
    "SharedMemoryFull",
    "ShmQueue",
    "add_janitor",
    "attach_queue",
    "create_queue",
    "default_private_directory",
    "default_queue_directory",
    "is_private_file",
    "queue_directory",
    "reclaim_stale_queues",
    "reserve",
]


# --------------------------------------------------------------------------- errors


class QueueError(Exception):
    """Base class of every error the ring raises."""


class RuntimeDirectoryError(ServiceError, PermissionError):
    """A per-user directory kservice needs is unusable (another user's, a symlink, a file, loose permissions).

    A ServiceError (the ``kservice`` command prints it as one line) and a
    PermissionError. Nothing is written through the path.
    """


class QueueFull(QueueError):
    """``put`` could not store the record before its timeout."""


class QueueEmpty(QueueError):
    """``get`` found no record before its timeout."""


class QueueClosed(QueueError):
    """The queue no longer serves: marked closed, its owner died, or the handle is closed."""


class QueueLayoutError(QueueError, ValueError):
    """The file is not a queue of this layout (wrong magic, version or geometry)."""


class RecordTooLarge(QueueError, ValueError):
    """The record can never fit in this ring; carry it out of band."""


class QueueCorrupted(QueueError):
    """The consumer met an undecodable frame; committed data was dropped, the queue still works."""


class QueueWedged(QueueError):
    """The queue's lock could not be taken for :data:`LOCK_STUCK` seconds, or is unusable: its header is damaged."""


class SharedMemoryFull(OSError):
    """No room in the queue directory's filesystem for a new queue or segment (``errno.ENOSPC``)."""


def reserve(fd: int, size: int, directory: Path | str, what: str) -> None:
    """Give the file at ``fd`` ``size`` bytes, every block allocated now (never a sparse file).

    Raises :class:`SharedMemoryFull` naming ``directory``, ``what`` and the
    size when the filesystem has no room: writing through a mapping of a sparse
    file on a full tmpfs would kill the process with SIGBUS instead.
    """
    if size <= 0:
        os.ftruncate(fd, 0)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        try:
            st = os.statvfs(directory)
            free = f"{st.f_bavail * st.f_frsize} of {st.f_blocks * st.f_frsize} bytes free"
        except OSError:
            free = "free space unknown"
        raise SharedMemoryFull(
            errno.ENOSPC,
            f"no room in {directory} for {what} of {size} bytes ({free}): the shared-memory filesystem is full; "
            "free space there (kservice cleanup removes what dead processes left) or make it larger",
        ) from exc


# --------------------------------------------------------------------------- layout

MAGIC = b"KSVRING\x00"
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
FRAME = 8  # u32 length + u32 check word
MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 40
MAX_NAME = 200
SUFFIX = ".q"
_TMP_PREFIX = ".tmp-"
_CHECK_KEY = 0x5A5AA5A5
_M32 = 0xFFFFFFFF

_OFF_CLOSED = 64
_OFF_RECOVERIES = 68  # u32: times a producer's death was recovered from
_OFF_TAIL = 128  # u64
_OFF_DATA_SEQ = 144  # u32 futex word
_OFF_ASLEEP = 148  # u32 flag
_OFF_HEAD = 192  # u64
_OFF_SPACE_SEQ = 208  # u32 futex word
_OFF_SPACE_WAITERS = 212  # u32 flag
_OFF_MUTEX = 256
#: Seconds a lock may stay held before the queue is taken to be damaged (holders keep it for microseconds).
LOCK_STUCK = 5.0

# Indices of the shared words in the handle's u64 / u32 views of the mapping.
_TAIL = _OFF_TAIL >> 3
_HEAD = _OFF_HEAD >> 3
_CLOSED = _OFF_CLOSED >> 2
_RECOVERIES = _OFF_RECOVERIES >> 2
_DATA_SEQ, _ASLEEP = _OFF_DATA_SEQ >> 2, _OFF_ASLEEP >> 2
_SPACE_SEQ, _SPACE_WAITERS = _OFF_SPACE_SEQ >> 2, _OFF_SPACE_WAITERS >> 2
_DATA_WORD64 = HEADER_SIZE >> 3

# Static part of the header (written once, before the file gets its name):
# magic, version, header size, capacity, max record, owner pid, owner start
# time, creation time.  Native alignment gives offsets 0, 8, 12, 16, 24, 32,
# 40, 48.
_STATIC = struct.Struct("@8sIIQQQQd")
assert _STATIC.size == 56

#: The compiled fast path (``_ringfast``, built from ``_ringfast.c`` when a C
#: compiler is at hand), or None.  A build whose layout constants differ from the
#: ones above (a stale build) is ignored, never trusted.
_RINGFAST_LAYOUT = {
    "LAYOUT_VERSION": LAYOUT_VERSION,
    "HEADER_SIZE": HEADER_SIZE,
    "FRAME": FRAME,
    "CHECK_KEY": _CHECK_KEY,
    "OFF_CLOSED": _OFF_CLOSED,
    "OFF_RECOVERIES": _OFF_RECOVERIES,
    "OFF_TAIL": _OFF_TAIL,
    "OFF_DATA_SEQ": _OFF_DATA_SEQ,
    "OFF_ASLEEP": _OFF_ASLEEP,
    "OFF_HEAD": _OFF_HEAD,
    "OFF_SPACE_SEQ": _OFF_SPACE_SEQ,
    "OFF_SPACE_WAITERS": _OFF_SPACE_WAITERS,
    "OFF_MUTEX": _OFF_MUTEX,
}


def _load_ringfast() -> Any:
    try:
        from . import _ringfast
    except ImportError:
        return None
    if getattr(_ringfast, "LAYOUT", None) != _RINGFAST_LAYOUT or not hasattr(_ringfast, "ANNOUNCE_DECLINED"):
        return None  # a build of another layout, or an older build without the compiled sleep
    return _ringfast


_ringfast = _load_ringfast()
#: Environment variable: set to 1 to make new handles run the pure-Python path.
PURE_ENV = "KSERVICE_RING_PURE"


def _use_ringfast() -> bool:
    return _ringfast is not None and os.environ.get(PURE_ENV, "") in ("", "0")


#: The characters of a queue name (ASCII letters, digits, ".", "_", "-"; not "." first). Checked with
#: str.strip rather than a pattern: compiling one was 0.1 ms of a caller's first call.
_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"

_EMPTY: Any = object()
# Bits of the compiled spin()'s result (SPIN_ARRIVED, SPIN_LOST_CPU in _ringfast.c).
_SPIN_ARRIVED = 1
_SPIN_LOST_CPU = 2
_ANNOUNCE_ARRIVED = -1  # _ringfast.ANNOUNCE_ARRIVED


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or name[0] == "." or name.strip(_NAME_CHARS):
        raise ValueError(
            f"invalid queue name {name!r}: use 1-{MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.'"
        )


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


#: Seconds a spinning consumer may be off its CPU before it counts as lost (mirrors ``LOST_CPU_NS``
#: in ``_ringfast.c``). Between two looks at the clock a spinner runs for tens of µs at most; a
#: longer gap means the scheduler ran another thread in its place, usually for a whole time slice.
LOST_CPU = 250e-6
#: Seconds a process's waits sleep without spinning after a spin lost its CPU; doubled, up to
#: :data:`SPIN_PAUSE_MAX`, while the first spin after a pause loses its CPU again.
SPIN_PAUSE_MIN = 0.02
SPIN_PAUSE_MAX = 2.0
#: ``KSERVICE_RING_SPIN_WHEN_BUSY=1``: spin before every sleep, whatever happened to earlier spins
#: (the waits as they were before :func:`note_lost_cpu`), to measure the difference.
_SPIN_WHEN_BUSY = os.environ.get("KSERVICE_RING_SPIN_WHEN_BUSY", "0") == "1"
# [monotonic time this process's waits spin again, the length of the last pause]: process-wide,
# since a CPU lost to other processes says the machine is busy, not that one queue is.
_spin_pause = [0.0, SPIN_PAUSE_MIN]


def note_lost_cpu(now: float) -> None:
    """A consumer's spin lost its CPU: this process's waits sleep at once for a while.

    Why: a spinning consumer calls ``sched_yield()`` every few µs so that a
    partner sharing its CPU can run. When every CPU is busy with other
    processes, that yield hands the CPU to one of them for its whole time
    slice (about 4 ms here), and the record the consumer waits for arrives
    while it is off the CPU: on a machine whose CPUs were all busy, calls took
    4 ms each for seconds at a time (``tests/benchmarks/bench_peers.py``'s busy
    rows). Sleeping on the futex instead lets the partner's wake-up preempt a
    busy process, as a pipe's reader would.

    The pause is :data:`SPIN_PAUSE_MIN` and doubles (up to
    :data:`SPIN_PAUSE_MAX`) each time the first spin after a pause loses its
    CPU again, so a machine that stays busy pays one lost slice every two
    seconds, and a machine that becomes idle again spins within a pause.
    """
    resume_at, pause = _spin_pause
    pause = min(pause * 2, SPIN_PAUSE_MAX) if now - resume_at < pause else SPIN_PAUSE_MIN
    _spin_pause[0] = now + pause
    _spin_pause[1] = pause


def spin_paused(now: float | None = None) -> bool:
    """Whether this process's waits currently sleep without spinning (see :func:`note_lost_cpu`)."""
    return not _SPIN_WHEN_BUSY and (time.monotonic() if now is None else now) < _spin_pause[0]


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid``, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", 0)
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):  # pragma: no cover
        return ("?", 0)


def _pid_alive(pid: int, start_time: int = 0) -> bool:
    """Is ``pid`` a live (non-zombie) process, the same one that had ``start_time``?"""
    if pid <= 0:
        return False
    info = _proc_stat(pid)
    if info is None:
        if os.path.isdir("/proc/self"):
            return False
        try:  # pragma: no cover - no procfs
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    state, started = info
    if state in ("Z", "X", "x"):
        return False
    if start_time and started and started != start_time:
        return False  # the pid was recycled
    return True


def _start_time(pid: int) -> int:
    info = _proc_stat(pid)
    return info[1] if info else 0


# --------------------------------------------------------------------------- directory


_WHAT_TO_DO = (
    "remove it (as its owner or root) or set KSERVICE_QUEUE_DIR and KSERVICE_REGISTRY_DIR "
    "(or XDG_RUNTIME_DIR) to directories only you can write"
)


def private_directory(d: Path, what: str) -> Path:
    """``d``, created 0700 if missing and checked private to this user; returns it.

    Raises :class:`RuntimeDirectoryError`, naming the path and what to do, when
    it exists but is not a real directory owned by this user with mode 0700
    (nothing is created through it). The directory is removed when this
    process exits if it is empty then (see :func:`_remove_emptied_directories`):
    kservice leaves nothing behind in ``/dev/shm``.
    """
    uid = os.getuid()
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RuntimeDirectoryError(f"cannot create {what} {d}: {exc.strerror}; {_WHAT_TO_DO}") from None
    else:
        os.chmod(d, 0o700)  # whatever the umask
    try:
        st = os.lstat(d)
    except OSError as exc:
        raise RuntimeDirectoryError(f"cannot use {what} {d}: {exc.strerror}; {_WHAT_TO_DO}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
        raise RuntimeDirectoryError(
            f"{what} {d} is {kind} (uid {st.st_uid}), not a directory; refusing it: {_WHAT_TO_DO}"
        )
    if st.st_uid != uid:
        raise RuntimeDirectoryError(
            f"{what} {d} belongs to uid {st.st_uid}, not to this user (uid {uid}); refusing it: {_WHAT_TO_DO}"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise RuntimeDirectoryError(
            f"{what} {d} has mode {stat.S_IMODE(st.st_mode):04o}; expected 0700; refusing it: "
            f"chmod 700 it if it is yours, else {_WHAT_TO_DO}"
        )
    _used_directories.add(d)  # only once checked: never remove a directory that is not ours
    return d


def is_private_file(st: os.stat_result) -> bool:
    """Whether ``st`` (of a descriptor opened with ``O_NOFOLLOW``) is a regular file of this user's
    that no other user can read or write: the test every file kservice reads trust from must pass
    (segments, registry records, the runtime directory's key)."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _private_runtime_directory(path: str) -> bool:
    """Whether ``path`` is an absolute, real directory of this user's that no one else can write (XDG rules)."""
    if not os.path.isabs(path):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


#: Where the key naming the /dev/shm fallback directory is kept, relative to the home directory.
RUNTIME_KEY = Path(".local/state/kservice/runtime-key")


def _home() -> Path:
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)  # the same for every process of the user, whatever $HOME says
    except KeyError:
        return Path.home()


def _runtime_key() -> str | None:
    """The user's random key (kept 0600 in the home directory, made on first use), or None where it cannot be kept."""
    path = _home() / RUNTIME_KEY
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}")
            with open(
                os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "w"
            ) as f:
                f.write(os.urandom(16).hex())
            try:
                os.link(tmp, path)  # the first process of the user to get here sets the key; the others read it
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None  # no writable home: fall back to the predictable name
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        key = os.read(fd, 256).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not is_private_file(st) or len(key) < 32:
        raise RuntimeDirectoryError(
            f"the key naming kservice's runtime directory, {path}, is not a private file of this user's "
            "(mode 0600, 32 or more characters); delete it to have a new one made"
        )
    return key


def _rotate_runtime_key(taken: Path) -> bool:
    """Give the user a new runtime key when the directory its key names, ``taken``, belongs to someone else.

    A default directory is removed once emptied, and ``/dev/shm`` can be
    listed, so another user may create the name after seeing it. The key is
    replaced (under a lock on its file, only while it still names ``taken``),
    and every process of the user resolves the new name from then on. Returns
    False when there is no key to replace (the predictable fallback name).
    """
    path = _home() / RUNTIME_KEY
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _default_directory.cache_clear()
        current, keyed = default_queue_directory()
        if not keyed or current.parent != taken.parent:
            return False  # not the /dev/shm name: nothing a key changes
        if taken in (current, current.with_name(current.name + "-services")):
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}")
            with open(
                os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "w"
            ) as f:
                f.write(os.urandom(16).hex())
            os.replace(tmp, path)
            _default_directory.cache_clear()
        return True  # rotated here, or by another process meanwhile
    finally:
        os.close(fd)


def default_private_directory(suffix: str, what: str) -> Path:
    """The default directory ``default_queue_directory() + suffix``, made private; a squatted name gets a new key.

    Raises :class:`RuntimeDirectoryError` when the path is refused and no new
    name can be had (see :func:`_rotate_runtime_key`).
    """
    for _ in range(3):
        default, _keyed = default_queue_directory()
        d = default.with_name(default.name + suffix)
        try:
            return private_directory(d, what)
        except RuntimeDirectoryError:
            if not _rotate_runtime_key(d):
                raise
    return private_directory(d, what)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - not Linux
        return ""


@functools.lru_cache(maxsize=8)
def _default_directory(xdg_runtime_dir: str, uid: int) -> tuple[Path, bool]:
    for candidate in (xdg_runtime_dir, f"/run/user/{uid}"):
        if candidate and _private_runtime_directory(candidate):
            return Path(candidate) / "kservice", True
    root = Path("/dev/shm")
    if not root.is_dir():  # pragma: no cover - no tmpfs
        from tempfile import gettempdir

        root = Path(gettempdir())
    key = _runtime_key()
    if key is None:
        return root / f"kservice-{uid}", False
    from hashlib import sha256  # once per process, and only without KSERVICE_QUEUE_DIR

    digest = sha256(f"{key}:{_boot_id()}".encode()).hexdigest()[:24]
    return root / f"kservice-{uid}-{digest}", True


def default_queue_directory() -> tuple[Path, bool]:
    """Where queues live without ``KSERVICE_QUEUE_DIR``, and whether another user cannot take the path first.

    1. ``$XDG_RUNTIME_DIR/kservice`` when that variable names a private
       directory of this user's (mode 0700, the login manager's tmpfs);
    2. else ``/run/user/<uid>/kservice`` when that directory exists and is
       private (so a process started without the variable, from cron or ssh,
       finds the same directory);
    3. else ``/dev/shm/kservice-<uid>-<digest>``: the digest hashes a random
       key kept in ``~/.local/state/kservice/runtime-key`` (mode 0600, made by
       the first process that needs it) with the boot id, so another user can
       neither predict the name nor reuse one seen before a reboot; the
       directory is removed once emptied, and a name another user created
       after seeing it gets the user a new key (:func:`_rotate_runtime_key`);
    4. else (no writable home) ``/dev/shm/kservice-<uid>``, which another user
       could create first: then every command fails with a line naming it.

    Every process of the user resolves the same path (the home directory comes
    from the password database, not ``$HOME``). The choice is made once per
    process and value of ``XDG_RUNTIME_DIR``.
    """
    return _default_directory(os.environ.get("XDG_RUNTIME_DIR", ""), os.getuid())


def queue_directory(*, sweep: bool = True) -> Path:
    """The per-user directory holding queue segments (see :func:`private_directory` and :func:`default_queue_directory`).

    The first time this process uses a directory, the janitors run there
    (:func:`add_janitor`), unless ``sweep`` is false (a janitor locating it).
    """
    override = os.environ.get("KSERVICE_QUEUE_DIR")
    if override:
        d = private_directory(Path(override), "queue directory")
    else:
        d = default_private_directory("", "queue directory")
    if sweep and d not in _swept:
        _sweep(d)
    return d


#: Queue directories whose janitors ran in this process.
_swept: set[Path] = set()
_sweep_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_sweep_lock")
_janitors: list[Callable[[], object]] = []


def add_janitor(janitor: Callable[[], object]) -> None:
    """Run ``janitor()`` (besides :func:`reclaim_stale_queues`) the first time this process uses a queue directory.

    So a program that only uses the library reclaims what killed processes
    left (rings, segments, records) as a ``kservice`` command does. A janitor
    failing is ignored: the directory's real use reports the problem.
    """
    if janitor not in _janitors:
        _janitors.append(janitor)


def _sweep(d: Path) -> None:
    with _sweep_lock:
        if d in _swept:
            return
        _swept.add(d)  # before running: the janitors use the directory themselves
    for janitor in (reclaim_stale_queues, *_janitors):
        with contextlib.suppress(Exception):
            janitor()


@contextlib.contextmanager
def locked(d: Path) -> Iterator[None]:
    """Exclusive ``flock`` on directory ``d`` itself; FileNotFoundError when it is gone."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_directory(locate: Callable[[], Path]) -> Iterator[Path]:
    """Exclusive ``flock`` on the private directory ``locate()`` returns, held for the block; yields it.

    Serialises creating, reclaiming and unlinking files in it. A process
    leaving removes the directory once it is empty, under this same lock: one
    removed between ``locate()`` (which makes it) and the lock is made again,
    so the block always runs in the directory that exists.
    """
    while True:
        d = locate()
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            live = os.lstat(d).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            live = False
        if live:
            break
        os.close(fd)
    try:
        yield d
    finally:
        os.close(fd)


def entries_of(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of ``directory``; none when it is gone.

    Another process of the user removes a directory it emptied when it exits
    (:func:`_remove_emptied_directories`), so one found a moment ago may be
    gone when it is read: it then holds nothing to list or reclaim.
    """
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


#: Private directories this process used (queues, the service registry).
_used_directories: set[Path] = set()


def _remove_emptied_directories() -> None:
    """At exit: remove each directory this process used if nothing is left in it.

    Under the directory's lock, so a process creating a file there either went
    first (the directory is not empty and stays) or makes it again
    (:func:`locked_directory`). Registered when this module is imported, so it
    runs after the exit handlers of the modules built on it (rings and segments
    are unlinked first).
    """
    for d in list(_used_directories):
        with contextlib.suppress(OSError), locked(d):
            os.rmdir(d)


atexit.register(_remove_emptied_directories)


def _check_file(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    uid = os.getuid()
    if st.st_uid != uid:
        raise PermissionError(
            f"queue file {path} belongs to uid {st.st_uid}, not to this user (uid {uid}); refusing it"
        )
    if not stat.S_ISREG(st.st_mode):
        raise QueueLayoutError(f"{path} is not a regular file; not a kservice queue")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"queue file {path} has mode {stat.S_IMODE(st.st_mode):04o} (accessible to other users); expected 0600"
        )
    return st


def _parse_static(buf: bytes | mmap.mmap, path: Path, size: int) -> tuple[int, int, int, int, int]:
    """Validate the static header; return (capacity, max_record, owner_pid, owner_start, header_size)."""
    if size < _STATIC.size:
        raise QueueLayoutError(f"{path} is not a kservice queue: {size} bytes, too small for a header")
    magic, version, hsize, cap, max_record, pid, start, _created = _STATIC.unpack_from(buf, 0)
    if magic != MAGIC:
        raise QueueLayoutError(f"{path} is not a kservice queue: magic {magic!r}, expected {MAGIC!r}")
    if version != LAYOUT_VERSION:
        raise QueueLayoutError(f"{path} has queue layout version {version}, this code reads version {LAYOUT_VERSION}")
    if hsize != HEADER_SIZE:
        raise QueueLayoutError(f"{path}: header size {hsize}, expected {HEADER_SIZE}")
    if cap < MIN_CAPACITY or cap % FRAME or cap > MAX_CAPACITY or max_record != cap - FRAME:
        raise QueueLayoutError(f"{path}: inconsistent geometry (capacity {cap}, max record {max_record})")
    if size != HEADER_SIZE + cap:
        raise QueueLayoutError(f"{path}: file is {size} bytes, expected {HEADER_SIZE + cap} for capacity {cap}")
    return cap, max_record, pid, start, hsize


def _peek_owner(path: Path) -> tuple[int, int] | None:
    """(owner pid, owner start time) from a segment's header, or None if it is not a (readable) queue."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = _check_file(fd, path)
        head = os.pread(fd, _STATIC.size, 0)
        _cap, _mr, pid, start, _h = _parse_static(head.ljust(_STATIC.size, b"\0"), path, st.st_size)
        return pid, start
    except (QueueError, OSError):
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the queue


class ShmQueue:
    """A handle on one named shared-memory queue (see the module docstring)."""

    name: str
    capacity: int
    owner_pid: int

    # -- construction ---------------------------------------------------------

    def _setup(self, name: str, path: Path, mm: mmap.mmap, st: os.stat_result) -> None:
        cap, max_record, pid, start, _h = _parse_static(mm, path, len(mm))
        self.name = name
        self.path = path
        self.capacity = cap
        self.max_record = max_record
        self.owner_pid = pid
        self._owner_start = start
        self._ident = (st.st_dev, st.st_ino)
        self._mm = mm
        # Typed views of the whole mapping.  Item access on them is one aligned
        # load or store of the native word (struct.pack_into is NOT used for
        # shared words: it zero-fills its target before writing, so a concurrent
        # reader could see 0).  The views also pin the mapping: mmap.close()
        # refuses while they exist.
        self._w64 = memoryview(mm).cast("Q")
        self._w32 = memoryview(mm).cast("I")
        base = _futex.buffer_address(mm)  # the views above keep the mapping where it is
        self._lock_addr = base + _OFF_MUTEX
        self._lock_arg = _futex.pointer_arg(self._lock_addr)
        self._data_seq_addr = base + _OFF_DATA_SEQ
        self._space_seq_addr = base + _OFF_SPACE_SEQ
        self._closed = False
        self._wake_pending = False
        # With membarrier(2), producers about to sleep fence on the consumer's
        # behalf, so the consumer's hot path needs no barrier of its own.
        self._fence = not _futex.membarrier_register()
        # The compiled put/pop, or None: the pure-Python code below then runs.
        # It pins the mapping like the views do (released in _release_views).
        self._fast = _ringfast.Ring(mm, cap, self._fence) if _use_ringfast() else None
        # The compiled put, for the mmap transport's send path (private to this plugin, not API):
        # ``_compiled_put(record)`` returns 0 when the record is published, non-zero when it
        # declined without writing a byte (then call :meth:`put`, which waits, raises or takes
        # the Python path). None without the compiled extension, and once the handle is closed.
        # What it saves: put()'s argument handling and timeout set-up, ~0.05 µs of a ~0.4 µs
        # put + get (the "compiled put" row of tests/benchmarks/bench_tunings.py).
        self._compiled_put: Callable[[bytes], int] | None = self._fast.put if self._fast is not None else None
        self._rlock = threading.Lock()  # consumer side of this handle
        self._sleepers = 0
        ncpu = _usable_cpus()
        self._spin_max = 50e-6 if ncpu >= 2 else 20e-6
        self._spin = self._spin_max
        self._spin_checks = 16 if ncpu >= 2 else 1

    @classmethod
    def _attach(cls, name: str) -> ShmQueue:
        self = cls.__new__(cls)
        self._attach_into(name)
        return self

    def _attach_into(self, name: str) -> None:
        _check_name(name)
        path = queue_directory() / (name + SUFFIX)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no queue named {name!r} (no file {path})", str(path)) from None
        try:
            st = _check_file(fd, path)
            if st.st_size < HEADER_SIZE:
                raise QueueLayoutError(f"{path} is not a kservice queue: {st.st_size} bytes, smaller than a header")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            self._setup(name, path, mm, st)
        except BaseException:
            self._release_views()
            mm.close()
            raise

    # -- pickling: the name only ---------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._attach_into(state["name"])

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.qsize()} records"
        return f"<ShmQueue {self.name!r} capacity={self.capacity} owner={self.owner_pid} {state}>"

    def __enter__(self) -> ShmQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking --------------------------------------------------------------

    def _lock(self, deadline: float | None) -> None:
        """Take the producers' lock; ``deadline`` None waits at most :data:`LOCK_STUCK` (then QueueWedged)."""
        rc = _trylock(self._lock_arg)
        if rc:
            self._lock_slow(rc, deadline)

    def _lock_slow(self, rc: int, deadline: float | None) -> None:
        if rc == errno.EBUSY:
            stuck = deadline is None
            rc = _futex.mutex_lock(self._lock_addr, time.monotonic() + LOCK_STUCK if stuck else deadline)
            if rc == 0:
                return
            if rc == errno.ETIMEDOUT and stuck:
                raise QueueWedged(f"queue {self.name!r}: {self._lock_state()}")
        if rc == errno.EOWNERDEAD:
            # The previous holder died inside its critical section.  Nothing it
            # did there is visible before its final tail store, so the ring is
            # consistent as it stands: declare the lock consistent and go on.
            _futex.mutex_consistent(self._lock_addr)
            self._w32[_RECOVERIES] = (self._w32[_RECOVERIES] + 1) & _M32
            return
        if rc == errno.ETIMEDOUT:
            raise QueueFull(f"queue {self.name!r}: timed out waiting for the producers' lock")
        if rc == errno.ENOTRECOVERABLE:
            raise QueueWedged(f"queue {self.name!r}: its lock is unrecoverable; recreate the queue")
        raise QueueWedged(
            f"queue {self.name!r}: its lock is unusable ({os.strerror(rc)}): the queue's header is damaged; recreate the queue"
        )

    def _lock_state(self) -> str:
        """Why the lock could not be taken, for QueueWedged (names the thread the lock word holds)."""
        owner = self._w32[_OFF_MUTEX >> 2] & 0x3FFFFFFF
        holder = "no thread" if not owner else f"thread {owner}"
        if owner and not os.path.exists(f"/proc/{owner}"):
            holder += ", which does not exist"
        return (
            f"its producers' lock stayed held for {LOCK_STUCK:.0f} s (the lock word names {holder}): the queue's "
            "header is damaged, or a process holding the lock is stopped; recreate the queue (restart its owner)"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed(f"queue handle {self.name!r} is closed")

    # -- producer side --------------------------------------------------------

    def put(self, item: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Append one record; wait while the ring is full (``timeout=0``: never).

        Raises :class:`QueueFull` on timeout, :class:`QueueClosed` when the queue is
        marked closed or its owner died while we waited, :class:`RecordTooLarge`
        when the record can never fit.
        """
        fast = self._fast
        if fast is not None and not fast.put(item):
            return  # published by the compiled path
        # The pure-Python path: the reference, the fallback, and the slow path
        # whenever the compiled one declined (lock busy, ring full, queue
        # closed, record too large, not a buffer) without having written a byte.
        cls = item.__class__
        if cls is not bytes and cls is not bytearray:
            item = memoryview(item).cast("B")
        n = len(item)
        if n > self.max_record:
            raise RecordTooLarge(
                f"record of {n} bytes exceeds the limit of {self.max_record} bytes of queue {self.name!r} "
                f"(capacity {self.capacity}); carry it out of band"
            )
        if self._closed:
            self._check_open()
        self._put_python(item, n, FRAME + ((n + 7) & -8), timeout)

    def _write_wrapped(self, item: Any, p: int, end: int) -> None:
        limit = HEADER_SIZE + self.capacity
        k = limit - p
        mv = memoryview(item)
        self._mm[p:limit] = mv[:k]
        self._mm[HEADER_SIZE : HEADER_SIZE + end - limit] = mv[k:]

    def _put_locked(self, item: Any, n: int, need: int, register: bool) -> int | None:
        """Under the lock: write the record (None), or report full (-1) / register as waiter (seq)."""
        w64 = self._w64
        w32 = self._w32
        if w32[_CLOSED]:
            raise QueueClosed(f"queue {self.name!r} is closed")
        cap = self.capacity
        tail = w64[_TAIL]
        if cap - (tail - w64[_HEAD]) < need:
            if not register:
                return -1
            w32[_SPACE_WAITERS] = 1
            return w32[_SPACE_SEQ]
        pos = tail % cap
        w64[_DATA_WORD64 + (pos >> 3)] = n | ((n ^ _CHECK_KEY ^ (tail >> 3)) & _M32) << 32
        p = pos + (HEADER_SIZE + FRAME)
        if p >= HEADER_SIZE + cap:
            p -= cap
        end = p + n
        if end <= HEADER_SIZE + cap:
            self._mm[p:end] = item
        else:
            self._write_wrapped(item, p, end)
        w64[_TAIL] = tail + need  # publish
        if w32[_ASLEEP]:
            w32[_ASLEEP] = 0
            w32[_DATA_SEQ] = (w32[_DATA_SEQ] + 1) & _M32
            self._wake_pending = True
        return None

    def _put_python(self, item: Any, n: int, need: int, timeout: float | None) -> None:
        """Lock, write (or wait for room, registered as a space waiter), unlock, wake the consumer if asleep."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lock_arg = self._lock_arg
        while True:
            self._lock(deadline)
            self._wake_pending = False
            try:
                seq = self._put_locked(item, n, need, timeout is None or timeout > 0)
                wake = self._wake_pending
            finally:
                _unlock(lock_arg)
            if seq is None:
                if wake:
                    _futex_wake(self._data_seq_addr)
                return
            if seq < 0:
                raise QueueFull(f"queue {self.name!r} is full")
            self._wait_for_space(need, seq, deadline)

    def put_nowait(self, item: bytes | bytearray | memoryview) -> None:
        """``put(item, timeout=0)``."""
        self.put(item, 0)

    def _wait_for_space(self, need: int, seq: int, deadline: float | None) -> None:
        # Dekker with the consumer (store head; fence; load space_waiters): our
        # space_waiters store, then a barrier, then this re-read of head.  The
        # unlock just done is a locked instruction (a full barrier on our side);
        # when the consumer relies on membarrier instead of its own fence, the
        # membarrier call below supplies the barrier on its side.
        w64 = self._w64
        slice_ = 0.25
        if not _futex.membarrier_global():
            slice_ = 0.01  # no asymmetric fence available: re-check often
        if self.capacity - (w64[_TAIL] - w64[_HEAD]) >= need:
            return
        now = time.monotonic()
        if deadline is not None:
            if now >= deadline:
                raise QueueFull(f"queue {self.name!r} is still full after the timeout")
            slice_ = min(slice_, deadline - now)
        rc = _futex.futex_wait(self._space_seq_addr, seq, slice_)
        if rc == errno.ETIMEDOUT and not self.owner_alive:
            raise QueueClosed(f"queue {self.name!r}: its owner (pid {self.owner_pid}) is gone")
        if self._w32[_CLOSED]:
            raise QueueClosed(f"queue {self.name!r} is closed")

    # -- consumer side --------------------------------------------------------

    def _pop(self, max_items: int) -> Any:
        """Up to ``max_items`` records (one bytes for max_items == 0, else a list), or _EMPTY.

        Caller holds self._rlock.  Raises QueueCorrupted as :meth:`_pop_pure` does.
        """
        fast = self._fast
        if fast is None:
            return self._pop_pure(max_items)
        records, status = fast.pop(max_items)
        if status:
            if status == _POP_WAKE:  # the records are ours; producers wait for the space
                self._wake_producers()
            elif status == _POP_EMPTY:
                return _EMPTY
            else:  # _POP_CORRUPT, nothing consumed: the reference code resets and reports
                return self._pop_pure(max_items)
        return records

    def _pop_pure(self, max_items: int) -> Any:
        """:meth:`_pop` in Python: the reference for ``_ringfast`` and the fallback."""
        w64 = self._w64
        head = w64[_HEAD]
        tail = w64[_TAIL]
        if head == tail:
            return _EMPTY
        cap = self.capacity
        mm = self._mm
        used = tail - head
        if used < 0 or used > cap or used % FRAME:
            self._reset(head, f"counters out of range (head {head}, tail {tail}, capacity {cap})")
        out: list[bytes] | None = [] if max_items else None
        got = 0
        limit = HEADER_SIZE + cap
        while True:
            pos = head % cap
            word = w64[_DATA_WORD64 + (pos >> 3)]
            n = word & _M32
            size = FRAME + ((n + 7) & -8)
            if word >> 32 != (n ^ _CHECK_KEY ^ (head >> 3)) & _M32 or size > tail - head:
                if got:  # deliver the good records first; report on the next call
                    break
                self._reset(head, f"undecodable frame at position {head} (length {n}, check word {word >> 32:#010x})")
            p = pos + (HEADER_SIZE + FRAME)
            if p >= limit:
                p -= cap
            end = p + n
            if end <= limit:
                rec = mm[p:end]
            else:
                rec = mm[p:limit] + mm[HEADER_SIZE : HEADER_SIZE + end - limit]
            head += size
            got += 1
            if out is None:
                break
            out.append(rec)
            if got >= max_items or head == tail:
                break
        w64[_HEAD] = head  # release the space
        if self._fence:
            _spin_trylock(_FENCE)  # store head before loading space_waiters
        if self._w32[_SPACE_WAITERS]:
            self._wake_producers()
        return rec if out is None else out

    def _wake_producers(self) -> None:
        w32 = self._w32
        try:
            self._lock(None)
        except QueueWedged:
            # Producers cannot take a wedged lock to put anyway; the records just popped stay ours.
            _futex_wake(self._space_seq_addr)
            return
        try:
            w32[_SPACE_WAITERS] = 0
            w32[_SPACE_SEQ] = (w32[_SPACE_SEQ] + 1) & _M32
        finally:
            _unlock(self._lock_arg)
        _futex_wake(self._space_seq_addr)

    def _reset(self, head: int, what: str) -> None:
        """Drop every committed record (framing is lost) and raise QueueCorrupted."""
        w64 = self._w64
        self._lock(None)
        try:
            tail = w64[_TAIL]
            if tail % FRAME:  # even the tail is garbage: restart the ring
                tail = 0
                w64[_TAIL] = 0
            w64[_HEAD] = tail
            self._w32[_SPACE_WAITERS] = 0
            self._w32[_SPACE_SEQ] = (self._w32[_SPACE_SEQ] + 1) & _M32
        finally:
            _unlock(self._lock_arg)
        _futex_wake(self._space_seq_addr)
        dropped = f"{tail - head} bytes" if 0 <= tail - head <= self.capacity else "all"
        raise QueueCorrupted(
            f"queue {self.name!r} is corrupted: {what}; dropped {dropped} of committed records, "
            "the queue remains usable"
        )

    def get(self, timeout: float | None = None) -> bytes:
        """Remove and return the oldest record, waiting up to ``timeout`` seconds (None: forever).

        Raises :class:`QueueEmpty` on timeout, :class:`QueueClosed` when the queue
        is marked closed and empty, :class:`QueueCorrupted` (see module docstring).
        """
        if self._closed:
            self._check_open()
        rlock = self._rlock
        rlock.acquire()
        try:
            rec: bytes = self._pop(0)  # a record, or _EMPTY
        finally:
            rlock.release()
        if rec is not _EMPTY:
            return rec
        rec = self._wait_and_pop(0, timeout)
        return rec

    def get_nowait(self) -> bytes:
        """``get(timeout=0)``."""
        return self.get(0)

    def get_many(self, max_items: int = 64, timeout: float | None = None) -> list[bytes]:
        """Wait like :meth:`get` for at least one record, then return up to ``max_items`` at once."""
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        if self._closed:
            self._check_open()
        with self._rlock:
            recs: list[bytes] = self._pop(max_items)  # records, or _EMPTY
        if recs is not _EMPTY:
            return recs
        recs = self._wait_and_pop(max_items, timeout)
        return recs

    def _wait_and_pop(self, max_items: int, timeout: float | None) -> Any:
        w64 = self._w64
        w32 = self._w32
        if timeout is not None and timeout <= 0:
            if w32[_CLOSED]:
                raise QueueClosed(f"queue {self.name!r} is closed")
            raise QueueEmpty(f"queue {self.name!r} is empty")
        monotonic = time.monotonic
        start = monotonic()
        deadline = None if timeout is None else start + timeout
        rlock = self._rlock

        # Phase 1: spin for the adaptive budget, yielding the CPU (and the GIL)
        # every few checks.
        budget = self._spin
        if budget > 0 and not spin_paused(start):
            spin_end = start + budget
            if deadline is not None and deadline < spin_end:
                spin_end = deadline
            head = w64[_HEAD]
            checks = range(self._spin_checks)
            yield_ = os.sched_yield
            fast = self._fast
            yield_every = self._spin_checks * 16
            while True:
                if fast is not None:
                    # The compiled spin: without the GIL, PAUSE between reads of tail.
                    left = spin_end - monotonic()
                    if left <= 0:
                        break
                    spun = fast.spin(head, left, yield_every)
                    if spun & _SPIN_LOST_CPU:
                        note_lost_cpu(monotonic())
                        if not spun & _SPIN_ARRIVED:
                            break
                    elif not spun:
                        break
                else:
                    for _ in checks:
                        if w64[_TAIL] != head:
                            break
                    else:
                        now = monotonic()
                        if now < spin_end:
                            yield_()
                            if monotonic() - now >= LOST_CPU:
                                note_lost_cpu(monotonic())
                                if w64[_TAIL] == head:
                                    break
                            continue
                        break
                with rlock:
                    got = self._pop(max_items)
                if got is not _EMPTY:
                    return got
                head = w64[_HEAD]

        # Phase 2: announce sleep under the lock, then futex-wait on data_seq.
        fast = self._fast
        while True:
            with rlock:
                got = self._pop(max_items)
                if got is _EMPTY:
                    seq = self._announce_sleep()
                    if seq is None:
                        continue  # arrived meanwhile: loop and pop it
                    self._sleepers += 1
            if got is not _EMPTY:
                self._adapt(monotonic() - start)
                return got
            assert seq is not None  # announced whenever the ring was found empty
            try:
                wait = 1.0 if deadline is None else min(deadline - monotonic(), 1.0)
                if wait > 0:
                    if fast is not None:
                        fast.doze(seq, wait)
                    else:
                        _futex.futex_wait(self._data_seq_addr, seq, wait)
            finally:
                with rlock:
                    self._sleepers -= 1
                    if not self._sleepers and not self._closed:
                        w32[_ASLEEP] = 0  # spare producers a needless wake-up call
            if self._closed:
                self._check_open()
            with rlock:
                got = self._pop(max_items)
            if got is not _EMPTY:
                self._adapt(monotonic() - start)
                return got
            if deadline is not None and monotonic() >= deadline:
                if w32[_CLOSED]:
                    raise QueueClosed(f"queue {self.name!r} is closed")
                if timeout is not None and timeout > _IDLE_WAIT_FACTOR * self._spin_max:
                    self._spin = min(self._spin_max, max(self._spin * 0.5, 2e-6))
                raise QueueEmpty(f"queue {self.name!r} is still empty after {timeout} s")

    def _announce_sleep(self) -> int | None:
        """With the handle's lock held and the ring found empty: set ``consumer_asleep`` under the
        producers' lock and return the ``data_seq`` to wait on, or None when a record arrived meanwhile.

        Raises QueueClosed when the queue is closed and drained. The compiled
        ``announce`` does the common case; whenever it declines (the lock busy or
        its holder dead, the queue closed, producers waiting for space) it has
        changed nothing and this does the whole step.
        """
        fast = self._fast
        if fast is not None:
            seq: int = fast.announce()
            if seq >= 0:
                return seq
            if seq == _ANNOUNCE_ARRIVED:
                return None
        w32 = self._w32
        w64 = self._w64
        if w32[_CLOSED] and w64[_TAIL] == w64[_HEAD]:  # without the lock: closing is final
            raise QueueClosed(f"queue {self.name!r} is closed")
        self._lock(None)
        try:
            if w64[_TAIL] != w64[_HEAD]:
                return None
            if w32[_CLOSED]:
                raise QueueClosed(f"queue {self.name!r} is closed")
            seq = w32[_DATA_SEQ]
            w32[_ASLEEP] = 1
            # Belt and braces for the space_waiters protocol: whoever is registered
            # gets woken under the lock's ordering before we sleep.
            waiters = w32[_SPACE_WAITERS]
        finally:
            _unlock(self._lock_arg)
        if waiters:
            self._wake_producers()
        return seq

    def set_spin_limit(self, seconds: float) -> None:
        """Bound the consumer's spin phase (0: sleep at once). For consumers in busy processes:
        a thread spinning there holds the GIL the process's other threads need."""
        self._spin_max = max(0.0, float(seconds))
        self._spin = min(self._spin, self._spin_max)

    def _adapt(self, waited: float) -> None:
        """Grow the spin budget when a wait would have fitted in it; shrink it only after idle waits.

        A wait a little longer than the budget is usually the partner's own
        wake-up from sleep (tens of µs): shrinking then would make both sides
        sleep on every message, each wait would grow longer still, and the
        pair would lock itself into the slow regime. Only waits far beyond the
        budget (the queue was idle) shrink it, so an idle consumer still burns
        almost nothing.
        """
        if waited <= self._spin_max:
            self._spin = min(self._spin_max, max(self._spin * 2, waited * 1.5))
        elif waited > _IDLE_WAIT_FACTOR * self._spin_max:
            self._spin = min(self._spin_max, max(self._spin * 0.5, 2e-6))

    # -- state ----------------------------------------------------------------

    def qsize(self) -> int:
        """Number of records in the queue (a snapshot; walks the committed frames)."""
        self._check_open()
        w64 = self._w64
        cap = self.capacity
        with self._rlock:
            head = w64[_HEAD]
            tail = w64[_TAIL]
            if not 0 <= tail - head <= cap:
                return 0
            count = 0
            while head < tail:
                n = w64[_DATA_WORD64 + ((head % cap) >> 3)] & _M32
                head += FRAME + ((n + 7) & -8)
                count += 1
            return count

    def empty(self) -> bool:
        return self.qsize() == 0

    def unread(self) -> list[bytes]:
        """Copies of the records not consumed yet, oldest first, without consuming them.

        For a producer whose consumer died: a record still here was never read.
        A frame that does not check out ends the list (never raises for bad
        bytes; the records before it are returned).
        """
        self._check_open()
        w64 = self._w64
        cap = self.capacity
        mm = self._mm
        limit = HEADER_SIZE + cap
        head = w64[_HEAD]
        tail = w64[_TAIL]
        records: list[bytes] = []
        if not 0 <= tail - head <= cap:
            return records
        while head < tail:
            pos = head % cap
            word = w64[_DATA_WORD64 + (pos >> 3)]
            n = word & _M32
            size = FRAME + ((n + 7) & -8)
            if word >> 32 != (n ^ _CHECK_KEY ^ (head >> 3)) & _M32 or size > tail - head:
                break
            p = pos + (HEADER_SIZE + FRAME)
            if p >= limit:
                p -= cap
            end = p + n
            records.append(mm[p:end] if end <= limit else mm[p:limit] + mm[HEADER_SIZE : HEADER_SIZE + end - limit])
            head += size
        return records

    @property
    def closed(self) -> bool:
        """Whether the queue was marked closed (by its owner)."""
        self._check_open()
        return bool(self._w32[_CLOSED])

    @property
    def lock_recoveries(self) -> int:
        """How many times a locker found the lock's previous holder dead and recovered."""
        self._check_open()
        return self._w32[_RECOVERIES]

    @property
    def owner_alive(self) -> bool:
        """Is the owner (consumer) process alive, and still the same process?"""
        return _pid_alive(self.owner_pid, self._owner_start)

    @property
    def linked(self) -> bool:
        """Whether the file this handle maps is still at the queue's path (not removed, not replaced).

        One ``stat``; works on a closed handle too.
        """
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def mark_closed(self) -> None:
        """Stop serving: later puts raise QueueClosed; every blocked waiter wakes up."""
        self._check_open()
        w32 = self._w32
        try:
            self._lock(time.monotonic() + 1.0)
            locked = True
        except QueueError:
            # A damaged lock must not keep the owner from stopping: close without it (every
            # waiter re-reads the flag after its wake-up or its wait slice).
            locked = False
        try:
            w32[_CLOSED] = 1
            w32[_ASLEEP] = 0
            w32[_DATA_SEQ] = (w32[_DATA_SEQ] + 1) & _M32
            w32[_SPACE_WAITERS] = 0
            w32[_SPACE_SEQ] = (w32[_SPACE_SEQ] + 1) & _M32
        finally:
            if locked:
                _unlock(self._lock_arg)
        _futex_wake(self._data_seq_addr)
        _futex_wake(self._space_seq_addr)

    def _release_views(self) -> None:
        fast = self.__dict__.get("_fast")
        if fast is not None:
            fast.release()
        self._fast = self._compiled_put = None  # from now on put and _pop take the pure-Python path
        for attr in ("_w64", "_w32"):
            view = self.__dict__.pop(attr, None)
            if view is not None:
                view.release()

    def close(self) -> None:
        """Unmap this handle (idempotent).  The queue itself lives on until unlinked."""
        if self.__dict__.get("_closed", True):
            return
        self._closed = True
        self._release_views()
        mm = self.__dict__.pop("_mm", None)
        if mm is not None:
            mm.close()

    def unlink(self) -> None:
        """Remove the queue's name (idempotent).  Attached handles keep working until closed.

        Only the file this handle maps is removed, never a newer queue that took
        over the name.
        """
        try:
            with locked(self.path.parent):
                st = os.stat(self.path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
        except FileNotFoundError:
            return  # the name, or its whole directory, is gone already


# Hot-path bindings.
_trylock = _futex.fast_trylock
_unlock = _futex.fast_unlock
_spin_trylock = _futex.fast_spin_trylock
#: A wait this many spin budgets long means the queue was idle (see ``ShmQueue._adapt``).
_IDLE_WAIT_FACTOR = 20
_FENCE = _futex.FENCE_ARG
_futex_wake = _futex.futex_wake
_POP_WAKE = 1 if _ringfast is None else _ringfast.POP_WAKE
_POP_EMPTY = 2 if _ringfast is None else _ringfast.POP_EMPTY


# --------------------------------------------------------------------------- module functions


def create_queue(name: str, capacity: int = 1 << 20, *, create: bool = True, owner_pid: int | None = None) -> ShmQueue:
    """Create the named queue (``create=True``) or attach to it (``create=False``).

    ``capacity`` is the size of the ring's data area in bytes, rounded up to a
    multiple of 4096 (minimum 4096).  ``owner_pid`` is the consumer process,
    by default the caller.  Creating fails with ``FileExistsError`` when a queue
    of that name exists and its owner lives; a stale one (owner gone) is
    replaced.  Attaching fails with ``FileNotFoundError`` when there is none.
    """
    _check_name(name)
    if not create:
        return ShmQueue._attach(name)
    capacity = int(capacity)
    if capacity < 1 or capacity > MAX_CAPACITY:
        raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY} bytes, not {capacity}")
    capacity = max(MIN_CAPACITY, (capacity + 4095) // 4096 * 4096)
    owner = os.getpid() if owner_pid is None else int(owner_pid)
    with locked_directory(queue_directory) as d:
        path = d / (name + SUFFIX)
        if os.path.lexists(path):
            info = _peek_owner(path)
            if info is None:
                raise FileExistsError(
                    errno.EEXIST,
                    f"{path} exists and is not a usable queue; remove it or choose another name",
                    str(path),
                )
            if _pid_alive(*info):
                raise FileExistsError(
                    errno.EEXIST, f"queue {name!r} already exists and its owner (pid {info[0]}) is alive", str(path)
                )
            os.unlink(path)  # stale: its owner is gone
        tmp = d / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            reserve(fd, HEADER_SIZE + capacity, d, f"queue {name!r}")
            mm = mmap.mmap(fd, HEADER_SIZE + capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                _STATIC.pack_into(
                    mm,
                    0,
                    MAGIC,
                    LAYOUT_VERSION,
                    HEADER_SIZE,
                    capacity,
                    capacity - FRAME,
                    owner,
                    _start_time(owner),
                    time.time(),
                )
                _futex.mutex_init(_futex.buffer_address(mm) + _OFF_MUTEX)
                st = os.fstat(fd)
                os.rename(tmp, path)
            except BaseException:
                mm.close()
                raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
    q = ShmQueue.__new__(ShmQueue)
    try:
        q._setup(name, path, mm, st)
    except BaseException:
        q._release_views()
        mm.close()
        raise
    return q


def attach_queue(name: str) -> ShmQueue:
    """Attach to an existing named queue (``FileNotFoundError`` if there is none)."""
    return create_queue(name, create=False)


def reclaim_stale_queues() -> list[str]:
    """Unlink every segment whose owner process is gone; return the queue names removed.

    Also removes temporary files left by a process killed while creating a
    queue.  Files that are not queues, or belong to other users, are left alone.
    """
    removed: list[str] = []
    # sweep=False: the first-use sweep would run this very janitor and take what it reports.
    with locked_directory(lambda: queue_directory(sweep=False)) as d:
        for entry in os.scandir(d):
            fname = entry.name
            if fname.startswith(_TMP_PREFIX):
                pid_s = fname[len(_TMP_PREFIX) :].split("-", 1)[0]
                if pid_s.isdigit() and not _pid_alive(int(pid_s)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                continue
            if not fname.endswith(SUFFIX) or fname.startswith("."):
                continue
            info = _peek_owner(Path(entry.path))
            if info is None or _pid_alive(*info):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed.append(fname[: -len(SUFFIX)])
    return sorted(removed)
