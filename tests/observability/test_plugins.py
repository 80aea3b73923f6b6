"""Each plugin as a third party would see it: registered by entry point, removable, degrading, validated."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import kservice
import pytest
from kservice import ConfigError

from tests.observability.conftest import run_python

PLUGINS = ("health", "metrics", "calllog", "tracing")

# Runs in a fresh interpreter: one service, calls, status, and what each plugin left behind.
PROBE = """
import json, logging, threading, time
import kservice
from tests.observability.services import Echo, Poisonable

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())  # as an application would, before starting services

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("kservice.calls").addHandler(handler)
logging.getLogger("kservice.calls").setLevel(logging.INFO)
import os
disabled = os.environ.get("KSERVICE_DISABLE_PLUGINS", "")
# A disabled plugin's section is an unknown key: leave it out.
config = {"health": {"period": 0.02, "failure_threshold": 1}, "call_log": {"enabled": True}}
config = {k: v for k, v in config.items() if k.replace("_", "") != disabled}
with kservice.ServiceEnvironment("probe", config) as env:
    task = env.register_service("p", Poisonable)
    manager = env.manager()
    manager.call_service_sync("p", "poison")
    # (the health plugin, checking every 0.02 s, may already have restarted it: asserted where it is disabled)
    poisoned = manager.call_service_sync("p", "is_poisoned")
    health_thread = any(t.name == "kservice-health" for t in threading.enumerate())
    # A bounded look, not a wait that must succeed: with the health plugin disabled nothing restarts.
    deadline = time.monotonic() + 3
    while task.restarts == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    status = task.get_service_status()
    names = [type(m).__name__ for m in manager.client_middlewares("p")]
try:
    from kservice.middleware import metrics
    calls = metrics.snapshot()["server"].get("p", {}).get("calls", 0)
except ImportError:
    calls = None
plugins = sorted(name for name, plugin in kservice.get_plugin_manager().list_name_plugin() if plugin is not None)
print(json.dumps({
    "plugins": plugins, "restarts": status.restarts, "health_thread": health_thread,
    "load": "load" in status.extra, "health": status.extra.get("health", {}).get("monitored"),
    "chain": names, "calls": calls, "records": len(records), "poisoned": poisoned,
}))
"""


def probe_all(cases: dict[str, dict[str, str]]) -> dict[str, dict]:  # type: ignore[type-arg]
    """Run PROBE once per case, the interpreters side by side (each is a fresh plugin manager)."""
    with ThreadPoolExecutor(len(cases)) as pool:
        done = dict(zip(cases, pool.map(lambda env: run_python(PROBE, env=env), cases.values()), strict=True))
    for case, result in done.items():
        assert result.returncode == 0, f"{case}: {result.stderr}"
    return {case: json.loads(result.stdout.strip().splitlines()[-1]) for case, result in done.items()}


@pytest.mark.timeout(120)
def test_every_plugin_works_and_disabling_one_leaves_the_others_working() -> None:
    results = probe_all({"all": {}, **{name: {"KSERVICE_DISABLE_PLUGINS": name} for name in PLUGINS}})
    got = results["all"]
    assert set(PLUGINS) <= set(got["plugins"]), "registered through the 'kservice' entry-point group"
    assert got["restarts"] == 1 and got["health_thread"] and got["health"] is True
    assert got["load"] and got["calls"] == 2 and got["records"] == 2
    assert {"ClientTracing", "ClientMetrics", "CallLogMiddleware"} <= set(got["chain"])
    for disabled in PLUGINS:
        got = results[disabled]
        assert disabled not in got["plugins"], disabled
        assert set(PLUGINS) - {disabled} <= set(got["plugins"]), disabled
        if disabled == "health":
            assert got["restarts"] == 0 and not got["health_thread"] and got["health"] is None
            assert got["poisoned"] is True  # nothing restarted it
        else:
            assert got["restarts"] == 1 and got["health_thread"] and got["health"] is True, disabled
        if disabled == "metrics":
            assert not got["load"] and got["calls"] == 0 and "ClientMetrics" not in got["chain"]
        else:
            assert got["load"] and got["calls"] == 2, disabled
        if disabled == "calllog":
            assert got["records"] == 0 and "CallLogMiddleware" not in got["chain"]
        else:
            assert got["records"] == 2, disabled
        assert ("ClientTracing" in got["chain"]) is (disabled != "tracing"), disabled


BLOCK = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # an import of it now raises ImportError, as if it were not installed
"""


