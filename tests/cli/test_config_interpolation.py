"""``kservice config show`` / ``config check`` / ``serve -c``: ``${VAR}`` expanded, an unset one is one line per mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from .helpers import assert_user_error, cli_env, run_many

GOOD = """
service:
  local:
    max_workers: ${KS_WORKERS}
    queue_timeout: ${KS_QUEUE_TIMEOUT:-2.5}
call_log:
  level: ${KS_LEVEL:-info}
  side: Client
services:
  kv:
    class: sample_services:KV
    kwargs: {prefix: "$${not_a_variable}"}
"""

UNSET = """
service:
  local:
    max_workers: ${KS_MISSING}
service_call:
  default_timeout: ${KS_ALSO_MISSING}
services:
  kv: {class: "sample_services:KV"}
"""


@pytest.mark.timeout(90)
def test_config_show_and_check_print_the_interpolated_values(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(textwrap.dedent(GOOD))
    env = cli_env(KS_WORKERS="7")
    show, from_env, check = run_many(
        [["config", "show", "-c", str(path)], ["config", "show"], ["config", "check", "-c", str(path)]],
        env=env,
    )
    assert show.returncode == 0, show
    effective = yaml.safe_load(show.stdout)
    assert effective["service"]["local"]["max_workers"] == 7
    assert effective["service"]["local"]["queue_timeout"] == 2.5
    assert effective["call_log"]["level"] == "INFO" and effective["call_log"]["side"] == "client"
    assert effective["services"]["kv"]["kwargs"] == {"prefix": "${not_a_variable}"}
    assert from_env.returncode == 0 and "max_workers: 10" in from_env.stdout  # no KSERVICE_CONFIG: defaults
    assert check.returncode == 0 and check.stdout.startswith("ok: "), check
    (with_env,) = run_many([["config", "show"]], env={**env, "KSERVICE_CONFIG": str(path)})
    assert with_env.returncode == 0, with_env
    assert yaml.safe_load(with_env.stdout)["service"]["local"]["max_workers"] == 7


@pytest.mark.timeout(90)
def test_an_unset_variable_is_one_line_naming_key_and_variable_in_every_command(tmp_path: Path) -> None:
    path = tmp_path / "unset.yaml"
    path.write_text(textwrap.dedent(UNSET))
    check, show, served, from_env = run_many(
        [
            ["config", "check", str(path)],
            ["config", "show", "-c", str(path)],
            ["serve", "-c", str(path)],
            ["config", "show"],
        ],
        env=cli_env(),
    )
    # config check lists every mistake, one line each.
    assert check.returncode == 1, check
    assert "Traceback" not in check.stderr
    assert check.stderr_lines == [
        f"error: service.local.max_workers: environment variable KS_MISSING is not set and has no default; "
        f"set it, or write '${{KS_MISSING:-default}}' (config file {path})",
        f"error: service_call.default_timeout: environment variable KS_ALSO_MISSING is not set and has no default; "
        f"set it, or write '${{KS_ALSO_MISSING:-default}}' (config file {path})",
    ]
    # Every other command stops at once on one line naming the first, before serving anything.
    for result in (show, served):
        assert_user_error(result, "service.local.max_workers", "KS_MISSING", "and 1 more problem", status=1)
    assert "serving" not in served.stdout
    assert from_env.returncode == 0  # no file named: nothing to expand
    (named,) = run_many([["config", "show"]], env=cli_env(KSERVICE_CONFIG=str(path)))
    assert_user_error(named, "service.local.max_workers", "KS_MISSING", "KSERVICE_CONFIG", status=1)
