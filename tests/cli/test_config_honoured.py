"""The command line refuses what it would not do as configured: plugins, config check, serve -c, numbers, unreadable files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from .helpers import KSERVICE, assert_user_error, cli_env, run_cli, run_main, run_many, stop_host


def _yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- 1. kservice plugins


@pytest.mark.timeout(60)
def test_plugins_lists_disabled_and_failed_plugins_and_a_missing_required_one_exits_1(tmp_path: Path) -> None:
    config = _yaml(tmp_path / "p.yaml", "plugins:\n  disable: [retry]\n  require: [apikey]\n")
    table, as_json = run_many([["plugins", "-c", str(config)], ["plugins", "--json", "-c", str(config)]])
    assert table.returncode == 1 and as_json.returncode == 1
    rows = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert rows["retry"]["state"] == "disabled" and "plugins.disable in" in rows["retry"]["reason"]
    assert (
        rows["apikey"]["state"] == "failed"
        and rows["apikey"]["required"]
        and "is not installed" in rows["apikey"]["reason"]
    )
    assert rows["inproc"]["state"] == "loaded"
    assert "retry" in table.stdout and "disabled" in table.stdout and "apikey" in table.stdout
    assert_user_error(table, "required plugin 'apikey' is not installed", status=1)


@pytest.mark.timeout(60)
def test_a_required_plugin_that_is_missing_stops_every_command_before_it_starts(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path / "req.yaml",
        """
        plugins:
          require: [apikey]
        services:
          kv: {class: "sample_services:KV"}
        """,
    )
    served = run_cli("serve", "-c", str(config), timeout=30)
    assert_user_error(served, "required plugin 'apikey' is not installed", status=1)
    assert "serving" not in served.stdout
    from_env = run_cli("config", "show", env=cli_env(KSERVICE_CONFIG=str(config)))
    assert_user_error(from_env, "required plugin 'apikey'", status=1)


# --------------------------------------------------------------------------- 2. kservice config check


@pytest.mark.timeout(60)
def test_config_check_reports_every_start_time_problem_at_once(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path / "bad.yaml",
        """
        servces: {}
        service_call:
          default_timeout: .nan
        services:
          a: {class: "sample_services:KVV", kind: porcess, transports: [mmpa]}
          b: {class: "nosuchmodule:KeyValue"}
          c: {entry_point: nope}
          d: {class: "sample_services:KV", enabled: false, kind: nosuch}
          ok: {class: "sample_services:KV", kind: process, transports: [mmap]}
        """,
    )
    result = run_cli("config", "check", str(config))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr_lines
    expected = [
        "unknown config key 'servces'; did you mean 'services'?",
        "service_call.default_timeout: expected a finite number, got nan",
        "services.a.kind: no task kind 'porcess' is registered; did you mean 'process'?",
        "services.a.transports[0]: no transport 'mmpa' is registered; did you mean 'mmap'?",
        "services.a.class: module 'sample_services'",
        "services.b.class: no module named 'nosuchmodule'",
        "services.c.entry_point: no installed service named 'nope'",
    ]
    assert len(lines) == len(expected), lines
    for line, fragment in zip(lines, expected, strict=True):
        assert line.startswith("error: ") and fragment in line, (fragment, line)
    assert "defines no 'KVV'; did you mean 'KV'?" in lines[4]
    assert "services.d" not in result.stderr and "services.ok" not in result.stderr


@pytest.mark.timeout(60)
def test_config_check_reads_class_paths_without_running_them_and_imports_with_a_flag(tmp_path: Path) -> None:
    package = tmp_path / "side"
    package.mkdir()
    marker = tmp_path / "ran"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "plain.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Service:\n    pass\n")
    (package / "starry.py").write_text("from side.plain import *\n")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    good = _yaml(
        tmp_path / "good.yaml", "services:\n  s: {class: 'side.plain:Service'}\n  t: {class: 'side.plain:Servic'}\n"
    )
    result = run_cli("config", "check", str(good), env=env)
    assert result.returncode == 1 and not marker.exists(), result  # neither the package nor the module ran
    assert result.stderr_lines == [
        f"error: services.t.class: module 'side.plain' ({package / 'plain.py'}) defines no 'Servic'; did you mean 'Service'?"
    ]

    starry = _yaml(tmp_path / "starry.yaml", "services:\n  s: {class: 'side.starry:Service'}\n")
    noted = run_cli("config", "check", str(starry), env=env)
    assert noted.returncode == 0 and not marker.exists(), noted
    assert "note: services.s.class:" in noted.stderr and "star import" in noted.stderr and "--import" in noted.stderr
    imported = run_cli("config", "check", "--import", str(starry), env=env)
    assert imported.returncode == 0 and marker.exists(), imported
    assert imported.stderr == ""


@pytest.mark.timeout(60)
def test_config_check_names_a_misspelled_plugin_under_disable(tmp_path: Path) -> None:
    # Before, each was "ok": the metrics plugin stayed enabled, and the unknown name let 'bogus' pass as a key
    # that plugin might own.
    misspelled = _yaml(tmp_path / "typo.yaml", "plugins:\n  disable: [tracing, metrcs]\nbogus: 1\n")
    absent = _yaml(tmp_path / "absent.yaml", "plugins:\n  disable: [acme_audit]\n")
    real = _yaml(tmp_path / "real.yaml", "plugins:\n  disable: [metrics]\n")
    typo, elsewhere, good = run_many([["config", "check", str(c)] for c in (misspelled, absent, real)])
    assert typo.returncode == 1 and "Traceback" not in typo.stderr, typo
    assert len(typo.stderr_lines) == 2, typo.stderr
    assert typo.stderr_lines[0].startswith("error: unknown config key 'bogus'")
    assert typo.stderr_lines[1] == (
        "error: plugins.disable[1]: no plugin 'metrcs' is installed; did you mean 'metrics'? "
        "(as written it disables nothing)"
    )
    assert typo.stdout == ""
    # A name like no installed plugin's may be one installed elsewhere: a note, not an error.
    assert elsewhere.returncode == 0, elsewhere
    assert elsewhere.stdout.startswith("ok: ")
    assert elsewhere.stderr_lines == [
        "note: plugins.disable[0]: no plugin 'acme_audit' is installed here, so this disables nothing"
    ], elsewhere.stderr
    assert good.returncode == 0 and good.stderr == "" and good.stdout.startswith("ok: "), good


# --------------------------------------------------------------------------- 3. kservice serve -c


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        (
            "{class: 'sample_services:KV', kind: ray, replicas: 3}",
            ("services.kv is declared kind: ray, replicas: 3", "--host-locally"),
        ),
        ("{class: 'sample_services:KV', replicas: 2}", ("services.kv is declared kind: local, replicas: 2",)),
        ("{class: 'sample_services:KV', kind: process}", ("services.kv is declared kind: process",)),
        (
            "{class: 'sample_services:KV', kind: porcess}",
            ("services.kv.kind: no task kind 'porcess'", "did you mean 'process'?"),
        ),
    ],
)
def test_serve_refuses_a_service_it_cannot_host_as_declared(
    tmp_path: Path, entry: str, fragments: tuple[str, ...]
) -> None:
    config = _yaml(tmp_path / "s.yaml", f"services:\n  other: {{class: 'sample_services:KV'}}\n  kv: {entry}\n")
    result = run_cli("serve", "-c", str(config), timeout=30)
    assert_user_error(result, *fragments, "nothing was started", status=1)
    assert result.stdout == ""  # not even the service declared before it was served
    running = run_cli("services", "--running", "--json")
    assert not [r for r in json.loads(running.stdout or "[]") if r["name"] in ("kv", "other") and r.get("pid")], running


@pytest.mark.timeout(60)
def test_serve_host_locally_says_what_it_hosts_instead(tmp_path: Path) -> None:
    name = f"kv{os.getpid()}"
    config = _yaml(
        tmp_path / "s.yaml", f"services:\n  {name}: {{class: 'sample_services:KV', kind: ray, replicas: 3}}\n"
    )
    process = subprocess.Popen(
        [KSERVICE, "serve", "--host-locally", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        assert line.startswith(f"serving {name} on mmap"), line
        assert run_cli("call", name, "put", '["a", 1]').returncode == 0
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        note = process.stderr.read()
        assert (
            f"note: {name} is declared kind: ray, replicas: 3; hosting one local instance in this process instead"
            in note
        )
    finally:
        stop_host(process)


# --------------------------------------------------------------------------- 5. numbers and unreadable files


@pytest.mark.timeout(60)
def test_non_finite_durations_on_the_command_line_are_usage_errors() -> None:
    results = [
        run_main("call", "kv", "get", "--timeout", "nan"),
        run_main("call", "kv", "get", "--timeout", "inf"),
        run_main("status", "--watch", "--interval", "inf"),
        run_main("serve", "--drain-timeout", "nan", "kv=sample_services:KV"),
    ]
    for result, option in zip(results, ["--timeout", "--timeout", "--interval", "--drain-timeout"], strict=True):
        assert_user_error(result, f"Invalid value for '{option}'", "is not a finite number of seconds", status=2)
    assert run_cli("call", "kv", "get", "--timeout", "nan").returncode == 2


@pytest.mark.timeout(60)
def test_durations_longer_than_a_wait_can_take_on_the_command_line_are_usage_errors() -> None:
    results = [
        run_main("call", "kv", "get", "--timeout", "1e10"),
        run_main("status", "--watch", "--interval", "1e300"),
        run_main("dashboard", "--interval", "1e300"),
        run_main("serve", "--drain-timeout", "1e300", "kv=sample_services:KV"),
    ]
    for result, option in zip(results, ["--timeout", "--interval", "--interval", "--drain-timeout"], strict=True):
        assert_user_error(result, f"Invalid value for '{option}'", "at most 9.2e+09 seconds", status=2)
    result = run_cli("call", "kv", "get", "--timeout", "1e10")
    assert_user_error(result, "Invalid value for '--timeout'", status=2)


@pytest.mark.timeout(120)
def test_every_config_read_error_is_one_line_from_every_command(tmp_path: Path) -> None:
    bad = {
        "non_utf8": (tmp_path / "n.yaml", b"service_call: {default_timeout: 3} # \xff\n", "is not UTF-8 text"),
        "deep": (tmp_path / "d.yaml", b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper than 64 levels"),
        "bigint": (
            tmp_path / "b.yaml",
            b"service_call: {max_retries: " + b"9" * 100_000 + b"}\n",
            "an integer of 100000 digits",
        ),
        "duplicate": (tmp_path / "u.yaml", b"services: {}\nservices: {}\n", "duplicate key 'services'"),
        "workers": (tmp_path / "w.yaml", b"service: {local: {max_workers: 100000000}}\n", "above the maximum 1024"),
    }
    for path, data, _ in bad.values():
        path.write_bytes(data)
    for path, _, fragment in bad.values():
        for command in (
            ["config", "check", str(path)],
            ["config", "show", "-c", str(path)],
            ["serve", "-c", str(path)],
            ["status", "-c", str(path)],
        ):
            assert_user_error(run_main(*command), fragment, status=1)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    # Through the installed script too: a FIFO hung every command before.
    for result in run_many(
        [["config", "check", str(fifo)], ["serve", "-c", str(fifo)], ["status", "-c", str(fifo)]], timeout=30
    ):
        assert_user_error(result, "it is a FIFO", status=1)