@pytest.mark.timeout(60)
def test_metrics_without_prometheus_client_still_counts() -> None:
    code = (
        BLOCK.format(names=["prometheus_client"])
        + """
import kservice
from kservice.middleware import metrics
from tests.observability.services import Echo
with kservice.ServiceEnvironment("x", {"health": {"enabled": False}}) as env:
    env.register_service("echo", Echo)
    assert env.manager().call_service_sync("echo", "echo", (1,)) == 1
assert metrics.snapshot()["server"]["echo"]["calls"] == 1
try:
    metrics.prometheus_text()
except ImportError as exc:
    print("ImportError:", exc)
"""
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "ImportError: Prometheus exposition needs prometheus-client: pip install 'kservice[metrics]'" in done.stdout


@pytest.mark.timeout(60)
def test_tracing_without_opentelemetry_is_not_in_the_chain() -> None:
    code = (
        BLOCK.format(names=["opentelemetry", "opentelemetry.trace", "opentelemetry.context", "opentelemetry.propagate"])
        + """
import warnings
import kservice
from kservice.middleware import tracing
from tests.observability.services import Echo
assert not tracing.available()
kservice.get_plugin_manager()
with warnings.catch_warnings(record=True) as quiet:
    warnings.simplefilter("always")
    with kservice.ServiceEnvironment("x", {"health": {"enabled": False}}) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        assert manager.call_service_sync("echo", "echo", (1,)) == 1
        names = [type(m).__name__ for m in manager.client_middlewares("echo")]
        assert not any("Tracing" in n for n in names), names
        assert "ClientMetrics" in names
assert not [w for w in quiet if "tracing" in str(w.message)], "no warning unless tracing is asked for"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with kservice.ServiceEnvironment("y", {"health": {"enabled": False}, "tracing": {"enabled": True}}) as env:
        env.register_service("echo", Echo)
        assert env.manager().call_service_sync("echo", "echo", (2,)) == 2
print("warned:", [str(w.message) for w in caught])
"""
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "tracing.enabled is true but opentelemetry-api is not installed" in done.stdout


@pytest.mark.timeout(60)
def test_tracing_stays_out_without_provider_and_when_forced_picks_one_up_later() -> None:
    code = """
import kservice
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from kservice.middleware import tracing
from tests.observability.services import Echo
exporter = InMemorySpanExporter()
with kservice.ServiceEnvironment("auto", {"health": {"enabled": False}}) as env:
    env.register_service("echo", Echo)
    manager = env.manager()
    names = [type(m).__name__ for m in manager.client_middlewares("echo")]
    assert not any("Tracing" in n for n in names), "auto mode without a provider: not in the chain"
with kservice.ServiceEnvironment("x", {"health": {"enabled": False}, "tracing": {"enabled": True}}) as env:
    env.register_service("echo", Echo)
    manager = env.manager()
    manager.call_service_sync("echo", "echo", (1,))
    before = len(exporter.get_finished_spans())
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert tracing.refresh()
    manager.call_service_sync("echo", "echo", (2,))
print(before, sorted(s.kind.name for s in exporter.get_finished_spans()))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "['CLIENT',", "'SERVER']"]


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"health": {"period": "soon"}}, "health.period"),
        ({"health": {"failure_threshold": 0}}, "health.failure_threshold"),
        ({"health": {"max_queue_depth": 1.5}}, "health.max_queue_depth"),
        ({"metrics": {"enabled": "yes"}}, "metrics.enabled"),
        ({"metrics": {"load_window": 0}}, "metrics.load_window"),
        ({"call_log": {"side": "sideways"}}, "call_log.side"),
        ({"call_log": {"log_arguments": 1}}, "call_log.log_arguments"),
        ({"tracing": {"enabled": "auto"}}, "tracing.enabled"),
        (
            {"services": {"s": {"class": "tests.observability.services:Echo", "health": {"timeout": [1]}}}},
            "services.s.health.timeout",
        ),
        (
            {"services": {"s": {"class": "tests.observability.services:Echo", "metrics": {"clients": True}}}},
            "services.s.metrics.clients",
        ),
    ],
)
def test_wrong_config_names_the_key_path(config: dict, path: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as caught:
        kservice.Config.load(config)
    assert path in str(caught.value)


def test_every_section_is_in_the_schema_with_its_defaults() -> None:
    config = kservice.Config.load({})
    assert config.get("health.enabled") is True and config.get("health.max_restarts") == 3
    assert config.get("metrics.enabled") is True and config.get("metrics.load_window") == 60.0
    assert config.get("call_log.enabled") is False and config.get("call_log.log_arguments") is False
    assert config.get("tracing.enabled") is None
    assert config.for_service("any")["health"]["period"] == 5.0
