"""Errors keep their types across pickling, and the core never imports Ray."""

from __future__ import annotations

import pickle

import pytest
from kservice import (
    ServiceCallError,
    ServiceNotFoundError,
    ServiceResponse,
    ServiceStoppedError,
    ServiceUnavailableError,
)
from kservice._errors import make_call_error

from tests.core.conftest import run_python


class AppError(Exception):
    """A user exception class importable by the caller."""


def test_service_call_error_round_trips_through_pickle_with_its_original_class() -> None:
    try:
        raise AppError("disk full")
    except AppError as exc:
        response = ServiceResponse.from_exception("r1", exc, origin="service").for_wire()
    assert response.exception is None
    assert response.error_type == f"{__name__}.AppError"
    wire = pickle.loads(pickle.dumps(response))
    error = wire.to_exception("svc", "write")
    assert isinstance(error, AppError) and isinstance(error, ServiceCallError)
    assert str(error) == "disk full" and "raise AppError" in error.remote_traceback
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, AppError) and again.remote_type == error.remote_type


def test_unknown_remote_class_is_a_plain_service_call_error() -> None:
    error = make_call_error("x", remote_type="somewhere_else.CustomError", remote_traceback="tb")
    assert type(error) is ServiceCallError and error.remote_type == "somewhere_else.CustomError"


def test_runtime_errors_are_rebuilt_by_name() -> None:
    for cls in (ServiceStoppedError, ServiceUnavailableError):
        response = ServiceResponse.from_exception("r", cls("gone"), origin="runtime").for_wire()
        error = pickle.loads(pickle.dumps(response)).to_exception()
        assert type(error) is cls and str(error) == "gone"
    not_found = pickle.loads(pickle.dumps(ServiceNotFoundError("kvv", ["kv"])))
    assert "did you mean 'kv'" in str(not_found)


@pytest.mark.timeout(60)
def test_loading_every_plugin_does_not_import_ray() -> None:
    result = run_python(
        """
        import sys, kservice
        from kservice._plugins import get_plugin_manager, transports, config_schema
        get_plugin_manager(); transports(); config_schema()
        env = kservice.ServiceEnvironment("e")
        env.register_service("d", dict)
        with env, kservice.ServiceManager(env) as m:
            m.call_service_sync("d", "get", ("k",))
        print("ray" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
