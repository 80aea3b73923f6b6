"""Values the other side cannot decode get an immediate, typed answer naming what and where (mmap transport).

Before, the receiver logged and dropped such a record and the caller waited
its whole timeout for a ServiceTimeoutError. Each test uses a 30 s timeout (the
default) and asserts the answer came within a few seconds, that it is typed,
and that the service serves the next call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kservice import ServiceCallError, ServiceEnvironment, ServiceFactory, ServiceManager, ServiceRequest
from kservice.plugins.mmap import codec
from kservice.plugins.mmap.ring import QueueEmpty, attach_queue, create_queue

from .services import KV, Bombs, LoadBomb, unique

pytestmark = pytest.mark.timeout(90)

NO_RETRIES = {"service_call": {"max_retries": 0}, "breaker": {"enabled": False}}
#: What the bug cost: the caller's full timeout. The answer must come far sooner.
TIMEOUT = 30.0
PROMPT = 8.0


@pytest.fixture
def kv() -> Iterator[tuple[ServiceEnvironment, ServiceManager, str]]:
    name = unique("kv")
    env = ServiceEnvironment("decode-faults", NO_RETRIES)
    env.register_service(name, ServiceFactory(name, KV), kind="process")
    with env:
        yield env, env.manager(), name


def _main_only_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class living in this process's ``__main__``, as in a script: another process cannot unpickle it."""

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    Point.__module__ = "__main__"
    Point.__qualname__ = Point.__name__ = "PointOnlyInTheCaller"
    monkeypatch.setattr(sys.modules["__main__"], "PointOnlyInTheCaller", Point, raising=False)
    return Point


