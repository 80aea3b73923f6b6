"""The native primitives of :mod:`._futex` from the compiled extension ``_ringfast`` (no ctypes).

Imported by :mod:`._futex` only when the extension was built with them; same
functions, arguments, results and errors as :mod:`._futex_ctypes`.
"""

from __future__ import annotations

import errno
import time
from typing import Any

from . import _ringfast

_native: Any = _ringfast

MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL_EXPEDITED = 1 << 1
MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2

#: The argument of ``fast_spin_trylock`` that makes it a full barrier (a word locked for good).
FENCE_ARG: Any = _native.FENCE_ADDRESS
buffer_address = _native.buffer_address
futex_wake = _native.futex_wake
mutex_init = _native.mutex_init
mutex_trylock = _native.mutex_trylock
mutex_unlock = _native.mutex_unlock
mutex_consistent = _native.mutex_consistent
# The hot path's entry points take what pointer_arg returns: with the extension, the address itself.
fast_trylock = _native.mutex_trylock
fast_unlock = _native.mutex_unlock
fast_spin_trylock = _native.spin_trylock


def pointer_arg(addr: int) -> Any:
    """A reusable pointer argument for the ``fast_*`` functions."""
    return addr


def full_barrier(_f: Any = _native.spin_trylock, _a: int = _native.FENCE_ADDRESS) -> None:
    """Order all earlier stores before all later loads (x86 ``lock`` prefix)."""
    _f(_a)


def futex_wait(addr: int, expected: int, timeout: float) -> int:
    """Sleep while the 32-bit word at ``addr`` equals ``expected``, at most ``timeout`` s.

    Returns 0 when woken (or on a spurious wake-up), ``errno.EAGAIN`` when the
    word already differed, ``errno.ETIMEDOUT`` or ``errno.EINTR``; OSError
    otherwise. Callers must re-check their condition in every case.
    """
    result: int = _native.futex_wait(addr, expected & 0xFFFFFFFF, timeout)
    return result


_membarrier_state: bool | None = None


def membarrier_register() -> bool:
    """Let other processes issue barriers on this one's behalf (``membarrier(2)``); False where unavailable."""
    global _membarrier_state
    if _membarrier_state is None:
        cmds: int = _native.membarrier(MEMBARRIER_CMD_QUERY)
        ok = (
            cmds > 0
            and bool(cmds & MEMBARRIER_CMD_GLOBAL_EXPEDITED)
            and bool(cmds & MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED)
            and _native.membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0
        )
        _membarrier_state = ok
    return _membarrier_state


def membarrier_global() -> bool:
    """Run a full memory barrier on every thread of every registered process; False if unavailable."""
    return bool(_native.membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) == 0)


def mutex_lock(addr: int, deadline: float | None) -> int:
    """Lock the mutex, waiting at most until ``deadline`` (``time.monotonic()``).

    Returns 0, ``errno.EOWNERDEAD`` (the lock is held and its previous owner
    died: repair, then call :func:`mutex_consistent`), ``errno.ETIMEDOUT`` or
    ``errno.ENOTRECOVERABLE``. Waits are sliced so that pending signals
    (Ctrl-C) are handled at least every half second.
    """
    clocklock = _native.mutex_clocklock
    while True:
        now = time.monotonic()
        end = now + 0.5 if deadline is None else min(deadline, now + 0.5)
        rc: int = clocklock(addr, end)
        if rc != errno.ETIMEDOUT:
            return rc
        if deadline is not None and time.monotonic() >= deadline:
            return rc
