"""Configuration: the seed's keys and defaults, validation errors naming the key path, per-service overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from kservice import Config, ConfigError, ServiceEnvironment, ServiceManager


def test_defaults_are_the_seeds() -> None:
    config = Config.load({})
    assert config.get("service.local.max_workers") == 10
    assert config.get("service.local.queue_timeout") == 30
    assert config.get("service.local.request_queue_size") == 10000
    assert config.get("service.ray.max_restarts") == 3
    assert config.get("service_call.default_timeout") == 30
    assert config.get("service_call.max_retries") == 3
    assert config.get("service_call.retry_interval") == 1
    assert config.get("service_call.async_pool_size") == 20


def test_yaml_file_with_seed_layout(tmp_path: Path) -> None:
    path = tmp_path / "kservice.yaml"
    path.write_text(
        """
service:
  local:
    max_workers: 4
    queue_timeout: 5
  ray:
    resources: {"CPU": 2}
    lifetime: "detached"
    max_restarts: 3
service_call:
  default_timeout: 12
services:
  kv:
    class: tests.core.services:KeyValue
    kwargs: {prefix: "p:"}
    local: {max_workers: 2}
"""
    )
    config = Config.load(path)
    assert config.get("service.local.max_workers") == 4
    assert config.get("service.ray.resources") == {"CPU": 2}
    assert config.get("service_call.default_timeout") == 12.0
    kv = config.for_service("kv")
    assert kv["local"]["max_workers"] == 2
    assert kv["local"]["queue_timeout"] == 5  # the global value shows through
    assert kv["service_call"]["default_timeout"] == 12.0
    other = config.for_service("other")
    assert other["local"]["max_workers"] == 4
    # Each answer is the caller's own: changing one (nested lists and dicts too) changes no other.
    for options in (kv, other):
        options["local"]["max_workers"] = 99
        options["ray"]["resources"]["CPU"] = 99
        options["kwargs"]["prefix"] = "changed"
        options["transports"].append("changed")
    assert config.for_service("kv") == Config.load(path).for_service("kv")
    assert config.for_service("other") == Config.load(path).for_service("other")
    assert config.get("service.ray.resources") == {"CPU": 2}
    assert config.for_service("other")["transports"] == [] and config.for_service("other")["kwargs"] == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"service": {"local": {"max_worker": 3}}},
            "unknown config key 'service.local.max_worker'; did you mean 'service.local.max_workers'?",
        ),
        ({"servce": {}}, "unknown config key 'servce'; did you mean 'service'?"),
        ({"service": {"local": {"max_workers": "ten"}}}, "service.local.max_workers: expected int, got str ('ten')"),
        ({"service": {"local": {"max_workers": 0}}}, "service.local.max_workers: 0 is below the minimum 1"),
        (
            {"service": {"ray": {"lifetime": "detachd"}}},
            "service.ray.lifetime: 'detachd' is not one of 'detached', 'non_detached'; did you mean 'detached'?",
        ),
        ({"service_call": {"default_timeout": True}}, "service_call.default_timeout: expected float, got a boolean"),
        (
            {"services": {"kv": {"clas": "x:Y"}}},
            "unknown config key 'services.kv.clas'; did you mean 'services.kv.class'?",
        ),
        (
            {"services": {"kv": {"local": {"max_workers": -1}}}},
            "services.kv.local.max_workers: -1 is below the minimum 1",
        ),
        ({"services": ["kv"]}, "services: expected a mapping"),
        ([1, 2], "the top level must be a mapping"),
    ],
)
def test_invalid_config_names_the_key_path(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.load(data)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("service:\n  local:\n    max_workers: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        Config.load(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.load(tmp_path / "nope.yaml")


def test_kservice_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("service_call: {default_timeout: 3}\n")
    monkeypatch.setenv("KSERVICE_CONFIG", str(path))
    config = Config.load(None)
    assert config.get("service_call.default_timeout") == 3.0
    assert "KSERVICE_CONFIG" in config.source


def test_config_services_section_registers_services() -> None:
    config = {
        "services": {
            "kv": {"class": "tests.core.services:KeyValue", "args": [{"x": 1}], "kwargs": {"prefix": ""}},
            "off": {"class": "tests.core.services:KeyValue", "enabled": False},
        }
    }
    with ServiceEnvironment("cfg", config) as env, ServiceManager(env) as manager:
        assert env.service_names() == ["kv"]
        assert manager.call_service_sync("kv", "get", ("x",)) == 1


def test_bad_class_path_in_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no attribute 'Nope'"):
        ServiceEnvironment("cfg", {"services": {"kv": {"class": "tests.core.services:Nope"}}})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        ServiceEnvironment("cfg", {"services": {"kv": "no_such_module:Thing"}})
    with pytest.raises(ConfigError, match="no task kind 'elsewhere'"):
        ServiceEnvironment("cfg", {"services": {"kv": {"class": "tests.core.services:KeyValue", "kind": "elsewhere"}}})
