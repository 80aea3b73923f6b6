"""How ``kservice status`` reads what plugins add to a status (``status.extra``)."""

from __future__ import annotations

import io
import time

import kservice
import pytest
from kservice import ServiceStatus
from kservice.cli import status_rows, status_table
from rich.console import Console


def _status(**extra: object) -> ServiceStatus:
    return ServiceStatus(
        "svc",
        "ray",
        "running",
        True,
        requests_total=120,
        in_flight=3,
        queue_depth=2,
        started_at=time.time() - 60,
        extra=dict(extra),
    )


def test_plugin_fields_fill_their_columns() -> None:
    (row,) = status_rows(
        [
            _status(
                replicas=[{"actor": "a", "healthy": True}, {"actor": "b", "healthy": False, "state": "dead"}],
                load={"calls": 50, "calls_per_s": 12.5, "p50_ms": 1.5, "p99_ms": 9.0},
                breaker={"state": "open", "consecutive_failures": 5},
                health={"monitored": True, "state": "healthy"},
                ray={"namespace": "prod", "deployment": "x"},
                pid=1234,
            )
        ]
    )
    assert (row["replicas"], row["replicas_alive"]) == (2, 1)  # numbers, not "1/2"
    assert row["calls_per_second"] == 12.5
    assert (row["p50_ms"], row["p99_ms"]) == (1.5, 9.0)
    assert row["breaker"] == "open"
    assert row["extra"] == {"monitor": "healthy", "namespace": "prod", "pid": 1234}
    assert (row["in_flight"], row["queue_depth"], row["requests_total"]) == (3, 2, 120)


def test_missing_fields_show_a_dash_and_rates_come_from_samples() -> None:
    bare = ServiceStatus("kv", "local", "running", True, requests_total=10, started_at=time.time() - 10)
    (row,) = status_rows([bare])
    assert row["replicas"] == 1 and row["replicas_alive"] == 1 and row["breaker"] == "-" and row["p50_ms"] is None
    assert 0.5 < row["calls_per_second"] < 1.5  # averaged since start: 10 calls in 10 s

    previous: dict[str, tuple[float, int]] = {}
    status_rows([bare], previous)
    bare.requests_total = 110
    previous["kv"] = (previous["kv"][0] - 2.0, previous["kv"][1])  # the last sample was 2 s ago
    (watched,) = status_rows([bare], previous)
    assert 45 < watched["calls_per_second"] < 55  # 100 calls over the last ~2 s


def test_no_calls_in_the_metrics_window_means_no_percentile() -> None:
    (row,) = status_rows([_status(load={"calls": 0, "calls_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0})])
    assert row["p50_ms"] is None and row["p99_ms"] is None


def test_unreachable_and_malformed_statuses_become_rows() -> None:
    rows = status_rows([{"service_name": "gone", "error": "ServiceUnavailableError: host died"}, True])
    assert rows[0]["state"] == "unreachable" and "host died" in rows[0]["health"]
    assert rows[1]["state"] == "unreachable" and "bool" in rows[1]["health"]


def test_table_renders_every_row() -> None:
    rows = status_rows([_status(breaker={"state": "closed"}), {"service_name": "gone", "error": "no answer"}])
    out = io.StringIO()
    Console(file=out, width=220).print(status_table(rows, title="now"))
    text = out.getvalue()
    assert "svc" in text and "gone" in text and "unreachable" in text and "closed" in text


class _QuotaPlugin:
    """A third-party plugin rendering its own status section."""

    @kservice.hookimpl
    def kservice_status_columns(self, status: dict[str, object], extra: dict[str, object]) -> dict[str, object] | None:
        section = extra.pop("quota", None)
        if not isinstance(section, dict):
            return None
        return {"quota": f"{section['used']}/{section['limit']}", "p99_ms": 42.0}


class _BrokenColumnsPlugin:
    @kservice.hookimpl
    def kservice_status_columns(self, status: dict[str, object], extra: dict[str, object]) -> dict[str, object] | None:
        raise RuntimeError("renderer broke")


def test_a_plugin_renders_its_own_section() -> None:
    pm = kservice.get_plugin_manager()
    plugin = _QuotaPlugin()
    raw = _status(quota={"used": 3, "limit": 10}, pid=7)
    assert status_rows([raw])[0]["extra"]["quota"] == {"used": 3, "limit": 10}  # no plugin renders it: shown as it is
    pm.register(plugin, name="test-quota-columns")
    try:
        (row,) = status_rows([raw])
    finally:
        pm.unregister(plugin)
    assert row["extra"] == {"quota": "3/10", "pid": 7}  # its section taken, its cell under details
    assert row["p99_ms"] == 42.0  # a column the table has


def test_a_plugin_whose_columns_raise_is_left_out_with_a_warning() -> None:
    pm = kservice.get_plugin_manager()
    plugin = _BrokenColumnsPlugin()
    pm.register(plugin, name="test-broken-columns")
    try:
        with pytest.warns(RuntimeWarning, match="test-broken-columns.*kservice_status_columns.*renderer broke"):
            (row,) = status_rows([_status(breaker={"state": "open"}, pid=7)])
    finally:
        pm.unregister(plugin)
    assert row["breaker"] == "open" and row["extra"] == {"pid": 7}  # the other plugins' cells are kept
