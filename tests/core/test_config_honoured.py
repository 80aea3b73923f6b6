"""Configuration that is honoured or refused: plugins.disable/require, settings checked at registration, finite numbers, safe reads."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kservice import Config, ConfigError, PluginError, ServiceEnvironment, ServiceManager, Setting, hookimpl
from kservice._plugins import get_plugin_manager

from tests.core.conftest import make_distribution, run_python
from tests.core.services import KeyValue

# --------------------------------------------------------------------------- 1. plugins.disable and plugins.require

RETRIES = """
import json, os, sys, kservice
from kservice._plugins import plugin_states
source = sys.argv[1] if len(sys.argv) > 1 else None
config = {
    "plugins": {"disable": ["retry"]},
    "service_call": {"max_retries": 2, "retry_interval": 0.0},
    "services": {"flaky": {"class": "tests.policies.services:Flaky"}},
}
how = os.environ["HOW"]
if how == "dict":
    env = kservice.ServiceEnvironment("t", config)
else:
    import yaml
    path = os.path.join(os.environ["TMP"], "c.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    if how == "path":
        env = kservice.ServiceEnvironment("t", path)
    else:
        os.environ["KSERVICE_CONFIG"] = path  # read by the environment below (and by nothing before it)
        env = kservice.ServiceEnvironment("t")
with env, env.manager() as manager:
    try:
        manager.call_service_sync("flaky", "succeed_on", (3,))
    except ConnectionError:
        pass
    runs = env.get_task("flaky").service.calls["succeed_on"]
states = {s.name: (s.state, s.reason) for s in plugin_states()}
print(json.dumps({"runs": runs, "retry": states["retry"]}))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["dict", "path", "env"])
def test_plugins_disable_works_from_every_config_source(how: str, tmp_path: Path) -> None:
    import json

    result = run_python(RETRIES, env={"HOW": how, "TMP": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    # With the retry plugin the idempotent method runs 3 times (two retries); disabled, once.
    assert out["runs"] == 1, out
    assert out["retry"][0] == "disabled"
    assert "plugins.disable" in out["retry"][1]


BROKEN_SITE_MODULES = {"acme_broken": "raise ImportError('needs libfoo')\n", "acme_ok": "x = 1\n"}


def _site(tmp_path: Path) -> Path:
    return make_distribution(
        tmp_path, "acme", {"kservice": {"acme_broken": "acme_broken", "acme_ok": "acme_ok"}}, BROKEN_SITE_MODULES
    )


@pytest.mark.timeout(60)
def test_plugins_require_makes_a_missing_or_broken_plugin_an_error_and_nothing_starts(tmp_path: Path) -> None:
    result = run_python(
        """
        import kservice
        try:
            kservice.ServiceEnvironment("t", {
                "plugins": {"require": ["acme_broken", "acme_okk", "acme_ok"]},
                "services": {"kv": {"class": "tests.core.services:KeyValue"}},
            })
        except kservice.PluginError as exc:
            print("refused:", exc)
        import threading
        print("threads:", threading.active_count())
        """,
        site=_site(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("refused:"))
    assert "required plugin 'acme_broken' failed to load: ImportError: needs libfoo" in line
    assert "required plugin 'acme_okk' is not installed" in line and "did you mean 'acme_ok'?" in line
    assert "'acme_ok' " not in line.replace("did you mean 'acme_ok'?", "")  # the loaded one is not named
    assert "threads: 1" in result.stdout  # no task, pool or timer was started


@pytest.mark.timeout(60)
def test_an_invalid_config_disables_nothing() -> None:
    result = run_python(
        """
        import kservice
        from kservice._plugins import plugin_states
        try:
            kservice.Config.load({"plugins": {"disable": ["retry"]}, "service_cal": {}})
        except kservice.ConfigError as exc:
            print("refused:", exc)
        print({s.name: s.state for s in plugin_states()}["retry"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert "unknown config key 'service_cal'" in result.stdout
    assert result.stdout.splitlines()[-1] == "loaded"


def test_disabling_a_name_no_plugin_has_does_not_excuse_unknown_keys() -> None:
    # An installed plugin blocked before import may own keys nobody can know, so those are only warned of;
    # a misspelled name owns none. Refused before the plugins section is applied: nothing is disabled here.
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        Config.load({"plugins": {"disable": ["metrcs"]}, "bogus": 1})
    assert "metrcs" not in get_plugin_manager().disabled


# --------------------------------------------------------------------------- 4. settings checked at registration


class _SchemaPlugin:
    def __init__(self, section: str, settings: dict[str, Any]) -> None:
        self.section = section
        self.settings = settings

    @hookimpl
    def kservice_config_schema(self, register: Any) -> None:
        register(self.section, self.settings)


@pytest.fixture
def register_schema() -> Iterator[Any]:
    pm = get_plugin_manager()
    names: list[str] = []

    def register(name: str, section: str, settings: dict[str, Any]) -> None:
        pm.register(_SchemaPlugin(section, settings), name=name)
        names.append(name)

    yield register
    for name in names:
        pm.unregister(name=name)


def test_none_in_the_types_means_nullable_and_round_trips(register_schema: Any) -> None:
    spelled = Setting((str, type(None)), None, "Where to log.")
    assert spelled.nullable and spelled.types == (str,)
    assert spelled == Setting((str,), None, "Where to log.", nullable=True)
    register_schema(
        "apikey", "apikey", {"log_path": spelled, "key_file": Setting((str,), None, "Key file.", nullable=True)}
    )
    first = Config.load({})
    assert first.get("apikey.log_path") is None
    # What `kservice serve` does: the effective config loaded again (failed with "expected str or NoneType, got null").
    again = Config.load(first.as_dict())
    assert again.get("apikey.log_path") is None and again.get("apikey.key_file") is None
    assert Config.load({"apikey": {"log_path": "/tmp/x"}}).get("apikey.log_path") == "/tmp/x"


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        (Setting((str,), None, "No nullable."), "nullable=True"),
        (Setting((int,), "ten", "Wrong type."), "expected int"),
        (Setting((int,), 0, "Below its minimum.", minimum=1), "below the minimum 1"),
        (Setting((float,), math.nan, "NaN."), "finite"),
        (Setting((str,), "loud", "Not a choice.", choices=("quiet",)), "is not one of"),
        (
            Setting((str,), "Quiet", "A choice in another case.", choices=("quiet",)),
            "it is spelt 'quiet' among the choices",
        ),
    ],
)
def test_a_default_that_fails_its_own_check_is_a_plugin_error(
    register_schema: Any, setting: Setting, fragment: str
) -> None:
    register_schema("badplugin", "bad", {"key": setting})
    with pytest.raises(PluginError) as raised:
        Config.load({})
    message = str(raised.value)
    assert "plugin 'badplugin'" in message and "'bad.key'" in message and fragment in message


def test_every_builtin_setting_passes_its_own_check() -> None:
    from kservice._config import core_schema, service_entry_schema
    from kservice._plugins import check_settings

    check_settings("core", "", core_schema())
    check_settings("core", "services.<name>", service_entry_schema())
    Config.load({})  # every installed plugin's settings are checked here


# --------------------------------------------------------------------------- 5. numbers are numbers


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            {"service_call": {"default_timeout": math.nan}},
            "service_call.default_timeout: expected a finite number, got nan",
        ),
        (
            {"service_call": {"retry_interval": math.inf}},
            "service_call.retry_interval: expected a finite number, got inf",
        ),
        ({"service": {"local": {"queue_timeout": -math.inf}}}, "service.local.queue_timeout: expected a finite number"),
        (
            {"services": {"kv": {"service_call": {"default_timeout": math.nan}}}},
            "services.kv.service_call.default_timeout: expected a finite",
        ),
        (
            {"health": {"period": 1e12}},
            "health.period: 1000000000000.0 is above the maximum 9.2e+09 (seconds a wait can take)",
        ),
        (
            {"services": {"kv": {"service_call": {"default_timeout": 1e300}}}},
            "services.kv.service_call.default_timeout: 1e+300 is above the maximum 9.2e+09",
        ),
        (
            {"service_call": {"retry_interval": 10**400}},
            "service_call.retry_interval: an integer too large for a float is above the maximum 9.2e+09",
        ),
        (
            {"service": {"local": {"max_workers": 100_000_000}}},
            "service.local.max_workers: 100000000 is above the maximum 1024",
        ),
        (
            {"service": {"local": {"request_queue_size": 10**9}}},
            "service.local.request_queue_size: 1000000000 is above the maximum",
        ),
        (
            {"mmap": {"request_queue_capacity": 1 << 40}},
            "mmap.request_queue_capacity: 1099511627776 is above the maximum",
        ),
    ],
)
def test_nan_infinities_and_oversized_counts_are_refused(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.load(data)
    assert fragment in str(raised.value)


def test_every_problem_is_collected_and_the_error_names_the_first_and_the_count() -> None:
    from kservice._config import ConfigProblems

    with pytest.raises(ConfigProblems) as raised:
        Config.load({"servces": {}, "service_call": {"default_timeout": "soon", "max_retries": -1}})
    problems = raised.value.problems
    assert len(problems) == 3
    assert "did you mean 'services'?" in problems[0]
    assert str(raised.value).startswith(problems[0]) and "and 2 more problems" in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.timeout(30)
def test_api_timeouts_that_are_not_finite_raise_value_error_at_once_and_the_service_keeps_serving() -> None:
    env = ServiceEnvironment("t")
    env.register_service("kv", KeyValue, {"a": 1})
    with env, ServiceManager(env) as manager:
        for bad in (math.nan, math.inf, -math.inf, 1e300):
            with pytest.raises(ValueError, match="timeout must be a finite number of seconds"):
                manager.call_service_sync("kv", "get", ("a",), timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                manager.call_service_async("kv", "get", ("a",), timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                asyncio.run(manager.acall("kv", "get", ("a",), timeout=bad))
            with pytest.raises(ValueError, match="timeout"):
                manager.proxy("kv", timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                manager.get_service_status("kv", timeout=bad)
        with pytest.raises(TypeError, match="timeout must be a number"):
            manager.call_service_sync("kv", "get", ("a",), timeout="5")  # type: ignore[arg-type]
        # True is an int to Python, not a number of seconds: refused (it was taken as one second)
        with pytest.raises(TypeError, match=r"timeout must be a number of seconds or None, got bool \(True\)"):
            manager.call_service_sync("kv", "get", ("a",), timeout=True)
        with pytest.raises(TypeError, match="got bool"):
            manager.call_service_async("kv", "get", ("a",), timeout=False)
        with pytest.raises(TypeError, match="got bool"):
            manager.map("kv", "get", [("a",)], timeout=True)
        with pytest.raises(TypeError, match="got bool"):
            manager.stream("kv", "keys", timeout=True)
        assert manager.call_service_sync("kv", "get", ("a",), timeout=5) == 1
        assert manager.call_service_async("kv", "get", ("a",), timeout=5).result(5) == 1
        assert manager.proxy("kv", timeout=5).get("a") == 1


@pytest.mark.timeout(30)
def test_a_manager_given_an_environment_and_a_config_refuses_both_and_the_service_keeps_serving() -> None:
    """The manager follows its environment's config: a second one was silently ignored."""
    env = ServiceEnvironment("t")
    env.register_service("kv", KeyValue, {"a": 1})
    with env:
        for config in ({"service_call": {"default_timeout": 1.0}}, Config.load(None), "kservice.yaml"):
            with pytest.raises(TypeError, match=r"both an environment \('t'\) and a config") as raised:
                ServiceManager(env, config=config)
            assert "put the config on the ServiceEnvironment" in str(raised.value)
        # An environment where a config belongs (a path or a mapping passed first) names what was passed.
        for not_environment in ("kservice.yaml", {"service_call": {}}):
            with pytest.raises(
                TypeError, match=r"is a ServiceEnvironment or None, not (str|dict) .*ServiceManager\(config="
            ):
                ServiceManager(not_environment)  # type: ignore[arg-type]
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("kv", "get", ("a",), timeout=5) == 1
        with ServiceManager(config={"service_call": {"default_timeout": 5.0}}) as alone:
            assert alone.config.for_service("kv")["service_call"]["default_timeout"] == 5.0


@pytest.mark.parametrize(
    "misplaced",
    [{"services": {"kv": {"class": "tests.core.services:KeyValue"}}}, Config.load(None), Path("kservice.yaml"), None],
)
def test_an_environment_whose_name_is_a_config_is_refused(misplaced: Any) -> None:
    """``ServiceEnvironment(config)``: the config landed in ``name`` and the environment ran on the defaults."""
    with pytest.raises(TypeError, match=r"ServiceEnvironment's name must be a str.*ServiceEnvironment\(name, config\)"):
        ServiceEnvironment(misplaced)
    with ServiceEnvironment("named", {"services": {"kv": {"class": "tests.core.services:KeyValue"}}}) as env:
        assert env.service_names() == ["kv"]


def test_attaching_to_a_ray_deployment_with_both_a_context_and_a_config_is_refused() -> None:
    """The task follows its context's configuration: a second one was silently ignored (checked before Ray is asked)."""
    import sys

    from kservice import TaskContext
    from kservice.plugins.ray import RayServiceTask

    imported = "ray" in sys.modules
    with pytest.raises(TypeError, match=r"both a ctx and a config.*put the config on the TaskContext"):
        RayServiceTask.attach("shared", config={"service_call": {}}, ctx=TaskContext())
    assert ("ray" in sys.modules) == imported, "refused before Ray was imported"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        (
            "non_utf8",
            lambda p: _write(p, b"service_call:\n  default_timeout: 3 # \xff\xfe\n"),
            "is not UTF-8 text (byte 0xff at line 2)",
        ),
        ("deep", lambda p: _write(p, b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n"), "nested deeper than 64 levels"),
        (
            "deep_block",
            lambda p: _write(p, "".join(f"{'  ' * i}k{i}:\n" for i in range(200)).encode()),
            "nested deeper than 64",
        ),
        (
            "bigint",
            lambda p: _write(p, b"service_call:\n  max_retries: " + b"9" * 100_000 + b"\n"),
            "an integer of 100000 digits",
        ),
        ("too_large", lambda p: _write(p, b"# " + b"x" * (2 << 20) + b"\n"), "is too large"),
        (
            "duplicate",
            lambda p: _write(p, b"service_call:\n  max_retries: 1\n  max_retries: 5\n"),
            "duplicate key 'max_retries' (first at line 2)",
        ),
        ("directory", lambda p: (p.mkdir(), p)[1], "it is a directory"),
        ("fifo", lambda p: (os.mkfifo(p), p)[1], "it is a FIFO"),
    ],
)
def test_every_config_read_error_is_one_line(tmp_path: Path, name: str, make: Any, fragment: str) -> None:
    path = make(tmp_path / f"{name}.yaml")
    with pytest.raises(ConfigError) as raised:
        Config.load(path)
    message = str(raised.value)
    assert fragment in message and str(path) in message
    assert "\n" not in message and len(message) < 300


def test_yaml_merge_keys_may_override_and_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "base: &base\n  default_timeout: 3\n  max_retries: 1\nservice_call:\n  <<: *base\n  max_retries: 2\n"
    )
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        Config.load(path)
    path.write_text(
        "service_call: &base\n  default_timeout: 3\nservices:\n  kv:\n    class: a:B\n    service_call:\n      <<: *base\n      default_timeout: 4\n"
    )
    assert Config.load(path).service_entry("kv")["service_call"] == {"default_timeout": 4.0}  # type: ignore[index]


@pytest.mark.timeout(60)
def test_keys_of_a_plugin_disabled_in_the_config_are_ignored_and_typos_still_refused() -> None:
    result = run_python(
        """
        import warnings, kservice
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kservice.Config.load({"plugins": {"disable": ["health"]}, "health": {"period": 1.0},
                                  "services": {"kv": {"class": "a:B", "health": {"period": 2.0}}}})
        print(sum("belongs to a disabled plugin" in str(w.message) for w in caught))
        try:
            kservice.Config.load({"plugins": {"disable": ["health"]}, "service_cal": {}})
        except kservice.ConfigError as exc:
            print("refused:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1].startswith("refused: unknown config key 'service_cal'; did you mean 'service_call'?")


# --------------------------------------------------------------------------- keys kept for the seed's files


def test_a_key_that_sets_nothing_is_a_warning_when_given_a_value_and_a_note_in_config_check(tmp_path: Path) -> None:
    from tests.cli.helpers import run_cli

    # Before: accepted without a word, though nothing bounds async calls by it.
    with pytest.warns(RuntimeWarning, match=r"service_call\.async_pool_size .*sets nothing.*no thread"):
        manager = ServiceManager(config={"service_call": {"async_pool_size": 5}})
    manager.close()
    with pytest.warns(RuntimeWarning, match=r"services\.kv\.service_call\.async_pool_size"):
        ServiceEnvironment(
            "t", {"services": {"kv": {"class": "tests.core.services:KeyValue", "service_call": {"async_pool_size": 4}}}}
        )
    seed_file = tmp_path / "seed.yaml"
    seed_file.write_text("service_call:\n  async_pool_size: 20\n")  # the seed's own default: nothing meant by it
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ServiceManager(config=str(seed_file)).close()
    checked = run_cli("config", "check", "-c", str(seed_file))
    assert checked.returncode == 0, checked.stderr
    assert "note: service_call.async_pool_size" in checked.stderr and "sets nothing" in checked.stderr
