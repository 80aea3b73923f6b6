"""The ``ray`` task kind: a service hosted as a set of Ray replica actors, scaled, health-checked and stopped from the driver."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

from kservice import (
    BaseServiceTask,
    Config,
    ConfigError,
    Listener,
    ServiceError,
    ServiceFactory,
    ServiceResponse,
    ServiceStatus,
    ServiceUnavailableError,
    TaskContext,
)
from kservice._task import stop_timeout

from .actor import _actor_class, _idempotent_methods
from .balancers import _make_balancer
from .common import _CONTROL_GROUP, ACTOR_PREFIX, HEALTH_ANSWER_WAIT, _first_line, _ray
from .discovery import _deployments, _new_deployment_id, _newest_deployment
from .replicas import _aggregate_status, _Replica, _ReplicaSet
from .transport import _transport
from .wire import WIRE_VERSION

# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------


class RayServiceTask(BaseServiceTask):
    """A service whose instance lives in Ray actors, one per replica.

    ``start_service`` connects to Ray when this process has not (``ray.init``
    with ``service.ray.address`` and ``service.ray.namespace``; a configured
    address that does not answer is a quick error, not a hang), creates
    ``replicas`` named actors with the ``service.ray`` options and waits up to
    ``service.ray.start_timeout`` until every one has built its instance: a
    constructor that raises fails ``start_service`` with that error, the task
    is ``failed`` and the actors are killed. Starting a service whose name
    already runs in the namespace is refused (stop the other one first).

    ``stop_service`` drains and kills every replica, detached ones included.
    ``scale(n)`` changes the replica count while running; callers in this
    process see the change at once, callers in other drivers within
    ``service.ray.membership_refresh`` seconds.
    """

    kind: ClassVar[str] = "ray"
    hosted_here: ClassVar[bool] = False  # its replica actors run the instance (each reports its load)
    default_transports: ClassVar[tuple[str, ...]] = ("ray",)

    def __init__(
        self, service_factory: ServiceFactory, ctx: TaskContext | None = None, *, replicas: int | None = None
    ) -> None:
        _ray()
        super().__init__(service_factory, ctx)
        self.transport_names = ("ray",)
        ray_options: dict[str, Any] = self.options["ray"]
        self.ray_options = ray_options
        self.namespace: str = ray_options["namespace"]
        self.replica_count: int = int(replicas if replicas is not None else self.options.get("replicas", 1))
        if self.replica_count < 1:
            raise ConfigError(f"services.{self.service_name}.replicas: {self.replica_count} is below the minimum 1")
        _make_balancer(ray_options["balancer"])  # unknown names fail at construction, listing the known ones
        if ray_options["max_concurrency"] is not None:
            self.max_workers = int(ray_options["max_concurrency"])
        self.deployment = ""
        self.replica_set: _ReplicaSet | None = None
        self._next_index = 0
        self._scale_lock = threading.Lock()
        #: for a task attached to another driver's deployment: what its replicas were built from (read from a
        #: replica when the first one is added; see ``_spawn_args``), else None
        self._attached = False
        self._spawn: dict[str, Any] | None = None

    # -------------------------------------------------------------- starting

    def _new_replica_set(
        self, service_name: str, deployment: str, idempotent: frozenset[str] = frozenset()
    ) -> _ReplicaSet:
        """An empty replica set for ``deployment``, with this task's balancer, retry and batching options."""
        opts = self.ray_options
        return _ReplicaSet(
            service_name,
            self.namespace,
            deployment,
            _make_balancer(opts["balancer"]),
            int(opts["max_task_retries"]),
            idempotent,
            batch_max=int(opts["batch_max"]),
            batch_cost_limit=float(opts["batch_cost_limit"]),
        )

    def host_instance(self) -> None:
        """Connect to Ray, refuse a name already deployed, create the replicas and wait until each is built."""
        ray = _ray()
        _ensure_ray(ray, self.ray_options)
        existing = _deployments(ray, self.namespace).get(self.service_name)
        if existing:
            deployment = max(existing)
            raise ServiceError(
                f"service {self.service_name!r} already runs in Ray namespace {self.namespace!r} "
                f"(deployment {deployment}, actors {sorted(existing[deployment].values())}); stop it first "
                f"(RayServiceTask.attach({self.service_name!r}, namespace={self.namespace!r}).stop_service()) "
                "or set another service.ray.namespace"
            )
        self.deployment = _new_deployment_id()
        klass = self.service_factory.service_class
        self.replica_set = self._new_replica_set(
            self.service_name, self.deployment, frozenset(_idempotent_methods(klass, self.options))
        )
        self.replica_set.capacity = self.max_workers
        self.replica_set.wire = WIRE_VERSION  # replicas of this very code
        self._add_replicas(self.replica_count)

    def open_listeners(self) -> list[Listener]:
        """The ``ray`` address of the replica set (its actors listen by themselves)."""
        return [_transport.listen(self)]

    def _actor_options(self, name: str) -> dict[str, Any]:
        opts = self.ray_options
        resources = dict(opts["resources"] or {})
        # Ray takes CPU and GPU as their own options, not as custom resources.
        num_cpus = resources.pop("CPU", opts["num_cpus"])
        num_gpus = resources.pop("GPU", opts["num_gpus"])
        options: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "lifetime": opts["lifetime"],
            "max_restarts": opts["max_restarts"],
            # At most once by default; idempotent methods ask Ray for retries per call.
            "max_task_retries": 0,
            "max_concurrency": self.max_workers,
        }
        if resources:
            options["resources"] = resources
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        if num_gpus is not None:
            options["num_gpus"] = num_gpus
        if opts["runtime_env"]:
            options["runtime_env"] = opts["runtime_env"]
        return options

    def _add_replicas(self, count: int) -> None:
        """Create ``count`` replicas and add them once every one is ready; on failure kill them and raise."""
        ray = _ray()
        replicas = self.replica_set
        assert replicas is not None
        if self._attached:
            # Another driver's deployment: new replicas are built as its replicas were (this task's own
            # factory is a placeholder and its config may differ), never from this driver's settings.
            spawn = self._spawn_args()
            factory: ServiceFactory = spawn["factory"]
            config_data: Any = spawn["config"]
            middlewares: tuple[Any, ...] = spawn["middlewares"]
            environment_name: str = spawn["environment_name"]
            # None: a replica built without its options recorded; this driver's service.ray options stand in.
            template: dict[str, Any] | None = spawn["actor_options"]
        else:
            factory = self.service_factory
            # The validated Config itself, not its data: revalidating in the replica would reject values that
            # only the caller's process knows (a balancer registered there, a plugin the replica lacks).
            config_data = self.ctx.resolved_config()
            middlewares = self._middlewares()
            environment_name = self.ctx.environment_name
            template = None
        actor_class = _actor_class(factory.service_class)
        created: list[tuple[int, str, Any]] = []
        try:
            for _ in range(count):
                index = self._next_index
                self._next_index += 1
                name = f"{ACTOR_PREFIX}{self.service_name}:{self.deployment}:{index}"
                options = self._actor_options(name) if template is None else {**template, "name": name}
                handle = actor_class.options(**options).remote(
                    factory, config_data, middlewares, environment_name, name, _without_name(options)
                )
                created.append((index, name, handle))
            readiness = [h.ready.options(concurrency_group=_CONTROL_GROUP).remote() for _, _, h in created]
            timeout = float(self.ray_options["start_timeout"])
            try:
                answers: list[ServiceResponse] = ray.get(readiness, timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise ServiceUnavailableError(
                    f"replicas of {self.service_name!r} were not ready within service.ray.start_timeout={timeout}s: "
                    f"Ray could not place them (each asks for resources={self.ray_options['resources']!r}, "
                    f"num_cpus={self.ray_options['num_cpus']!r}; the cluster has {ray.cluster_resources()}) "
                    "or their constructor is slow"
                ) from None
            except ray.exceptions.RayActorError as exc:
                # The actor could not even be built: usually its arguments (the service class) do not unpickle there.
                detail = str(exc)
                missing = "ModuleNotFoundError" in detail or "No module named" in detail
                hint = (
                    f"; the service class {self.service_factory.class_path} must be importable in Ray's workers "
                    "(install its package on every node, or ship it with service.ray.runtime_env, e.g. "
                    "{py_modules: [...]} or {working_dir: ...})"
                    if missing
                    else ""
                )
                last = [line.strip() for line in detail.splitlines() if line.strip()][-1:]
                raise ServiceUnavailableError(
                    f"replicas of {self.service_name!r} could not be created by Ray: {last[0] if last else type(exc).__name__}{hint}"
                ) from exc
            for answer in answers:
                if not answer.success:
                    raise answer.to_exception(self.service_name, "__init__")
        except BaseException:
            # Gone for good before the error reaches the caller: a retried start must not find them.
            _kill_and_wait(ray, [(name, handle) for _, name, handle in created], self.namespace)
            raise
        for (index, name, handle), answer in zip(created, answers, strict=True):
            replicas.add(index, name, handle, answer.result)

    def _spawn_args(self) -> dict[str, Any]:
        """What the attached deployment's replicas were built from, asked of a live replica once.

        Raises ServiceUnavailableError when no replica can tell (none live, an older kservice, or the service
        class does not unpickle in this driver): adding replicas built otherwise would serve another class.
        """
        if self._spawn is not None:
            return self._spawn
        ray = _ray()
        assert self.replica_set is not None
        why = "no replica is live"
        for replica in self.replica_set.live:
            try:
                spawn: dict[str, Any] = ray.get(
                    replica.handle.spawn_args.options(concurrency_group=_CONTROL_GROUP).remote(), timeout=30
                )
            except Exception as exc:  # noqa: BLE001 - said in the error below if no replica can tell
                why = f"{replica.name} could not tell ({type(exc).__name__}: {_first_line(exc)})"
                continue
            self._spawn = spawn
            return spawn
        raise ServiceUnavailableError(
            f"cannot add replicas to ray service {self.service_name!r} (deployment {self.deployment}, attached): "
            f"what its replicas were built from is unknown: {why}; scale it from the driver that started it, "
            "or from one that can import the service class"
        )

    def _middlewares(self) -> tuple[Any, ...]:
        """The environment's middleware as of now (added before this start), after the context's own."""
        return self.ctx.current_middlewares()

    @classmethod
    def attach(
        cls, service_name: str, *, namespace: str | None = None, config: Any = None, ctx: TaskContext | None = None
    ) -> RayServiceTask:
        """A running task controlling a deployment another driver started (``stop_service`` kills it).

        ``config`` (what :meth:`Config.load` takes) configures the task when no
        ``ctx`` is given; with a ``ctx``, the task follows the context's config.
        Raises TypeError for both (the config would be ignored), before Ray is
        asked; ServiceUnavailableError when no replica of ``service_name``
        runs in the namespace.
        """
        if ctx is not None and config is not None:
            raise TypeError(
                "RayServiceTask.attach got both a ctx and a config: the task follows its context's configuration, "
                "so this config would be ignored; put the config on the TaskContext (TaskContext(config=...)), "
                "or pass only config=..."
            )
        ray = _ray()
        if not ray.is_initialized():
            raise ServiceUnavailableError(
                "RayServiceTask.attach needs a Ray connection: call ray.init(address=...) first"
            )
        if ctx is None:
            ctx = TaskContext(config=Config.load(config))
        factory = ServiceFactory(service_name, object)
        task = cls(factory, ctx)
        if namespace is not None:
            task.namespace = namespace
        existing = _deployments(ray, task.namespace).get(service_name)
        if not existing:
            raise ServiceUnavailableError(
                f"no replica of ray service {service_name!r} runs in namespace {task.namespace!r}"
            )
        deployment = _newest_deployment(existing)
        assert deployment is not None
        task.deployment = deployment
        task.replica_set = task._new_replica_set(service_name, deployment)
        for index, name in sorted(existing[deployment].items()):
            task.replica_set.add(index, name, ray.get_actor(name, namespace=task.namespace))
        task._next_index = max(existing[deployment]) + 1
        task.replica_count = len(existing[deployment])
        described = ray.get(
            task.replica_set.snapshot()[0].handle.describe.options(concurrency_group=_CONTROL_GROUP).remote(),
            timeout=30,
        )
        task.replica_set.adopt_description(described)
        task.max_workers = task.replica_set.capacity  # the deployment's, not this driver's config
        task._attached = True
        task.adopt_running()
        return task

    # -------------------------------------------------------------- scaling

    def scale(self, replicas: int, timeout: float | None = None) -> None:
        """Run ``replicas`` replicas from now on (an int, at least 1: anything else raises before anything changes).

        Growing waits until the new replicas are ready (ServiceUnavailableError
        and no change if they fail). Shrinking fails no call: the
        highest-numbered replicas leave the rotation at once (calls waiting
        in this process go to the others), finish the calls they were sent
        (up to ``timeout`` seconds, default ``service.ray.start_timeout``;
        after that they are killed and those calls fail as "may have run";
        one of more than about 146 years, or infinity, waits without limit,
        and one that is no number, NaN included, raises TypeError or
        ValueError before anything changes),
        then stop and are killed. Callers in other drivers see the change
        within ``service.ray.membership_refresh`` seconds; a call one of them
        sends to a leaving replica meanwhile is refused unrun and goes to
        another replica.
        """
        if timeout is not None:
            # Checked before anything changes. One longer than a wait can take drains without limit.
            timeout = stop_timeout(timeout)
        if type(replicas) is bool or not isinstance(replicas, int):
            raise TypeError(
                f"scale takes a number of replicas, an int of at least 1, got {type(replicas).__name__} {replicas!r}"
            )
        if replicas < 1:
            raise ValueError(f"a ray service needs at least 1 replica, got {replicas}")
        if not self.running or self.replica_set is None:
            raise ServiceUnavailableError(f"service {self.service_name!r} is {self.state}; start it before scaling")
        with self._scale_lock:
            current = self.replica_set.snapshot()
            if replicas > len(current):
                self._add_replicas(replicas - len(current))
            elif replicas < len(current):
                leaving = current[replicas:]
                self.replica_set.retire(leaving)
                self._retire(leaving, self.ray_options["start_timeout"] if timeout is None else timeout)
            self.replica_count = replicas

    set_replicas = scale

    def _retire(self, leaving: Sequence[_Replica], timeout: float) -> None:
        """Drain (up to ``timeout`` seconds) and kill replicas already out of rotation.

        First this process's calls to them are let finish (none waits in the
        actors, see _ReplicaSet), then each replica stops its task (refusing,
        unrun, what other drivers still send) and waits for what it runs.
        """
        if not leaving:
            return
        ray = _ray()
        deadline = time.monotonic() + timeout
        if self.replica_set is not None:
            self.replica_set.drain(leaving, deadline)
        remaining = max(0.0, deadline - time.monotonic())
        drains = [
            r.handle.shutdown.options(concurrency_group=_CONTROL_GROUP).remote(remaining) for r in leaving if not r.dead
        ]
        if drains:
            ray.wait(drains, num_returns=len(drains), timeout=remaining + 1.0)
        _kill_and_wait(ray, [(replica.name, replica.handle) for replica in leaving], self.namespace)

    # -------------------------------------------------------------- health

    def _unhealthy_replicas(self) -> list[tuple[_Replica, str]]:
        """Replicas that are dead, down, unreachable, or whose service's ``check_health()`` fails."""
        ray = _ray()
        if self.replica_set is None:
            return []
        unhealthy: list[tuple[_Replica, str]] = []
        asks: list[tuple[_Replica, Any]] = []
        for replica in self.replica_set.snapshot():
            if replica.dead or not replica.up:
                unhealthy.append(
                    (replica, f"{replica.name} is {'dead' if replica.dead else 'down'} ({replica.last_error})")
                )
            else:
                asks.append((replica, replica.handle.check_health.options(concurrency_group=_CONTROL_GROUP).remote()))
        for replica, ask in asks:
            try:
                outcome = ray.get(ask, timeout=HEALTH_ANSWER_WAIT)
            except Exception as exc:
                unhealthy.append((replica, f"{replica.name} did not answer its health check: {_first_line(exc)}"))
                continue
            if isinstance(outcome, str) or (outcome is not None and not outcome):
                unhealthy.append((replica, f"{replica.name}: check_health() returned {outcome!r}"))
        return unhealthy

    def check_service_health(self) -> str | None:
        """None when every replica serves and passes its service's ``check_health()``, else the reasons."""
        return "; ".join(reason for _, reason in self._unhealthy_replicas()) or None

    def recover(self, reason: str) -> str:
        """Replace the replicas that are dead, down or failing their health check with new ones.

        The broken replicas leave the rotation at once and their replacements
        are built; then the calls already running in them are let finish for
        ``health.drain_timeout`` seconds (a replica failing its check may
        still serve them; a dead one has none), as a ``process`` host being
        replaced is drained, and they are killed (a call still running then
        fails "may have run"). Returns what was done. Raises what creating
        the new replicas raised (the broken ones are then gone all the same
        and the service runs with fewer).
        """
        drain = stop_timeout((self.options.get("health") or {}).get("drain_timeout"))
        with self._state_lock:
            if self.state != "running" or self.replica_set is None:
                return f"nothing: task is {self.state}"
            with self._scale_lock:
                broken = [replica for replica, _ in self._unhealthy_replicas()]
                if not broken:
                    return "nothing: every replica serves"
                self.replica_set.retire(broken)
                self.restarts += len(broken)
                try:
                    self._add_replicas(len(broken))  # first: the service keeps its capacity during the drain
                finally:
                    self._retire(broken, drain)
                return f"replaced replica(s) {', '.join(r.name for r in broken)}"

    # -------------------------------------------------------------- stopping

    def release_instance(self, deadline: float) -> None:
        """Refuse new calls, let every call already accepted in this process finish (until ``deadline``), then kill.

        Calls still waiting in this process at ``deadline`` never reached a
        replica: they fail with ServiceStoppedError.
        """
        replicas = self.replica_set
        if replicas is not None:
            replicas.close(f"service {self.service_name!r} is stopped")
            members = replicas.snapshot()
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                replicas.drain(members, deadline, queue=True)
            replicas.retire(members)  # what still waits is answered ServiceStoppedError
            if ray is not None and ray.is_initialized():
                self._retire(members, max(0.0, deadline - time.monotonic()))
        super().release_instance(deadline)

    # ---------------------------------------------------------------- status

    def report_status(self) -> ServiceStatus:
        """State, load and health summed over replicas; ``extra['replicas']`` has one entry per replica.

        Replicas are asked with a control call answered even when every request
        slot is busy; one that does not answer within 5 s is reported unhealthy.
        """
        if self.replica_set is None or not self.running:
            status = ServiceStatus(
                self.service_name, self.kind, self.state, False, f"task is {self.state}", max_workers=self.max_workers
            )
        else:
            status = _aggregate_status(self.replica_set, self.state, self.kind)
        status.started_at = self.started_at
        # Calls each replica runs at once (Ray's max_concurrency), not the replica's idle pool.
        status.max_workers = self.max_workers
        status.restarts = self.restarts + status.restarts
        status.extra["ray"] = {
            "namespace": self.namespace,
            "deployment": self.deployment,
            "lifetime": self.ray_options["lifetime"],
            "balancer": self.ray_options["balancer"],
            "replicas": self.replica_count,
        }
        return status


def _without_name(options: dict[str, Any]) -> dict[str, Any]:
    """Actor options as a template for more replicas of the deployment (each gets its own name)."""
    return {key: value for key, value in options.items() if key != "name"}


def _kill_and_wait(ray: ModuleType, actors: Sequence[tuple[str, Any]], namespace: str, timeout: float = 10.0) -> None:
    """Kill the named actors and wait (up to ``timeout`` s) until their names are released.

    ``ray.kill`` returns before the GCS releases a name: without the wait, a
    stopped or failed service would still be listed, and a new start under the
    same name refused.
    """
    for _, handle in actors:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
    gone_by = time.monotonic() + timeout
    for name, _ in actors:
        while time.monotonic() < gone_by:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.02)


