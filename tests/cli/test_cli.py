"""Every ``kservice`` command through the installed console script, in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from .conftest import Served
from .helpers import HERE, KSERVICE, assert_user_error, cli_env, run_cli, run_main, run_many, start_host, stop_host

COMMANDS = [
    ("plugins",),
    ("services",),
    ("call",),
    ("status",),
    ("bench",),
    ("config",),
    ("config", "check"),
    ("config", "show"),
    ("config", "reference"),
    ("serve",),
]


@pytest.mark.timeout(60)
def test_every_command_has_help_with_an_example() -> None:
    for command in [(), *COMMANDS]:
        result = run_main(*command, "--help")
        assert result.returncode == 0, (command, result)
        assert "Example:" in result.stdout, (command, result.stdout)
        assert "kservice " in result.stdout.split("Example:", 1)[1], command
    through_the_script = run_cli("--help")
    assert through_the_script.returncode == 0 and "Example:" in through_the_script.stdout
    for command in COMMANDS:
        assert f"  {command[0]} " in through_the_script.stdout, command


@pytest.mark.timeout(60)
def test_plugins_lists_built_in_plugins_and_honours_disable() -> None:
    listed, as_json = run_many([["plugins"], ["plugins", "--json"]])
    disabled = run_cli("plugins", "--json", env=cli_env(KSERVICE_DISABLE_PLUGINS="mmap"))
    rows = {p["name"]: p for p in json.loads(as_json.stdout)}
    assert {"inproc", "mmap"} <= set(rows)
    assert "kservice_register_transports" in rows["inproc"]["hooks"]
    assert rows["inproc"]["state"] == "loaded"
    header = next(line for line in listed.stdout.splitlines() if "plugin" in line and "state" in line)
    assert "origin" in header and "hooks / reason" in header
    assert all(name in listed.stdout for name in rows)
    states = {p["name"]: p for p in json.loads(disabled.stdout)}
    assert states["mmap"]["state"] == "disabled" and states["mmap"]["hooks"] == []
    assert "KSERVICE_DISABLE_PLUGINS" in states["mmap"]["reason"]
    assert states["inproc"]["state"] == "loaded"


# --------------------------------------------------------------------------- config


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(
        textwrap.dedent(
            """
            service_call:
              default_timeout: 5
            services:
              kv:
                class: sample_services:KV
                kind: process
                service_call:
                  default_timeout: 2
            """
        )
    )
    return path


@pytest.mark.timeout(60)
def test_config_check_show_and_reference(good_config: Path, tmp_path: Path) -> None:
    check, show, defaults, reference = run_many(
        [
            ["config", "check", str(good_config)],
            ["config", "show", "-c", str(good_config)],
            ["config", "show"],
            ["config", "reference"],
        ]
    )
    from_env = run_cli("config", "show", env=cli_env(KSERVICE_CONFIG=str(good_config)))
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check
    assert "kv (process)" in check.stdout

    effective = yaml.safe_load(show.stdout)
    assert effective["service_call"]["default_timeout"] == 5.0
    assert effective["service_call"]["max_retries"] == 3  # a default filled in
    assert effective["services"]["kv"]["kind"] == "process"
    assert effective["services"]["kv"]["service_call"] == {"default_timeout": 2.0}
    assert effective["services"]["kv"]["replicas"] == 1

    assert yaml.safe_load(defaults.stdout)["service_call"]["default_timeout"] == 30.0
    assert yaml.safe_load(defaults.stdout)["services"] == {}
    assert yaml.safe_load(from_env.stdout)["service_call"]["default_timeout"] == 5.0
    assert str(good_config) in from_env.stdout.splitlines()[0]

    assert reference.returncode == 0
    assert "| `service.local.max_workers` | int | `10` |" in reference.stdout
    assert "## `mmap`" in reference.stdout  # a plugin's section is included


@pytest.mark.timeout(60)
def test_config_errors_are_one_line(tmp_path: Path) -> None:
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("service_call: [unclosed\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("service_call:\n  default_timout: 3\n")
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("service:\n  local:\n    max_workers: many\n")
    missing = tmp_path / "missing.yaml"
    cases = [
        ["config", "check", str(not_yaml)],
        ["config", "check", str(typo)],
        ["config", "check", str(wrong_type)],
        ["config", "check", str(missing)],
        ["config", "check"],
        ["config", "show", "-c", str(typo)],
        ["services", "-c", str(not_yaml)],
        ["call", "-c", str(typo), "kv", "get"],
        ["status", "-c", str(wrong_type), "kv"],
        ["config", "nosuch"],
    ]
    results = [run_main(*case) for case in cases]
    # The same through the installed script, for one of them.
    assert run_cli(*cases[1]) == results[1]
    assert_user_error(results[0], "not valid YAML", "line 2", status=1)
    assert_user_error(
        results[1], "service_call.default_timout", "did you mean 'service_call.default_timeout'", status=1
    )
    assert_user_error(results[2], "service.local.max_workers", "expected int", status=1)
    assert_user_error(results[3], "cannot read config file", status=1)
    assert_user_error(results[4], "no file to check: give one with -c FILE", "kservice config check --help", status=2)
    assert_user_error(results[5], "default_timout", status=1)
    assert_user_error(results[6], "not valid YAML", status=1)
    assert_user_error(results[7], "default_timout", status=1)
    assert_user_error(results[8], "max_workers", status=1)
    assert_user_error(results[9], "No such command 'nosuch'", status=2)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.timeout(60)
def test_bad_arguments_are_one_line_and_exit_2() -> None:
    cases = [
        (["call"], "Missing argument 'SERVICE'"),
        (["call", "kv"], "Missing argument 'METHOD'"),
        (["call", "kv", "get", "[1"], "not valid JSON"),
        (["call", "kv", "get", '{"a": 1}'], "must be a JSON array"),
        (["call", "kv", "get", "--kwargs", "[]"], "must be a JSON object"),
        (["call", "kv", "get", "--async", "0"], "--async"),
        (["call", "kv", "get", "--timeout", "-1"], "--timeout"),
        (["status", "--watch", "--json"], "cannot be combined"),
        (["status", "--interval", "x"], "--interval"),
        (["bench", "--transports", "nope"], "unknown row 'nope'"),
        (["bench", "--calls", "1"], "--calls"),
        (["services", "--bogus"], "No such option"),
        (["nosuch"], "No such command"),
    ]
    for args, fragment in cases:
        result = run_main(*args)
        assert_user_error(result, fragment, status=2)
        assert "--help" in result.stderr, args
    assert run_cli(*cases[0][0]) == run_main(*cases[0][0])  # the installed script says the same


@pytest.mark.timeout(60)
def test_unreachable_service_is_one_line() -> None:
    call = run_cli("call", "no-such-service-here", "get", '["a"]')
    status = run_main("status", "no-such-service-here")
    many = run_main("call", "no-such-service-here", "get", "--async", "5")
    served = run_main("serve", "no-such-entry-point")
    assert_user_error(call, "no service named 'no-such-service-here'", status=1)
    assert_user_error(status, "no service named 'no-such-service-here'", status=1)
    assert_user_error(many, "no service named 'no-such-service-here'", status=1)
    assert_user_error(served, "no-such-entry-point", status=1)


@pytest.mark.timeout(120)
def test_status_asks_unanswering_hosts_at_once_and_says_which_did_not_answer_within_its_timeout() -> None:
    # A runtime of its own: the table lists only this test's four services.
    shm = Path(f"/dev/shm/kservice-{os.getuid()}-status-{uuid.uuid4().hex[:8]}")
    env = cli_env(KSERVICE_QUEUE_DIR=str(shm), KSERVICE_REGISTRY_DIR=f"{shm}-services")
    names = [f"s{i}" for i in range(1, 5)]
    host = start_host(*(f"{n}=sample_services:KV" for n in names), env=env, app_dir=HERE)
    try:
        host.send_signal(signal.SIGSTOP)  # alive, listed, and answering nothing
        started = time.monotonic()
        result = run_cli("status", "--json", "--timeout", "5", env=env)
        took = time.monotonic() - started
        assert result.returncode == 0, result
        rows = {row["service"]: row for row in json.loads(result.stdout)}
        assert sorted(rows) == names
        for row in rows.values():
            assert row["state"] == "unreachable"
            assert f"did not answer a status request within 5s (host pid {host.pid})" in row["health"], row
            assert "--timeout" in row["health"], row
        # Asked one after another, four hosts took at least 4 x 5 s; asked at once, about 5 s.
        assert took < 15, took
        host.send_signal(signal.SIGCONT)
        answered = run_cli("status", "--json", "--timeout", "30", env=env)
        assert answered.returncode == 0, answered
        assert {row["service"]: row["state"] for row in json.loads(answered.stdout)} == dict.fromkeys(names, "running")
        assert run_cli("call", "s1", "put", '["k", "still"]', env=env).returncode == 0
        assert run_cli("call", "s1", "get", '["k"]', env=env).stdout.strip() == '"still"'
    finally:
        host.send_signal(signal.SIGCONT)
        try:
            stop_host(host)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
            shutil.rmtree(f"{shm}-services", ignore_errors=True)


@pytest.mark.timeout(60)
def test_bench_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    # A package that shadows matplotlib and fails to import, as if it were not installed.
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = cli_env()
    env["PYTHONPATH"] = f"{shadow.parent}:{env['PYTHONPATH']}"
    result = run_cli("bench", "--quick", "--plot", str(tmp_path / "x.png"), env=env)
    assert_user_error(result, "matplotlib", "kservice[plot]", status=1)
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- bench


@pytest.mark.timeout(120)
def test_bench_measures_transports_beside_baselines_and_plots(tmp_path: Path) -> None:
    picture = tmp_path / "latency.png"
    result = run_cli(
        "bench",
        "--calls",
        "40",
        "--transports",
        "inproc,mmap,threadpool,mp-queue,mp-pipe",
        "--json",
        "--plot",
        str(picture),
    )
    assert result.returncode == 0, result
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == ["inproc", "mmap", "threadpool", "mp-queue", "mp-pipe"]
    for row in rows.values():
        assert row["calls"] == 40
        assert 0 < row["p50_us"] <= row["p99_us"]
        assert row["pipelined_calls_per_s"] > 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latency plot written" in result.stderr


@pytest.mark.timeout(60)
def test_bench_table() -> None:
    result = run_cli("bench", "--quick", "--calls", "20", "--transports", "inproc,threadpool")
    assert result.returncode == 0, result
    assert "inproc" in result.stdout and "ThreadPoolExecutor" in result.stdout
    assert "p99 µs" in result.stdout


# --------------------------------------------------------------------------- a running service


@pytest.mark.timeout(60)
def test_services_running_lists_the_served_service(served: Served) -> None:
    listed, as_json = run_many([["services", "--running"], ["services", "--running", "--json"]])
    assert listed.returncode == 0
    assert any(line.split()[:3] == [served.name, "running", "mmap"] for line in listed.stdout.splitlines()), (
        listed.stdout
    )
    # The record comes from the mmap plugin's registry through the kservice_running_services hook.
    (record,) = [r for r in json.loads(as_json.stdout) if r["name"] == served.name]
    assert record["transport"] == "mmap"
    assert record["pid"] == served.process.pid


@pytest.mark.timeout(60)
def test_services_lists_configured_services(good_config: Path) -> None:
    result = run_cli("services", "-c", str(good_config))
    assert result.returncode == 0, result
    assert any(
        line.split()[:4] == ["kv", "configured", "-", "sample_services:KV"] for line in result.stdout.splitlines()
    ), result.stdout


@pytest.mark.timeout(60)
def test_call_round_trips_json(served: Served) -> None:
    put = run_cli("call", served.name, "put", '["greeting", {"text": "hello", "n": [1, 2]}]')
    assert put.returncode == 0, put
    assert put.stdout.strip() == "null"
    by_args, by_kwargs = run_many(
        [
            ["call", served.name, "get", '["greeting"]'],
            ["call", served.name, "get", "--kwargs", '{"key": "greeting"}', "--timeout", "5"],
        ]
    )
    assert json.loads(by_args.stdout) == {"text": "hello", "n": [1, 2]}
    assert json.loads(by_kwargs.stdout) == {"text": "hello", "n": [1, 2]}


@pytest.mark.timeout(60)
def test_call_async_prints_a_summary(served: Served) -> None:
    result = run_cli("call", served.name, "slow", "[0.01]", "--async", "40")
    assert result.returncode == 0, result
    first, latency, first_result = result.stdout.splitlines()
    assert first.startswith(f"40 calls to {served.name}.slow, all started at once: 40 ok, 0 failed")
    assert "calls/s" in first
    assert latency.startswith("latency ms: p50 ")
    assert first_result == "first result: 0.01"


@pytest.mark.timeout(60)
def test_call_failures_are_one_line(served: Served) -> None:
    timeout, raised, missing, private, some_failed = run_many(
        [
            ["call", served.name, "slow", "[2]", "--timeout", "0.2"],
            ["call", served.name, "boom"],
            ["call", served.name, "gett", '["a"]'],
            ["call", served.name, "_data"],
            ["call", served.name, "slow", "[1]", "--async", "3", "--timeout", "0.2"],
        ]
    )
    assert_user_error(timeout, "timed out", status=1)
    assert_user_error(raised, "the boom method always fails", status=1)
    assert_user_error(missing, "no callable method 'gett'", "did you mean 'get'", status=1)
    assert_user_error(private, "private", status=1)
    assert_user_error(some_failed, "3 of 3 calls failed", "ServiceTimeoutError", status=1)
    assert "failures: 3 ServiceTimeoutError" in some_failed.stdout


@pytest.mark.timeout(60)
def test_status_shows_the_running_service(served: Served) -> None:
    run_cli("call", served.name, "get", '["x"]')
    as_json, table = run_many([["status", served.name, "--json"], ["status"]])
    assert as_json.returncode == 0, as_json
    (row,) = json.loads(as_json.stdout)
    assert row["service"] == served.name
    assert row["state"] == "running"
    assert row["health"] == "ok"
    assert row["requests_total"] >= 1
    assert row["calls_per_second"] is not None
    assert table.returncode == 0, table
    assert served.name in table.stdout
    assert "in-flight" in table.stdout and "breaker" in table.stdout


@pytest.mark.timeout(60)
def test_status_watch_refreshes_until_interrupted(served: Served) -> None:
    counted = run_cli("status", served.name, "--watch", "--interval", "0.1", "--count", "3")
    assert counted.returncode == 0, counted
    assert served.name in counted.stdout and "kservice status at" in counted.stdout

    watching = subprocess.Popen(
        [KSERVICE, "status", "--watch", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        # Let it refresh a few times, then Ctrl-C: the watch ends cleanly with status 0.
        watching.wait(1.5)
    except subprocess.TimeoutExpired:
        pass
    watching.send_signal(signal.SIGINT)
    out, err = watching.communicate(timeout=20)
    assert watching.returncode == 0, (out, err)
    assert "Traceback" not in err
    assert served.name in out


@pytest.mark.timeout(60)
def test_cleanup_help_says_what_it_removes_and_when_and_it_does_so() -> None:
    from kservice.plugins.mmap import codec
    from kservice.plugins.mmap.ring import queue_directory

    shown = " ".join(run_main("cleanup", "--help").stdout.split())
    grace = codec.ORPHAN_SEGMENT_GRACE
    assert f"older than {grace / 60:g} minutes" in shown, shown
    for what in ("rings", "registry records", "pooled segments", "one-shot segments", "receiver", "live process"):
        assert what in shown, (what, shown)
    ended = subprocess.Popen(["true"])
    ended.wait()
    me, gone = os.getpid(), ended.pid
    directory = queue_directory()
    young = f"oob-{gone}-{me}-{uuid.uuid4().hex[:12]}.seg"  # its record may still reach this live receiver
    old = f"oob-{gone}-{me}-{uuid.uuid4().hex[:12]}.seg"
    unread = f"oob-{me}-{gone}-{uuid.uuid4().hex[:12]}.seg"  # its receiver is gone: nobody will read it
    for name in (young, old, unread):
        (directory / name).write_bytes(b"x")
    os.utime(directory / old, (time.time() - grace - 60,) * 2)
    try:
        result = run_cli("cleanup")
        assert result.returncode == 0, result
        assert f"removed segment {old}" in result.stdout and f"removed segment {unread}" in result.stdout, result
        assert young not in result.stdout and (directory / young).exists()
    finally:
        for name in (young, old, unread):
            (directory / name).unlink(missing_ok=True)


@pytest.mark.timeout(60)
def test_cleanup_runs(served: Served) -> None:
    result = run_cli("cleanup")
    assert result.returncode == 0, result
    # A live host's queue is never reclaimed: the service still answers.
    assert run_cli("call", served.name, "get", '["nothing"]').stdout.strip() == "null"
