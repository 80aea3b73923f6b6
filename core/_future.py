"""The Future that ``call_service_async`` returns: a ``concurrent.futures.Future`` built lazily.

A standard Future allocates a ``threading.Condition`` (a Python object, an
RLock and a deque) and two lists when it is created, and takes the condition
on every ``set_result``, ``done`` and ``result``. With thousands of calls in
flight that is most of a call's client-side cost, and the containers it keeps
alive make the garbage collector's full passes grow with every pending call.

:class:`CallFuture` is a real subclass (``isinstance`` checks,
``asyncio.wrap_future``, ``concurrent.futures.wait`` and ``as_completed`` all
work) whose condition and lists are only created when something needs them:
a thread that waits before the result is there, a done-callback, a waiter of
``wait()``/``as_completed()``, or ``cancel()``. Completing a future nobody waits
on, and reading a finished one, take no condition.

Why it is safe: the condition is created under one module lock, and the
lock-free completion checks, under that same lock, that no condition exists
yet. So either the completion comes first (state FINISHED is set before any
waiter can look at it under the condition, and the waiter returns at once) or
the condition exists and the completion takes the standard path, which
notifies waiters and runs callbacks. Callbacks and waiters are only ever
registered under the condition, so the lock-free path has none to run.

This relies on CPython's private ``Future`` internals: the six attributes
``Future.__init__`` sets and the state constants of ``concurrent.futures._base``.
:func:`check_future_internals` runs when this module is imported and raises
ImportError naming what changed if a Python release sets other attributes,
or if the standard ``Future`` methods or ``wait()``/``as_completed()`` use a
private name this class does not provide: kservice then fails at import
rather than corrupting futures at run time (``tests/core/test_future.py``
covers the check).
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError, _base
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import Any, TypeVar

from ._fork import renew_after_fork

__all__ = ["CallFuture"]

T = TypeVar("T")

_condition_creation = threading.Lock()
#: The lock under which conditions are created and unobserved futures completed; a subclass
#: may hold it to decide something and complete in one step (:meth:`CallFuture._finish_locked`).
#: A module that binds it under a name of its own registers that name with ``renew_after_fork`` too.
future_lock = _condition_creation
renew_after_fork(sys.modules[__name__], "_condition_creation", "future_lock")
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))

#: The attributes ``Future.__init__`` sets, which :class:`CallFuture` provides lazily or itself.
FUTURE_ATTRIBUTES = frozenset(("_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"))
#: Private names the standard ``Future`` methods and ``wait()``/``as_completed()`` may use.
FUTURE_PRIVATE_NAMES = FUTURE_ATTRIBUTES | {"_invoke_callbacks", "_Future__get_result"}


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def check_future_internals(future_class: type[Any] = Future, base_module: Any = _base) -> None:
    """Raise ImportError naming what differs if ``future_class`` is not the Future this module was written for.

    Checks the attributes a new future gets, the private names used by the
    class's own methods and by the module's ``wait``/``as_completed`` helpers
    (module-level names excepted), and the four state constants.
    """
    found = set(vars(future_class()))
    if found != FUTURE_ATTRIBUTES:
        raise ImportError(
            f"kservice's CallFuture does not support this Python's concurrent.futures.Future: it sets "
            f"{sorted(found)}, expected {sorted(FUTURE_ATTRIBUTES)} (see kservice/_future.py)"
        )
    # (function, names it may use that are not the future's: its own class's attributes)
    functions: list[tuple[types.FunctionType, set[str]]] = [
        (f, set()) for f in vars(future_class).values() if isinstance(f, types.FunctionType)
    ]
    for value in vars(base_module).values():
        if isinstance(value, types.FunctionType):
            functions.append((value, set()))
        elif isinstance(value, type) and value.__module__ == base_module.__name__ and value is not future_class:
            own = set(dir(value))  # once per class (dir() walks its MRO): this check runs in every process
            functions += [(f, own) for f in vars(value).values() if isinstance(f, types.FunctionType)]
    module_names = set(vars(base_module))
    used = {
        name
        for function, own in functions
        for code in _code_objects(function.__code__)
        for name in code.co_names
        if name.startswith("_") and not name.startswith("__") and name not in module_names and name not in own
    }
    unknown = used - FUTURE_PRIVATE_NAMES
    if unknown:
        raise ImportError(
            f"kservice's CallFuture does not support this Python's concurrent.futures: it uses private names "
            f"{sorted(unknown)} that CallFuture does not provide (see kservice/_future.py)"
        )
    states = (base_module.PENDING, base_module.CANCELLED, base_module.CANCELLED_AND_NOTIFIED, base_module.FINISHED)
    if states != ("PENDING", "CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"):
        raise ImportError(f"kservice's CallFuture does not support this Python's Future states {states}")


check_future_internals()


def wait_seconds(timeout: object) -> float | None:
    """How long a wait for a call takes: ``timeout`` in seconds, None (no limit) when it is longer than a wait can be.

    A timeout beyond ``threading.TIMEOUT_MAX`` (about 292 years), infinity
    included, waits without limit, as None does (the standard Future raises
    OverflowError from inside the wait). NaN raises ValueError and a bool or a
    non-number TypeError, naming the value, whether or not the call is done.
    """
    if type(timeout) is bool or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__} ({timeout!r})")
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds or None, got nan")
    return None if timeout > threading.TIMEOUT_MAX else float(timeout)


class CallFuture(Future[T]):
    """A ``concurrent.futures.Future`` whose condition and lists are created on first need."""

    # A new future's state is these class attributes: an instance gets its own only once it is
    # set (completing, or a waiter's condition), so creating one stores nothing. A subclass's
    # __init__ need not call this class's.
    _lazy_condition: threading.Condition | None = None
    _lazy_waiters: list[Any] | None = None
    _lazy_callbacks: list[Any] | None = None
    _state = PENDING
    _result: Any = None
    _exception: BaseException | None = None

    # Future.__init__ is deliberately not called: it would build the condition eagerly.
    def __init__(self) -> None:  # pylint: disable=super-init-not-called
        pass

    # The attributes the base class (and concurrent.futures.wait) use, built on first access.

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        condition = self._lazy_condition
        if condition is None:
            with _condition_creation:
                condition = self._lazy_condition
                if condition is None:
                    condition = self._lazy_condition = threading.Condition()
        return condition

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        waiters = self._lazy_waiters
        if waiters is None:
            waiters = self._lazy_waiters = []
        return waiters

    @property
    def _done_callbacks(self) -> list[Any]:
        callbacks = self._lazy_callbacks
        if callbacks is None:
            callbacks = self._lazy_callbacks = []
        return callbacks

    # Fast paths; everything else is the standard implementation.

    def _finish_unobserved(self, result: Any, exception: BaseException | None) -> bool:
        """Complete without the condition when none exists; False when one does (use the standard path)."""
        if self._lazy_condition is not None:
            return False
        with _condition_creation:
            return self._finish_locked(result, exception)

    def _finish_locked(self, result: Any, exception: BaseException | None) -> bool:
        """:meth:`_finish_unobserved` for a caller that holds :data:`future_lock` already."""
        if self._lazy_condition is not None:
            return False
        if self._state in _DONE:
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._result = result
        self._exception = exception
        self._state = FINISHED
        return True

    def set_result(self, result: T) -> None:
        if not self._finish_unobserved(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._finish_unobserved(None, exception):
            super().set_exception(exception)

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> T:
        """The call's result; as the standard Future's, with the timeouts of :func:`wait_seconds`."""
        if timeout is not None:
            timeout = wait_seconds(timeout)
        if self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[no-any-return]
        # Failures take the standard path, which also breaks the traceback's reference cycle.
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's exception; as the standard Future's, with the timeouts of :func:`wait_seconds`."""
        return super().exception(None if timeout is None else wait_seconds(timeout))

    def __repr__(self) -> str:
        return f"<CallFuture at {id(self):#x} state={self._state.lower()}>"