def _ensure_ray(ray: ModuleType, options: dict[str, Any]) -> None:
    """Connect this process to Ray unless it already is (``ray.init`` with the configured address and namespace).

    The address is ``service.ray.address``, else ``RAY_ADDRESS``, else
    ``"local"``: a new Ray instance private to this process, never a cluster
    that happens to run on the machine (Ray's own default with no address
    joins one). A ``host:port`` address is first checked with a TCP
    connection bounded by ``service.ray.connect_timeout``, because
    ``ray.init`` keeps retrying an unreachable address for minutes.
    """
    if ray.is_initialized():
        return
    address = options.get("address") or os.environ.get("RAY_ADDRESS") or "local"
    if address and address not in ("auto", "local") and "://" not in address:
        host, _, port = address.rpartition(":")
        timeout = float(options["connect_timeout"])
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        except (OSError, ValueError) as exc:
            raise ServiceUnavailableError(
                f"cannot reach the Ray cluster at {address!r} (service.ray.address or RAY_ADDRESS): {exc}; "
                "start one with 'ray start --head' or fix the address"
            ) from None
    try:
        ray.init(address=address, namespace=options["namespace"])
    except Exception as exc:
        raise ServiceUnavailableError(f"cannot connect to Ray (address {address!r}): {_first_line(exc)}") from exc
