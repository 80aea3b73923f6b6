"""Starting, stopping, placing and configuring ray services."""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray
from kservice import ConfigError, ServiceEnvironment, ServiceError, ServiceFactory, ServiceUnavailableError
from kservice.plugins.ray import ACTOR_PREFIX, RayConnection, RayServiceTask, balancer_names, register_balancer
from kservice.testing import wait_for
from ray_services import AsyncPicker, BrokenService, EchoService, FirstReplica, IndexPicker, SicklyService


def actors_of(service_name: str) -> list[str]:
    prefix = f"{ACTOR_PREFIX}{service_name}:"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


@pytest.mark.timeout(90)
def test_constructor_error_fails_start_service_with_the_original_error() -> None:
    env = ServiceEnvironment("ray-broken")
    env.register_service("broken", ServiceFactory("broken", BrokenService), kind="ray", replicas=2)
    started = time.monotonic()
    with pytest.raises(
        ServiceUnavailableError, match=r"failed to start: ValueError: .*missing setting 'dsn'"
    ) as caught:
        env.start()
    assert time.monotonic() - started < 60
    assert isinstance(caught.value.__cause__, ValueError)
    assert "BrokenService" in caught.value.__cause__.remote_traceback  # type: ignore[attr-defined]
    assert env.get_task("broken").state == "failed"
    assert actors_of("broken") == []
    env.stop()


@pytest.mark.timeout(90)
def test_stop_service_kills_detached_replicas() -> None:
    with ServiceEnvironment("ray-detached") as env:
        task = env.register_service(
            "detached-echo",
            ServiceFactory("detached-echo", EchoService),
            kind="ray",
            replicas=2,
            ray={"lifetime": "detached"},
        )
        with env.manager() as manager:
            assert manager.call_service_sync("detached-echo", "echo", (1,)) == 1
        names = actors_of("detached-echo")
        assert len(names) == 2
        task.stop_service()
        assert task.state == "stopped"
        for name in names:
            with pytest.raises(ValueError):
                ray.get_actor(name, namespace="kservice")
        with env.manager() as manager, pytest.raises(ServiceUnavailableError):
            manager.call_service_sync("detached-echo", "echo", (1,))


@pytest.mark.timeout(90)
def test_replica_pinned_by_custom_resource_runs_on_the_other_node(node_ids: dict[str, str]) -> None:
    driver_node = ray.get_runtime_context().get_node_id()
    assert driver_node == node_ids["node_a"]
    with ServiceEnvironment("ray-pinned") as env:
        env.register_service(
            "pinned", ServiceFactory("pinned", EchoService), kind="ray", ray={"resources": {"node_b": 1}}
        )
        with env.manager() as manager:
            where = manager.call_service_sync("pinned", "where")
            assert where["node_id"] == node_ids["node_b"] != driver_node
            assert manager.call_service_sync("pinned", "echo", ("across nodes",)) == "across nodes"


@pytest.mark.timeout(90)
def test_a_name_already_running_in_the_namespace_is_refused() -> None:
    with ServiceEnvironment("ray-first") as first:
        first.register_service("unique", ServiceFactory("unique", EchoService), kind="ray")
        second = ServiceEnvironment("ray-second")
        second.register_service("unique", ServiceFactory("unique", EchoService), kind="ray")
        with pytest.raises(ServiceUnavailableError, match="already runs in Ray namespace 'kservice'"):
            second.start()
        second.stop()
        # Another namespace is another name space.
        with ServiceEnvironment("ray-third") as third:
            third.register_service(
                "unique", ServiceFactory("unique", EchoService), kind="ray", ray={"namespace": "other"}
            )
            with third.manager() as manager:
                assert manager.call_service_sync("unique", "echo", (3,)) == 3


def test_unknown_balancer_is_a_config_error_listing_the_known_ones() -> None:
    env = ServiceEnvironment("ray-config")
    with pytest.raises(ConfigError, match=r"'nearest' is not one of 'power_of_two', 'round_robin'"):
        env.register_service("b", ServiceFactory("b", EchoService), kind="ray", ray={"balancer": "nearest"})
    with pytest.raises(ConfigError, match="replicas"):
        env.register_service("c", ServiceFactory("c", EchoService), kind="ray", replicas=0)
    # 0 would mean "never re-read" to the connection, not "always": refused, naming the key.
    with pytest.raises(ConfigError, match="membership_refresh"):
        env.register_service("d", ServiceFactory("d", EchoService), kind="ray", ray={"membership_refresh": 0})
    assert "round_robin" in balancer_names()


