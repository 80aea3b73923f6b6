"""Structured call logging: one ``logging`` record per call on logger ``kservice.calls``.

Off by default (``call_log.enabled: true`` turns it on, globally or per
service). Each record carries, as ``extra=`` attributes a formatter or a JSON
handler can read: ``service``, ``method``, ``request_id``, ``duration_ms``,
``outcome`` (``ok``, ``error`` or ``degraded``), ``error_type`` (empty on
success) and ``side`` (``client`` or ``server``). Argument values are never
logged unless ``call_log.log_arguments: true``; they then appear, each
``repr`` cut to ``call_log.max_argument_chars``, as ``call_args`` and
``call_kwargs`` (``args`` is a reserved LogRecord attribute), and the
message of a failed call's error is added to the log message (error messages
often quote argument values, so they are left out by default; ``error_type``
is always there).

A logging handler that raises does not fail the call: the record is lost and
counted in the middleware's ``dropped`` attribute. The middleware is an
observer (``observe_call``/``observe_handle``): it logs the outcome the side
finally produced, timed by the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kservice import ServiceMiddleware, ServiceRequest, ServiceResponse, Setting, hookimpl

if TYPE_CHECKING:
    import logging

# logging's levels, as numbers: the module is imported by the middleware when a service's call log is
# enabled, not by every process that loads the plugin (it costs a caller's start 3 ms with what it imports).
_INFO = 20  # logging.INFO
_WARNING = 30  # logging.WARNING

__all__ = ["LOGGER_NAME", "CallLogMiddleware"]

LOGGER_NAME = "kservice.calls"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _schema() -> dict[str, Setting]:
    return {
        "enabled": Setting((bool,), False, "Log one structured record per call on logger 'kservice.calls'."),
        "side": Setting(
            (str,),
            "server",
            "Where calls are logged: 'server' (the service's process, an access log), 'client' (the caller's), or 'both'.",
            choices=("server", "client", "both"),
        ),
        "level": Setting((str,), "INFO", "Level of records for calls that succeeded.", choices=_LEVELS),
        "error_level": Setting((str,), "WARNING", "Level of records for calls that failed.", choices=_LEVELS),
        "log_arguments": Setting(
            (bool,),
            False,
            "Add the call's argument values (repr, truncated) as call_args/call_kwargs. May log secrets.",
        ),
        "max_argument_chars": Setting((int,), 200, "Longest repr kept of each argument value.", minimum=8),
    }


_BRACKETS: dict[type, tuple[str, str]] = {
    list: ("[", "]"),
    tuple: ("(", ")"),
    set: ("{", "}"),
    frozenset: ("frozenset({", "})"),
    dict: ("{", "}"),
}


def _pieces(container: Any) -> Iterator[tuple[Any, bool]]:
    """What the repr of a builtin container is made of, in order: (value, True) or (separator, False)."""
    for index, item in enumerate(container.items() if type(container) is dict else container):
        if index:
            yield ", ", False
        if type(container) is dict:
            yield item[0], True
            yield ": ", False
            yield item[1], True
        else:
            yield item, True


def _repr_prefix(value: Any, budget: int, outer: frozenset[int] = frozenset()) -> str:
    """``repr(value)``, or, when that is longer, at least ``budget`` characters of how it begins.

    Builtin containers, ``str``, ``bytes`` and ``bytearray`` are read only as far as ``budget`` needs,
    so a huge argument costs what is kept, not its size (a cut string is the repr of its first
    characters, whose quotes may differ from the whole one's). Any other value is its own ``repr()``,
    whatever it costs. Raises what that ``repr()`` raises (``RecursionError`` for nesting too deep).

    Not :mod:`reprlib`: it cuts by item count, not characters (the text kept would no longer be
    how the repr begins), and it sorts a dict's or a set's keys whole before it cuts.
    """
    kind = type(value)
    if budget <= 0:
        return ""
    if kind is str or kind is bytes or kind is bytearray:
        # Every character takes at least one in the repr: the first `budget` are enough.
        return repr(value[:budget] if len(value) > budget else value)
    brackets = _BRACKETS.get(kind)
    if brackets is None or not value:
        return repr(value)
    opening, closing = brackets
    if id(value) in outer:  # a list or dict inside itself, written as repr writes it
        return f"{opening}...{closing}"
    inside = outer | {id(value)}
    parts = [opening]
    used = len(opening)
    for piece, is_value in _pieces(value):
        if used >= budget:
            return "".join(parts)
        text = _repr_prefix(piece, budget - used, inside) if is_value else piece
        parts.append(text)
        used += len(text)
    if used >= budget:
        return "".join(parts)
    if kind is tuple and len(value) == 1:
        parts.append(",")
    parts.append(closing)
    return "".join(parts)


def _short(value: Any, limit: int) -> str:
    try:
        text = _repr_prefix(value, limit + 1)
    except Exception as exc:  # a broken __repr__ must not fail the call
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CallLogMiddleware(ServiceMiddleware):
    """Logs each call of one service on one side; built by the plugin from the ``call_log`` section."""

    def __init__(
        self,
        side: str,
        *,
        level: int = _INFO,
        error_level: int = _WARNING,
        log_arguments: bool = False,
        max_argument_chars: int = 200,
        logger: logging.Logger | None = None,
    ) -> None:
        self.side = side
        self.level = level
        self.error_level = error_level
        self.log_arguments = log_arguments
        self.max_argument_chars = max_argument_chars
        if logger is None:
            import logging

            logger = logging.getLogger(LOGGER_NAME)
        self.logger = logger
        #: records lost because a logging handler raised
        self.dropped = 0
        # An observer of one side only: the chain times the call and hands over the final response.
        if side == "client":
            self.observe_call = self._log  # type: ignore[method-assign]
        else:
            self.observe_handle = self._log  # type: ignore[method-assign]

    def _log(self, request: ServiceRequest, response: ServiceResponse, seconds: float) -> None:
        duration_ms = seconds * 1e3
        if response.success:
            outcome = "degraded" if response.degraded else "ok"
            level = self.level
        else:
            outcome = "error"
            level = self.error_level
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        extra: dict[str, Any] = {
            "service": request.service_name,
            "method": request.method_name,
            "request_id": request.request_id,
            "duration_ms": duration_ms,
            "outcome": outcome,
            "error_type": "" if response.success else response.error_type,
            "side": self.side,
        }
        if self.log_arguments:
            limit = self.max_argument_chars
            extra["call_args"] = [_short(a, limit) for a in request.args]
            extra["call_kwargs"] = {k: _short(v, limit) for k, v in request.kwargs.items()}
        try:
            if response.success or not self.log_arguments:
                logger.log(
                    level,
                    "%s.%s %s in %.3f ms",
                    request.service_name,
                    request.method_name,
                    outcome,
                    duration_ms,
                    extra=extra,
                )
            else:
                # Error messages often quote argument values: shown only when those may be logged.
                logger.log(
                    level,
                    "%s.%s %s in %.3f ms: %s: %s",
                    request.service_name,
                    request.method_name,
                    outcome,
                    duration_ms,
                    response.error_type,
                    response.error,
                    extra=extra,
                )
        except Exception:  # a broken handler must not turn a served call into an error
            self.dropped += 1

    def __repr__(self) -> str:
        return f"<CallLogMiddleware side={self.side}>"


# The class-level hooks stay the base class's no-ops: _overridden() then sees
# only the side chosen in __init__ (an instance attribute), so the other side's
# chain does not include this middleware at all.


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register("call_log", _schema())


@hookimpl(trylast=True)
def kservice_middleware(service_name: str, options: dict[str, Any]) -> list[ServiceMiddleware] | None:
    """Innermost of the built-in middleware (trylast), so it sees every call that reaches the service's side."""
    section = options.get("call_log") or {}
    if not section.get("enabled", False):
        return None
    import logging

    sides = ("client", "server") if section.get("side", "server") == "both" else (section.get("side", "server"),)
    return [
        CallLogMiddleware(
            side,
            level=logging.getLevelName(section.get("level", "INFO")),
            error_level=logging.getLevelName(section.get("error_level", "WARNING")),
            log_arguments=bool(section.get("log_arguments", False)),
            max_argument_chars=int(section.get("max_argument_chars", 200)),
        )
        for side in sides
    ]
