"""Environment middleware runs its service-side hooks inside a `process` task's child."""

from __future__ import annotations

import os

import pytest
from kservice import (
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
)

from tests.core.services import KeyValue


class StampPid(ServiceMiddleware):
    """Server side: records the pid of the process that ran the method."""

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse:
        if response.success:
            response.result = (response.result, os.getpid())
        return response


@pytest.mark.timeout(120)
def test_environment_middleware_runs_in_the_child() -> None:
    with ServiceEnvironment("mw") as env:
        env.add_middleware(StampPid())
        task = env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
        with ServiceManager(env) as manager:
            value, pid = manager.call_service_sync("kv", "get", ("a",))
        assert value == 1
        assert pid == task.pid and pid != os.getpid()