@pytest.mark.timeout(90)
def test_a_registered_balancer_is_selectable_by_config() -> None:
    register_balancer("first_replica", FirstReplica)
    with pytest.raises(ValueError, match="already registered"):
        register_balancer("first_replica", lambda: FirstReplica())
    with ServiceEnvironment("ray-balancer") as env:
        env.register_service(
            "first", ServiceFactory("first", EchoService), kind="ray", replicas=2, ray={"balancer": "first_replica"}
        )
        with env.manager() as manager:
            actors = {manager.call_service_sync("first", "where")["actor"] for _ in range(10)}
    assert len(actors) == 1 and actors.pop().endswith(":0")


@pytest.mark.timeout(90)
def test_a_balancer_answering_no_replica_fails_the_call_naming_it_and_an_async_one_is_refused() -> None:
    """Before: a bare ``AttributeError: 'int' object has no attribute 'slots'`` for every call, naming
    neither the balancer nor what it should answer; an ``async def pick`` the same, with its coroutine."""
    register_balancer("index_picker", IndexPicker)
    register_balancer("async_picker", AsyncPicker)
    with ServiceEnvironment("ray-wrong-balancer") as env:
        with pytest.raises(ConfigError, match=r"AsyncPicker\.pick is async def.*plain function"):
            env.register_service(
                "a", ServiceFactory("a", EchoService), kind="ray", replicas=2, ray={"balancer": "async_picker"}
            )
        env.register_service(
            "i", ServiceFactory("i", EchoService), kind="ray", replicas=2, ray={"balancer": "index_picker"}
        )
        with env.manager() as manager:
            wrong = r"replica balancer IndexPicker\.pick returned int 0; it returns one of the replicas it is given"
            with pytest.raises(TypeError, match=wrong):
                manager.call_service_sync("i", "echo", (1,), timeout=10)
            with pytest.raises(TypeError, match=wrong):
                manager.call_service_async("i", "echo", (1,), timeout=10).result()
            task = env.get_task("i")
            assert task is not None and task.running


@pytest.mark.timeout(90)
def test_health_recovery_replaces_a_dead_replica() -> None:
    with ServiceEnvironment("ray-recover") as env:
        task = env.register_service(
            "recovered", ServiceFactory("recovered", EchoService), kind="ray", replicas=2, ray={"max_restarts": 0}
        )
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            victim = task.replica_set.snapshot()[0]  # type: ignore[union-attr]
            ray.kill(victim.handle, no_restart=True)

            def health_reason() -> str | None:
                reason = task.check_service_health()
                if reason is None:
                    try:
                        manager.call_service_sync("recovered", "echo", (0,))
                    except ServiceUnavailableError:
                        pass  # a non-idempotent call that reached the dead replica is reported, not retried
                return reason

            # Calls find out and avoid it; the health check names it.
            reason = wait_for(health_reason, timeout=20, what="the health check to report the dead replica")
            assert victim.name in reason
            assert task.recover("test") == f"replaced replica(s) {victim.name}"
            assert task.check_service_health() is None
            assert task.get_service_status().restarts == 1
            actors = {manager.call_service_sync("recovered", "where")["actor"] for _ in range(20)}
            assert victim.name not in actors and len(actors) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("drain_timeout", [30.0, 0.5])
def test_recovery_lets_the_calls_of_a_replica_it_replaces_finish_within_health_drain_timeout(
    drain_timeout: float,
) -> None:
    """A replica failing its service's check_health() but still serving: its running call gets its own result
    when it ends within ``health.drain_timeout`` (before: the replica was killed at once, the call cut as
    "may have run"); one running past it is cut, as over mmap."""
    config = {"health": {"enabled": False, "drain_timeout": drain_timeout}}  # retries at their defaults
    with ServiceEnvironment("ray-recover-drain", config) as env:
        task = env.register_service("sickly", ServiceFactory("sickly", SicklyService), kind="ray", replicas=1)
        assert isinstance(task, RayServiceTask)
        with env.manager() as manager:
            old = task.replica_set.snapshot()[0]  # type: ignore[union-attr]
            manager.call_service_sync("sickly", "sicken")
            assert "told to be sick" in (task.check_service_health() or "")
            running = manager.call_service_async("sickly", "sleep", (2.0,), timeout=60)
            time.sleep(0.5)  # the call runs in the replica
            began = time.monotonic()
            assert task.recover("test") == f"replaced replica(s) {old.name}"
            if drain_timeout > 2.0:
                assert running.result(30) == 2.0
            else:
                with pytest.raises(ServiceUnavailableError) as cut:
                    running.result(30)
                assert cut.value.may_have_run is not False
                assert time.monotonic() - began < drain_timeout + 15  # killed after the window, not after the call
            assert task.check_service_health() is None
            assert manager.call_service_sync("sickly", "echo", ("after",)) == "after"
            assert old.name not in {manager.call_service_sync("sickly", "where")["actor"] for _ in range(5)}


