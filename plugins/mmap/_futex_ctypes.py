"""Native waiting and locking primitives for the shared-memory ring, through ctypes.

:mod:`._futex` uses these only where the compiled extension ``_ringfast`` (which
implements the same functions without ctypes) was not built.

Everything here works on raw addresses inside a ``MAP_SHARED`` file mapping, so
the same primitives synchronise unrelated processes that map the same file:

* :func:`futex_wait` / :func:`futex_wake`: the Linux ``futex(2)`` system call
  *without* ``FUTEX_PRIVATE_FLAG`` (a shared futex is keyed on the file page, not
  on the process's address space).  Waits always take a finite relative timeout.
* a process-shared, *robust* glibc ``pthread_mutex_t`` (``PTHREAD_PROCESS_SHARED``
  + ``PTHREAD_MUTEX_ROBUST``): when its holder dies the kernel hands the lock to
  the next locker with ``EOWNERDEAD`` instead of deadlocking everyone.
* :func:`full_barrier`: one locked read-modify-write instruction (a failed
  ``lock cmpxchg`` inside ``pthread_spin_trylock`` on a private word), which on
  x86-64 orders every earlier store before every later load (``mfence``
  semantics).  Python has no other way to issue it.

ctypes foreign calls release the GIL, so a thread blocked here never stalls the
other threads of its process.  Only Linux on x86-64 is supported: the memory
ordering argument of the ring relies on x86 TSO and the system call number is
the x86-64 one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import time
from typing import TYPE_CHECKING

from ._futex import NativeUnavailable  # one class, whichever implementation raises it

if TYPE_CHECKING:
    from _ctypes import CFuncPtr  # the class of every foreign function ctypes loads

__all__ = [
    "FENCE_ARG",
    "MUTEX_SIZE",
    "NativeUnavailable",
    "buffer_address",
    "fast_spin_trylock",
    "fast_trylock",
    "fast_unlock",
    "full_barrier",
    "futex_wait",
    "futex_wake",
    "membarrier_global",
    "membarrier_register",
    "mutex_consistent",
    "mutex_init",
    "mutex_lock",
    "mutex_trylock",
    "mutex_unlock",
    "pointer_arg",
]

if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
    raise NativeUnavailable(
        f"the shared-memory ring needs Linux on x86-64 (this is {sys.platform}/{os.uname().machine})"
    )

SYS_futex = 202  # x86-64
SYS_membarrier = 324  # x86-64
MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL_EXPEDITED = 1 << 1
MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2
FUTEX_WAIT = 0
FUTEX_WAKE = 1
CLOCK_MONOTONIC = 1
PTHREAD_PROCESS_SHARED = 1
PTHREAD_MUTEX_ROBUST = 1
MUTEX_SIZE = 40  # sizeof(pthread_mutex_t) on x86-64 glibc
_MUTEXATTR_SIZE = 8  # sizeof(pthread_mutexattr_t) is 4; keep a margin
_INT_MAX = 0x7FFFFFFF

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _mutex_lock = _libc.pthread_mutex_lock
    _mutex_trylock = _libc.pthread_mutex_trylock
    _mutex_unlock = _libc.pthread_mutex_unlock
    _mutex_consistent = _libc.pthread_mutex_consistent
    _mutex_init = _libc.pthread_mutex_init
    _attr_init = _libc.pthread_mutexattr_init
    _attr_destroy = _libc.pthread_mutexattr_destroy
    _attr_setpshared = _libc.pthread_mutexattr_setpshared
    _attr_setrobust = _libc.pthread_mutexattr_setrobust
    _spin_trylock = _libc.pthread_spin_trylock
except AttributeError as exc:  # pragma: no cover - non-glibc libc
    raise NativeUnavailable(f"the shared-memory ring needs glibc's robust pthread mutexes: {exc}") from exc

_mutex_clocklock: CFuncPtr | None
try:
    _mutex_clocklock = _libc.pthread_mutex_clocklock  # glibc >= 2.30: monotonic deadline
except AttributeError:  # pragma: no cover - older glibc
    _mutex_clocklock = None
    _mutex_timedlock = _libc.pthread_mutex_timedlock


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_vp = ctypes.c_void_p
_syscall.argtypes = [ctypes.c_long, _vp, ctypes.c_int, ctypes.c_int, _vp, _vp, ctypes.c_int]
_syscall.restype = ctypes.c_long
for _f in (_mutex_lock, _mutex_trylock, _mutex_unlock, _mutex_consistent, _attr_init, _attr_destroy, _spin_trylock):
    _f.argtypes = [_vp]
    _f.restype = ctypes.c_int
_mutex_init.argtypes = [_vp, _vp]
_mutex_init.restype = ctypes.c_int
_attr_setpshared.argtypes = [_vp, ctypes.c_int]
_attr_setpshared.restype = ctypes.c_int
_attr_setrobust.argtypes = [_vp, ctypes.c_int]
_attr_setrobust.restype = ctypes.c_int
if _mutex_clocklock is not None:
    _mutex_clocklock.argtypes = [_vp, ctypes.c_int, ctypes.POINTER(timespec)]
    _mutex_clocklock.restype = ctypes.c_int
else:  # pragma: no cover
    _mutex_timedlock.argtypes = [_vp, ctypes.POINTER(timespec)]
    _mutex_timedlock.restype = ctypes.c_int

# Hot-path entry points for calls that never block (trylock, unlock, the
# barrier): loaded through PyDLL so the call does not drop and re-take the GIL,
# and called with pre-built c_void_p arguments (no argtypes conversion).  Each
# handle builds its pointer objects once with :func:`pointer_arg`.
_pylibc = ctypes.PyDLL(None)
fast_trylock = _pylibc.pthread_mutex_trylock
fast_unlock = _pylibc.pthread_mutex_unlock
fast_spin_trylock = _pylibc.pthread_spin_trylock
for _f in (fast_trylock, fast_unlock, fast_spin_trylock):
    _f.restype = ctypes.c_int


def buffer_address(buffer: object) -> int:
    """The address of a writable buffer's (an mmap's) first byte."""
    anchor = ctypes.c_char.from_buffer(buffer)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def pointer_arg(addr: int) -> ctypes.c_void_p:
    """A reusable pointer argument for the ``fast_*`` functions."""
    return ctypes.c_void_p(addr)


# A private word for full_barrier(): after the first call it stays "locked", so
# every later call is a failed (but still locked, hence fencing) cmpxchg.
_fence_word = ctypes.c_int(1)
FENCE_ARG = ctypes.c_void_p(ctypes.addressof(_fence_word))


def full_barrier(_f: CFuncPtr = fast_spin_trylock, _a: ctypes.c_void_p = FENCE_ARG) -> None:
    """Order all earlier stores before all later loads (x86 ``lock`` prefix)."""
    _f(_a)


_membarrier_state: bool | None = None


def membarrier_register() -> bool:
    """Let other processes issue barriers on this one's behalf (``membarrier(2)``).

    After a successful registration, a thread that stores and then loads
    needs no fence of its own, provided the other side of the protocol calls
    :func:`membarrier_global` between its own store and load (an asymmetric
    Dekker fence).  Returns False where the kernel (or a seccomp policy) does
    not offer ``MEMBARRIER_CMD_GLOBAL_EXPEDITED``; callers then fence both sides.
    """
    global _membarrier_state
    if _membarrier_state is None:
        ok = False
        try:
            cmds = _syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0, None, None, 0)
            if cmds > 0 and cmds & MEMBARRIER_CMD_GLOBAL_EXPEDITED and cmds & MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED:
                ok = _syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0, None, None, 0) == 0
        except OSError:  # pragma: no cover
            ok = False
        _membarrier_state = ok
    return _membarrier_state


def membarrier_global() -> bool:
    """Run a full memory barrier on every thread of every registered process; False if unavailable."""
    r: int = _syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0, None, None, 0)
    return r == 0


def futex_wait(addr: int, expected: int, timeout: float) -> int:
    """Sleep while the 32-bit word at ``addr`` equals ``expected``, at most ``timeout`` s.

    Returns 0 when woken (or on a spurious wake-up), ``errno.EAGAIN`` when the
    word already differed, ``errno.ETIMEDOUT`` or ``errno.EINTR``.  Callers must
    re-check their condition in every case.
    """
    if timeout < 0:
        timeout = 0.0
    sec = int(timeout)
    ts = timespec(sec, int((timeout - sec) * 1e9))
    if expected >= 0x80000000:  # the word is unsigned in memory, the argument a C int
        expected -= 1 << 32
    r = _syscall(SYS_futex, addr, FUTEX_WAIT, expected, ctypes.addressof(ts), None, 0)
    if r == 0:
        return 0
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
        return err
    raise OSError(err, f"futex wait failed: {os.strerror(err)}")


def futex_wake(addr: int, count: int = _INT_MAX, _sys: CFuncPtr = _syscall) -> int:
    """Wake up to ``count`` waiters of the futex word at ``addr``; returns how many woke."""
    r: int = _sys(SYS_futex, addr, FUTEX_WAKE, count, None, None, 0)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex wake failed: {os.strerror(err)}")
    return r


def mutex_init(addr: int) -> None:
    """Initialise a process-shared robust mutex at ``addr`` (fresh, zeroed memory)."""
    attr = ctypes.create_string_buffer(_MUTEXATTR_SIZE)
    for rc in (
        _attr_init(attr),
        _attr_setpshared(attr, PTHREAD_PROCESS_SHARED),
        _attr_setrobust(attr, PTHREAD_MUTEX_ROBUST),
        _mutex_init(addr, attr),
    ):
        if rc:
            raise OSError(rc, f"cannot initialise the queue's robust mutex: {os.strerror(rc)}")
    _attr_destroy(attr)


# Bound hot-path entry points: no attribute look-ups, no argument conversion
# beyond the int address.
mutex_trylock = _mutex_trylock
mutex_unlock = _mutex_unlock
mutex_consistent = _mutex_consistent


def mutex_lock(addr: int, deadline: float | None) -> int:
    """Lock the mutex, waiting at most until ``deadline`` (``time.monotonic()``).

    Returns 0, ``errno.EOWNERDEAD`` (the lock is held and its previous owner
    died: repair, then call :func:`mutex_consistent`), ``errno.ETIMEDOUT`` or
    ``errno.ENOTRECOVERABLE``.  Waits are sliced so that pending signals
    (Ctrl-C) are handled at least every half second.
    """
    rc: int
    while True:
        now = time.monotonic()
        end = now + 0.5 if deadline is None else min(deadline, now + 0.5)
        sec = int(end)
        ts = timespec(sec, int((end - sec) * 1e9))
        if _mutex_clocklock is not None:
            rc = _mutex_clocklock(addr, CLOCK_MONOTONIC, ctypes.byref(ts))
        else:  # pragma: no cover - realtime clock deadline on old glibc
            rend = time.time() + (end - now)
            sec = int(rend)
            rc = _mutex_timedlock(addr, ctypes.byref(timespec(sec, int((rend - sec) * 1e9))))
        if rc != errno.ETIMEDOUT:
            return rc
        if deadline is not None and time.monotonic() >= deadline:
            return rc
