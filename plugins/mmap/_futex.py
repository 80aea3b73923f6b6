"""Native waiting and locking primitives for the shared-memory ring.

The futex system call, process-shared robust glibc mutexes, the membarrier
system call and a full memory barrier, on raw addresses inside ``MAP_SHARED``
file mappings (see :mod:`._futex_ctypes` for what each one guarantees). They come
from the compiled extension ``_ringfast`` when it was built, and through ctypes
otherwise: the two implementations make the same calls with the same arguments,
results and errors. With the extension, a process never imports ctypes (about a
millisecond of every start of a caller).

Only Linux on x86-64 is supported (:class:`NativeUnavailable` elsewhere).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "FENCE_ARG",
    "MUTEX_SIZE",
    "NATIVE",
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


class NativeUnavailable(OSError):
    """The platform lacks what the shared-memory ring needs (Linux, x86-64, glibc)."""


if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
    raise NativeUnavailable(
        f"the shared-memory ring needs Linux on x86-64 (this is {sys.platform}/{os.uname().machine})"
    )


def _compiled() -> Any:
    """The compiled extension, if it was built with these primitives (an older build has only the ring's)."""
    try:
        from . import _ringfast
    except ImportError:
        return None
    return _ringfast if hasattr(_ringfast, "mutex_clocklock") and hasattr(_ringfast, "FENCE_ADDRESS") else None


_native = _compiled()
#: Whether the primitives come from the compiled extension (else through ctypes).
NATIVE = _native is not None

MUTEX_SIZE = 40  # sizeof(pthread_mutex_t) on x86-64 glibc

_impl: Any
if NATIVE:
    from . import _futex_native as _impl
else:
    from . import _futex_ctypes as _impl

#: The argument of ``fast_spin_trylock`` that makes it a full barrier (a word locked for good).
FENCE_ARG: Any = _impl.FENCE_ARG
#: The address of a writable buffer's (an mmap's) first byte.
buffer_address: Callable[[Any], int] = _impl.buffer_address
#: A reusable pointer argument for the ``fast_*`` functions.
pointer_arg: Callable[[int], Any] = _impl.pointer_arg
#: The hot path's trylock, unlock and spin-trylock: they take what :func:`pointer_arg` returns.
fast_trylock: Callable[[Any], int] = _impl.fast_trylock
fast_unlock: Callable[[Any], int] = _impl.fast_unlock
fast_spin_trylock: Callable[[Any], int] = _impl.fast_spin_trylock
full_barrier: Callable[[], None] = _impl.full_barrier
membarrier_register: Callable[[], bool] = _impl.membarrier_register
membarrier_global: Callable[[], bool] = _impl.membarrier_global
futex_wait: Callable[[int, int, float], int] = _impl.futex_wait
futex_wake: Callable[..., int] = _impl.futex_wake
mutex_init: Callable[[int], None] = _impl.mutex_init
mutex_lock: Callable[[int, float | None], int] = _impl.mutex_lock
mutex_trylock: Callable[[int], int] = _impl.mutex_trylock
mutex_unlock: Callable[[int], int] = _impl.mutex_unlock
mutex_consistent: Callable[[int], int] = _impl.mutex_consistent
