"""The ``ray`` plugin's hooks, and what tools outside this plugin need from Ray (status columns, the runtime)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kservice import (
    ConfigError,
    ServiceAddress,
    Setting,
    Transport,
    hookimpl,
)

from .balancers import balancer_names
from .transport import _transport

if TYPE_CHECKING:
    from kservice import BaseServiceTask, ServiceFactory, TaskContext

# The replica machinery (connection, discovery, the task kind) and ``common`` are imported by the
# hooks that use them: a process that never touches a ray service does not pay for them when the
# plugin loads, nor when its calls ask every resolver.


#: In a process forked from a Ray driver, the driver's pid: Ray's connection to its cluster (its
#: threads, its sockets) stays with the driver, so nothing here may use it. None otherwise.
forked_from_driver: int | None = None


def _after_fork_in_child() -> None:
    global forked_from_driver
    ray = sys.modules.get("ray")
    if forked_from_driver is None and ray is not None and getattr(ray, "is_initialized", bool)():
        forked_from_driver = os.getppid()


os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_driver_refusal(service_name: str) -> str:
    """Why a process forked from a Ray driver cannot call ``service_name`` (see :data:`forked_from_driver`)."""
    return (
        f"service {service_name!r} runs on Ray, and this process was forked from a Ray driver (pid "
        f"{forked_from_driver}): Ray's connection to its cluster does not survive a fork, so no call can be sent "
        f"from here. Call it from pid {forked_from_driver}, or from a process that starts a new interpreter "
        "(multiprocessing's 'spawn' or 'forkserver') and connects with ray.init; nothing was sent"
    )


def _ray_if_running() -> ModuleType | None:
    """The ``ray`` module when this process is connected to a cluster, else None (never imports Ray).

    None in a process forked from a driver: the connection it inherited is the driver's.
    """
    if "ray" not in sys.modules or forked_from_driver is not None:  # not imported: connected to no cluster
        return None
    from .common import _ray_if_running

    return _ray_if_running()


def _ray() -> ModuleType:
    from .common import _ray

    return _ray()


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


def _make_task(factory: ServiceFactory, ctx: TaskContext) -> BaseServiceTask:
    try:
        import ray  # noqa: F401
    except ImportError:
        from .common import RAY_EXTRA_HINT

        raise ConfigError(
            f"services.{factory.service_name}.kind: 'ray' needs Ray, which is not installed: {RAY_EXTRA_HINT}"
        ) from None
    from .task import RayServiceTask

    return RayServiceTask(factory, ctx)


@hookimpl
def kservice_register_transports(register: Callable[[Transport], None]) -> None:
    register(_transport)


@hookimpl
def kservice_register_task_kinds(register: Callable[..., None]) -> None:
    register("ray", _make_task)


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "service.ray",
        {
            "namespace": Setting(
                (str,), "kservice", "Ray namespace of the replica actors (and of ray.init when kservice connects)."
            ),
            "resources": Setting((dict,), {}, "Ray resources each replica actor asks for, e.g. {CPU: 2}."),
            "lifetime": Setting(
                (str,),
                "non_detached",
                "Actor lifetime: 'detached' outlives the driver.",
                choices=("detached", "non_detached"),
            ),
            "max_restarts": Setting((int,), 3, "Times Ray restarts a dead replica actor.", minimum=-1),
            "address": Setting(
                (str,),
                None,
                "Cluster address for ray.init when this process is not connected yet ('auto': the cluster running on "
                "this machine; null: RAY_ADDRESS, else 'local', a new Ray instance of this process only).",
                nullable=True,
            ),
            "connect_timeout": Setting(
                (float,), 10.0, "Seconds to wait for a configured address to answer before failing.", minimum=0
            ),
            "max_concurrency": Setting(
                (int,),
                None,
                "Calls one replica runs at once (None: service.local.max_workers).",
                nullable=True,
                minimum=1,
            ),
            "max_task_retries": Setting(
                (int,),
                3,
                "Times Ray re-runs a call of an idempotent method on a restarted replica (-1: unlimited). "
                "Other methods run at most once.",
                minimum=-1,
            ),
            "num_cpus": Setting(
                (float,), None, "CPUs each replica reserves (None: Ray's actor default).", nullable=True, minimum=0
            ),
            "num_gpus": Setting((float,), None, "GPUs each replica reserves.", nullable=True, minimum=0),
            "runtime_env": Setting((dict,), None, "Ray runtime_env of the replica actors.", nullable=True),
            "balancer": Setting(
                (str,),
                "power_of_two",
                "How calls choose a replica (register_balancer adds more).",
                choices=balancer_names,
            ),
            "start_timeout": Setting(
                (float,), 120.0, "Seconds start_service and scale wait for replicas to be placed and built.", minimum=0
            ),
            "membership_refresh": Setting(
                (float,),
                5.0,
                "Seconds between re-reads of the replica list by callers in other drivers.",
                minimum=0.1,  # 0 read as "never" (the connection's rule for no refresh), not "always"
            ),
            "batch_max": Setting(
                (int,),
                64,
                "Most async calls sent together in one actor call while a replica is busy (0: every call travels alone).",
                minimum=0,
            ),
            "batch_cost_limit": Setting(
                (float,), 0.001, "Only methods the replica runs in under this many seconds are batched.", minimum=0
            ),
        },
    )


@hookimpl
def kservice_resolve_service(service_name: str, options: dict[str, Any]) -> list[ServiceAddress] | None:
    ray = _ray_if_running()
    if ray is None:
        return None
    from .connection import _DeploymentRef
    from .discovery import _deployments, _newest_deployment

    options = options["ray"]
    namespace = options["namespace"]
    deployments = _deployments(ray, namespace).get(service_name)
    if not deployments:
        return None
    deployment = _newest_deployment(deployments)
    assert deployment is not None
    names = tuple(name for _, name in sorted(deployments[deployment].items()))
    target = _DeploymentRef(
        namespace,
        service_name,
        deployment,
        names,
        float(options["membership_refresh"]),
        options["balancer"],
        int(options["max_task_retries"]),
        int(options["batch_max"]),
        float(options["batch_cost_limit"]),
    )
    return [
        ServiceAddress(
            "ray", service_name, target, instance=deployment, info={"namespace": namespace, "actors": list(names)}
        )
    ]


@hookimpl
def kservice_known_services() -> list[str]:
    ray = _ray_if_running()
    if ray is None:
        return []
    from .discovery import _deployments

    try:
        return sorted(_deployments(ray, None))
    except Exception:
        return []


# ---------------------------------------------------------------------------
# What tools outside this plugin need from Ray (status columns, the runtime)
# ---------------------------------------------------------------------------


@hookimpl
def kservice_status_columns(status: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """Replicas alive of ``extra["replicas"]`` (one entry per replica actor) and the namespace of ``extra["ray"]``."""
    cells: dict[str, Any] = {}
    section = extra.pop("ray", None)
    if isinstance(section, dict):
        cells["namespace"] = section.get("namespace")
    replicas = extra.pop("replicas", None)
    if isinstance(replicas, list):

        def up(replica: Any) -> bool:
            if not isinstance(replica, dict):
                return True
            if "healthy" in replica:
                return bool(replica["healthy"])
            return replica.get("state", "running") in ("running", "alive")

        cells.update(replicas=len(replicas), replicas_alive=sum(1 for r in replicas if up(r)))
    elif replicas is not None:
        extra["replicas"] = replicas  # not this plugin's shape: left for details
    return cells or None


class RayRuntime:
    """The :class:`kservice.KindRuntime` of the ``ray`` kind: a Ray for the tools that host ray services."""

    def __init__(self) -> None:
        self._started: ModuleType | None = None

    def unavailable(self) -> str | None:
        try:
            import ray  # noqa: F401 - importing is the test: a broken install counts as missing
        except ImportError:
            from .common import RAY_EXTRA_HINT

            return f"Ray is not installed ({RAY_EXTRA_HINT}); kind='ray' services cannot run"
        return None

    def start(self) -> str:
        ray = _ray()
        if ray.is_initialized():
            return f"the Ray this process is connected to ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
        # A private local Ray unless RAY_ADDRESS names a cluster: never land on whatever runs nearby.
        address = os.environ.get("RAY_ADDRESS") or "local"
        import logging

        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        self._started = ray
        where = "a local Ray" if address == "local" else f"the Ray at {address}"
        return f"{where} with {int(ray.cluster_resources().get('CPU', 0))} CPUs"

    def stop(self) -> None:
        ray, self._started = self._started, None
        if ray is not None:
            ray.shutdown()

    def kill_replica(self, task: BaseServiceTask, index: int) -> str:
        ray = _ray()
        extra = task.get_service_status().extra
        name = str(extra.get("replicas", [])[index]["actor"])
        namespace = extra.get("ray", {}).get("namespace", "kservice")
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
        return name


_runtime = RayRuntime()


@hookimpl
def kservice_kind_runtime(kind: str) -> RayRuntime | None:
    return _runtime if kind == "ray" else None
