"""Bad input and faults: raising middleware, and each policy plugin disabled on its own."""

from __future__ import annotations

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceRequest, ServiceResponse

from tests.policies.conftest import run_script
from tests.policies.services import Flaky

POLICY_PLUGINS = ("retry", "breaker", "fallback", "cache")


class Raising(kservice.ServiceMiddleware):
    def __init__(self, where: str) -> None:
        self.where = where

    def before_call(self, request: ServiceRequest) -> None:
        if self.where == "before" and request.method_name == "ok" and request.args == ("bad",):
            raise PermissionError("refused by before_call")

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if self.where == "after" and request.method_name == "ok" and request.args == ("bad",):
            raise LookupError("broken after_call")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_raising_middleware_fails_that_call_with_its_typed_error_and_the_service_keeps_serving(where: str) -> None:
    config = {"service_call": {"max_retries": 3, "retry_interval": 0.0}, "breaker": {"failure_threshold": 1}}
    env = ServiceEnvironment("t", config)
    env.add_middleware(Raising(where))
    env.register_service("flaky", Flaky)
    with env, env.manager() as manager:
        expected = PermissionError if where == "before" else LookupError
        for _ in range(3):
            with pytest.raises(expected):
                manager.call_service_sync("flaky", "ok", ("bad",))
            with pytest.raises(expected):
                manager.call_service_async("flaky", "ok", ("bad",)).result(timeout=2)
        assert manager.call_service_sync("flaky", "ok", ("good",)) == "good"
        calls = env.get_task("flaky").service.calls["ok"]
        # before_call rejected: never sent, never retried. after_call: ran once per call, never retried.
        assert calls == (1 if where == "before" else 7)
        from kservice.plugins.breaker import breaker_state

        assert breaker_state("flaky") == "closed"  # caller-side middleware errors never trip the breaker


SCRIPT = """
import json, time, kservice
from kservice._plugins import plugin_infos
config = {
    "service_call": {"max_retries": 2, "retry_interval": 0.0, "retry_jitter": 0.0},
    "services": {
        "flaky": {"class": "tests.policies.services:Flaky"},
        "cached": {"class": "tests.policies.services:Flaky", "cache": {"enabled": True}},
        "guarded": {"class": "tests.policies.services:Flaky",
                    "breaker": {"failure_threshold": 1, "cooldown": 30, "count_service_errors": True},
                    "fallback": {"methods": {"toggle": {"value": "degraded"}}}},
    },
}
loaded = {p.name for p in plugin_infos()}
disabled = set(%(disabled)r)
for name in disabled:
    config.pop(name, None)
    for entry in config["services"].values():
        entry.pop(name, None)
if %(plugin)r == "retry":
    config["service_call"] = {"max_retries": 2, "retry_interval": 0.0}  # the core's keys only
out = {"loaded": sorted(loaded)}
with kservice.ServiceEnvironment("t", config) as env, env.manager() as manager:
    try:
        manager.call_service_sync("flaky", "succeed_on", (3,))
        out["retry"] = env.get_task("flaky").service.calls["succeed_on"]
    except ConnectionError:
        out["retry"] = env.get_task("flaky").service.calls["succeed_on"]
    manager.call_service_sync("cached", "square", (2,)); manager.call_service_sync("cached", "square", (2,))
    out["cache"] = env.get_task("cached").service.calls["square"]
    guarded = env.get_task("guarded").service
    guarded.failing = True
    results = []
    for _ in range(3):
        try:
            results.append(manager.call_service_sync("guarded", "toggle"))
        except Exception as exc:
            results.append(type(exc).__name__)
    out["guarded"] = results
    out["guarded_ran"] = guarded.calls["toggle"]
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = kservice.Config.load({%(section)r: {%(probe_key)r: 1}} if %(plugin)r == "retry" else {%(section)r: {}})
    out["key_known"] = probe.get(%(section)r + "." + %(probe_key)r) is not None if %(plugin)r == "retry" else probe.get(%(section)r) is not None
    out["key_warned"] = any("not known to any loaded plugin" in str(w.message) for w in caught)
print(json.dumps(out))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("disabled", POLICY_PLUGINS)
def test_each_policy_plugin_can_be_disabled_and_the_others_keep_working(disabled: str) -> None:
    section = {"retry": "service_call", "breaker": "breaker", "fallback": "fallback", "cache": "cache"}[disabled]
    out = run_script(
        SCRIPT % {"disabled": [disabled], "plugin": disabled, "section": section, "probe_key": "retry_backoff"},
        env={"KSERVICE_DISABLE_PLUGINS": disabled},
    )
    assert disabled not in out["loaded"]
    assert set(POLICY_PLUGINS) - {disabled} <= set(out["loaded"])
    # retry: the idempotent method succeeds on its third run only when retries work.
    assert out["retry"] == (1 if disabled == "retry" else 3)
    # cache: the second call is a hit only with the cache plugin.
    assert out["cache"] == (2 if disabled == "cache" else 1)
    if disabled == "breaker":
        assert out["guarded"] == ["ConnectionError"] * 3 and out["guarded_ran"] == 3
    elif disabled == "fallback":
        assert out["guarded"] == ["ConnectionError", "CircuitOpenError", "CircuitOpenError"] and out["guarded_ran"] == 1
    else:
        assert out["guarded"] == ["ConnectionError", "degraded", "degraded"] and out["guarded_ran"] == 1
    # Its config keys are gone with it: ignored with a warning, so a shared config file stays valid.
    assert out["key_known"] is False and out["key_warned"] is True
