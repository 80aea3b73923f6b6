"""ServiceMiddleware.admit: a refusal before the request is built, and what it must not break."""

from __future__ import annotations

from typing import Any

import kservice
import pytest
from kservice import ServiceEnvironment, ServiceRequest, ServiceResponse, ServiceUnavailableError


class Echo:
    def echo(self, value: Any) -> Any:
        return value


class Gate(kservice.ServiceMiddleware):
    def __init__(self) -> None:
        self.closed = False
        self.broken = False
        self.before = 0
        self.refused: list[tuple[str, str, str]] = []

    def admit(self, service_name: str, method_name: str) -> BaseException | None:
        if self.broken:
            raise RuntimeError("the check itself failed")
        return ServiceUnavailableError("gate closed") if self.closed else None

    def on_refused(self, service_name: str, method_name: str, error: BaseException) -> None:
        self.refused.append((service_name, method_name, str(error)))

    def before_call(self, request: ServiceRequest) -> None:
        self.before += 1

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        pass


NO_POLICIES = {"breaker": {"enabled": False}, "metrics": {"enabled": False}, "tracing": {"enabled": False}, "service_call": {"max_retries": 0}}


def test_admit_refuses_before_the_chain_and_tells_the_listeners() -> None:
    gate = Gate()
    with ServiceEnvironment("admit", NO_POLICIES) as environment:
        environment.add_middleware(gate)
        environment.register_service("echo", Echo)
        with environment.manager() as manager:
            assert manager.call_service_sync("echo", "echo", (1,)) == 1 and gate.before == 1
            gate.closed = True
            with pytest.raises(ServiceUnavailableError, match="gate closed"):
                manager.call_service_sync("echo", "echo", (2,))
            with pytest.raises(ServiceUnavailableError, match="gate closed"):
                manager.call_service_async("echo", "echo", (3,)).result(timeout=5)
            assert gate.before == 1  # neither refused call reached before_call
            assert gate.refused == [("echo", "echo", "gate closed")] * 2


def test_a_check_that_raises_lets_the_call_through_the_chain() -> None:
    gate = Gate()
    gate.broken = True
    with ServiceEnvironment("admit-broken", NO_POLICIES) as environment:
        environment.add_middleware(gate)
        environment.register_service("echo", Echo)
        with environment.manager() as manager:
            assert manager.call_service_sync("echo", "echo", (4,)) == 4
            assert gate.before == 1 and not gate.refused
