"""An example kservice plugin distribution: a custom retry policy and a custom middleware.

Install it (``pip install .``) and it is picked up through the ``kservice``
entry-point group. Everything is off until configured::

    example:
      enabled: true      # use RetryEverything and the Stamp middleware for every service
      attempts: 2        # retries after the first attempt
      delay: 0.01        # seconds between attempts

or per service under ``services.<name>.example``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kservice import ServiceMiddleware, ServiceRequest, ServiceResponse, Setting, hookimpl


class RetryEverything:
    """Retries every failure, whatever its cause, ``attempts`` times with a fixed delay.

    Only for services whose every method is safe to run twice: it replaces the
    built-in policy, which retries only failures that are safe.
    """

    def __init__(self, attempts: int, delay: float) -> None:
        self.attempts = attempts
        self.delay = delay

    def should_retry(
        self, request: ServiceRequest, response: ServiceResponse, attempt: int, idempotent: bool
    ) -> float | None:
        if attempt >= self.attempts:
            return None
        remaining = request.remaining()
        if remaining is not None and remaining <= self.delay:
            return None  # never past the call's deadline
        return self.delay


class Stamp(ServiceMiddleware):
    """Tags each request (the service can read it) and each response (the caller can)."""

    def before_call(self, request: ServiceRequest) -> ServiceRequest:
        request.metadata = {**request.metadata, "example.stamp": request.service_name}
        return request

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        response.metadata["example.seen"] = True


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "example",
        {
            "enabled": Setting((bool,), False, "Use the example retry policy and middleware."),
            "attempts": Setting((int,), 2, "Retries after the first attempt.", minimum=0),
            "delay": Setting((float,), 0.01, "Seconds between attempts.", minimum=0),
        },
    )


@hookimpl(tryfirst=True)
def kservice_retry_policy(service_name: str, options: dict[str, Any]) -> RetryEverything | None:
    # tryfirst + firstresult: when enabled, this replaces the built-in policy; otherwise None lets it answer.
    settings = options.get("example")
    if not settings or not settings["enabled"]:
        return None
    return RetryEverything(settings["attempts"], settings["delay"])


@hookimpl
def kservice_middleware(service_name: str, options: dict[str, Any]) -> ServiceMiddleware | None:
    settings = options.get("example")
    if not settings or not settings["enabled"]:
        return None  # not configured: not in the chain, costs nothing
    return Stamp()


__all__ = ["RetryEverything", "Stamp"]
