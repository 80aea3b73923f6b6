"""The policies on a service hosted by another process (``process`` kind, ``mmap`` transport)."""

from __future__ import annotations

import kservice
import pytest
from kservice import ServiceEnvironment
from kservice.plugins.breaker import CircuitOpenError, breaker_state

pytestmark = pytest.mark.skipif(
    "process" not in kservice._plugins.task_kinds(), reason="the mmap plugin (process kind) is not installed"
)


@pytest.mark.timeout(60)
def test_retry_breaker_and_fallback_on_a_process_hosted_service() -> None:
    config = {
        "service_call": {"max_retries": 5, "retry_interval": 0.0, "retry_jitter": 0.0},
        "breaker": {"failure_threshold": 2, "cooldown": 30},
        "services": {
            "remote": {"class": "tests.policies.services:Flaky", "kind": "process"},
            "guarded": {
                "class": "tests.policies.services:Flaky",
                "kind": "process",
                "fallback": {"methods": {"sleep": {"value": -1.0}}},
            },
        },
    }
    with ServiceEnvironment("t", config) as env, env.manager() as manager:
        # Idempotent: retried in the child until its third run succeeds (the count comes back from there).
        assert manager.call_service_sync("remote", "succeed_on", (3,)) == 3
        # Not idempotent: the child ran it once.
        with pytest.raises(ConnectionError, match="fail #1"):
            manager.call_service_sync("remote", "fail")
        # Two timeouts open the breaker; then calls fail fast, typed, without reaching the child.
        for _ in range(2):
            with pytest.raises(kservice.ServiceTimeoutError):
                manager.call_service_sync("remote", "sleep", (0.3,), timeout=0.05)
        assert breaker_state("remote") == "open"
        with pytest.raises(CircuitOpenError):
            manager.call_service_sync("remote", "ok", (1,))
        # The fallback answers the timeouts, then the open breaker.
        assert [manager.call_service_sync("guarded", "sleep", (0.3,), timeout=0.05) for _ in range(3)] == [-1.0] * 3
        assert breaker_state("guarded") == "open"
