"""Completing async calls: one thread per process waits on the ObjectRefs of calls in flight and settles them in batches."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from kservice._transport import BLOCKED_COMPLETION, blocked_completion

from .common import _ray

# ---------------------------------------------------------------------------
# Completing async calls
# ---------------------------------------------------------------------------


class _RefCompleter:
    """One thread per process that turns the ObjectRefs of async calls into callbacks, in batches.

    ``ref.future()`` costs a Future and a callback that a Ray thread runs
    under the GIL for every call, handing the GIL back and forth with the
    threads that submit calls; with thousands of calls in flight that, not
    Ray, bounded the call rate. Here one thread asks ``ray.wait`` about the
    oldest pending refs (between ``MIN_WINDOW`` and ``WINDOW`` of them, about
    twice as many as finished in the previous round), gathers whatever finishes within
    ``BATCH_WAIT`` seconds (returning at once when all of them have), fetches
    the batch with one ``ray.get`` and runs the callbacks.

    Guarantees: ``callback(answer, error)`` runs exactly once per ``add``, in
    this thread: ``error`` is None and ``answer`` the task's value, or
    ``error`` is what ``ray.get`` raises for that ref (actor died, task
    cancelled, ...). A call that finishes while others are in flight is
    reported up to ``BATCH_WAIT`` late; a lone call at once. When none of the
    oldest refs finishes within ``BATCH_WAIT`` they move behind the others, so
    long-running calls never hide finished ones for more than
    ``BATCH_WAIT * pending / WINDOW`` seconds. If Ray itself fails (e.g. it
    was shut down), every pending callback gets that error.
    """

    #: most refs asked about per ``ray.wait``: its cost grows with the count (about 0.4 µs each)
    WINDOW = 256
    #: fewest refs asked about per ``ray.wait`` (the window adapts between the two)
    MIN_WINDOW = 16
    #: seconds to let a batch accumulate while several calls are in flight
    BATCH_WAIT = 0.002

    #: seconds the thread stays without work before it exits (the next call starts another)
    IDLE_EXIT = 0.5

    def __init__(self, ray: ModuleType) -> None:
        self._ray = ray
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[tuple[Any, Callable[[Any, BaseException | None], None]]] = []
        self._soon: list[Callable[[], None]] = []
        self._idle = False
        self._running = False
        self._window = self.MIN_WINDOW

    def add(self, ref: Any, callback: Callable[[Any, BaseException | None], None]) -> None:
        with self._lock:
            self._incoming.append((ref, callback))
            self._wake_up()

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run ``function()`` in this thread before its next wait (within ``BATCH_WAIT`` s); exceptions are dropped."""
        with self._lock:
            self._soon.append(function)
            self._wake_up()

    def _wake_up(self) -> None:
        # Holding the lock.
        if not self._running:
            self._running = True
            threading.Thread(target=self._run, name="kservice-ray-completer", daemon=True).start()
        elif self._idle:
            self._idle = False
            self._wake.notify()

    def _run(self) -> None:
        # Insertion-ordered: the oldest refs first.
        pending: dict[Any, Callable[[Any, BaseException | None], None]] = {}
        while True:
            with self._lock:
                if not self._incoming and not pending and not self._soon:
                    self._idle = True
                    self._wake.wait(self.IDLE_EXIT)
                    self._idle = False
                    if not self._incoming and not self._soon:
                        # No thread lingers in a process that stopped calling.
                        self._running = False
                        return
            # One round in a frame of its own: when this thread waits or ends, it holds no ObjectRef
            # (one freed after ray.shutdown() makes Ray end the whole process).
            self._round(pending)

    def _round(self, pending: dict[Any, Callable[[Any, BaseException | None], None]]) -> None:
        with self._lock:
            soon, self._soon = self._soon, []
        for function in soon:
            try:
                function()
            except Exception:  # noqa: BLE001 - one failing function must not stop the completer
                pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for ref, callback in incoming:
            pending[ref] = callback
        if not pending:
            return
        try:
            self._complete_some(pending)
        except Exception as exc:  # noqa: BLE001 - Ray itself failed: nothing pending can complete any more
            failed = dict(pending)
            pending.clear()
            for callback in failed.values():
                _run_callback(callback, None, exc)

    def _complete_some(self, pending: dict[Any, Callable[[Any, BaseException | None], None]]) -> None:
        ray = self._ray
        window = list(itertools.islice(pending, self._window))
        if _calls_waiting():
            # Calls wait in this process for the slots these refs hold: hand each slot on as soon as it frees.
            ready, _ = ray.wait(window, num_returns=1, timeout=self.BATCH_WAIT, fetch_local=False)
            if ready and len(window) > 1:
                ready, _ = ray.wait(window, num_returns=len(window), timeout=0, fetch_local=False)
        else:
            ready, _ = ray.wait(window, num_returns=len(window), timeout=self.BATCH_WAIT, fetch_local=False)
        # Ask about twice what finished this time: enough to catch a batch, no more (ray.wait's cost grows
        # with it); after a round where nothing finished, about as many as allowed, to look past slow calls.
        self._window = min(self.WINDOW, max(self.MIN_WINDOW, 2 * len(ready))) if ready else self.WINDOW
        if not ready:
            if len(pending) > len(window):
                for ref in window:
                    pending[ref] = pending.pop(ref)
            return
        try:
            outcomes: list[tuple[Any, BaseException | None]] = [(value, None) for value in ray.get(ready)]
        except Exception:
            # At least one failed: ask each (all are ready, so this does not block).
            outcomes = []
            for ref in ready:
                try:
                    outcomes.append((ray.get(ref), None))
                except Exception as exc:  # noqa: BLE001 - delivered to the call's callback
                    outcomes.append((None, exc))
        began = time.monotonic()
        for ref, (value, error) in zip(ready, outcomes, strict=True):
            _run_callback(pending.pop(ref), value, error)
        took = time.monotonic() - began
        if took > BLOCKED_COMPLETION:
            import logging

            thread = "this process's Ray completion thread"
            logging.getLogger("kservice.ray").warning("ray: %s", blocked_completion(thread, len(ready), took))


#: replica sets that have had calls waiting for a slot since the completer last looked (see _calls_waiting)
_backlogged: set[Any] = set()


def _calls_waiting() -> bool:
    """Whether calls of this process wait in the caller for a replica slot (forgets sets whose queue emptied)."""
    if not _backlogged:
        return False
    for replicas in list(_backlogged):
        if replicas.queued:
            return True
        _backlogged.discard(replicas)
    return False


def _run_callback(
    callback: Callable[[Any, BaseException | None], None], value: Any, error: BaseException | None
) -> None:
    try:
        callback(value, error)
    except Exception:  # noqa: BLE001 - a failing callback must not stop the completer
        pass


_completer_instance: _RefCompleter | None = None
_completer_lock = threading.Lock()


def _completer() -> _RefCompleter:
    global _completer_instance
    completer = _completer_instance
    if completer is None:
        with _completer_lock:
            if _completer_instance is None:
                _completer_instance = _RefCompleter(_ray())
            completer = _completer_instance
    return completer
