"""The breaker plugin: opening, failing fast, half-open probes, what counts, status."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import time
import traceback
from collections.abc import Iterator
from typing import Any

import kservice
import pytest
from kservice import CallBatch, ServiceEnvironment, ServiceRequest, ServiceResponse
from kservice.keys import AT_CAPACITY
from kservice.plugins.breaker import CircuitBreaker, CircuitOpenError, breaker_state, breaker_status, reset_breaker

from tests.cli.helpers import KV_TARGET, start_host, stop_host
from tests.policies.conftest import chain_of
from tests.policies.services import Flaky


def settings(**over: Any) -> dict[str, Any]:
    return {**kservice.Config.load({}).get("breaker"), **over}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


_ids = iter(range(1_000_000))


def req() -> ServiceRequest:
    return ServiceRequest(f"r{next(_ids)}", "svc", "m")


OK = ServiceResponse(True, 1)
DOWN = ServiceResponse(False, None, "down", error_type="ServiceUnavailableError", error_origin="runtime")
TIMEOUT = ServiceResponse(False, None, "late", error_type="ServiceTimeoutError", error_origin="runtime")
RAISED = ServiceResponse(False, None, "k", error_type="KeyError", error_origin="service")


def call(breaker: CircuitBreaker, outcome: ServiceResponse) -> ServiceResponse:
    """One call through the breaker as the chain runs it: before, (service), after."""
    request = req()
    rejected = breaker.before_call(request)
    if rejected is not None:
        return rejected
    breaker.after_call(outcome, request)
    return outcome


# ------------------------------------------------------------------ unit


@pytest.mark.timeout(10)
def test_consecutive_failures_open_and_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker("svc", settings(failure_threshold=3), clock=Clock())
    for outcome in (DOWN, DOWN, OK, DOWN, DOWN):
        call(breaker, outcome)
    assert breaker.state == "closed"
    call(breaker, TIMEOUT)
    assert breaker.state == "open"
    rejected = call(breaker, OK)
    assert rejected.error_type == "CircuitOpenError" and isinstance(rejected.exception, CircuitOpenError)
    assert isinstance(rejected.exception, kservice.ServiceUnavailableError)
    assert rejected.metadata["kservice.retryable"] is False


@pytest.mark.timeout(10)
def test_each_rejection_is_a_complete_circuit_open_error_of_its_own() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", settings(failure_threshold=1, cooldown=5.0), clock=clock)
    call(breaker, DOWN)
    request = req()
    first, second = breaker.before_call(request), breaker.before_call(req())
    assert first is not None and second is not None
    assert first.request_id == request.request_id and not first.success
    assert (first.error_type, first.error_origin) == ("CircuitOpenError", "runtime")
    error = first.exception
    assert type(error) is CircuitOpenError and error is not second.exception  # callers may annotate and raise it
    assert error.args == (first.error,) and str(error) == first.error
    assert "'svc' is open after ServiceUnavailableError: down" in first.error
    assert error.probe_at == pytest.approx(105.0)
    assert first.metadata == {"kservice.retryable": False, "kservice.circuit_open": True}
    assert first.metadata is not second.metadata
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is CircuitOpenError and restored.args == error.args and restored.probe_at == error.probe_at
    assert CircuitOpenError("built by hand", 3.0).probe_at == 3.0 and CircuitOpenError("m").probe_at == 0.0
    # Raised in a service that called through its own open breaker, it reaches that service's caller rebuilt by
    # name, with its attributes (in process, and from another process through the response's metadata).
    response = ServiceResponse.from_exception("r", error, origin="service")
    for relayed in (response.to_exception("svc", "m"), response.for_wire().to_exception("svc", "m")):
        assert isinstance(relayed, CircuitOpenError) and isinstance(relayed, kservice.ServiceCallError)
        assert relayed.probe_at == pytest.approx(105.0) and relayed.args == error.args
    assert breaker.snapshot()["rejected_total"] == 2


@pytest.mark.timeout(10)
def test_half_open_probe_closes_on_success_and_reopens_on_failure() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", settings(failure_threshold=1, cooldown=5.0, half_open_probes=2), clock=clock)
    call(breaker, DOWN)
    assert breaker.state == "open"
    clock.now += 4.9
    assert call(breaker, OK).error_type == "CircuitOpenError"  # still cooling down
    clock.now += 0.2
    first, second = req(), req()
    assert breaker.before_call(first) is None and breaker.before_call(second) is None  # two probes out
    assert breaker.state == "half_open"
    assert breaker.before_call(req()) is not None  # a third call is not a probe: rejected
    breaker.after_call(OK, first)
    assert breaker.state == "half_open"  # one of two probes succeeded
    breaker.after_call(OK, second)
    assert breaker.state == "closed"
    call(breaker, DOWN)
    clock.now += 5.0
    probe = req()
    assert breaker.before_call(probe) is None
    breaker.after_call(TIMEOUT, probe)
    assert breaker.state == "open"
    assert breaker.snapshot()["retry_after"] == pytest.approx(5.0)  # the cool-down starts again
    assert breaker.snapshot()["opened_total"] == 3


AT_CAPACITY_REFUSAL = ServiceResponse(
    False,
    None,
    "full",
    error_type="ServiceOverloadedError",
    error_origin="runtime",
    metadata={kservice.MAY_HAVE_RUN: False, AT_CAPACITY: True},
)
RING_FULL = ServiceResponse(False, None, "never sent", error_type="ServiceOverloadedError", error_origin="runtime")


@pytest.mark.timeout(10)
def test_refusals_at_the_admission_limit_count_neither_way_and_free_a_probe_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", settings(failure_threshold=2, cooldown=1.0), clock=clock)
    for outcome in (DOWN, AT_CAPACITY_REFUSAL, AT_CAPACITY_REFUSAL, AT_CAPACITY_REFUSAL):
        call(breaker, outcome)
    assert breaker.state == "closed"  # no failure: the service answered at capacity
    call(breaker, DOWN)
    assert breaker.state == "open"  # nor a success: the run of failures went on
    clock.now += 1.0
    probe = req()
    assert breaker.before_call(probe) is None
    assert breaker.before_call(req()) is not None  # one probe at a time
    breaker.after_call(AT_CAPACITY_REFUSAL, probe)
    assert breaker.state == "half_open"  # no verdict
    second = req()
    assert breaker.before_call(second) is None, "the refused probe's slot was freed at once"
    breaker.after_call(OK, second)
    assert breaker.state == "closed"
    call(breaker, RING_FULL)
    call(breaker, RING_FULL)
    assert breaker.state == "open", "an overload the caller's transport saw (the host not reading) still counts"


@pytest.mark.timeout(10)
def test_a_chunk_of_a_map_counts_refusals_at_the_admission_limit_neither_way() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", settings(failure_threshold=3, cooldown=1.0), clock=clock)
    batch = CallBatch("svc", "m", 5, "b1")
    batch.failures = {0: DOWN, 1: AT_CAPACITY_REFUSAL, 2: DOWN, 3: AT_CAPACITY_REFUSAL}
    breaker.after_batch(batch)  # DOWN, -, DOWN, -, OK: the success at the end ends the run
    assert breaker.state == "closed" and breaker.snapshot()["consecutive_failures"] == 0
    batch = CallBatch("svc", "m", 4, "b2")
    batch.failures = {0: DOWN, 1: AT_CAPACITY_REFUSAL, 2: DOWN, 3: AT_CAPACITY_REFUSAL}
    breaker.after_batch(batch)  # two failures in a row, refusals between and after
    assert breaker.state == "closed" and breaker.snapshot()["consecutive_failures"] == 2
    call(breaker, DOWN)
    assert breaker.state == "open"
    clock.now += 1.0
    probe = CallBatch("svc", "m", 2, "b3")
    assert breaker.admit_batch(probe) is None
    probe.failures = {0: AT_CAPACITY_REFUSAL, 1: AT_CAPACITY_REFUSAL}
    breaker.after_batch(probe)
    assert breaker.state == "half_open"
    assert breaker.admit_batch(CallBatch("svc", "m", 1, "b4")) is None, "the refused chunk's probe slot was freed"


@pytest.mark.timeout(10)
def test_a_lost_probe_is_given_up_after_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", settings(failure_threshold=1, cooldown=1.0), clock=clock)
    call(breaker, DOWN)
    clock.now += 1.0
    assert breaker.before_call(req()) is None  # the probe's outcome never comes back (cancelled)
    assert breaker.before_call(req()) is not None
    clock.now += 1.0
    assert breaker.before_call(req()) is None  # a new probe


@pytest.mark.timeout(10)
def test_late_outcomes_of_calls_admitted_before_opening_are_ignored() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", settings(failure_threshold=1, cooldown=1.0), clock=clock)
    early = req()
    assert breaker.before_call(early) is None
    call(breaker, DOWN)
    clock.now += 1.0
    probe = req()
    assert breaker.before_call(probe) is None
    breaker.after_call(OK, early)  # not the probe: does not close it
    assert breaker.state == "half_open"
    breaker.after_call(OK, probe)
    assert breaker.state == "closed"


@pytest.mark.timeout(10)
def test_failure_rate_over_a_window_needs_minimum_calls() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        "svc", settings(failure_threshold=1000, failure_rate=0.5, minimum_calls=10, window=10.0), clock=clock
    )
    for _ in range(4):
        call(breaker, DOWN)
        call(breaker, OK)
    assert breaker.state == "closed"  # 50% but only 8 calls
    call(breaker, OK)
    call(breaker, DOWN)
    assert breaker.state == "open"  # 5 of 10
    breaker.reset()
    for _ in range(9):
        call(breaker, DOWN)
    clock.now += 11.0  # the window slid past them
    call(breaker, DOWN)
    assert breaker.state == "closed"


@pytest.mark.timeout(10)
def test_service_errors_count_only_when_configured() -> None:
    quiet = CircuitBreaker("svc", settings(failure_threshold=2), clock=Clock())
    for _ in range(5):
        call(quiet, RAISED)
    assert quiet.state == "closed"
    counting = CircuitBreaker("svc", settings(failure_threshold=2, count_service_errors=True), clock=Clock())
    call(counting, RAISED)
    call(counting, RAISED)
    assert counting.state == "open"


# ------------------------------------------------------------ integration


@pytest.mark.timeout(30)
def test_a_flapping_service_opens_and_closes_the_breaker_as_specified() -> None:
    config = {
        "service_call": {"max_retries": 0},
        "breaker": {"failure_threshold": 3, "cooldown": 0.2, "count_service_errors": True},
    }
    with ServiceEnvironment("t", config) as env:
        flaky = env.register_service("flaky", Flaky).service
        with env.manager() as manager:
            assert manager.call_service_sync("flaky", "toggle") == "up"
            assert breaker_state("flaky") == "closed"
            flaky.failing = True
            for _ in range(3):
                with pytest.raises(ConnectionError):
                    manager.call_service_sync("flaky", "toggle")
            assert breaker_state("flaky") == "open"
            ran = flaky.calls["toggle"]
            started = time.monotonic()
            for _ in range(100):
                with pytest.raises(CircuitOpenError):
                    manager.call_service_sync("flaky", "toggle")
            assert time.monotonic() - started < 0.19  # failed fast, well inside the cool-down
            assert flaky.calls["toggle"] == ran  # the service never saw them
            # Cool-down over, service still failing: the probe re-opens it.
            time.sleep(0.25)  # deliberate: the cool-down is a span of time; waiting it out is the point
            with pytest.raises(ConnectionError):
                manager.call_service_sync("flaky", "toggle")
            assert breaker_state("flaky") == "open"
            with pytest.raises(CircuitOpenError):
                manager.call_service_sync("flaky", "toggle")
            # Service recovers: after the cool-down the probe closes it.
            flaky.failing = False
            time.sleep(0.25)  # deliberate: the cool-down again
            assert manager.call_service_sync("flaky", "toggle") == "up"
            assert breaker_state("flaky") == "closed"
            assert manager.call_service_sync("flaky", "toggle") == "up"
            status = env.get_task("flaky").get_service_status()
            assert status.extra["breaker"]["opened_total"] == 2
            assert status.extra["breaker"]["rejected_total"] == 101
            assert breaker_status("flaky")["flaky"]["state"] == "closed"


@pytest.mark.timeout(30)
def test_rejections_are_counted_by_metrics_and_raised_with_their_own_traceback() -> None:
    from kservice.middleware import metrics

    config = {"service_call": {"max_retries": 3}, "breaker": {"failure_threshold": 1, "cooldown": 30}}
    with ServiceEnvironment("t", config) as env:
        env.register_service("rejecting", Flaky)
        with env.manager() as manager:
            with pytest.raises(kservice.ServiceTimeoutError):
                manager.call_service_sync("rejecting", "sleep", (0.2,), timeout=0.02)
            assert breaker_state("rejecting") == "open"
            caught = []
            for _ in range(5):
                with pytest.raises(CircuitOpenError) as raised:
                    manager.call_service_sync("rejecting", "ok", (1,))
                caught.append(raised.value)
            assert len({id(error) for error in caught}) == 5
            # A fresh exception per call: its traceback is this raise only, not every earlier one.
            assert all(
                len(traceback.extract_tb(error.__traceback__)) == len(traceback.extract_tb(caught[0].__traceback__))
                for error in caught
            )
            assert not any(hasattr(error, "attempts") for error in caught)  # rejections are not retried
            client = metrics.snapshot()["client"]["rejecting"]["methods"]["ok"]
            assert client["calls"] == 5 and client["errors_by_type"] == {"CircuitOpenError": 5}


@pytest.mark.timeout(30)
def test_timeouts_count_by_default_method_errors_do_not() -> None:
    config = {"service_call": {"max_retries": 0}, "breaker": {"failure_threshold": 2, "cooldown": 30}}
    with ServiceEnvironment("t", config) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            for _ in range(5):
                with pytest.raises(KeyError):
                    manager.call_service_sync("flaky", "key_error")
            assert breaker_state("flaky") == "closed"
            for _ in range(2):
                with pytest.raises(kservice.ServiceTimeoutError):
                    manager.call_service_sync("flaky", "sleep", (0.2,), timeout=0.02)
            assert breaker_state("flaky") == "open"
            future = manager.call_service_async("flaky", "ok", (1,))
            with pytest.raises(CircuitOpenError):
                future.result(timeout=2)
            assert reset_breaker("flaky") and breaker_state("flaky") == "closed"
            assert manager.call_service_sync("flaky", "ok", (1,)) == 1


@pytest.mark.timeout(30)
def test_retries_do_not_hammer_an_open_breaker() -> None:
    config = {
        "service_call": {"max_retries": 10, "retry_interval": 0.0, "retry_jitter": 0.0},
        "breaker": {"failure_threshold": 2, "cooldown": 30, "count_service_errors": True},
    }
    with ServiceEnvironment("t", config) as env:
        env.register_service("flaky", Flaky)
        with env.manager() as manager:
            with pytest.raises(CircuitOpenError) as caught:
                manager.call_service_sync("flaky", "fail_idempotent")
            assert env.get_task("flaky").service.calls["fail_idempotent"] == 2  # then the breaker stopped it
            assert caught.value.attempts == 3  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_a_service_can_turn_its_breaker_off() -> None:
    config = {
        "service_call": {"max_retries": 0},
        "breaker": {"failure_threshold": 1, "count_service_errors": True},
        "services": {"solo": {"class": "tests.policies.services:Flaky", "breaker": {"enabled": False}}},
    }
    with ServiceEnvironment("t", config) as env, env.manager() as manager:
        for _ in range(3):
            with pytest.raises(ConnectionError):
                manager.call_service_sync("solo", "fail")
        assert not any(isinstance(m, CircuitBreaker) for m in chain_of(manager, "solo"))
        assert "breaker" not in env.get_task("solo").get_service_status().extra


def _open(manager: kservice.ServiceManager, name: str) -> None:
    with pytest.raises(kservice.ServiceTimeoutError):
        manager.call_service_sync(name, "sleep", (0.2,), timeout=0.02)
    assert breaker_state(name) == "open"


@pytest.mark.timeout(30)
def test_an_open_breaker_refuses_before_the_request_is_built() -> None:
    """The flood path: ServiceMiddleware.admit refuses; no request, no chain; metrics still count it."""
    from kservice.middleware import metrics

    # Flaky declares fallbacks, and a fallback must answer rejections through the chain: off here; so is
    # tracing, whose client middleware has only after_call (and which another test may have turned on).
    config = {
        "service_call": {"max_retries": 2},
        "breaker": {"failure_threshold": 1, "cooldown": 30},
        "fallback": {"enabled": False},
        "tracing": {"enabled": False},
    }
    with ServiceEnvironment("t", config) as env:
        env.register_service("gated", Flaky)
        with env.manager() as manager:
            _open(manager, "gated")
            counter = next(m for m in manager.client_middlewares("gated") if type(m).__name__ == "RetryBudgetCounter")
            attempts_before = counter.budget.calls
            for _ in range(4):
                with pytest.raises(CircuitOpenError):
                    manager.call_service_sync("gated", "ok", (1,))
            with pytest.raises(CircuitOpenError):
                manager.call_service_async("gated", "ok", (1,)).result(timeout=2)
            # No before_call ran: the breaker's admit refused before the chain was entered (the fast path).
            assert counter.budget.calls == attempts_before
            client = metrics.snapshot()["client"]["gated"]["methods"]["ok"]
            assert client["calls"] == 5 and client["errors_by_type"] == {"CircuitOpenError": 5}
            assert breaker_status("gated")["gated"]["rejected_total"] == 5


@pytest.mark.timeout(30)
def test_a_middleware_that_does_not_hear_refusals_still_sees_every_rejected_call() -> None:
    seen: list[str] = []

    class Audit(kservice.ServiceMiddleware):
        def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:  # type: ignore[override]
            seen.append(response.error_type)

    config = {
        "service_call": {"max_retries": 0},
        "breaker": {"failure_threshold": 1, "cooldown": 30},
        "fallback": {"enabled": False},
    }
    with ServiceEnvironment("t", config) as env:
        env.add_middleware(Audit())
        env.register_service("audited", Flaky)
        with env.manager() as manager:
            _open(manager, "audited")
            with pytest.raises(CircuitOpenError):
                manager.call_service_sync("audited", "ok", (1,))
            # Audit has no on_refused, so the chain has no fast refusal: its after_call still sees the call.
            assert seen[-1] == "CircuitOpenError"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["local", "process"])
def test_a_service_refusing_calls_at_its_admission_limit_does_not_open_the_breaker_but_calls_expiring_in_its_queue_do(
    kind: str,
) -> None:
    config = {
        "service_call": {"max_retries": 0},
        "breaker": {"failure_threshold": 2, "cooldown": 30},
        "health": {"enabled": False},
    }
    name = f"admission-{kind}"
    reset_breaker(name)
    with ServiceEnvironment("t", config) as env:
        env.register_service(
            name,
            kservice.ServiceFactory(name, Flaky),
            kind=kind,
            local={"max_workers": 1, "request_queue_size": 3, "queue_timeout": 0.2},
        )
        with env.manager() as manager:
            flood = [manager.call_service_async(name, "sleep", (0.3,), timeout=30) for _ in range(10)]
            refused = []
            for future in flood:
                try:
                    future.result(30)
                except kservice.ServiceOverloadedError as exc:
                    refused.append(exc)
            assert len(refused) >= 2, "the flood met the admission limit"
            # The service answered every call at once, ran what it admitted and refused the rest unrun:
            # it is serving at capacity, not broken.
            assert breaker_state(name) == "closed", breaker_status(name)
            assert manager.call_service_sync(name, "ok", (1,), timeout=10) == 1
            # Calls whose deadline passes while they wait behind a slow one: the service could not serve them
            # in time, which the breaker counts (the caller waited their whole timeout).
            busy = manager.call_service_async(name, "sleep", (1.5,), timeout=30)
            time.sleep(0.2)
            for _ in range(2):
                with pytest.raises(kservice.ServiceTimeoutError):
                    manager.call_service_sync(name, "ok", (2,), timeout=0.3)
            assert breaker_state(name) == "open", breaker_status(name)
            assert busy.result(30) == 1.5
            assert reset_breaker(name) and manager.call_service_sync(name, "ok", (3,), timeout=10) == 3


@contextlib.contextmanager
def _hosts_of(name: str) -> Iterator[list[subprocess.Popen[str]]]:
    """The ``kservice serve`` hosts of ``name`` a test runs, the first started here; stopped, and the breaker reset, after."""
    hosts = [start_host(f"{name}={KV_TARGET}")]
    try:
        yield hosts
    finally:
        for host in hosts:
            stop_host(host)
        reset_breaker(name)


@pytest.mark.timeout(120)
def test_a_breaker_opened_by_a_host_that_died_probes_the_new_host_at_once() -> None:
    """Calls cut in flight by a host's death open the caller's breaker; a supervisor starts a new host
    under the name. Before, every call failed fast with CircuitOpenError for the whole cool-down although
    the new host served; now the first call after it serves is a probe, and closes the breaker."""
    name = f"brk{os.getpid()}"
    config = kservice.Config.load(
        {"breaker": {"failure_threshold": 2, "cooldown": 300}, "service_call": {"max_retries": 0}}
    )
    with _hosts_of(name) as hosts, kservice.ServiceManager(config=config) as manager:
        assert manager.call_service_sync(name, "echo", ("a",)) == "a"
        running = [manager.call_service_async(name, "sleep", (30.0,), timeout=60) for _ in range(3)]
        time.sleep(0.5)  # they run in the host
        hosts[0].kill()
        hosts[0].wait(30)
        for future in running:  # "died during the call": each counts
            with pytest.raises(kservice.ServiceUnavailableError, match="died during the call"):
                future.result(30)
        assert breaker_state(name) == "open"
        hosts.append(start_host(f"{name}={KV_TARGET}"))
        # The first call after the new host serves is a probe; it succeeds and closes the breaker.
        assert manager.call_service_sync(name, "echo", ("c",), timeout=10) == "c"
        assert breaker_state(name) == "closed"
        assert manager.call_service_sync(name, "add", (2, 3)) == 5


@pytest.mark.timeout(120)
def test_refusals_by_a_closed_connection_do_not_open_the_breaker() -> None:
    """A host that stopped or died refuses what is sent to its closed queue ("nothing was sent"): that says
    where the service is not, not how it serves. With no new host the calls fail at once by name; the
    breaker stays closed, so a host started later serves the next call."""
    name = f"brkclosed{os.getpid()}"
    # No retries: the refusals themselves are what the breaker must not count (a retry policy waiting
    # for a new host under the name would only add its back-off, about 8 s, to each call).
    config = kservice.Config.load(
        {"breaker": {"failure_threshold": 1, "cooldown": 300}, "service_call": {"max_retries": 0}}
    )
    with _hosts_of(name) as hosts, kservice.ServiceManager(config=config) as manager:
        assert manager.call_service_sync(name, "echo", ("a",)) == "a"
        hosts[0].kill()
        hosts[0].wait(30)
        futures = [manager.call_service_async(name, "echo", (i,), timeout=10) for i in range(20)]
        for future in futures:
            with pytest.raises(kservice.ServiceError) as refused:
                future.result(30)
            assert not isinstance(refused.value, CircuitOpenError)
            assert refused.value.may_have_run is False
        assert breaker_state(name) == "closed"
        hosts.append(start_host(f"{name}={KV_TARGET}"))
        assert manager.call_service_sync(name, "echo", ("b",), timeout=10) == "b"


class _Counted(CircuitBreaker):
    """A breaker that counts how often the chain calls its per-call hooks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_calls = 0

    def admit(self, service_name: str, method_name: str) -> BaseException | None:
        self.hook_calls += 1
        return super().admit(service_name, method_name)

    def before_call(self, request: ServiceRequest) -> ServiceResponse | None:
        self.hook_calls += 1
        return super().before_call(request)

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        self.hook_calls += 1
        super().after_call(response, request)


