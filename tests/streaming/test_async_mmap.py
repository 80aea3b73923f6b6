"""``async def`` methods of services hosted in another process (the ``process`` kind and ``kservice serve``)."""

from __future__ import annotations

from collections.abc import Iterator

import kservice
import pytest
from kservice.testing import wait_for

from tests.mmap.services import hosting, unique
from tests.streaming.services import AsyncGreeter

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def env() -> Iterator[kservice.ServiceEnvironment]:
    environment = kservice.ServiceEnvironment("aio-mmap", {"service_call": {"max_retries": 0}})
    environment.register_service("greeter", kservice.ServiceFactory("greeter", AsyncGreeter), kind="process")
    with environment:
        yield environment


@pytest.fixture
def manager(env: kservice.ServiceEnvironment) -> Iterator[kservice.ServiceManager]:
    with kservice.ServiceManager(env) as m:
        yield m


@pytest.mark.allow_leaks  # the module's host process outlives each test
def test_process_kind_awaits_coroutines_on_the_hosts_loop(manager: kservice.ServiceManager) -> None:
    assert manager.call_service_sync("greeter", "hello", (21,)) == "hello 42"
    where = manager.call_service_sync("greeter", "where", timeout=5)
    assert where["thread"] == "kservice-greeter-loop" and 0 < where["remaining"] <= 5
    futures = [manager.call_service_async("greeter", "nap", (0.1, str(i))) for i in range(30)]
    assert sorted(f.result(10) for f in futures) == sorted(str(i) for i in range(30))


@pytest.mark.allow_leaks
def test_process_kind_deadline_cancels_the_coroutine(manager: kservice.ServiceManager) -> None:
    with pytest.raises(kservice.ServiceTimeoutError):
        manager.call_service_sync("greeter", "nap", (5.0, "late-mmap"), timeout=0.3)
    wait_for(
        lambda: "late-mmap" in manager.call_service_sync("greeter", "stats")["cancelled"],
        timeout=5,
        what="the coroutine to be cancelled at its deadline",
    )
    with pytest.raises(ValueError, match="bad"):
        manager.call_service_sync("greeter", "fail", ("bad",))
    assert manager.call_service_sync("greeter", "hello", (1,)) == "hello 2"


def test_kservice_serve_hosts_coroutine_methods() -> None:
    name = unique("greeter")
    with hosting(f"{name}=tests.streaming.services:AsyncGreeter"), kservice.ServiceManager() as manager:
        assert manager.call_service_sync(name, "hello", (4,)) == "hello 8"
        assert manager.call_service_sync(name, "where")["thread"] == f"kservice-{name}-loop"
