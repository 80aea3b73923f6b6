"""Transport choice: an installed transport plugin never moves callers off a faster transport by itself.

A real distribution (tests/relay_transport, pip-installed into a directory of
its own) registers a ``relay`` transport and a resolver that claims every
service ``kservice serve`` hosts. Its entry-point name sorts after ``mmap``, so
pluggy asks its resolver first: before transports were ranked, its answer won.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import install_distribution

from .conftest import Served
from .helpers import assert_user_error, cli_env, run_cli

RELAY = Path(__file__).resolve().parents[1] / "relay_transport"


@pytest.fixture(scope="module")
def relay_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The relay distribution installed by pip into a directory of its own (put on PYTHONPATH to enable it)."""
    target = install_distribution(RELAY, tmp_path_factory.mktemp("relay"))
    assert any(target.glob("kservice_relay_transport-1.0.dist-info"))
    yield target


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    return env


def _caller(name: str, site: Path, config: Path | None = None, **extra: str) -> list[str]:
    code = f"""
        import kservice_relay
        from kservice import ServiceManager
        with ServiceManager(config={str(config) if config else None!r}) as manager:
            print(",".join(a.transport for a in manager.service_addresses({name!r})))
            manager.call_service_sync({name!r}, "put", ("k", "v"))
            assert manager.call_service_sync({name!r}, "get", ("k",)) == "v"
            print(type(manager.get_service_queue({name!r})).__name__, kservice_relay.CALLS)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(site, **extra),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.timeout(180)
def test_an_installed_transport_without_a_cost_does_not_take_callers_off_mmap(served: Served, relay_site: Path) -> None:
    assert _caller(served.name, relay_site) == ["mmap,relay", "MmapConnection 0"]
    listed = run_cli("plugins", env=_env(relay_site))
    assert "kservice-relay-transport" in listed.stdout  # the plugin is loaded: its resolver was asked
    running = run_cli("services", "--running", "--json", env=_env(relay_site))
    (record,) = [r for r in json.loads(running.stdout) if r["name"] == served.name]
    assert record["transport"] == "mmap"


@pytest.mark.timeout(180)
def test_a_cheaper_transport_wins_whoever_registered_it(served: Served, relay_site: Path) -> None:
    assert _caller(served.name, relay_site, KSERVICE_RELAY_COST="1") == ["relay,mmap", "RelayConnection 2"]


@pytest.mark.timeout(180)
def test_the_configured_preference_comes_first(served: Served, relay_site: Path, tmp_path: Path) -> None:
    prefer = tmp_path / "prefer.yaml"
    prefer.write_text("service_call:\n  transports: [relay]\n")
    assert _caller(served.name, relay_site, prefer) == ["relay,mmap", "RelayConnection 2"]
    running = run_cli("services", "--running", "--json", "-c", str(prefer), env=_env(relay_site))
    (record,) = [r for r in json.loads(running.stdout) if r["name"] == served.name]
    assert record["transport"] == "relay"

    # Per service, too; and a preferred transport nobody registers is one clear line.
    per_service = tmp_path / "per-service.yaml"
    per_service.write_text(f"services:\n  {served.name}:\n    service_call:\n      transports: [mmpa]\n")
    wrong = run_cli("call", "-c", str(per_service), served.name, "get", '["k"]', env=_env(relay_site))
    assert_user_error(wrong, "service_call.transports", "no transport named 'mmpa'", "did you mean 'mmap'", status=1)
    # Nothing was lost: the host still answers callers that use the default choice.
    assert run_cli("call", served.name, "get", '["k"]').returncode == 0
