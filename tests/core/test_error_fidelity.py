"""A method's exception reaches the caller with its arguments and attributes, on every transport.

``except KeyError as e: e.args[0]`` and ``except HTTPError as e: e.code`` work as
they would around a local call; before, only the type and the message crossed
a process (``e.args[0]`` was the message, ``"'k'"`` for ``KeyError('k')``, and
attributes were missing).
"""

from __future__ import annotations

import pickle
import sys
import threading
import types
from collections.abc import Iterator

import pytest
from kservice import ServiceCallError, ServiceEnvironment, ServiceFactory, ServiceManager, ServiceResponse

from tests.core.services import CodedError, LockedError, NeedsArguments, Raiser

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["local", "process"])
def manager(request: pytest.FixtureRequest) -> Iterator[ServiceManager]:
    env = ServiceEnvironment("errors", {"service_call": {"max_retries": 0}})
    env.register_service("raiser", ServiceFactory("raiser", Raiser), kind=request.param)
    with env, ServiceManager(env) as manager:
        yield manager


def test_a_methods_exception_keeps_its_arguments_and_attributes(manager: ServiceManager) -> None:
    with pytest.raises(CodedError) as coded:
        manager.call_service_sync("raiser", "coded", (404, "missing"))
    error = coded.value
    assert isinstance(error, ServiceCallError)
    assert (error.code, error.detail, error.args) == (404, "missing", (404, "missing"))
    assert str(error) == "404: missing"
    assert (error.service_name, error.method_name) == ("raiser", "coded")

    with pytest.raises(KeyError) as missing:
        manager.call_service_async("raiser", "missing", ("k",)).result(30)
    assert missing.value.args == ("k",) and str(missing.value) == "'k'"


def test_built_in_exceptions_keep_the_fields_they_keep_outside_their_arguments(manager: ServiceManager) -> None:
    missing = "/nonexistent/kservice-test/file"
    with pytest.raises(FileNotFoundError) as opened:
        manager.call_service_sync("raiser", "open_missing", (missing,))
    error = opened.value
    assert (error.errno, error.strerror, error.filename) == (2, "No such file or directory", missing)
    assert str(error) == f"[Errno 2] No such file or directory: '{missing}'"
    with pytest.raises(UnicodeDecodeError) as decoding:
        manager.call_service_sync("raiser", "decode", (b"ok\xff",))
    bad = decoding.value
    assert (bad.encoding, bad.object, bad.start, bad.end) == ("utf-8", b"ok\xff", 2, 3)
    assert bad.reason == "invalid start byte"


def test_an_exception_whose_state_cannot_travel_still_arrives_typed_with_its_message(manager: ServiceManager) -> None:
    with pytest.raises(LockedError, match="held a lock") as locked:
        manager.call_service_sync("raiser", "locked", ("held a lock",))
    assert locked.value.args == ("held a lock",)
    (failed,) = list(manager.map("raiser", "coded", [(500, "in a map")], return_exceptions=True))
    assert isinstance(failed, CodedError) and failed.code == 500 and failed.args == (500, "in a map")
    with pytest.raises(KeyError):
        manager.call_service_sync("raiser", "missing", ("next",))  # the service keeps serving


def test_attributes_the_caller_cannot_unpickle_leave_the_arguments_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    # A class only the service's process has: its instances, pickled there, do not load here.
    module = types.ModuleType("only_in_the_service")
    exec("class Detail:\n    pass\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "only_in_the_service", module)
    error = CodedError(409, "conflict")
    error.detail = module.Detail()  # type: ignore[assignment]
    wire = ServiceResponse.from_exception("r-1", error, origin="service").for_wire()
    monkeypatch.delitem(sys.modules, "only_in_the_service")
    rebuilt = wire.to_exception("raiser", "coded")
    assert isinstance(rebuilt, CodedError) and rebuilt.args == (409, "conflict")
    assert not hasattr(rebuilt, "detail")  # the attributes that did not load are left out, not the arguments


def test_a_caught_error_pickled_again_keeps_its_arguments_and_attributes(manager: ServiceManager) -> None:
    # A caught error returned as a value, put on a queue or relayed by Ray is pickled a second time:
    # what it was given back (the original's args and attributes) goes with it.
    with pytest.raises(CodedError) as coded:
        manager.call_service_sync("raiser", "coded", (404, "missing"))
    caught = coded.value
    caught.held = threading.Lock()  # type: ignore[attr-defined]  # an attribute that cannot be pickled
    again = pickle.loads(pickle.dumps(caught))
    assert isinstance(again, CodedError) and isinstance(again, ServiceCallError)
    assert (again.code, again.detail, again.args) == (404, "missing", (404, "missing"))
    assert str(again) == "404: missing"
    assert (again.remote_type, again.service_name, again.method_name) == (
        caught.remote_type,
        "raiser",
        "coded",
    )
    assert again.remote_traceback == caught.remote_traceback
    assert not hasattr(again, "held")  # left out, not a pickling error


@pytest.mark.timeout(60)
def test_an_exception_group_arrives_as_a_group_and_an_async_call_of_it_completes(manager: ServiceManager) -> None:
    # ExceptionGroup's __new__ takes its message and exceptions: building the caller's error without them
    # raised TypeError in the reply path, so a sync call failed with that and an async call never completed.
    with pytest.raises(ExceptionGroup) as grouped:
        manager.call_service_sync("raiser", "group", ("two failed",))
    group = grouped.value
    assert isinstance(group, ServiceCallError) and str(group) == "two failed (2 sub-exceptions)"
    assert [type(e) for e in group.exceptions] == [ValueError, KeyError]
    assert group.message == "two failed" and group.args[0] == "two failed"
    try:
        raise group
    except* ValueError as values:  # except* splits the group as it would the original
        assert [str(e) for e in values.exceptions] == ["bad value"]
    except* KeyError:
        pass
    again = pickle.loads(pickle.dumps(group))
    assert isinstance(again, ExceptionGroup) and [type(e) for e in again.exceptions] == [ValueError, KeyError]
    future = manager.call_service_async("raiser", "group", ("async",), timeout=5)
    with pytest.raises(ExceptionGroup):
        future.result(10)  # completed with the error, well before this wait ends


@pytest.mark.timeout(60)
def test_an_exception_that_cannot_be_rebuilt_as_its_type_still_completes_the_call_with_its_message(
    manager: ServiceManager,
) -> None:
    # A group whose members cannot travel, across a process, cannot be rebuilt as a group: a ServiceCallError.
    future = manager.call_service_async("raiser", "unpicklable_group", ("held a lock",), timeout=5)
    with pytest.raises(ServiceCallError, match="held a lock") as caught:
        future.result(10)
    assert caught.value.remote_type == "ExceptionGroup"
    with pytest.raises(NeedsArguments) as needs:
        manager.call_service_sync("raiser", "needs_arguments", (7,))
    assert needs.value.code == 7 and needs.value.args == (7, "refused")
    assert manager.call_service_sync("raiser", "decode", (b"ok",)) == "ok"  # the service keeps serving
