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


NO_POLICIES = {
    "breaker": {"enabled": False},
    "metrics": {"enabled": False},
    "tracing": {"enabled": False},
    "service_call": {"max_retries": 0},
}


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


class Watcher(kservice.ServiceMiddleware):
    """Observes outcomes; hears of refusals only when ``hears`` is set."""

    def __init__(self, hears: bool) -> None:
        self.observed: list[str] = []
        self.refused: list[str] = []
        if hears:
            self.on_refused = lambda service, method, error: self.refused.append(str(error))  # type: ignore[method-assign]

    def observe_call(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        self.observed.append("ok" if response.success else response.error or "")


@pytest.mark.parametrize("hears", [True, False])
def test_an_observer_that_does_not_hear_refusals_keeps_every_call_on_the_chain(hears: bool) -> None:
    gate, watcher = Gate(), Watcher(hears)

    def refuse_in_chain(request: ServiceRequest) -> None:
        gate.before += 1
        if gate.closed:
            raise ServiceUnavailableError("gate closed")

    gate.before_call = refuse_in_chain  # type: ignore[method-assign]
    with ServiceEnvironment("admit-observer", NO_POLICIES) as environment:
        environment.add_middleware(watcher)
        environment.add_middleware(gate)
        environment.register_service("echo", Echo)
        with environment.manager() as manager:
            gate.closed = True
            with pytest.raises(ServiceUnavailableError, match="gate closed"):
                manager.call_service_sync("echo", "echo", (1,))
    if hears:  # refused by admit: the chain never ran, the observer heard of it
        assert (gate.before, watcher.observed, watcher.refused) == (0, [], ["gate closed"])
    else:  # the observer would have missed it: the call went down the chain and was refused there
        assert (gate.before, watcher.observed, watcher.refused) == (1, ["gate closed"], [])