def test_an_argument_the_host_cannot_decode_fails_the_call_at_once_and_the_host_keeps_serving(
    kv: tuple[ServiceEnvironment, ServiceManager, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manager, name = kv
    point = _main_only_class(monkeypatch)
    for attempt in ("sync", "async"):
        started = time.monotonic()
        with pytest.raises(ServiceCallError) as caught:
            if attempt == "sync":
                manager.call_service_sync(name, "echo", (point(1),), timeout=TIMEOUT)
            else:
                manager.call_service_async(name, "echo", (point(1),), timeout=TIMEOUT).result(TIMEOUT + 5)
        assert time.monotonic() - started < PROMPT, attempt
        error = caught.value
        assert isinstance(error, TypeError)
        message = str(error)
        assert "could not decode the arguments" in message and "on the host" in message, message
        assert "PointOnlyInTheCaller" in message and f"{name}.echo" in message, message
        assert "did not run" in message
        assert manager.call_service_sync(name, "echo", (attempt,)) == attempt


def test_a_result_the_caller_cannot_decode_fails_that_call_at_once_and_says_it_ran(
    kv: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    _, manager, name = kv
    for attempt in ("sync", "async", "sync"):  # the second sync call: the method now runs inline
        started = time.monotonic()
        with pytest.raises(ServiceCallError) as caught:
            if attempt == "sync":
                manager.call_service_sync(name, "host_only", (1,), timeout=TIMEOUT)
            else:
                manager.call_service_async(name, "host_only", (1,), timeout=TIMEOUT).result(TIMEOUT + 5)
        assert time.monotonic() - started < PROMPT, attempt
        assert isinstance(caught.value, TypeError)
        message = str(caught.value)
        assert "could not be decoded in the caller" in message and "kservice_host_only" in message, message
        assert "the call ran" in message
        assert manager.call_service_sync(name, "echo", (attempt,)) == attempt


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_value_whose_unpickling_raises_system_exit_fails_its_call_at_once_and_both_sides_go_on(kind: str) -> None:
    """Before: the receiving thread ended (a SystemExit or KeyboardInterrupt from unpickling passed the
    decoder's guard): an answer's ended the caller's response thread, so that call and every later async
    call of the process waited out its timeout; an argument's ended the host's listener."""
    name = unique("bombs")
    environment = ServiceEnvironment("decode-faults", NO_RETRIES)
    environment.register_service(name, ServiceFactory(name, Bombs), kind="process")
    with environment, ServiceManager(environment) as manager:
        for attempt in ("sync", "async", "async"):
            started = time.monotonic()
            with pytest.raises(ServiceCallError) as caught:  # an answer that goes off in the caller
                if attempt == "sync":
                    manager.call_service_sync(name, "bomb", (kind,), timeout=TIMEOUT)
                else:
                    manager.call_service_async(name, "bomb", (kind,), timeout=TIMEOUT).result(TIMEOUT + 5)
            assert "could not be decoded in the caller" in str(caught.value), caught.value
            with pytest.raises(ServiceCallError) as caught:  # an argument that goes off in the host
                if attempt == "sync":
                    manager.call_service_sync(name, "echo", (LoadBomb(kind),), timeout=TIMEOUT)
                else:
                    manager.call_service_async(name, "echo", (LoadBomb(kind),), timeout=TIMEOUT).result(TIMEOUT + 5)
            assert "could not decode the arguments" in str(caught.value), caught.value
            assert time.monotonic() - started < PROMPT, attempt
            assert manager.call_service_async(name, "echo", (attempt,), timeout=TIMEOUT).result(TIMEOUT) == attempt
            assert manager.call_service_sync(name, "echo", (attempt,), timeout=TIMEOUT) == attempt


def test_in_a_batch_of_responses_only_the_undecodable_ones_fail(
    kv: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    _, manager, name = kv
    for method in ("echo", "host_only"):  # measured fast: from now on both run inline, answered in batches
        for _ in range(3):
            try:
                manager.call_service_sync(name, method, (0,), timeout=TIMEOUT)
            except ServiceCallError:
                pass
    started = time.monotonic()
    futures = [
        manager.call_service_async(name, "host_only" if i % 3 == 0 else "echo", (i,), timeout=TIMEOUT)
        for i in range(300)
    ]
    for i, future in enumerate(futures):
        if i % 3 == 0:
            error = future.exception(TIMEOUT + 5)
            assert isinstance(error, ServiceCallError) and isinstance(error, TypeError), error
            assert "could not be decoded in the caller" in str(error)
        else:
            assert future.result(TIMEOUT + 5) == i
    assert time.monotonic() - started < PROMPT
    assert manager.call_service_sync(name, "echo", ("after",)) == "after"


def _answer_to(manager: ServiceManager, name: str, request: ServiceRequest, record_of: Any, missing: str) -> Any:
    """The host's answer to a hand-made request record: ``record_of(encoded)`` turns the request's
    ordinary encoding into what is sent; fails with ``missing`` when no answer comes promptly."""
    target = manager.get_service_queue(name).queue_name  # type: ignore[attr-defined]
    ring = attach_queue(target)
    replies = create_queue(unique("rsp.test"), 1 << 16)
    try:
        record, _ = codec.encode_request(request, replies.name, ring.owner_pid, 1 << 16)
        ring.put(record_of(record), 5)
        try:
            reply = replies.get(PROMPT)
        except QueueEmpty:
            pytest.fail(missing)
        [message] = codec.decode_many(reply)
        return codec.response_from_message(message)
    finally:
        ring.close()
        replies.close()
        replies.unlink()


def test_a_request_with_fields_of_the_wrong_type_is_answered_naming_them(
    kv: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    _, manager, name = kv
    request = ServiceRequest("bad-1", name, 12345, ("x",), {}, deadline=time.time() + TIMEOUT)  # type: ignore[arg-type]
    response = _answer_to(
        manager,
        name,
        request,
        lambda record: record,
        "the host did not answer a request whose method name is not a str",
    )
    assert response.request_id == "bad-1" and not response.success
    assert response.error_type == "TypeError"
    assert "the method name is a int" in (response.error or "")
    assert response.metadata.get("kservice.retryable") is False
    assert manager.call_service_sync(name, "echo", (1,)) == 1


def test_a_record_of_a_kind_the_host_does_not_know_is_answered_not_dropped(
    kv: tuple[ServiceEnvironment, ServiceManager, str],
) -> None:
    """As a newer kservice might send: the host answers at once (nothing ran) and keeps serving."""
    import pickle

    def of_an_unknown_kind(record: bytes) -> bytes:
        message = pickle.loads(record)
        assert message[0] == codec.KIND_CALL
        return pickle.dumps((99, *message[1:]), 5)  # the same envelope, a kind no host knows

    _, manager, name = kv
    request = ServiceRequest("newer-1", name, "put", ("k", 1), {}, deadline=time.time() + TIMEOUT)
    response = _answer_to(
        manager,
        name,
        request,
        of_an_unknown_kind,
        "the host dropped a record of an unknown kind: its caller would wait its whole timeout",
    )
    assert response.request_id == "newer-1" and not response.success
    assert response.error_type == "TypeError"
    assert "does not know record kind 99" in (response.error or "") and "nothing ran" in (response.error or "")
    assert response.metadata.get("kservice.retryable") is False
    with pytest.raises(KeyError):  # nothing ran: the put never stored its key
        manager.call_service_sync(name, "get", ("k",))
    assert manager.call_service_sync(name, "echo", (1,)) == 1


def test_lenient_decoding_recovers_the_envelope_of_a_request_only_its_sender_can_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    point = _main_only_class(monkeypatch)
    request = ServiceRequest("rid-7", "svc", "echo", (point(1),), {}, deadline=time.time() + 5)
    record, _ = codec.encode_request(request, "rsp.somewhere", 0, 1 << 16)
    monkeypatch.delattr(sys.modules["__main__"], "PointOnlyInTheCaller")  # as in the host: the class is not there
    with pytest.raises(codec.DecodeError, match="PointOnlyInTheCaller") as caught:
        codec.decode_request(record)
    error = caught.value
    assert (error.request_id, error.response_queue, error.service_name, error.method_name) == (
        "rid-7",
        "rsp.somewhere",
        "svc",
        "echo",
    )
