"""The transport plugin of docs/guide-transport.md, pip-installed as a user would, called through the manager."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.helpers import cli_env, run_cli
from tests.conftest import install_distribution

EXAMPLE = Path(__file__).resolve().parents[1] / "example_transport"
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide-transport.md"
DISTRIBUTION = "kservice-loopback-transport"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that has the distribution installed (see ``install_distribution``)."""
    site = install_distribution(EXAMPLE, tmp_path_factory.mktemp("example"))
    env = cli_env()
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.timeout(180)
def test_installed_transport_is_loaded_and_carries_calls(installed: dict[str, str]) -> None:
    listed = run_cli("plugins", "--json", env=installed)
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["loopback"]["origin"] == f"entry point of {DISTRIBUTION} 1.0", listed.stdout
    assert rows["loopback"]["state"] == "loaded" and "kservice_register_transports" in rows["loopback"]["hooks"]

    result = _python(
        """
        from kservice import ServiceCallError, ServiceEnvironment, ServiceFactory

        class Store:
            def __init__(self):
                self.items = []

            def add(self, item):
                item.append("seen by the service")   # mutates the service's copy only
                self.items.append(item)
                return item

            def all(self):
                return self.items

            def callback(self):
                return lambda: None                   # cannot be pickled

            def fail(self):
                raise KeyError("missing")

        with ServiceEnvironment("example") as env:
            task = env.register_service("store", ServiceFactory("store", Store), kind="loopback")
            assert [a.transport for a in task.addresses] == ["loopback-pickle"], task.addresses
            manager = env.manager()

            mine = ["from the caller"]
            returned = manager.call_service_sync("store", "add", (mine,))
            assert mine == ["from the caller"], mine                      # the argument was copied
            assert returned == ["from the caller", "seen by the service"]
            assert returned is not task.service.items[0]                  # so was the result
            assert manager.call_service_async("store", "all").result(10) == [returned]

            try:
                manager.call_service_sync("store", "add", (lambda: None,))
            except Exception as exc:                                      # pickling fails in the caller
                assert "pickle" in str(exc).lower(), exc
            else:
                raise AssertionError("an unpicklable argument was accepted")

            try:
                manager.call_service_sync("store", "callback")
            except ServiceCallError as exc:                               # and for results, in the service
                assert "pickle" in str(exc).lower(), exc
            else:
                raise AssertionError("an unpicklable result was returned")

            try:
                manager.call_service_sync("store", "fail")
            except KeyError as exc:                                       # error types survive the trip
                assert exc.remote_type == "KeyError"
        print("ok")
        """,
        installed,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

    # The plugin's configuration key joins validation and `config show`.
    shown = run_cli("config", "show", env=installed)
    assert "loopback:\n  protocol: 5" in shown.stdout


def test_the_guide_shows_the_plugin_as_it_is_tested() -> None:
    """Every file of the example distribution appears verbatim in docs/guide-transport.md."""
    guide = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", guide, re.S)
    for name in ("pyproject.toml", "kservice_loopback/__init__.py"):
        text = (EXAMPLE / name).read_text(encoding="utf-8")
        assert text in blocks, f"docs/guide-transport.md does not show tests/example_transport/{name} verbatim"
