"""Structured call logging: off by default, one record per call, no argument values unless asked."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import kservice
import pytest
from kservice.middleware.calllog import LOGGER_NAME, CallLogMiddleware

from tests.observability.conftest import client_chain, server_chain
from tests.observability.services import Echo

NO_HEALTH = {"health": {"enabled": False}}


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger(LOGGER_NAME)
    handler = Capture()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.mark.timeout(30)
def test_off_by_default(records: list[logging.LogRecord]) -> None:
    with kservice.ServiceEnvironment("l", NO_HEALTH) as env:
        task = env.register_service("echo", Echo)
        manager = env.manager()
        manager.call_service_sync("echo", "echo", (1,))
        assert not any(isinstance(m, CallLogMiddleware) for m in client_chain(manager, "echo"))
        assert not any(isinstance(m, CallLogMiddleware) for m in server_chain(task))
    assert records == []


@pytest.mark.timeout(30)
def test_one_structured_record_per_call_without_argument_values(records: list[logging.LogRecord]) -> None:
    with kservice.ServiceEnvironment("l", {**NO_HEALTH, "call_log": {"enabled": True}}) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        manager.call_service_sync("echo", "echo", ("s3cret-token",), kwargs={})
        with pytest.raises(ValueError):
            manager.call_service_sync("echo", "fail", ("pa55word",))
    ok, failed = records
    assert (ok.service, ok.method, ok.outcome, ok.error_type, ok.side) == ("echo", "echo", "ok", "", "server")  # type: ignore[attr-defined]
    assert ok.levelno == logging.INFO and ok.duration_ms >= 0 and ok.request_id  # type: ignore[attr-defined]
    assert (failed.outcome, failed.error_type) == ("error", "ValueError")  # type: ignore[attr-defined]
    assert failed.levelno == logging.WARNING
    for record in records:
        assert "s3cret-token" not in record.getMessage() and "pa55word" not in str(record.__dict__)
        assert not hasattr(record, "call_args")
    assert ok.request_id != failed.request_id  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_log_arguments_adds_truncated_reprs(records: list[logging.LogRecord]) -> None:
    config = {
        **NO_HEALTH,
        "call_log": {"enabled": True, "log_arguments": True, "max_argument_chars": 10, "side": "client"},
    }
    with kservice.ServiceEnvironment("l", config) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        manager.call_service_sync("echo", "echo", kwargs={"value": "x" * 50})
        with pytest.raises(ValueError):
            manager.call_service_sync("echo", "fail", ("pa55word",))
    record, failed = records
    assert record.side == "client"  # type: ignore[attr-defined]
    assert record.call_args == [] and record.call_kwargs == {"value": "'xxxxxx..."}  # type: ignore[attr-defined]
    assert failed.call_args == ["'pa55word'"]  # type: ignore[attr-defined]
    assert failed.getMessage().endswith("ValueError: pa55word")


@pytest.mark.timeout(30)
def test_both_sides_and_per_service_override(records: list[logging.LogRecord]) -> None:
    config = {
        **NO_HEALTH,
        "call_log": {"enabled": True, "side": "both"},
        "services": {"quiet": {"class": "tests.observability.services:Echo", "call_log": {"enabled": False}}},
    }
    with kservice.ServiceEnvironment("l", config) as env:
        env.register_service("loud", Echo)
        manager = env.manager()
        manager.call_service_sync("loud", "echo", (1,))
        manager.call_service_sync("quiet", "echo", (1,))
    assert sorted((r.service, r.side) for r in records) == [("loud", "client"), ("loud", "server")]  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_a_failing_log_handler_does_not_fail_the_call(
    records: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise OSError("log disk full")

    broken = Broken()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(broken)
    try:
        with kservice.ServiceEnvironment("l", {**NO_HEALTH, "call_log": {"enabled": True}}) as env:
            task = env.register_service("echo", Echo)
            manager = env.manager()
            assert manager.call_service_sync("echo", "echo", (5,)) == 5
            assert manager.call_service_sync("echo", "echo", (6,)) == 6
            (log_middleware,) = [m for m in server_chain(task) if isinstance(m, CallLogMiddleware)]
            assert log_middleware.dropped == 2
    finally:
        logger.removeHandler(broken)


class Counted:
    """An argument element that counts how often its repr is taken."""

    reprs = 0

    def __repr__(self) -> str:
        Counted.reprs += 1
        return "<c>"


@pytest.mark.timeout(60)
def test_a_huge_argument_costs_only_the_repr_kept(records: list[logging.LogRecord]) -> None:
    # A 200-character record must not build the repr of a whole argument (seconds and gigabytes for a
    # large one): builtin containers, str and bytes are walked only as far as the kept prefix needs.
    config = {
        **NO_HEALTH,
        "call_log": {"enabled": True, "log_arguments": True, "max_argument_chars": 40, "side": "both"},
    }
    many = [Counted() for _ in range(20_000)]
    nested = {"key": ("x" * 1_000_000, [b"\x00" * 1_000_000])}
    with kservice.ServiceEnvironment("l", config) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        Counted.reprs = 0
        assert manager.call_service_sync("echo", "echo", (many,), kwargs={}, timeout=30) is not None
        taken = Counted.reprs
        manager.call_service_sync("echo", "echo", kwargs={"value": nested}, timeout=30)
        assert manager.call_service_sync("echo", "echo", ([Counted(), 1],), timeout=30)  # and it keeps serving
    assert taken <= 2 * 40, taken  # two sides, at most one repr per kept character (it was 2 x 20,000)
    assert len(records) == 6
    many_args = [r.call_args for r in records[:2]]  # type: ignore[attr-defined]
    assert many_args == [[repr(many)[:37] + "..."]] * 2
    nested_kwargs = [r.call_kwargs for r in records[2:4]]  # type: ignore[attr-defined]
    assert nested_kwargs == [{"value": repr(nested)[:37] + "..."}] * 2
    small = [r.call_args for r in records[4:]]  # type: ignore[attr-defined]
    assert small == [["[<c>, 1]"]] * 2