@pytest.mark.timeout(10)
def test_a_closed_breaker_costs_a_success_no_hook_call_and_still_counts_runs_of_failures() -> None:
    from kservice._middleware import MiddlewareChain

    breaker = _Counted("svc", settings(failure_threshold=3), clock=Clock())
    chain = MiddlewareChain([breaker], "client")
    assert chain.admit is not None

    def through_chain(outcome: ServiceResponse) -> ServiceResponse:
        refusal = chain.admit("svc", "m")
        if refusal is not None:
            return ServiceResponse.from_exception("r", refusal, origin="runtime")
        began = time.perf_counter()
        sent, answered, limit = chain.run_before(req())
        return chain.run_after(sent, answered or outcome, limit, began)

    assert breaker.hooks_idle
    for _ in range(100):
        through_chain(OK)
    assert breaker.hook_calls == 0  # before: admit, before_call and after_call for every success
    for outcome in (DOWN, DOWN, OK, DOWN, DOWN, OK):  # a success still ends a run of failures
        through_chain(outcome)
    assert breaker.state == "closed" and breaker.hooks_idle
    # Idle, a failure reaches after_call only (1); then every hook runs (3 each) until a success ends the run.
    assert breaker.hook_calls == (1 + 3 + 3) * 2
    for outcome in (DOWN, DOWN, TIMEOUT):
        through_chain(outcome)
    assert breaker.state == "open" and not breaker.hooks_idle
    assert through_chain(OK).error_type == "CircuitOpenError"  # open: the hooks run again and refuse
    breaker.reset()
    assert breaker.hooks_idle and through_chain(OK).success
    # A failure-rate window counts every success: such a breaker is never idle.
    assert not CircuitBreaker("svc", settings(failure_rate=0.5), clock=Clock()).hooks_idle
