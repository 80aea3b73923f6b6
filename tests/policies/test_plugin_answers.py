"""What plugins answer the manager: a retry policy that raises, and hook answers that are not what the hook returns.

A policy or a hook answer is plugin code the manager runs on every call's
path. A bug there must end each call with its own outcome by its deadline
(never a future that stays pending), and a wrong answer must be an error
naming the hook, not a call that silently runs without the plugin.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kservice
import pytest
from kservice import PluginError, ServiceCallError, ServiceEnvironment, ServiceManager, hookimpl

from tests.policies.services import Flaky

pytestmark = pytest.mark.timeout(60)


class BuggyPolicy:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error or ValueError("a bug in the policy")

    def should_retry(self, request: Any, response: Any, attempt: int, idempotent: bool) -> float | None:
        raise self.error


class AsyncPolicy:
    async def should_retry(self, request: Any, response: Any, attempt: int, idempotent: bool) -> float | None:
        return 0.01


class Answers:
    """A plugin answering the manager's hooks with whatever a test sets."""

    def __init__(self) -> None:
        self.policy: Any = None
        self.middleware: Any = None
        self.addresses: Any = None
        self.known: Any = None

    @hookimpl(tryfirst=True)
    def kservice_retry_policy(self, service_name: str, options: Any) -> Any:
        return self.policy if service_name in ("kv", "flaky") else None

    @hookimpl
    def kservice_middleware(self, service_name: str, options: Any) -> Any:
        return self.middleware if service_name == "kv" else None

    @hookimpl
    def kservice_resolve_service(self, service_name: str, options: Any, manager: Any) -> Any:
        return self.addresses if service_name == "elsewhere" else None

    @hookimpl
    def kservice_known_services(self) -> Any:
        return self.known


@pytest.fixture
def answers() -> Iterator[Answers]:
    plugin = Answers()
    pm = kservice.get_plugin_manager()
    pm.register(plugin, name="test-answers")
    try:
        yield plugin
    finally:
        pm.unregister(name="test-answers")


@pytest.fixture
def env() -> Iterator[ServiceEnvironment]:
    environment = ServiceEnvironment("answers")
    environment.register_service("kv", dict)
    environment.register_service("other", dict)
    with environment:
        yield environment


@pytest.mark.parametrize(
    ("error", "named"),
    [
        (ValueError("a bug in the policy"), "ValueError: a bug in the policy"),
        # Before: SystemExit went through the policy's guard (in the connection's response thread, for
        # an async call: the call then waited out its deadline and was reported held by the policy).
        (SystemExit("policy exits"), "SystemExit: policy exits"),
    ],
)
def test_a_retry_policy_that_raises_leaves_each_call_its_own_outcome_by_its_deadline(
    answers: Answers, env: ServiceEnvironment, error: BaseException, named: str
) -> None:
    answers.policy = BuggyPolicy(error)
    with ServiceManager(env) as manager:
        # Before: the sync call raised the policy's bare ValueError instead of its own KeyError.
        with pytest.warns(RuntimeWarning, match=rf"retry policy .*BuggyPolicy.* raised {named}"):
            with pytest.raises(ServiceCallError) as raised:
                manager.call_service_sync("kv", "pop", ("missing",), timeout=5)
        assert isinstance(raised.value, KeyError)
        # Before: the async call's future never completed (its deadline passed, the timer polled it forever).
        began = time.monotonic()
        future = manager.call_service_async("kv", "pop", ("missing",), timeout=1)
        with pytest.warns(RuntimeWarning, match="BuggyPolicy"):
            error = future.exception(timeout=10)
        assert isinstance(error, KeyError), error
        assert time.monotonic() - began < 5
        manager.call_service_sync("kv", "update", ({"a": 1},))
        assert manager.call_service_sync("kv", "get", ("a",)) == 1  # the service keeps serving


def test_a_retry_policy_that_raises_runs_an_idempotent_call_once_by_its_deadline(answers: Answers) -> None:
    answers.policy = BuggyPolicy()
    flaky = Flaky()
    environment = ServiceEnvironment("answers-flaky")
    environment.register_service("flaky", kservice.ServiceFactory("flaky", lambda: flaky), kind="local")
    with environment, ServiceManager(environment) as manager:
        # A method a working policy would retry (idempotent, a ConnectionError): the policy's bug means no retry.
        with pytest.warns(RuntimeWarning, match="BuggyPolicy"), pytest.raises(ConnectionError):
            manager.call_service_sync("flaky", "fail_idempotent", timeout=5)
        began = time.monotonic()
        with pytest.warns(RuntimeWarning, match="BuggyPolicy"):
            error = manager.call_service_async("flaky", "fail_idempotent", timeout=2).exception(timeout=10)
        assert isinstance(error, ConnectionError), error
        assert time.monotonic() - began < 2.5
        assert flaky.calls["fail_idempotent"] == 2  # one run per call


