"""One CLI convention everywhere: -c FILE, tables with headers that fit 80 columns, valid JSON, typed errors, hints."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from kservice import ServiceStatus
from kservice.cli import REPLICAS_NOTE, status_rows, status_table
from rich.console import Console

from tests.core.conftest import make_distribution

from .conftest import Served
from .helpers import assert_user_error, cli_env, run_cli, run_main, run_many

# Every command and sub-command, with what it needs to get past its arguments.
EVERY_COMMAND = [
    ["plugins"],
    ["services"],
    ["call", "kv", "get"],
    ["status"],
    ["bench"],
    ["dashboard"],
    ["config", "check", "x.yaml"],
    ["config", "show"],
    ["config", "reference"],
    ["serve", "kv=sample_services:KV"],
    ["cleanup"],
]


@pytest.mark.timeout(60)
def test_a_wrong_option_is_one_line_and_exit_2_on_every_command() -> None:
    for command in EVERY_COMMAND:
        result = run_main(*command, "--no-such-option")
        assert_user_error(result, "No such option '--no-such-option'", status=2)
        assert result.stdout == "", (command, result.stdout)


@pytest.mark.timeout(60)
def test_config_check_takes_c_file_like_every_other_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  kv:\n    class: sample_services:KV\n")
    other = tmp_path / "other.yaml"
    other.write_text("{}\n")
    with_c, positional, both_same = run_many(
        [
            ["config", "check", "-c", str(good)],
            ["config", "check", str(good)],
            ["config", "check", str(good), "-c", str(good)],
        ]
    )
    assert with_c.returncode == 0, with_c
    assert with_c.stdout == positional.stdout == both_same.stdout == f"ok: {good} is valid; services: kv (local)\n"
    assert_user_error(run_main("config", "check", str(good), "-c", str(other)), "two files given", status=2)
    from_env = run_cli("config", "check", env=cli_env(KSERVICE_CONFIG=str(good)))
    assert from_env.stdout.startswith(f"ok: {good} is valid"), from_env


@pytest.mark.timeout(60)
def test_listings_print_valid_json_when_nothing_runs(tmp_path: Path) -> None:
    # A registry directory of its own: nothing runs there.
    empty = cli_env(KSERVICE_REGISTRY_DIR=str(tmp_path / "registry"), KSERVICE_QUEUE_DIR=str(tmp_path / "queues"))
    status, running, services = run_many(
        [["status", "--json"], ["services", "--running", "--json"], ["services", "--json"]], env=empty
    )
    for result in (status, running, services):
        assert result.returncode == 0, result
        assert isinstance(json.loads(result.stdout), list), result.stdout
    assert json.loads(status.stdout) == [] and json.loads(running.stdout) == []
    assert "no running services" in status.stderr


@pytest.mark.timeout(60)
def test_tables_have_headers_and_fit_80_columns(served: Served) -> None:
    run_cli("call", served.name, "put", '["k", 1]')
    narrow = cli_env(COLUMNS="80")
    services, status, services_wide, status_wide = run_many(
        [["services", "--running"], ["status"], ["services", "--running", "--wide"], ["status", "--wide"]], env=narrow
    )
    for result in (services, status):
        assert result.returncode == 0, result
        lines = result.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), result.stdout
        assert any(served.name in line for line in lines), result.stdout
    assert services.stdout.splitlines()[0].split() == ["name", "state", "transport", "class", "pid", "uptime"]
    assert status.stdout.splitlines()[0].split()[:4] == ["service", "state", "health", "replicas"]
    # --wide shows every column even at 80 (folded to fit).
    assert all(len(line) <= 80 for line in (services_wide.stdout + status_wide.stdout).splitlines())
    assert "bre" not in status.stdout and "bre" in status_wide.stdout  # the breaker column, folded
    assert "addres" not in services.stdout and "addres" in services_wide.stdout  # the address column, folded
    # A pipe with no COLUMNS gets every column.
    assert "breaker" in run_cli("status").stdout


@pytest.mark.timeout(60)
def test_json_numbers_are_numbers(served: Served) -> None:
    status, running = run_many([["status", served.name, "--json"], ["services", "--running", "--json"]])
    (row,) = json.loads(status.stdout)
    assert row["replicas"] == 1 and row["replicas_alive"] == 1
    for key in ("in_flight", "queue_depth", "requests_total", "errors_total"):
        assert type(row[key]) is int, (key, row)
    (record,) = [r for r in json.loads(running.stdout) if r["name"] == served.name]
    assert record["pid"] == served.process.pid and isinstance(record["uptime_s"], float)
    assert record["running"] is True and record["state"] == "running" and record["transport"] == "mmap"


@pytest.mark.timeout(60)
def test_call_errors_name_the_exception_type(tmp_path: Path) -> None:
    import signal
    import subprocess
    import uuid

    from .helpers import KSERVICE

    name = f"inventory-{uuid.uuid4().hex[:6]}"
    host = subprocess.Popen(
        [KSERVICE, "serve", f"{name}=sample_services:Inventory"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert host.stdout is not None and host.stdout.readline().startswith("serving")
        taken, timed_out, many = run_many(
            [
                ["call", name, "take", '["apple", 10]'],
                ["call", name, "take", '["apple", 1]', "--timeout", "0.000001"],
                ["call", name, "take", '["apple", 10]', "--async", "3"],
            ]
        )
        assert_user_error(taken, status=1)
        assert taken.stderr_lines == ["error: OutOfStock: only 3 apple left"]
        assert_user_error(timed_out, "ServiceTimeoutError: ", status=1)
        assert_user_error(many, "3 of 3 calls failed; first: OutOfStock: only 3 apple left", status=1)
        assert "failures: 3 OutOfStock" in many.stdout
        # The host keeps serving.
        assert run_cli("call", name, "take", '["apple", 1]').stdout.strip() == "2"
    finally:
        host.send_signal(signal.SIGINT)
        host.communicate(timeout=20)


@pytest.mark.timeout(60)
def test_services_shows_installed_configured_and_running_together_with_hints(served: Served, tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path, "acme_stock", {"kservice.services": {"inventory": "sample_services:Inventory"}}, {}
    )
    config = tmp_path / "services.yaml"
    config.write_text("services:\n  ledger:\n    class: sample_services:KV\n")
    env = cli_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    table, as_json, installed_call, configured_call = run_many(
        [
            ["services", "-c", str(config)],
            ["services", "-c", str(config), "--json"],
            ["call", "inventory", "take", '["apple", 1]'],
            ["call", "-c", str(config), "ledger", "get", '["k"]'],
        ],
        env=env,
    )
    rows = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert (rows["inventory"]["state"], rows["inventory"]["installed"], rows["inventory"]["transport"]) == (
        "installed",
        True,
        None,
    )
    assert (rows["ledger"]["state"], rows["ledger"]["configured"]) == ("configured", True)
    assert (rows[served.name]["state"], rows[served.name]["transport"]) == ("running", "mmap")
    states = {line.split()[0]: line.split()[1] for line in table.stdout.splitlines()[2:] if len(line.split()) > 1}
    assert states["inventory"] == "installed" and states["ledger"] == "configured" and states[served.name] == "running"
    assert f"kservice serve -c {config} ledger" in table.stderr and "kservice serve inventory" in table.stderr
    assert_user_error(installed_call, "'inventory' is installed", "start it with: kservice serve inventory", status=1)
    assert_user_error(
        configured_call, f"'ledger' is configured in {config}", f"kservice serve -c {config} ledger", status=1
    )
    assert_user_error(
        run_main("call", "no-such-service-anywhere", "get"), "ServiceNotFoundError: no service named", status=1
    )


def test_status_warns_that_replicas_do_not_share_state() -> None:
    replicated = ServiceStatus(
        "kv",
        "ray",
        "running",
        True,
        started_at=time.time() - 5,
        extra={"replicas": [{"healthy": True}, {"healthy": True}]},
    )
    single = ServiceStatus("one", "local", "running", True, started_at=time.time() - 5)
    out = io.StringIO()
    Console(file=out, width=80).print(status_table(status_rows([replicated, single]), wide=False))
    text = " ".join(out.getvalue().split())
    assert "replicas do not share state" in text and REPLICAS_NOTE.startswith("replicas do not share state")
    out = io.StringIO()
    Console(file=out, width=80).print(status_table(status_rows([single]), wide=False))
    assert "share state" not in out.getvalue()
