# Hook specifications are signatures only: pluggy never runs their bodies.
# mypy: disable-error-code="empty-body"
"""Every hook kservice calls, grouped by when it is called.

Plugins implement these with ``@kservice.hookimpl`` and are found through the
``kservice`` entry-point group (built-in plugins load the same way). No hook is
called on the per-call path: the manager and each task call the chain hooks
once per service, compile the result, and compile again only when a plugin is
registered or unregistered.

Hooks whose docstring says *first result* stop at the first implementation
returning something other than None; the others collect every non-None result,
last-registered plugin first (pluggy's order; ``tryfirst``/``trylast`` adjust).

Every hook says what happens when an implementation raises (*If it raises*).
There are three behaviours, one per kind of hook:

- *contributions* (group 1, except ``kservice_register_commands``): a
  RuntimeWarning names the plugin, the hook and the error, and that plugin's
  contributions to that hook are skipped; the others' are kept.
  ``KSERVICE_STRICT_PLUGINS=1`` makes it a PluginError instead.
- *announcements* (groups 4 and ``kservice_task_status``): a RuntimeWarning
  names the plugin, the hook and the error, the other implementations still
  run, and what was announced goes on: a task still starts, stops (its
  workers, listeners and instance released) or reports its status.
- *decisions* (resolving, chains, retry policy, commands, health checks): the
  error propagates to the operation that asked, which fails with it, as
  described on each hook; nothing is left half-done. For the resolving and
  chain hooks (``kservice_resolve_service``, ``kservice_known_services``,
  ``kservice_middleware``, ``kservice_retry_policy``) the error arrives as a
  PluginError naming the plugin and the hook, the original chained; a
  ServiceError (a typed answer, such as ServiceUnavailableError from a
  resolver) arrives as raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    import click

    from ._environment import ServiceEnvironment
    from ._manager import ServiceManager
    from ._messages import ServiceRequest, ServiceResponse
    from ._middleware import ServiceMiddleware
    from ._status import ServiceStatus
    from ._task import BaseServiceTask, ServiceFactory, TaskContext
    from ._transport import ServiceAddress, Transport

hookspec = pluggy.HookspecMarker("kservice")

# --------------------------------------------------------------------------
# 1. Contributions: called once per plugin-set, results cached.
# --------------------------------------------------------------------------


@hookspec
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    """Contribute transports by calling ``register(transport)``.

    A transport carries requests from callers to a task and responses back
    (``inproc``, ``mmap``, ``ray``). Registering two transports with one name
    is a PluginError naming both plugins.

    ``register(transport)`` with anything but one Transport instance raises TypeError in the hook, naming what was wrong.

    If it raises: a warning naming the plugin; its transports are skipped.
    """


@hookspec
def kservice_register_task_kinds(
    register: Callable[[str, Callable[[ServiceFactory, TaskContext], BaseServiceTask]], None],
) -> None:
    """Contribute task kinds by calling ``register(kind, make_task)``.

    ``make_task(factory, ctx)`` returns an unstarted BaseServiceTask; the
    environment picks the kind from the service's ``kind`` option
    (``local``, ``process``, ``ray``, ...).

    ``register(kind, make_task)`` without a kind name and a callable raises TypeError in the hook, naming what was wrong.

    If it raises: a warning naming the plugin; its task kinds are skipped.
    """


@hookspec
def kservice_register_services(register: Callable[[str, type], None]) -> None:
    """Contribute service classes by calling ``register(name, service_class)``.

    The ``kservice.services`` entry-point group is the usual way for a
    distribution to advertise services; this hook is for plugins that compute
    them.

    ``register(name, service_class)`` without a name and a class raises TypeError in the hook, naming what was wrong.

    If it raises: a warning naming the plugin; its services are skipped.
    """


@hookspec
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    """Contribute configuration keys by calling ``register(section_path, {key: Setting})``.

    Keys join validation, ``kservice config show`` and the configuration
    reference. A section at the top level (not ``service`` or ``services``)
    can also be overridden per service under ``services.<name>.<section>``.

    ``register`` without a section path (str) and a dict raises TypeError in the hook.

    If it raises: a warning naming the plugin; its keys are skipped (a config
    that uses them is then refused as having unknown keys).
    """


@hookspec
def kservice_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``kservice`` command-line tool.

    ``cli.add_command(command)`` adds one at once; to keep the tool's start
    fast, name it instead in ``cli.lazy_commands`` (``{"name":
    "package.module:attribute"}``): the module is imported, and the command
    added, only when that command is run or listed.

    If it raises: the error propagates and the command-line tool does not start.
    """


