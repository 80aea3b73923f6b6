"""ServiceMiddleware and the compiled chains that run it.

Ordering (both sides): before-hooks run in registration order, after-hooks in
reverse. A before-hook may return a replacement request, or a
ServiceResponse that answers the call without reaching the service (a cache,
an open breaker with a fallback); after-hooks of the middleware registered
before it still run. A before-hook that raises rejects the call with that
error. After-hooks see failures too, may return a replacement response, and
finish before the caller gets its result; an after-hook that raises turns the
response into that error and the remaining after-hooks still run.

Threads: client hooks run in the calling thread for sync calls; for async
calls ``before_call`` runs in the calling thread and ``after_call`` in the
thread that completes the call (a transport's response thread, a worker, or
the timer thread for timeouts). Server hooks run in the thread that runs the
method, in the service's process (a worker, a listener, or an in-process
caller's own thread for a fast method).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from ._messages import ServiceRequest, ServiceResponse

__all__ = ["MiddlewareChain", "ServiceMiddleware"]

BeforeHook = Callable[[ServiceRequest], "ServiceRequest | ServiceResponse | None"]
AfterHook = Callable[[ServiceResponse, ServiceRequest], "ServiceResponse | None"]


class ServiceMiddleware:
    """Hooks around a call; override only what you need (the rest costs nothing).

    ``before_call``/``after_call`` run in the caller's process,
    ``before_handle``/``after_handle`` in the service's process. After-hooks
    may take ``(response)`` as in the seed, or ``(response, request)``.
    """

    def before_call(self, request: ServiceRequest) -> ServiceRequest | ServiceResponse | None:
        """Inspect or replace the request before it is sent; raise to reject the call."""
        return None

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        """Inspect or replace the response before the caller sees it."""
        return None

    def before_handle(self, request: ServiceRequest) -> ServiceRequest | ServiceResponse | None:
        """In the service's process, before the method runs."""
        return None

    def after_handle(self, response: ServiceResponse, request: ServiceRequest) -> ServiceResponse | None:
        """In the service's process, after the method returned or raised."""
        return None

    def admit(self, service_name: str, method_name: str) -> BaseException | None:
        """Fast refusal, in the caller's process, before the request is even built.

        Return an exception to refuse the call: the caller gets it raised (an
        async call, a failed Future) without a request, a chain or a retry,
        which makes a refusal cost about a microsecond (an open circuit
        breaker's flood). The manager only asks when every middleware of the
        chain that has an ``after_call`` also implements :meth:`on_refused`,
        so no middleware misses a call it expects to see; otherwise the call
        takes the normal path and ``before_call`` refuses it there.
        """
        return None

    def on_refused(self, service_name: str, method_name: str, error: BaseException) -> None:
        """Told, instead of ``after_call``, about a call an :meth:`admit` refused (count it, log it)."""
        return None


def _overridden(middleware: Any, name: str) -> Callable[..., Any] | None:
    method = getattr(middleware, name, None)
    if method is None:
        return None
    base = getattr(ServiceMiddleware, name)
    if getattr(method, "__func__", None) is base:
        return None
    return method  # type: ignore[no-any-return]


def _as_after_hook(method: Callable[..., Any]) -> AfterHook:
    try:
        params = [
            p
            for p in inspect.signature(method).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return method
    if len(params) == 1 and params[0].kind != params[0].VAR_POSITIONAL:
        return lambda response, request: method(response)
    return method


class MiddlewareError(Exception):
    """Carries the index of the middleware whose before-hook raised (internal)."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class MiddlewareChain:
    """One side's hooks of an ordered middleware list, compiled once."""

    __slots__ = ("_afters", "_befores", "_error_origin", "_refused", "admit", "middlewares", "size")

    def __init__(self, middlewares: Iterable[Any], side: str) -> None:
        before_name, after_name = ("before_call", "after_call") if side == "client" else ("before_handle", "after_handle")
        # A client hook's error reaches the caller as raised; a server hook's travels like the method's.
        self._error_origin: Any = "client" if side == "client" else "service"
        self.middlewares = tuple(middlewares)
        self.size = len(self.middlewares)
        befores: list[tuple[int, BeforeHook]] = []
        afters: list[tuple[int, AfterHook]] = []
        for index, middleware in enumerate(self.middlewares):
            before = _overridden(middleware, before_name)
            if before is not None:
                befores.append((index, before))
            after = _overridden(middleware, after_name)
            if after is not None:
                afters.append((index, _as_after_hook(after)))
        self._befores = tuple(befores)
        self._afters = tuple(reversed(afters))
        # Fast refusal (client side): only when every after-hook's middleware hears of refusals too.
        admits = [m.admit for m in self.middlewares if _overridden(m, "admit") is not None]
        refused = [m.on_refused for m in self.middlewares if _overridden(m, "on_refused") is not None]
        hears = all(_overridden(self.middlewares[index], "on_refused") is not None for index, _ in afters)
        self._refused = tuple(refused)
        #: ``admit(service_name, method_name)``: the refusal to raise, or None (None: no fast refusal here).
        self.admit: Callable[[str, str], BaseException | None] | None = None
        if side == "client" and admits and hears:
            self.admit = self._compile_admit(tuple(admits))

    def _compile_admit(
        self, admits: tuple[Callable[[str, str], BaseException | None], ...]
    ) -> Callable[[str, str], BaseException | None]:
        refused = self._refused

        def admit(service_name: str, method_name: str) -> BaseException | None:
            for check in admits:
                try:
                    error = check(service_name, method_name)
                except Exception:  # noqa: BLE001 - a failing check decides nothing: the chain handles the call
                    return None
                if error is not None:
                    for tell in refused:
                        try:
                            tell(service_name, method_name, error)
                        except Exception:  # noqa: BLE001 - a failing listener must not change the refusal
                            pass
                    return error
            return None

        return admit

    def __bool__(self) -> bool:
        return bool(self._befores or self._afters)

    def run_before(self, request: ServiceRequest) -> tuple[ServiceRequest, ServiceResponse | None, int]:
        """Run before-hooks: (request to send, short-circuit response or None, after-hook limit).

        Raises MiddlewareError when a hook raises.
        """
        for index, before in self._befores:
            try:
                outcome = before(request)
            except Exception as exc:
                raise MiddlewareError(index, exc) from exc
            if outcome is not None:
                if isinstance(outcome, ServiceResponse):
                    return request, outcome, index
                request = outcome
        return request, None, self.size

    def run_after(self, request: ServiceRequest, response: ServiceResponse, limit: int) -> ServiceResponse:
        """Run after-hooks of middleware before ``limit``, last registered first."""
        for index, after in self._afters:
            if index >= limit:
                continue
            try:
                outcome = after(response, request)
            except Exception as exc:
                response = ServiceResponse.from_exception(request.request_id, exc, origin=self._error_origin)
                continue
            if outcome is not None:
                response = outcome
        return response
