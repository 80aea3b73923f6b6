"""Listing what runs asks every plugin: one that hangs or raises is named, and the listing goes on without it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.core.conftest import make_distribution

from .helpers import cli_env, run_many

DIRECTORY_DOWN = """
import time
import kservice

@kservice.hookimpl
def kservice_known_services():
    time.sleep(60)  # a directory service that stopped answering
    return ["never"]
"""

DIRECTORY_BROKEN = """
import kservice

@kservice.hookimpl
def kservice_running_services():
    raise RuntimeError("registry file unreadable")
"""

DIRECTORY_UP = """
import kservice

@kservice.hookimpl
def kservice_known_services():
    return ["beta-svc"]
"""


@pytest.mark.timeout(60)
def test_status_and_services_name_a_plugin_that_hangs_or_raises_and_list_the_others(tmp_path: Path) -> None:
    site = make_distribution(
        tmp_path,
        "acme_directories",
        {"kservice": {name: name for name in ("acme_down", "acme_broken", "acme_up")}},
        {"acme_down": DIRECTORY_DOWN, "acme_broken": DIRECTORY_BROKEN, "acme_up": DIRECTORY_UP},
    )
    env = cli_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    began = time.monotonic()
    services, status = run_many(
        [["services", "--running", "--json", "--timeout", "1"], ["status", "--timeout", "1"]], env=env
    )
    # Before: both waited for the hung plugin (60 s), and a plugin that raised ended them with a traceback.
    assert time.monotonic() - began < 30
    for result in (services, status):
        assert result.returncode == 0, result
        assert "Traceback" not in result.stderr, result.stderr
        assert "plugin 'acme_down'" in result.stderr and "kservice_known_services" in result.stderr, result.stderr
        assert "plugin 'acme_broken'" in result.stderr and "registry file unreadable" in result.stderr, result.stderr
    assert [row["name"] for row in json.loads(services.stdout)] == ["beta-svc"]
    assert "beta-svc" in status.stdout