# --------------------------------------------------------------------------
# 2. Resolving a service name (on a manager's first call to a name, and after
#    a call finds the service gone).
# --------------------------------------------------------------------------


@hookspec
def kservice_resolve_service(
    service_name: str, options: dict[str, Any], manager: ServiceManager
) -> list[ServiceAddress] | None:
    """Addresses of a running service the manager's own environment does not hold.

    ``options`` is the service's effective configuration as the manager sees
    it (``manager.config.for_service(service_name)``): what a resolver needs
    (a namespace, a refresh period). ``manager`` is still passed for
    resolvers written before ``options`` was; new ones should not need it.
    Called only after the environment was consulted. Every resolver is asked
    and the manager pools their addresses: it does not matter which plugin
    answers first. Calls use the address whose transport comes first in the
    service's ``service_call.transports``, then the cheapest one
    (``Transport.cost``), then by transport name. Return None when this
    plugin does not know the name.

    If it raises: the error propagates to the call that resolved the name,
    before anything is sent.
    """


@hookspec
def kservice_known_services() -> list[str]:
    """Names of services this plugin can resolve (for listings and "did you mean" hints).

    If it raises: the error propagates to the listing, or to the call whose
    unknown name was being explained.
    """


@hookspec
def kservice_running_services() -> list[dict[str, Any]]:
    """Services hosted by live processes that this plugin can reach, one dict per service.

    Each dict has at least ``name`` (what callers pass to the manager) and
    ``transport``; it may add ``pid``, ``address`` (queue or actor name),
    ``kind``, ``host`` and ``started_at`` (``time.time()``). ``kservice
    services --running`` lists them and ``kservice status`` asks each for its
    status. Return an empty list when nothing runs; records of dead hosts must
    not be returned.

    If it raises: the error propagates to the listing (``kservice services
    --running``, ``kservice status``), which fails with it.
    """


# --------------------------------------------------------------------------
# 3. The client call chain (compiled once per manager and service).
# --------------------------------------------------------------------------


@hookspec
def kservice_middleware(
    service_name: str, options: dict[str, Any], service_class: type | None, address: ServiceAddress | None
) -> ServiceMiddleware | list[ServiceMiddleware] | None:
    """Middleware for one service, used on both sides of a call.

    Its ``before_call``/``after_call`` run in the caller's process (client
    chain); its ``before_handle``/``after_handle`` run in the service's process
    around the method (server chain). ``options`` is the service's effective
    configuration (``Config.for_service``). ``service_class`` is the service's
    class where it is known: always on the service's side; on the caller's
    side when the manager's environment holds the service, else None (a
    service reached through a resolver, in another process). Declarations on
    the class (``@kservice.idempotent``, a fallback) are read from it.
    ``address`` is where the caller's calls now go (a new address when the
    service's host changed: a restarted ``kservice serve``, a moved service);
    None on the service's side and for a caller's route that refuses every
    call without sending it (a stopped task, a host being replaced). The hook
    is called each time a caller compiles a route, so state kept per service
    (a circuit breaker) learns of a new host here. Return None to stay out of
    this service's chain.

    If it raises: on the caller's side the error propagates to the call that
    compiled the route (nothing is sent); on the service's side to
    ``start_service`` (the task fails to start) or, when plugins change while
    it runs, to the registration that changed them.
    """


