"""Config files: ``${VAR}`` / ``${VAR:-default}`` from the environment, and choices accepted in any case."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from kservice import Config, ConfigError, ServiceEnvironment, ServiceFactory, ServiceManager
from kservice._config import ConfigProblems, check_config

from tests.core.services import KeyValue


def _yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


INTERPOLATED = """
service:
  local:
    max_workers: ${KS_WORKERS}
    queue_timeout: ${KS_QUEUE_TIMEOUT:-2.5}
service_call:
  default_timeout: 9
call_log:
  enabled: ${KS_LOG_CALLS}
  level: ${KS_LEVEL:-info}
services:
  kv:
    class: tests.core.services:KeyValue
    args:
      - url: http://${KS_HOST}:${KS_PORT}/db
        port: ${KS_PORT}
        quoted_port: "${KS_PORT}"
        literal: price $${KS_PORT} and $$5
        empty_default: ${KS_UNSET_ONE:-}
        quoted_empty: "${KS_UNSET_ONE:-}"
        set_but_empty: ${KS_EMPTY:-fallback}
        nested: ${KS_UNSET_ONE:-${KS_HOST}}
        structure: ${KS_LISTY}
        "${KS_HOST}": keys are not interpolated
    kwargs: {prefix: "${KS_PREFIX:-}"}