def test_ray_task_class_is_exported_and_registered_as_kind_ray() -> None:
    from kservice._plugins import task_kinds, transports

    assert "ray" in task_kinds() and "ray" in transports()
    assert RayServiceTask.kind == "ray" and RayServiceTask.default_transports == ("ray",)


def test_duplicate_register_name_is_refused_before_touching_ray() -> None:
    env = ServiceEnvironment("ray-dup")
    env.register_service("dup", ServiceFactory("dup", EchoService), kind="ray")
    with pytest.raises(ServiceError, match="already registered"):
        env.register_service("dup", ServiceFactory("dup", EchoService), kind="ray")
    assert actors_of("dup") == []


@pytest.mark.timeout(90)
def test_a_service_class_the_workers_cannot_import_is_a_clear_start_error(tmp_path: Any, monkeypatch: Any) -> None:
    (tmp_path / "driver_only_module.py").write_text("class DriverOnly:\n    def ping(self):\n        return 'pong'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import driver_only_module

    env = ServiceEnvironment("ray-unimportable")
    env.register_service("driver-only", ServiceFactory("driver-only", driver_only_module.DriverOnly), kind="ray")
    with pytest.raises(
        ServiceUnavailableError, match=r"driver_only_module:DriverOnly must be importable in Ray's workers"
    ):
        env.start()
    assert env.get_task("driver-only").state == "failed"
    assert actors_of("driver-only") == []
    env.stop()


@pytest.mark.timeout(90)
def test_a_task_built_directly_is_found_by_name_and_scale_reaches_remote_callers() -> None:
    from kservice import ServiceManager

    task = RayServiceTask(ServiceFactory("direct", EchoService, ("d-",)), replicas=1)
    task.start_service()
    try:
        # No environment holds it: the manager resolves the name through the ray plugin, as another driver would.
        with ServiceManager(
            config={"service": {"ray": {"membership_refresh": 0.2, "balancer": "round_robin"}}}
        ) as manager:
            assert manager.call_service_sync("direct", "echo", ("x",)) == "d-x"
            assert manager.get_service_queue("direct").queue_name.startswith("ray:kservice/kservice:direct:")
            task.scale(2)
            connection = manager.get_service_queue("direct")
            assert isinstance(connection, RayConnection)

            def sees_both() -> bool:
                # A call re-reads the membership once it is older than membership_refresh.
                manager.call_service_sync("direct", "echo", ("x",))
                return len(connection.replicas.snapshot()) == 2

            wait_for(sees_both, timeout=10, what="the caller to see the second replica")
            actors = {manager.call_service_sync("direct", "where")["actor"] for _ in range(6)}
            assert len(actors) == 2
    finally:
        task.stop_service()
    assert actors_of("direct") == []


@pytest.mark.timeout(120)
def test_an_attached_task_grows_the_deployment_with_replicas_built_like_its_own() -> None:
    from kservice import Config, ServiceManager, TaskContext

    config = Config.load({"services": {"grown": {"ray": {"max_concurrency": 3}}}})
    task = RayServiceTask(ServiceFactory("grown", EchoService, ("g-",)), TaskContext(config=config), replicas=1)
    task.start_service()
    attached: RayServiceTask | None = None
    try:
        # This driver's config says nothing of the service: what the new replica is comes from the deployment.
        attached = RayServiceTask.attach("grown")
        attached.scale(2)
        members = attached.replica_set.snapshot()  # type: ignore[union-attr]
        assert len(members) == 2
        described = ray.get(members[1].handle.describe.remote(), timeout=30)
        assert described["class"].endswith("EchoService")
        with ServiceManager(config={"service": {"ray": {"membership_refresh": 0.2}}}) as manager:
            # Every call succeeds, the new replica's included (before: it hosted a bare object, no method).
            answers = {manager.call_service_sync("grown", "echo", (i,)) for i in range(12)}
            assert answers == {f"g-{i}" for i in range(12)}
            actors = {manager.call_service_sync("grown", "where")["actor"] for _ in range(12)}
            assert members[1].name in actors
    finally:
        (attached or task).stop_service()
        task.stop_service()
    assert actors_of("grown") == []
