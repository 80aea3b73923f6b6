"""The task-kind seam: a kind overrides public steps; the base class sequences them and owns the state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import (
    BaseServiceTask,
    Listener,
    LocalServiceTask,
    ServiceAddress,
    ServiceFactory,
    ServiceStatus,
    ServiceUnavailableError,
    get_plugin_manager,
    hookimpl,
)

from tests.core.services import KeyValue

pytestmark = pytest.mark.timeout(60)


class RecordingListener(Listener):
    def __init__(self, name: str, closed: list[str]) -> None:
        self.address = ServiceAddress("recording", name, name)
        self._closed = closed

    def close(self) -> None:
        self._closed.append(self.address.target)


class ElsewhereTask(BaseServiceTask):
    """A kind hosting 'elsewhere' (here: nowhere), recording which steps ran and in which state."""

    kind = "elsewhere"

    def __init__(self, *args: Any, fail_in: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_in = fail_in
        self.steps: list[tuple[str, str]] = []
        self.closed: list[str] = []

    def host_instance(self) -> None:
        self.steps.append(("host_instance", self.state))
        if self.fail_in == "host_instance":
            raise RuntimeError("host would not come up")

    def open_listeners(self) -> list[Listener]:
        self.steps.append(("open_listeners", self.state))
        self.listeners = [RecordingListener("first", self.closed)]
        if self.fail_in == "open_listeners":
            raise RuntimeError("second listener would not open")
        return [*self.listeners, RecordingListener("second", self.closed)]

    def release_instance(self, deadline: float) -> None:
        self.steps.append(("release_instance", self.state))
        assert deadline > time.monotonic() - 1.0
        if self.fail_in == "release_instance":
            raise RuntimeError("host would not stop")

    def report_status(self) -> ServiceStatus:
        status = super().report_status()
        status.extra["host"] = "elsewhere"
        return status


def make(fail_in: str = "") -> ElsewhereTask:
    return ElsewhereTask(ServiceFactory("elsewhere", KeyValue), fail_in=fail_in)


def test_the_base_class_calls_each_step_in_its_state_and_marks_the_state() -> None:
    task = make()
    task.start_service()
    assert task.state == "running" and task.started_at is not None
    assert [listener.address.target for listener in task.listeners] == ["first", "second"]
    task.stop_service(5)
    assert task.steps == [
        ("host_instance", "starting"),
        ("open_listeners", "running"),
        ("release_instance", "stopping"),
    ]
    assert task.state == "stopped"
    assert sorted(task.closed) == ["first", "second"] and task.listeners == []


@pytest.mark.parametrize("fail_in", ["host_instance", "open_listeners"])
def test_a_failed_step_fails_the_start_and_releases_everything(fail_in: str) -> None:
    task = make(fail_in)
    with pytest.raises(ServiceUnavailableError, match="failed to start: RuntimeError") as caught:
        task.start_service()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert task.state == "failed"
    assert task.steps[-1] == ("release_instance", "failed")
    # A listener opened before the failure is closed, not leaked.
    assert task.closed == (["first"] if fail_in == "open_listeners" else []) and task.listeners == []


def test_a_release_that_raises_still_closes_the_listeners_and_stops_the_task() -> None:
    task = make("release_instance")
    task.start_service()
    task.stop_service(5)  # does not raise: teardown runs in finally
    assert task.state == "stopped"
    assert sorted(task.closed) == ["first", "second"] and task.listeners == []
    task.stop_service(5)  # idempotent
    assert task.steps.count(("release_instance", "stopping")) == 1


class StatusCounter:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def kservice_task_status(self, task: Any, status: ServiceStatus) -> None:
        self.calls += 1
        status.extra["counted"] = self.calls


@pytest.fixture
def status_counter() -> Iterator[StatusCounter]:
    counter = StatusCounter()
    get_plugin_manager().register(counter, name="status-counter")
    try:
        yield counter
    finally:
        get_plugin_manager().unregister(name="status-counter")


def test_a_kind_reports_its_status_and_plugins_add_to_it_exactly_once(status_counter: StatusCounter) -> None:
    task = make()
    task.start_service()
    try:
        status = task.get_service_status()
        assert status.extra["host"] == "elsewhere"  # the kind's report_status()
        assert status.extra["counted"] == 1 and status_counter.calls == 1  # kservice_task_status, once
        assert status.kind == "elsewhere" and status.state == "running"
    finally:
        task.stop_service(5)


def test_adopt_running_opens_listeners_without_hosting_or_announcing() -> None:
    started: list[str] = []

    class Announced:
        @hookimpl
        def kservice_task_started(self, task: Any) -> None:
            started.append(task.service_name)

    get_plugin_manager().register(Announced(), name="announced")
    try:
        task = make()
        task.adopt_running()
        assert task.state == "running" and task.started_at is not None
        assert [step for step, _ in task.steps] == ["open_listeners"] and started == []
        with pytest.raises(ServiceUnavailableError, match="only a new task can adopt"):
            task.adopt_running()
        task.stop_service(5)
        assert task.state == "stopped" and sorted(task.closed) == ["first", "second"]
    finally:
        get_plugin_manager().unregister(name="announced")


def test_the_local_kind_serves_through_the_default_steps() -> None:
    task = LocalServiceTask(ServiceFactory("kv-local", KeyValue, ({"a": 1},)))
    task.start_service()
    try:
        assert task.service is not None and [listener.address.transport for listener in task.listeners] == ["inproc"]
    finally:
        task.stop_service(5)
    assert task.service is None and task.listeners == [] and task.state == "stopped"
