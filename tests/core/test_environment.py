"""ServiceEnvironment: registering services every way, entry-point services, start/stop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kservice import (
    ConfigError,
    LocalServiceTask,
    ServiceEnvironment,
    ServiceError,
    ServiceFactory,
    ServiceManager,
)

from tests.core.conftest import make_distribution, run_python
from tests.core.services import KeyValue


def test_register_class_forwards_constructor_arguments_verbatim() -> None:
    class Odd:
        def __init__(self, name: str, *, kind: str, timeout: int, service_name: str) -> None:
            self.seen = (name, kind, timeout, service_name)

        def seen_args(self) -> tuple[str, str, int, str]:
            return self.seen

    env = ServiceEnvironment("e")
    task = env.register_service("odd", Odd, "n", kind="k", timeout=3, service_name="s")
    assert isinstance(task, LocalServiceTask)
    with env, ServiceManager(env) as manager:
        assert manager.call_service_sync("odd", "seen_args") == ("n", "k", 3, "s")


def test_a_factory_takes_an_import_path_and_refuses_what_cannot_build_a_service() -> None:
    factory = ServiceFactory("kv", "tests.core.services:KeyValue", ({"a": 1},))  # type: ignore[arg-type]
    assert factory.service_class is KeyValue and factory.create().get("a") == 1
    with pytest.raises(ConfigError, match=r"cannot import module 'tests\.core\.nowhere'"):
        ServiceFactory("kv", "tests.core.nowhere:KeyValue")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a class or an import path"):
        ServiceFactory("kv", 42)  # type: ignore[arg-type]


def test_a_service_module_that_exits_when_imported_is_a_config_error_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A script's module-level command-line parsing: argparse exits (SystemExit 2) when another program imports it.
    # Before: the SystemExit went through, and `kservice serve app=cli_script:App` exited 2 printing only the
    # script's usage line, as if kservice needed its --port.
    (tmp_path / "cli_script.py").write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--port', type=int, required=True)\n"
        "args = parser.parse_args([])\n"
        "class App:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as raised:
        ServiceFactory("app", "cli_script:App")  # type: ignore[arg-type]
    message = str(raised.value)
    assert "importing module 'cli_script' for service class 'cli_script:App' exited (SystemExit: 2)" in message
    assert "if __name__ == '__main__':" in message


def test_register_factory_with_options_and_ready_task() -> None:
    env = ServiceEnvironment("e")
    task = env.register_service("kv", ServiceFactory("kv", KeyValue), local={"max_workers": 2})
    assert task.max_workers == 2
    ready = LocalServiceTask(ServiceFactory("kv2", KeyValue, ({"z": 26},)))
    assert env.register_service("kv2", ready) is ready
    with pytest.raises(ServiceError, match="already registered"):
        env.register_service("kv", KeyValue)
    with pytest.raises(TypeError, match="expects a class"):
        env.register_service("x", 42)
    with pytest.raises(ConfigError, match=r"unknown config key 'services\.kv3\.colour'"):
        env.register_service("kv3", ServiceFactory("kv3", KeyValue), colour="red")
    with env, ServiceManager(env) as manager:
        assert manager.call_service_sync("kv2", "get", ("z",)) == 26
        assert [t.state for t in env] == ["running", "running"]
    assert [t.state for t in env] == ["stopped", "stopped"]


def test_registering_into_a_started_environment_starts_the_task() -> None:
    with ServiceEnvironment("e") as env:
        task = env.register_service("kv", KeyValue)
        assert task.running
        env.unregister_service("kv")
        assert task.state == "stopped" and "kv" not in env


def test_stop_is_idempotent_and_closes_bound_managers() -> None:
    env = ServiceEnvironment("e")
    env.register_service("kv", KeyValue)
    env.start()
    manager = env.manager()
    assert manager.call_service_sync("kv", "get", ("a",)) is None
    env.stop()
    env.stop()
    assert manager._closed


def test_failed_start_stops_the_tasks_already_started() -> None:
    env = ServiceEnvironment("e")
    first = env.register_service("kv", KeyValue)
    from tests.core.services import FailsToStart

    env.register_service("db", FailsToStart)
    with pytest.raises(ServiceError, match="database unreachable"):
        env.start()
    assert first.state == "stopped"


def test_services_from_entry_points_are_listed_and_registered_by_name(tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path,
        "acme_services",
        {"kservice.services": {"greeter": "acme_greeter:Greeter"}},
        {"acme_greeter": "class Greeter:\n    def hello(self, who):\n        return f'hello {who}'\n"},
    )
    result = run_python(
        """
        import kservice
        print(kservice.ServiceEnvironment.available_services()["greeter"])
        env = kservice.ServiceEnvironment("e", {"services": {"greeter": {}, "g2": {"entry_point": "greeter"}}})
        with env, kservice.ServiceManager(env) as m:
            print(m.call_service_sync("greeter", "hello", ("ada",)), m.call_service_sync("g2", "hello", ("bob",)))
        try:
            kservice.ServiceEnvironment("e", {"services": {"nope": {}}})
        except kservice.ConfigError as e:
            print("error:", e)
        """,
        site=site,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "acme_greeter:Greeter"
    assert lines[1] == "hello ada hello bob"
    assert "no installed service named 'nope'" in lines[2] and "greeter" in lines[2]


def test_a_service_name_two_distributions_advertise_is_refused_naming_both(tmp_path: Path) -> None:
    # Two installed distributions both advertise 'kv'. Was: the one read last silently won (the opposite of
    # Python's first-on-sys.path rule, and within one directory an accident of its listing order).
    for dist, module in (("acme_alpha", "alpha_kv"), ("acme_beta", "beta_kv")):
        site = make_distribution(
            tmp_path,
            dist,
            {"kservice.services": {"kv": f"{module}:KV", f"only_{module}": f"{module}:KV"}},
            {module: f"class KV:\n    def who(self):\n        return {module!r}\n"},
        )
    result = run_python(
        """
        import kservice
        from kservice._config import check_config
        listed = kservice.ServiceEnvironment.available_services()
        print("listed:", listed["kv"])
        print("check:", check_config({"services": {"kv": {}, "only_alpha_kv": {}}})[1])
        for name in ("kv", "only_beta_kv"):
            try:
                env = kservice.ServiceEnvironment("e", {"services": {name: {}}})
                with env, kservice.ServiceManager(env) as m:
                    print(name + ":", m.call_service_sync(name, "who"))
            except kservice.ConfigError as e:
                print(name + ": ConfigError", e)
        """,
        site=site,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    refused = lines["kv"]
    assert "ConfigError" in refused and "2 installed distributions" in refused, refused
    assert "acme_alpha 1.0 (alpha_kv:KV)" in refused and "acme_beta 1.0 (beta_kv:KV)" in refused
    assert "kservice serve kv=alpha_kv:KV" in refused or "kservice serve kv=beta_kv:KV" in refused  # name the class
    assert "alpha_kv:KV" in lines["listed"] and "beta_kv:KV" in lines["listed"] and "ambiguous" in lines["listed"]
    assert "services.kv: service entry point 'kv' is advertised by 2" in lines["check"]  # config check says so too
    assert "only_alpha_kv" not in lines["check"]
    assert lines["only_beta_kv"].strip() == "beta_kv"  # every other installed service still loads


def test_options_given_at_registration_reach_the_managers() -> None:
    from kservice import ServiceTimeoutError

    with ServiceEnvironment("e") as env, ServiceManager(env) as manager:
        env.register_service("kv", ServiceFactory("kv", KeyValue), service_call={"default_timeout": 0.1})
        began = time.monotonic()
        with pytest.raises(ServiceTimeoutError, match=r"timed out after 0\.\d+s"):
            manager.call_service_sync("kv", "sleep", (1.0,))
        assert time.monotonic() - began < 0.8  # the 0.1 s (finding the service included), not the default 30 s


def test_middleware_added_to_a_running_environment_applies_at_once() -> None:
    from kservice import ServiceMiddleware

    seen: list[str] = []

    class Both(ServiceMiddleware):
        def before_call(self, request):  # type: ignore[no-untyped-def]
            seen.append("client")

        def before_handle(self, request):  # type: ignore[no-untyped-def]
            seen.append("server")

    with ServiceEnvironment("e") as env, ServiceManager(env) as manager:
        env.register_service("kv", KeyValue)
        manager.call_service_sync("kv", "get", ("a",))
        env.add_middleware(Both())
        manager.call_service_sync("kv", "get", ("a",))
    assert seen == ["client", "server"]