@pytest.mark.parametrize(
    ("hook", "answer", "fragment"),
    [
        ("kservice_retry_policy", 5, "should_retry"),
        ("kservice_retry_policy", "retry please", "should_retry"),
        # Before: accepted; every failed attempt's warning named a coroutine as "no delay".
        ("kservice_retry_policy", AsyncPolicy(), "not async def"),
        ("kservice_middleware", 5, "ServiceMiddleware"),
        ("kservice_middleware", ["not middleware"], "ServiceMiddleware"),
    ],
)
def test_a_hook_answer_that_is_no_policy_or_middleware_is_a_plugin_error_naming_the_hook(
    answers: Answers, env: ServiceEnvironment, hook: str, answer: Any, fragment: str
) -> None:
    if hook == "kservice_retry_policy":
        answers.policy = answer
    else:
        answers.middleware = answer
    with ServiceManager(env) as manager:
        # Before: accepted; the call ran without the plugin (middleware), or crashed at its first failure (policy).
        with pytest.raises(PluginError) as raised:
            manager.call_service_sync("kv", "get", ("a",))
        message = str(raised.value)
        assert hook in message and fragment in message and "test-answers" in message, message
        assert manager.call_service_sync("other", "get", ("a", 2)) == 2  # the other services are unaffected


@pytest.mark.parametrize("answer", [5, "mmap://kv", [None], ["kv"]])
def test_a_resolver_answer_that_is_no_list_of_addresses_is_a_plugin_error_naming_the_hook(
    answers: Answers, answer: Any
) -> None:
    answers.addresses = answer
    with ServiceManager() as manager:
        # Before: a bare TypeError or AttributeError ('int' object is not iterable, ... has no attribute 'transport').
        with pytest.raises(PluginError) as raised:
            manager.call_service_sync("elsewhere", "get", ("a",), timeout=5)
        message = str(raised.value)
        assert "kservice_resolve_service" in message and "ServiceAddress" in message, message
        assert "test-answers" in message, message


def test_a_middleware_answer_that_is_no_middleware_fails_the_services_start_naming_the_plugin(
    answers: Answers,
) -> None:
    environment = ServiceEnvironment("answers-start")
    environment.register_service("kv", dict)
    environment.register_service("other", dict)
    with environment:
        task = environment.get_task("kv")
        assert task is not None
        task.stop_service()
        answers.middleware = 5
        # Before: the task started and served without the plugin's middleware, without a word.
        with pytest.raises(
            kservice.ServiceUnavailableError,
            match=r"failed to start: PluginError: kservice plugin 'test-answers': its kservice_middleware answered int 5",
        ):
            task.start_service()
        with ServiceManager(environment) as manager:
            assert manager.call_service_sync("other", "get", ("a", 3)) == 3


def test_a_known_services_answer_that_is_no_list_of_names_is_a_plugin_error_naming_the_hook(answers: Answers) -> None:
    answers.known = 5
    with ServiceManager() as manager:
        # Before: the call to an unknown name raised a bare TypeError ('int' object is not iterable).
        with pytest.raises(PluginError, match=r"plugin 'test-answers': its kservice_known_services answered int 5"):
            manager.call_service_sync("nowhere", "get", timeout=5)
        answers.known = ["billing"]
        with pytest.raises(kservice.ServiceNotFoundError, match="billing"):
            manager.call_service_sync("nowhere", "get", timeout=5)


class HangingPolicy:
    """A policy that blocks on its first question (it asks a rate limiter that stopped answering)."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.asked = threading.Event()

    def should_retry(self, request: Any, response: Any, attempt: int, idempotent: bool) -> float | None:
        self.asked.set()
        self.release.wait(30)
        return None


def test_a_retry_policy_that_hangs_leaves_an_async_call_its_timeout_by_its_deadline(
    answers: Answers, env: ServiceEnvironment
) -> None:
    policy = answers.policy = HangingPolicy()
    try:
        with ServiceManager(env) as manager:
            began = time.monotonic()
            # Before: the policy held the call's claim, and its future never completed.
            future = manager.call_service_async("kv", "pop", ("missing",), timeout=1)
            assert policy.asked.wait(5)
            error = future.exception(timeout=10)
            assert time.monotonic() - began < 3
            assert isinstance(error, kservice.ServiceTimeoutError), error
            assert "HangingPolicy.should_retry" in str(error), error
            assert error.may_have_run is True
    finally:
        policy.release.set()
