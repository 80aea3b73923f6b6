"""Environment middleware runs its service-side hooks inside a `process` task's child."""

from __future__ import annotations

import os
import time
from typing import Any

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


#: What SlowObserver saw, in the host process (read back through Observed.observed).
OBSERVED: list[tuple[Any, float]] = []
OBSERVER_SECONDS = 2.0


class SlowObserver(ServiceMiddleware):
    """Server side: takes OBSERVER_SECONDS to observe a call whose argument is "slow" (an exporter that stalls),
    and raises observing one whose argument is "boom" (an exporter that fails)."""

    def observe_handle(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        if request.args[:1] == ("slow",):
            time.sleep(OBSERVER_SECONDS)
        if request.args[:1] == ("boom",):
            raise RuntimeError("the exporter is down")
        OBSERVED.append((request.args, seconds))


class Observed:
    def echo(self, value: Any) -> Any:
        return value

    def observed(self) -> list[tuple[Any, float]]:
        return list(OBSERVED)


@pytest.mark.timeout(120)
def test_a_call_run_on_the_listener_thread_is_answered_before_the_server_observers_run() -> None:
    # A generous inline limit: a warm-up call preempted on a busy machine must not send echo to the pool.
    with ServiceEnvironment("mw-observe", {"mmap": {"inline_limit": 0.1}}) as env:
        env.add_middleware(SlowObserver())
        env.register_service("obs", ServiceFactory("obs", Observed), kind="process")
        with ServiceManager(env) as manager:
            for _ in range(5):  # the host learns echo is fast: it runs on the listener thread from now on
                assert manager.call_service_sync("obs", "echo", ("warm",)) == "warm"
            began = time.monotonic()
            assert manager.call_service_sync("obs", "echo", ("slow",)) == "slow"
            answered = time.monotonic() - began
            # The listener observes before it reads its next record: this call sees the slow one observed.
            seen = manager.call_service_sync("obs", "observed", timeout=30)
            waited = time.monotonic() - began
            # An observer that raises after the answer left changes nothing: the answer, the next call.
            assert manager.call_service_sync("obs", "echo", ("boom",)) == "boom"
            assert manager.call_service_sync("obs", "echo", ("after",)) == "after"
            assert manager.call_service_sync("obs", "observed")[-1][0] == ("after",)
    assert answered < OBSERVER_SECONDS / 2, f"the answer waited for the observer ({answered:.2f} s)"
    assert waited >= OBSERVER_SECONDS
    assert [args for args, _ in seen] == [("warm",)] * 5 + [("slow",)]
    # The observed duration is the call's own (method and middleware), not the observer's.
    assert seen[-1][1] < OBSERVER_SECONDS / 2


#: A main script (run as ``python script.py``) whose middleware classes live in ``__main__``.
MAIN_SCRIPT = """
import json, os, sys
from kservice import ConfigError, ServiceEnvironment, ServiceFactory, ServiceMiddleware, ServiceUnavailableError
from tests.mmap.services import KV


class MarkCaller(ServiceMiddleware):
    # Caller's side only: nothing of it needs to reach the host.
    def before_call(self, request):
        request.metadata["from-main"] = True
        return None


class StampHost(ServiceMiddleware):
    # Service's side: it would have to run in the host, which cannot import __main__.
    def after_handle(self, response, request):
        return response


out = {}
with ServiceEnvironment("main-mw") as env:
    env.add_middleware(MarkCaller())
    env.register_service("kv", ServiceFactory("kv", KV), kind="process")
    manager = env.manager()
    out["tags"] = manager.call_service_sync("kv", "tag", ("x",), timeout=30)
    out["host_pid"] = env.get_task("kv").pid
    env.add_middleware(StampHost())
    try:
        env.register_service("kv2", ServiceFactory("kv2", KV), kind="process")
    except (ConfigError, ServiceUnavailableError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__
        out["cause"] = "" if cause is None else type(cause).__name__
    out["kv2_state"] = env.get_task("kv2").state if env.get_task("kv2") is not None else None
    out["still_serving"] = manager.call_service_sync("kv", "echo", (7,), timeout=30)
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_middleware_defined_in_the_main_script_client_only_stays_here_service_side_is_a_clear_start_error(
    tmp_path: Any,
) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import clean_environ

    repo = Path(__file__).resolve().parents[2]
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    environ = clean_environ()
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=100
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # The caller-side middleware ran here and the host started without it.
    assert "from-main" in out["tags"] and "x" in out["tags"], out
    assert out["host_pid"] and out["host_pid"] != done.returncode
    # The service-side one: a start error naming the class, where it is and what to do.
    error = out.get("error", "")
    assert "StampHost" in error and "__main__" in error and "importable module" in error, out
    assert "Can't get attribute" not in error, out
    assert out["kv2_state"] in (None, "failed"), out
    assert out["still_serving"] == 7, "the environment's other service kept serving"


@pytest.mark.timeout(120)
def test_a_service_side_middleware_whose_module_the_host_cannot_import_fails_the_start_naming_it() -> None:
    import sys
    import types

    from kservice import ServiceUnavailableError

    # A module that exists only in this process (built at run time, as a notebook's or a plugin loader's are).
    module = types.ModuleType("kservice_test_ghost_middleware")
    exec(
        "from kservice import ServiceMiddleware\n"
        "class Ghost(ServiceMiddleware):\n"
        "    def after_handle(self, response, request):\n"
        "        return response\n",
        module.__dict__,
    )
    sys.modules[module.__name__] = module
    try:
        with ServiceEnvironment("ghost-mw") as env:
            env.add_middleware(module.Ghost())
            with pytest.raises(ServiceUnavailableError) as failed:
                env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
            message = str(failed.value)
            assert "kservice_test_ghost_middleware.Ghost" in message and "importable module" in message, message
            env.register_service("local-kv", ServiceFactory("local-kv", KeyValue, ({"a": 2},)))
            with ServiceManager(env) as manager:
                assert manager.call_service_sync("local-kv", "get", ("a",)) == 2, "the environment keeps serving"
    finally:
        del sys.modules[module.__name__]


class LockedGuard(ServiceMiddleware):
    """A service-side guard holding a lock: it cannot be pickled, so it cannot reach the host."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()

    def before_handle(self, request: Any) -> Any:
        return None


@pytest.mark.timeout(120)
def test_a_service_side_middleware_that_cannot_be_pickled_fails_the_start_naming_it() -> None:
    """Its hooks would silently not run in the host (a guard skipped): a start error, not a warning."""
    import warnings

    from kservice import ConfigError, ServiceUnavailableError

    with ServiceEnvironment("locked-mw") as env:
        env.add_middleware(LockedGuard())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # before: a RuntimeWarning, and the host started without the guard
            with pytest.raises((ConfigError, ServiceUnavailableError)) as failed:
                env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
        message = str(failed.value)
        assert "LockedGuard" in message and "cannot be pickled" in message and "before_handle" in message, message
        env.register_service("local-kv", ServiceFactory("local-kv", KeyValue, ({"a": 2},)))
        with ServiceManager(env) as manager:
            assert manager.call_service_sync("local-kv", "get", ("a",)) == 2, "the environment keeps serving"
