"""pytest fixtures for testing your own services with kservice.

Installed with kservice and loaded by pytest automatically (entry point
``pytest11``: ``kservice = "kservice.testing"``). Test a service in three
lines::

    def test_kv(kservice_service):
        kv = kservice_service(KV, kind="process")   # hosted in a child process, over mmap
        assert kv.get("a") is None

Fixtures (function scope unless noted):

``kservice_config``
    The configuration of the test's environment: None (defaults) unless you
    override the fixture in a conftest or test module to return a dict or a
    YAML path.
``kservice_environment``
    A started :class:`kservice.ServiceEnvironment` using ``kservice_config``;
    stopped after the test, with every service, child process and shared-memory
    queue it started.
``kservice_manager``
    A :class:`kservice.ServiceManager` bound to that environment.
``kservice_service``
    ``kservice_service(ServiceClass, *args, name=None, kind="local",
    timeout=None, kwargs=None, **options)`` registers and starts a service in
    the environment and returns a :class:`kservice.ServiceProxy` whose method
    calls are synchronous calls through the manager. ``args``/``kwargs`` go to
    the class's constructor; ``options`` are the service's options as in
    config (``replicas=2``, ``local={"max_workers": 1}``...). ``kind`` is
    ``"local"`` (this process), ``"process"`` (a child process over shared
    memory) or any kind a plugin adds, such as ``"ray"`` (Ray actors). A kind
    whose runtime cannot run here (Ray not installed) skips the test, saying why.
``kservice_runtimes`` (session scope)
    Brings up, once per session, the runtime a kind's services need (its
    plugin's :class:`kservice.KindRuntime`: Ray for ``ray``) and stops at the
    end of the session what it started. ``kservice_service`` asks it for
    every kind; ``kservice_runtimes.start("ray")`` in a fixture does it yourself.

And one function, for tests that wait for something to happen (a call to
land, a status to change, a process to exit) rather than sleeping a guessed
time::

    wait_for(lambda: task.get_service_status().healthy, timeout=10, what="the service to be healthy")

Guarantees: a service that fails to start fails the test with the service's
own error; teardown stops every service the test started even when the test
fails, and the environment's child processes are gone when teardown returns.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from . import KindRuntime, ServiceEnvironment, ServiceManager, ServiceProxy

__all__ = [
    "KindRuntimes",
    "ServiceStarter",
    "WaitTimeoutError",
    "kservice_config",
    "kservice_environment",
    "kservice_manager",
    "kservice_runtimes",
    "kservice_service",
    "wait_for",
]

T = TypeVar("T")

_environment_numbers = itertools.count(1)


class WaitTimeoutError(AssertionError, TimeoutError):
    """What :func:`wait_for` raises when its condition did not come true in time.

    An AssertionError, so pytest reports it as a test failure with its message,
    and a TimeoutError, for code outside tests that catches that.
    """


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition", interval: float = 0.01
) -> T:
    """Call ``predicate()`` until it returns something truthy, and return that value.

    Polls every ``interval`` seconds (the first call is immediate) for up to
    ``timeout`` seconds, then raises :class:`WaitTimeoutError` saying
    ``timed out after <timeout>s waiting for <what>`` and the last value seen.
    An exception ``predicate`` raises propagates at once (a broken check is
    not a slow one). Use it instead of ``time.sleep(guess)`` wherever a test
    waits for a state: it returns as soon as the state is reached and fails
    with a message naming what never happened.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError(
            f"wait_for needs timeout >= 0 and interval > 0, got timeout={timeout!r}, interval={interval!r}"
        )
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeoutError(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(min(interval, remaining))


@pytest.fixture
def kservice_config() -> Any:
    """The test environment's configuration: override this fixture to return a dict or a YAML path."""
    return None


@pytest.fixture
def kservice_environment(kservice_config: Any, request: pytest.FixtureRequest) -> Iterator[ServiceEnvironment]:
    """A started ServiceEnvironment for one test, stopped (with everything it started) afterwards."""
    from . import ServiceEnvironment

    # Readable in `kservice status` and in error messages: which test owns the environment.
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60].strip("-") or "test"
    environment = ServiceEnvironment(f"pytest-{label}-{next(_environment_numbers)}", kservice_config)
    environment.start()
    try:
        yield environment
    finally:
        environment.stop()


@pytest.fixture
def kservice_manager(kservice_environment: ServiceEnvironment) -> Iterator[ServiceManager]:
    """A ServiceManager bound to ``kservice_environment`` (closed after the test)."""
    manager = kservice_environment.manager()
    try:
        yield manager
    finally:
        manager.close()


class KindRuntimes:
    """The session's runtimes of task kinds (what ``kservice_runtimes`` yields)."""

    def __init__(self) -> None:
        self._started: dict[str, KindRuntime] = {}

    def start(self, kind: str) -> None:
        """Make the runtime ``kind`` needs run for the rest of the session; skips the test when it cannot run here.

        Does nothing for kinds that need no runtime (``local``, ``process``)
        and for one already started. An error starting it fails the test.
        """
        if kind in self._started:
            return
        from ._plugins import get_plugin_manager

        runtime = get_plugin_manager().hook.kservice_kind_runtime(kind=kind)
        if runtime is None:
            return
        reason = runtime.unavailable()
        if reason is not None:
            pytest.skip(reason)
        runtime.start()
        self._started[kind] = runtime

    def stop(self) -> None:
        """Stop what :meth:`start` started, last started first."""
        while self._started:
            _, runtime = self._started.popitem()
            runtime.stop()


@pytest.fixture(scope="session")
def kservice_runtimes() -> Iterator[KindRuntimes]:
    """The runtimes task kinds need (Ray for ``ray``), started on first use and stopped at the end of the session."""
    runtimes = KindRuntimes()
    try:
        yield runtimes
    finally:
        runtimes.stop()


class ServiceStarter:
    """The callable the ``kservice_service`` fixture returns."""

    def __init__(
        self, environment: ServiceEnvironment, manager: ServiceManager, request: pytest.FixtureRequest
    ) -> None:
        self.environment = environment
        self.manager = manager
        self._request = request

    def __call__(
        self,
        service_class: type,
        *args: Any,
        name: str | None = None,
        kind: str = "local",
        timeout: float | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ServiceProxy:
        """Start ``service_class(*args, **kwargs)`` as a service of ``kind`` and return a proxy to it.

        ``name`` defaults to the class name (with a numeric suffix when the
        test starts the same class twice). ``timeout`` applies to every call
        made through the proxy. Raises the service's start error
        (ServiceUnavailableError, ConfigError) when it cannot start.
        """
        from . import ServiceFactory

        # The kind's runtime (Ray for "ray") for the session; skips, saying why, when it cannot run here.
        self._request.getfixturevalue("kservice_runtimes").start(kind)
        service_name = name or self._free_name(service_class.__name__)
        factory = ServiceFactory(service_name, service_class, tuple(args), dict(kwargs or {}))
        self.environment.register_service(service_name, factory, kind=kind, **options)
        return self.manager.proxy(service_name, timeout=timeout)

    def _free_name(self, base: str) -> str:
        taken = set(self.environment.service_names())
        if base not in taken:
            return base
        return next(f"{base}-{n}" for n in itertools.count(2) if f"{base}-{n}" not in taken)


@pytest.fixture
def kservice_service(
    kservice_environment: ServiceEnvironment, kservice_manager: ServiceManager, request: pytest.FixtureRequest
) -> ServiceStarter:
    """Start services for this test: ``kv = kservice_service(KV, kind="process"); kv.get("a")``."""
    return ServiceStarter(kservice_environment, kservice_manager, request)