@runtime_checkable
class RetryPolicy(Protocol):
    """What the manager asks after a failed attempt; ``kservice_retry_policy`` returns one per service."""

    def should_retry(
        self, request: ServiceRequest, response: ServiceResponse, attempt: int, idempotent: bool
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up. ``attempt`` counts retries so far.

        Called on the call's own path (the caller's thread for a sync call, the
        thread delivering the response for an async one): it should decide
        without blocking, and it is a plain function (a policy whose
        ``should_retry`` is ``async def`` is refused, a PluginError when the
        route is compiled). A delay that would pass the call's deadline means no retry.
        A policy that raises, or answers anything but None or a number of
        seconds of at least 0, is reported (a RuntimeWarning naming it) and the
        call is not retried: it ends with its own outcome.
        """
        ...


@hookspec(firstresult=True)
def kservice_retry_policy(service_name: str, options: dict[str, Any]) -> RetryPolicy | None:
    """The retry policy of one service's calls (a :class:`RetryPolicy`). First result.

    The policy is an object with ``should_retry(request, response, attempt,
    idempotent) -> float | None``: the delay in seconds before the next attempt,
    or None to give up. It is asked only after a failed attempt, and reads the
    request without changing it. Return None from the hook for no retries.

    At most once: a policy must not re-send a method not declared idempotent
    (``idempotent`` False) after a failure that may have reached the service.
    A runtime ServiceUnavailableError proves it did not only when
    ``response.metadata[kservice.MAY_HAVE_RUN] is False``; True or absent
    means it may have run. The manager sends no retry once it is closed.

    If it raises: the error propagates to the call that compiled the route
    (nothing is sent).
    """


# --------------------------------------------------------------------------
# 4. Task lifecycle announcements (never on the per-call path).
#
# A plugin's implementation (one not of kservice itself) runs in a daemon
# thread, and the step waits for it at most 5 s (``kservice_task_stopping``:
# half of the stop's timeout, at least 0.1 s; ``kservice_task_status``: 1 s).
# One that has not returned by then is a warning naming the plugin, is left
# running, and is not called again for that hook until it returns (those
# calls are warnings too):
# a plugin waiting on an endpoint that stopped answering cannot keep a task
# from starting, reporting or stopping on time. It runs in its own thread: a
# plugin must not rely on the thread that starts or stops the task.
# --------------------------------------------------------------------------


@hookspec
def kservice_task_started(task: BaseServiceTask) -> None:
    """A task has started and serves calls.

    If it raises: a warning naming the plugin; the task stays started.
    """


@hookspec
def kservice_task_stopping(task: BaseServiceTask) -> None:
    """A task is about to stop: it no longer accepts calls and drains those in flight.

    If it raises: a warning naming the plugin; the task still drains, releases
    its workers, listeners and instance, and ends ``stopped``.
    """


@hookspec
def kservice_task_stopped(task: BaseServiceTask) -> None:
    """A task has stopped; its resources are released.

    If it raises: a warning naming the plugin; nothing else changes.
    """


@hookspec
def kservice_task_failed(task: BaseServiceTask, error: BaseException) -> None:
    """A task failed to start, or its service or listener died while running.

    If it raises: a warning naming the plugin; the start still fails with its
    own error, and what was started is released.
    """


@hookspec
def kservice_environment_started(environment: ServiceEnvironment) -> None:
    """An environment has started every task it holds.

    If it raises: a warning naming the plugin; the environment stays started.
    """


@hookspec
def kservice_environment_stopped(environment: ServiceEnvironment) -> None:
    """An environment has stopped every task it holds.

    If it raises: a warning naming the plugin; nothing else changes.
    """


# --------------------------------------------------------------------------
# 5. Health and status.
# --------------------------------------------------------------------------


@hookspec
def kservice_health_checks(task: BaseServiceTask) -> list[Callable[[BaseServiceTask], str | None]] | None:
    """Extra health checks for one task, each returning None when healthy or a reason string.

    The health plugin runs them with the built-in checks on its schedule; a
    check that raises or exceeds the configured timeout counts as a failure.

    If it raises: that check round fails ("health checks could not run",
    naming the error), like a failing check.
    """


@hookspec
def kservice_task_status(task: BaseServiceTask, status: ServiceStatus) -> None:
    """Add plugin state to a task's status (``status.extra``): breaker state, load, health.

    If it raises: a warning naming the plugin; the status is returned without
    that plugin's part (a local task's status; other kinds may let it propagate).
    """


@hookspec
def kservice_status_columns(status: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """This plugin's cells of one service's row in ``kservice status`` and the dashboard.

    Called in the process that shows the table (not the service's), once per
    row, for every status that is not an error row. ``status`` is the
    service's status as a dict (``ServiceStatus.to_dict()``, possibly read
    from another process); ``extra`` is a copy of its ``extra`` shared by
    every plugin asked for this row. Take (``extra.pop``) the sections of
    ``extra`` you render: what no plugin takes is shown in the ``details``
    column as ``key=value``. Return None when this status has nothing of yours.

    The returned keys fill the table's columns that are not the core's own:
    ``replicas`` and ``replicas_alive`` (ints), ``calls_per_second``,
    ``p50_ms`` and ``p99_ms`` (numbers, None for "no figure") and
    ``breaker`` (a word: ``closed``, ``open``, ``half_open``). Any other key
    is shown under ``details``. Values are str, int, float, bool or None.
    Columns no plugin fills show ``-`` (replicas: ``1``); a rate measured by
    the table itself (``kservice status --watch``) wins over a plugin's.

    If it raises: a warning naming the plugin; the row is shown without that
    plugin's cells, and the sections it had not taken are shown under details.
    If it has not returned within 1 s (it runs in a daemon thread): the same,
    and it is not called again until it returns.
    """


@runtime_checkable
class KindRuntime(Protocol):
    """What services of one task kind need running in the caller's process (Ray for ``ray``).

    ``kservice_kind_runtime`` returns one. The pytest fixtures
    (:mod:`kservice.testing`), ``kservice bench`` and ``python -m
    kservice.demo`` use it to bring the runtime up before they host services
    of the kind, and down again after, without knowing what it is.
    """

    def unavailable(self) -> str | None:
        """Why services of this kind cannot run in this process (what to install), or None. Starts nothing."""
        ...

    def start(self) -> str:
        """Join the runtime this process is connected to, else start one; a line saying which.

        A runtime started here is private to this process unless the
        environment names a shared one (``RAY_ADDRESS`` for Ray). Calling it
        again while started changes nothing. If it raises, nothing it started
        is left running.
        """
        ...

    def stop(self) -> None:
        """Stop what :meth:`start` started, and nothing else (a runtime it joined keeps running). Idempotent."""
        ...

    def kill_replica(self, task: BaseServiceTask, index: int) -> str:
        """Kill replica ``index`` of a running ``task`` of this kind the way a crash would; returns the replica's name.

        For fault drills (the demo kills one under load). The runtime restarts
        it as the service's options say. IndexError when there is no such replica.
        """
        ...


@hookspec(firstresult=True)
def kservice_kind_runtime(kind: str) -> KindRuntime | None:
    """The :class:`KindRuntime` services of ``kind`` need, from the plugin that registered the kind. First result.

    Return None for kinds this plugin does not host, and for kinds that need
    nothing started (``local``, ``process``). Called rarely (a test session's
    first service of the kind, a benchmark row, the demo), never per call.

    If it raises: the error propagates to the tool that asked (the test
    errors, the benchmark row fails naming it, the demo fails).
    """
