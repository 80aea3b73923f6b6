"""The ``retry`` plugin: which failed calls are re-sent, how long to wait, and a retry budget.

A call is retried only when that is safe:

- the request provably never ran: the runtime answered ServiceUnavailableError
  whose response the transport marked ``metadata[kservice.MAY_HAVE_RUN] =
  False`` (refused before it was written, its queue closed, the task not
  running: a stopping, restarting or moved service), ServiceNotFoundError (a
  resolver lost the name between attempts) or, with
  ``service_call.retry_overloaded: true``, ServiceOverloadedError (the queue
  did not accept it; off by default because the runtime has already waited
  ``service.local.queue_timeout`` for room, and retrying at a second layer
  adds load when the service asks for less), or
- the method is declared idempotent (``@kservice.idempotent``, the class's
  ``idempotent_methods`` or the service's ``idempotent:`` config list): then
  any failure is retried, a method's own exception included.

A ServiceUnavailableError that may have reached the service (its host died
during the call, the connection was lost after the request was sent:
``MAY_HAVE_RUN`` is True, or absent because the transport did not say) is
retried only for an idempotent method, so a method not declared idempotent
runs at most once per call whatever dies or restarts.

Never retried: ServiceStoppedError (a service stopped on purpose will not come
back by itself, so the call fails at once), a response a middleware marked ``metadata["kservice.retryable"]
= False`` (the breaker's fail-fast rejections), errors raised by caller-side
middleware, MethodNotFoundError. The core never sleeps past the call's
deadline, and the policy gives up before that too.

A name that does not resolve at all (ServiceNotFoundError on the first
attempt, or a task that is not running yet) is raised by the manager before
any attempt, so it is not retried: an unknown name is almost always a typo,
and its "did you mean" message is more useful at once than after the retries.

Each service also has a retry budget (a token bucket per service and
process): every call deposits ``retry_budget_ratio`` tokens, every retry
spends one, and ``retry_budget_min_per_second`` tokens accrue with time so a
quiet service can still retry. When a dependency fails for everyone, retries
add at most that fraction of load instead of multiplying it by
``max_retries``. A call its budget cannot pay for fails with its own error.

The policy comes from the ``kservice_retry_policy`` hook (first result), so a
plugin can replace it (``tryfirst=True``), or register a named policy with
:func:`register_retry_policy` and let users pick it with
``service_call.retry_policy``.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kservice import (
    MAY_HAVE_RUN,
    CallBatch,
    ConfigError,
    RetryPolicy,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    Setting,
    hookimpl,
)
from kservice._fork import renew_after_fork
from kservice.keys import RETRYABLE

if TYPE_CHECKING:
    import tenacity

__all__ = [
    "DefaultRetryPolicy",
    "NeverRetry",
    "RetryBudget",
    "RetryPolicy",
    "give_up",
    "register_retry_policy",
    "retry_policy_names",
]

#: Runtime errors that prove the request never ran, so any method may be re-sent. (A plain
#: ServiceUnavailableError proves it only when its response says ``MAY_HAVE_RUN: False``.)
SAFE_RUNTIME_ERRORS = frozenset({"ServiceOverloadedError", "ServiceNotFoundError"})
#: Runtime errors no retry can fix (the caller asked for something that does not exist).
NEVER_RETRIED = frozenset({"MethodNotFoundError", "ConfigError", "ServiceStoppedError"})


class RetryBudget:
    """A token bucket that caps retries at a fraction of calls, plus a floor per second.

    ``calls`` is incremented once per attempt by the counting middleware
    (no lock: a rare lost increment between racing threads only makes the
    budget stricter); ``withdraw()`` is called once per retry wanted and
    returns whether the budget allows it. Tokens are capped at ``capacity`` so a long quiet period
    cannot save up an unbounded burst. ``clock`` returns seconds (monotonic);
    tests drive it.
    """

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.capacity = capacity if capacity is not None else max(10.0, 10.0 * min_per_second)
        self._clock = clock
        self.calls = 0
        self._lock = threading.Lock()
        renew_after_fork(self, "_lock")
        self._seen_calls = 0
        self._tokens = min(self.capacity, min_per_second)
        self._updated = clock()

    def _refill(self) -> None:
        calls = self.calls
        now = self._clock()
        gained = (calls - self._seen_calls) * self.ratio + (now - self._updated) * self.min_per_second
        self._tokens = min(self.capacity, self._tokens + gained)
        self._seen_calls = calls
        self._updated = now

    def withdraw(self) -> bool:
        """Spend one token for a retry; False (and nothing spent) when the budget is exhausted."""
        with self._lock:
            self._refill()
            # The retry's own attempt deposits ``ratio`` again; charge it here so retries don't fund retries.
            cost = 1.0 + self.ratio
            if self._tokens >= cost:
                self._tokens -= cost
                return True
            return False

    @property
    def tokens(self) -> float:
        """Tokens available now (for status and tests)."""
        with self._lock:
            self._refill()
            return self._tokens


class _State:
    """The one attribute tenacity's wait strategies read from a RetryCallState."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