"""


@pytest.fixture
def env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_WORKERS", "7")
    monkeypatch.setenv("KS_LOG_CALLS", "true")
    monkeypatch.setenv("KS_HOST", "db.internal")
    monkeypatch.setenv("KS_PORT", "5432")
    monkeypatch.setenv("KS_EMPTY", "")
    monkeypatch.setenv("KS_LISTY", "[mmap, ray]")
    for name in ("KS_QUEUE_TIMEOUT", "KS_LEVEL", "KS_UNSET_ONE", "KS_PREFIX", "KS_MISSING"):
        monkeypatch.delenv(name, raising=False)


def _assert_interpolated(config: Config) -> None:
    # A plain scalar is typed by YAML after substitution: an int setting takes ${KS_WORKERS}.
    assert config.get("service.local.max_workers") == 7
    assert config.get("service.local.queue_timeout") == 2.5
    assert config.get("call_log.enabled") is True
    assert config.get("call_log.level") == "INFO"  # 'info' from the default, normalised to the declared spelling
    entry = config.service_entry("kv")
    assert entry is not None
    args = entry["args"][0]
    assert args["url"] == "http://db.internal:5432/db"
    assert args["port"] == 5432
    assert args["quoted_port"] == "5432"
    assert args["literal"] == "price ${KS_PORT} and $$5"
    assert args["empty_default"] is None  # an empty plain value is null in YAML
    assert args["quoted_empty"] == ""
    assert args["set_but_empty"] == "fallback"  # ':-' as in the shell: unset or empty takes the default
    assert args["nested"] == "db.internal"
    assert args["structure"] == "[mmap, ray]"  # a variable's text is typed as a scalar, never parsed as a list
    assert args["${KS_HOST}"] == "keys are not interpolated"
    assert entry["kwargs"] == {"prefix": ""}


def _write(tmp_path: Path) -> Path:
    return _yaml(tmp_path / "interp.yaml", INTERPOLATED)


def test_a_file_given_by_path_is_interpolated(tmp_path: Path, env_vars: None) -> None:
    _assert_interpolated(Config.load(_write(tmp_path)))


def test_the_file_named_by_kservice_config_is_interpolated(
    tmp_path: Path, env_vars: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KSERVICE_CONFIG", str(_write(tmp_path)))
    _assert_interpolated(Config.load(None))


@pytest.mark.timeout(60)
def test_service_environment_config_path_is_interpolated_and_serves(tmp_path: Path, env_vars: None) -> None:
    path = _write(tmp_path)
    with ServiceEnvironment("interp", config=str(path)) as env, ServiceManager(env) as manager:
        _assert_interpolated(env.config)
        assert manager.call_service_sync("kv", "get", ("url",)) == "http://db.internal:5432/db"
        assert manager.call_service_sync("kv", "get", ("port",)) == 5432


def test_a_quoted_reference_stays_a_string_and_the_schema_says_so(tmp_path: Path, env_vars: None) -> None:
    path = _yaml(tmp_path / "q.yaml", 'service_call:\n  default_timeout: "${KS_WORKERS}"\n')
    with pytest.raises(ConfigError, match=r"service_call.default_timeout: expected float, got str \('7'\)"):
        Config.load(path)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "service:\n  local:\n    max_workers: ${KS_MISSING}\n",
            ["service.local.max_workers:", "environment variable KS_MISSING is not set", "${KS_MISSING:-default}"],
        ),
        (
            "services:\n  kv:\n    class: tests.core.services:KeyValue\n    args: [a, 'x ${KS_MISSING} y']\n",
            ["services.kv.args[1]:", "KS_MISSING"],
        ),
        (
            "service:\n  local:\n    max_workers: ${KS_WORKERS:4}\n",
            ["service.local.max_workers:", "'${KS_WORKERS:4}'", "${KS_WORKERS:-4}", "$${"],
        ),
        ("service:\n  local:\n    max_workers: ${KS WORKERS}\n", ["service.local.max_workers:", "'${KS WORKERS}'"]),
        ("service:\n  local:\n    max_workers: ${KS_WORKERS\n", ["service.local.max_workers:", "no closing '}'"]),
    ],
)
def test_an_unset_variable_or_a_bad_reference_is_one_line_naming_key_and_variable(
    tmp_path: Path, env_vars: None, monkeypatch: pytest.MonkeyPatch, text: str, fragments: list[str]
) -> None:
    path = _yaml(tmp_path / "bad.yaml", text)
    for load in (lambda: Config.load(path), lambda: ServiceEnvironment("bad", config=str(path))):
        with pytest.raises(ConfigError) as caught:
            load()
        message = str(caught.value)
        assert "\n" not in message
        assert str(path) in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    monkeypatch.setenv("KSERVICE_CONFIG", str(path))
    with pytest.raises(ConfigError) as from_env:
        Config.load(None)
    assert fragments[0] in str(from_env.value) and "KSERVICE_CONFIG" in str(from_env.value)


def test_every_unset_variable_is_listed_and_nothing_else_follows_from_them(tmp_path: Path, env_vars: None) -> None:
    path = _yaml(
        tmp_path / "many.yaml",
        """
        service:
          local:
            max_workers: ${KS_MISSING}
            queue_timeout: ${KS_UNSET_ONE}
        service_call:
          max_retries: ${KS_WORKERS}
        """,
    )
    with pytest.raises(ConfigProblems) as caught:
        Config.load(path)
    assert len(caught.value.problems) == 2, caught.value.problems
    assert "service.local.max_workers" in caught.value.problems[0] and "KS_MISSING" in caught.value.problems[0]
    assert "service.local.queue_timeout" in caught.value.problems[1] and "KS_UNSET_ONE" in caught.value.problems[1]
    _, problems, _ = check_config(path)
    assert problems == caught.value.problems


def test_a_dict_given_in_python_is_not_interpolated(env_vars: None) -> None:
    # Python code reads os.environ itself; and a Config's own as_dict() (which child hosts receive) must not be
    # expanded a second time, or an escaped '$${X}' would become X's value.
    config = Config.load(
        {"services": {"kv": {"class": "tests.core.services:KeyValue", "kwargs": {"prefix": "${KS_HOST}"}}}}
    )
    assert config.service_entry("kv")["kwargs"] == {"prefix": "${KS_HOST}"}  # type: ignore[index]


def test_an_escaped_reference_survives_a_round_trip_through_as_dict(tmp_path: Path, env_vars: None) -> None:
    path = _yaml(
        tmp_path / "esc.yaml",
        "services:\n  kv:\n    class: tests.core.services:KeyValue\n    kwargs: {prefix: '$${KS_HOST}'}\n",
    )
    first = Config.load(path)
    again = Config.load(first.as_dict())
    assert again.service_entry("kv")["kwargs"] == {"prefix": "${KS_HOST}"}  # type: ignore[index]


# --------------------------------------------------------------------------- choices in any case


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"call_log": {"level": "info"}}, "call_log.level", "INFO"),
        ({"call_log": {"error_level": "Error"}}, "call_log.error_level", "ERROR"),
        ({"call_log": {"side": "BOTH"}}, "call_log.side", "both"),
        ({"service": {"ray": {"lifetime": "Detached"}}}, "service.ray.lifetime", "detached"),
        ({"service_call": {"retry_policy": "NEVER"}}, "service_call.retry_policy", "never"),  # choices from a callable
    ],
)
def test_a_choice_in_any_case_is_normalised_to_the_declared_spelling(data: dict, path: str, expected: str) -> None:
    assert Config.load(data).get(path) == expected


def test_a_choice_given_per_service_or_at_registration_is_normalised() -> None:
    config = Config.load(
        {"services": {"kv": {"class": "tests.core.services:KeyValue", "call_log": {"level": "debug"}}}}
    )
    assert config.for_service("kv")["call_log"]["level"] == "DEBUG"
    with ServiceEnvironment("choices", {}) as env:
        task = env.register_service("kv", ServiceFactory("kv", KeyValue), call_log={"level": "warning"})
        assert task.options["call_log"]["level"] == "WARNING"


def test_a_misspelt_choice_suggests_the_declared_spelling_whatever_its_case() -> None:
    with pytest.raises(ConfigError, match=r"call_log.level: 'inf' is not one of .*; did you mean 'INFO'\?"):
        Config.load({"call_log": {"level": "inf"}})
    with pytest.raises(
        ConfigError, match=r"service.ray.lifetime: 'DETACHD' is not one of .*; did you mean 'detached'\?"
    ):
        Config.load({"service": {"ray": {"lifetime": "DETACHD"}}})


def test_inside_a_flow_mapping_a_tagged_quoted_reference_is_typed(tmp_path: Path, env_vars: None) -> None:
    path = _yaml(
        tmp_path / "flow.yaml",
        """
        service:
          local: {max_workers: !!int "${KS_WORKERS}", queue_timeout: !!float "${KS_QUEUE_TIMEOUT:-4}"}
        services:
          kv: {class: tests.core.services:KeyValue, args: [!!str "${KS_PORT}"]}
        """,
    )
    config = Config.load(path)
    assert config.get("service.local.max_workers") == 7
    assert config.get("service.local.queue_timeout") == 4.0
    assert config.service_entry("kv")["args"] == ["5432"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # YAML ends an unquoted value at '{' inside {...}: the error says to quote it.
        (
            "service:\n  local: {max_workers: ${KS_WORKERS}}\n",
            "must be quoted: '\"${VAR}\"' for a string, '!!int \"${VAR}\"'",
        ),
        (
            'service:\n  local:\n    max_workers: !!int "${KS_UNSET_ONE:-}"\n',
            "line 3, column 18: '' is not a valid !!int value",
        ),
        (
            'service:\n  local:\n    max_workers: !!bool "${KS_UNSET_ONE:-maybe}"\n',
            "'maybe' is not a valid !!bool value",
        ),
    ],
)
def test_a_reference_yaml_cannot_read_is_one_line_naming_the_line(
    tmp_path: Path, env_vars: None, text: str, fragment: str
) -> None:
    path = _yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as caught:
        Config.load(path)
    assert "\n" not in str(caught.value) and fragment in str(caught.value), str(caught.value)


def test_an_anchored_reference_is_expanded_once(tmp_path: Path, env_vars: None) -> None:
    path = _yaml(
        tmp_path / "alias.yaml",
        """
        services:
          kv:
            class: tests.core.services:KeyValue
            args: [&host "${KS_HOST} $${KS_HOST}", *host]
        """,
    )
    assert Config.load(path).service_entry("kv")["args"] == ["db.internal ${KS_HOST}"] * 2  # type: ignore[index]
