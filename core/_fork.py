"""The locks a process forked from this one makes anew.

A forked child has only the thread that called ``fork``: a lock another thread
held at that instant stays held in the child for good, and the child's first
use of it waits for ever. Each lock registered with :func:`renew_after_fork` is
replaced in a child by a new lock of the same kind (``Lock`` or ``RLock``)
before the child's own code runs again. A lock known by several names, or to
several owners, is replaced by one new lock everywhere: what was one lock stays
one lock.

Registering costs one dictionary entry per owner, made when the owner is
(never on a call's path). State other than locks (threads that did not come
along, what belongs to the parent) each module resets in its own fork handler.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["renew_after_fork"]

_RLOCK = type(threading.RLock())

#: owner (a module or an object, held weakly) -> the names of its locks
_owners: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


def renew_after_fork(owner: Any, *names: str) -> None:
    """In a child forked from this process, give ``owner``'s attributes ``names`` new locks of the same kinds.

    ``owner`` is a module or an object that can be weakly referenced (it is
    forgotten when it dies); registering it again adds names. An attribute that
    holds no lock at the fork is left as it is.
    """
    with _owners_lock:
        _owners[owner] = tuple(dict.fromkeys((*_owners.get(owner, ()), *names)))


def _renew() -> None:
    global _owners_lock
    _owners_lock = threading.Lock()
    fresh: dict[int, Any] = {}  # id of a parent's lock -> its replacement
    for owner, names in list(_owners.items()):
        for name in names:
            old = getattr(owner, name, None)
            if old is None:
                continue
            new = fresh.get(id(old))
            if new is None:
                new = fresh[id(old)] = threading.RLock() if isinstance(old, _RLOCK) else threading.Lock()
            setattr(owner, name, new)


os.register_at_fork(after_in_child=_renew)