class DefaultRetryPolicy:
    """Retries what is safe (see the module docstring), with capped exponential backoff and jitter.

    The delay before retry ``n`` (1-based) is ``min(retry_max_interval,
    retry_interval * retry_backoff ** (n - 1)) + uniform(0, retry_jitter)``,
    computed by tenacity's wait strategies. Gives up (returns None) after
    ``max_retries`` retries, when the retry would start past the request's
    deadline, or when the budget is spent.
    """

    def __init__(self, settings: dict[str, Any], budget: RetryBudget | None = None) -> None:
        self.max_retries: int = settings["max_retries"]
        self.retry_overloaded: bool = settings.get("retry_overloaded", False)
        self._interval: float = settings["retry_interval"]
        self._backoff: float = settings["retry_backoff"]
        self._max_interval: float = settings["retry_max_interval"]
        self._jitter: float = settings["retry_jitter"]
        # tenacity's wait strategy, built by the first delay(): only a failed call needs it, so a
        # process whose calls succeed never imports tenacity.
        self._wait: tenacity.wait.wait_base | None = None
        self.budget = budget

    def retryable(self, response: ServiceResponse, idempotent: bool) -> bool:
        """Whether this failure may be re-sent at all (before counting attempts, time and budget)."""
        if response.metadata.get(RETRYABLE) is False:
            return False
        origin = response.error_origin
        if origin == "runtime":
            if response.error_type in SAFE_RUNTIME_ERRORS:
                if response.error_type == "ServiceOverloadedError":
                    # The runtime already waited service.local.queue_timeout for room: that wait was
                    # the retry. Retrying at a second layer adds load exactly when the service asks for less.
                    return self.retry_overloaded
                return True
            if response.error_type in NEVER_RETRIED:
                return False
            # The transport's word that the request never reached the service; without it the
            # call may have run (a host killed mid-call), and only an idempotent method goes again.
            return idempotent or response.metadata.get(MAY_HAVE_RUN) is False
        if origin == "service":
            return idempotent
        # "client": a caller-side middleware rejected the call; re-sending cannot change its mind.
        return False

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        wait = self._wait
        if wait is None:
            import tenacity

            wait = tenacity.wait_exponential(multiplier=self._interval, exp_base=self._backoff, max=self._max_interval)
            if self._jitter > 0:
                wait = wait + tenacity.wait_random(0, self._jitter)
            self._wait = wait
        return float(wait(_State(attempt + 1)))  # type: ignore[arg-type]

    def should_retry(
        self, request: ServiceRequest, response: ServiceResponse, attempt: int, idempotent: bool
    ) -> float | None:
        if response.metadata.get(RETRYABLE) is False:
            # A middleware's final word (every rejection of an open breaker): nothing to weigh.
            if attempt:
                give_up(request, response, attempt, "the error is not safe to retry")
            return None
        if not self.retryable(response, idempotent):
            give_up(request, response, attempt, "the error is not safe to retry")
            return None
        if attempt >= self.max_retries:
            give_up(request, response, attempt, f"service_call.max_retries={self.max_retries} reached")
            return None
        delay = self.delay(attempt)
        deadline = request.deadline
        if deadline is not None and time.time() + delay >= deadline:
            give_up(request, response, attempt, "the next retry would start past the call's deadline")
            return None
        if self.budget is not None and not self.budget.withdraw():
            give_up(request, response, attempt, "the service's retry budget is spent")
            return None
        return delay


def give_up(request: ServiceRequest, response: ServiceResponse, attempt: int, why: str) -> None:
    """Record on the error the caller will get how many attempts were made.

    After at least one retry, the raised exception (the last attempt's error)
    gets ``attempts`` (attempts made, first included) and a note saying why
    retrying stopped. It works by building the caller's exception now and
    storing it as the response's live exception, which the core raises as is.
    Custom policies may call it too.
    """
    if attempt > 0:
        error = response.to_exception(request.service_name, request.method_name)
        error.attempts = attempt + 1  # type: ignore[attr-defined]
        error.add_note(f"kservice: gave up after {attempt + 1} attempts: {why}")
        response.exception = error


class NeverRetry:
    """The ``never`` policy: every failure goes straight to the caller."""

    def should_retry(
        self, request: ServiceRequest, response: ServiceResponse, attempt: int, idempotent: bool
    ) -> float | None:
        return None


# ------------------------------------------------------------------ registry

#: name -> factory(settings of ``service_call``, budget) -> policy
_policies: dict[str, Callable[[dict[str, Any], RetryBudget | None], RetryPolicy]] = {
    "default": DefaultRetryPolicy,
    "never": lambda settings, budget: NeverRetry(),
}
_policies_lock = threading.Lock()


def register_retry_policy(
    name: str, factory: Callable[[dict[str, Any], RetryBudget | None], RetryPolicy], *, replace: bool = False
) -> None:
    """Make ``service_call.retry_policy: <name>`` select ``factory(settings, budget)``.

    ``settings`` is the service's effective ``service_call`` section; ``budget``
    its RetryBudget (None when the budget is off). Registering an existing name
    raises ValueError unless ``replace=True``. Register before configs that
    use the name are loaded: validation checks names against this registry.
    """
    with _policies_lock:
        if name in _policies and not replace:
            raise ValueError(f"a retry policy named {name!r} is already registered; pass replace=True to replace it")
        _policies[name] = factory


def retry_policy_names() -> tuple[str, ...]:
    """Names ``service_call.retry_policy`` accepts, sorted."""
    return tuple(sorted(_policies))


# ------------------------------------------------------------------- budgets

_budgets: weakref.WeakValueDictionary[tuple[Any, ...], RetryBudget] = weakref.WeakValueDictionary()
_budgets_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_budgets_lock", "_policies_lock")


def _budget_for(service_name: str, ratio: float, min_per_second: float) -> RetryBudget:
    """One budget per service and settings in this process, shared by every manager calling it."""
    key = (service_name, ratio, min_per_second)
    with _budgets_lock:
        budget = _budgets.get(key)
        if budget is None:
            budget = RetryBudget(ratio, min_per_second)
            _budgets[key] = budget
        return budget


class RetryBudgetCounter(ServiceMiddleware):
    """Counts attempts into the service's retry budget (the only per-call work of this plugin)."""

    __slots__ = ("budget",)

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def before_call(self, request: ServiceRequest) -> None:
        self.budget.calls += 1

    def admit_batch(self, batch: CallBatch) -> None:
        """A chunk of a map: each of its calls is an attempt (a call retried later is counted by ``before_call``)."""
        self.budget.calls += batch.count


# --------------------------------------------------------------------- hooks


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "service_call",
        {
            "retry_policy": Setting(
                (str,),
                "default",
                "Named retry policy: 'default' (safe failures, backoff, budget), 'never', or one a plugin registers.",
                choices=retry_policy_names,
            ),
            "retry_backoff": Setting(
                (float,), 2.0, "Each retry waits this many times longer than the previous one.", minimum=1
            ),
            "retry_max_interval": Setting(
                (float,), 30.0, "Cap in seconds on the delay between retries (before jitter).", minimum=0
            ),
            "retry_jitter": Setting(
                (float,), 0.1, "Up to this many seconds of random delay added to each retry.", minimum=0
            ),
            "retry_overloaded": Setting(
                (bool,),
                False,
                "Retry ServiceOverloadedError too (off: the runtime already waited service.local.queue_timeout for room).",
            ),
            "retry_budget_ratio": Setting(
                (float,), 0.2, "Retries per service may add at most this fraction of its calls.", minimum=0
            ),
            "retry_budget_min_per_second": Setting(
                (float,),
                10.0,
                "Retries per second allowed whatever the call volume (so quiet services still retry).",
                minimum=0,
            ),
        },
    )


def _settings(options: dict[str, Any]) -> dict[str, Any]:
    settings = options["service_call"]
    name = settings.get("retry_policy", "default")
    if name not in _policies:
        raise ConfigError(
            f"service_call.retry_policy: no retry policy named {name!r} (known: {', '.join(retry_policy_names())})"
        )
    return settings  # type: ignore[no-any-return]


@hookimpl
def kservice_middleware(service_name: str, options: dict[str, Any]) -> ServiceMiddleware | None:
    settings = _settings(options)
    if settings.get("retry_policy") == "never" or settings["max_retries"] == 0:
        return None
    return RetryBudgetCounter(
        _budget_for(service_name, settings["retry_budget_ratio"], settings["retry_budget_min_per_second"])
    )


@hookimpl
def kservice_retry_policy(service_name: str, options: dict[str, Any]) -> RetryPolicy | None:
    settings = _settings(options)
    name = settings.get("retry_policy", "default")
    if name == "never" or settings["max_retries"] == 0:
        return None
    budget = _budget_for(service_name, settings["retry_budget_ratio"], settings["retry_budget_min_per_second"])
    return _policies[name](settings, budget)
