"""``kservice call``: one call (or many at once, or a stream) from the command line."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import click

from .._config import Config
from .._errors import ServiceCallError, ServiceError, ServiceNotFoundError

if TYPE_CHECKING:
    from .._manager import ServiceManager

from ._group import _CONFIG_OPTION_HELP, FiniteFloatRange, _fail, cli
from .services import _serve_hint

# --------------------------------------------------------------------------
# call
# --------------------------------------------------------------------------


def _parse_json(text: str, hint: str, expected: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}", param_hint=hint
        ) from None
    if not isinstance(value, expected):
        example = "'[1, \"a\"]'" if expected is list else "'{\"key\": 1}'"
        raise click.BadParameter(
            f"must be a JSON {'array' if expected is list else 'object'}, e.g. {example}", param_hint=hint
        )
    return value


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _json_result(result: Any) -> str:
    return json.dumps(result, default=repr)


@cli.command("call")
@click.argument("service")
@click.argument("method")
@click.argument("args_json", required=False, default="[]")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments.")
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help="Seconds before ServiceTimeoutError (default: service_call.default_timeout).",
)
@click.option(
    "--async",
    "concurrency",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Make N concurrent asynchronous calls and print a summary (count, failures, calls/s, latency percentiles).",
)
@click.option(
    "--stream", "streamed", is_flag=True, help="Stream a generator method: print each item as it arrives, one per line."
)
@click.option(
    "--json", "as_json", is_flag=True, help="With --stream: print each item as one line of JSON (JSON lines)."
)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def call_command(
    service: str,
    method: str,
    args_json: str,
    kwargs_json: str,
    timeout: float | None,
    concurrency: int | None,
    streamed: bool,
    as_json: bool,
    config_path: str | None,
) -> None:
    """Call SERVICE.METHOD with a JSON array of arguments and print the JSON result.

    The service must be reachable from this process: hosted on this host (see
    'kservice services --running') or resolvable by an installed plugin.
    Results that are not JSON are printed as their repr.

    \b
    Example:
      kservice call kv put '["greeting", "hello"]'
      kservice call kv get '["greeting"]' --timeout 2
      kservice call kv get --kwargs '{"key": "greeting"}'
      kservice call kv get '["greeting"]' --async 1000
      kservice call --stream model generate '["once upon a time"]' --json
    """
    from .._manager import ServiceManager

    if streamed and concurrency is not None:
        raise click.UsageError("--stream and --async cannot be combined: stream one call at a time")
    if as_json and not streamed:
        raise click.UsageError("--json goes with --stream (a plain call prints its result as JSON already)")
    args = _parse_json(args_json, "ARGS_JSON", list)
    kwargs = _parse_json(kwargs_json, "--kwargs", dict)
    config = Config.load(config_path)
    with ServiceManager(config=config) as manager:
        try:
            if streamed:
                with manager.stream(service, method, tuple(args), kwargs, timeout=timeout) as items:
                    for item in items:
                        click.echo(_json_result(item) if as_json else str(item))
                        sys.stdout.flush()
                return
            if concurrency is None:
                result = manager.call_service_sync(service, method, tuple(args), kwargs, timeout=timeout)
                click.echo(_json_result(result))
                return
            _call_concurrently(manager, service, method, tuple(args), kwargs, timeout, concurrency)
        except ServiceNotFoundError as exc:
            _fail(_not_running_hint(exc, config, config_path) or f"{type(exc).__name__}: {exc}")
        except ServiceError as exc:
            _fail(f"{_error_type(exc)}: {exc}")


def _error_type(exc: BaseException) -> str:
    """The name a user knows an error by: the service's own exception class for a remote error."""
    if isinstance(exc, ServiceCallError) and exc.remote_type:
        return exc.remote_type.rpartition(".")[2]
    return type(exc).__name__


def _not_running_hint(exc: ServiceNotFoundError, config: Config, config_path: str | None) -> str | None:
    """For a service installed or configured here but not running: the error, saying how to start it."""
    from .._environment import ServiceEnvironment

    name = exc.service_name
    if name in config.service_names():
        where = f"configured in {config.source}"
    elif name in ServiceEnvironment.available_services():
        where = "installed ('kservice.services' entry point)"
    else:
        return None
    return f"service {name!r} is {where} but not running; start it with: {_serve_hint(name, config, config_path)}"


def _call_concurrently(
    manager: ServiceManager,
    service: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    count: int,
) -> None:
    """Start ``count`` asynchronous calls at once, wait for all, print a summary; exit 1 if any failed."""
    # Resolve once first: an unknown service is one clear error, not N failed futures.
    manager.get_service_queue(service)
    latencies: list[float] = [math.nan] * count
    futures: list[Future[Any]] = []
    started = time.perf_counter()
    for index in range(count):
        sent = time.perf_counter()
        future = manager.call_service_async(service, method, args, dict(kwargs), timeout=timeout)

        def record(_: Future[Any], index: int = index, sent: float = sent) -> None:
            latencies[index] = time.perf_counter() - sent

        future.add_done_callback(record)
        futures.append(future)
    wait(futures)
    elapsed = time.perf_counter() - started
    failures: dict[str, int] = {}
    first_error: BaseException | None = None
    first_result: Any = None
    ok = 0
    for future in futures:
        error = future.exception()
        if error is None:
            if ok == 0:
                first_result = future.result()
            ok += 1
        else:
            first_error = first_error or error
            failures[_error_type(error)] = failures.get(_error_type(error), 0) + 1
    done = sorted(x for x in latencies if not math.isnan(x))
    click.echo(
        f"{count} calls to {service}.{method}, all started at once: {ok} ok, {count - ok} failed "
        f"in {elapsed:.3f} s ({count / elapsed:,.0f} calls/s)"
    )
    click.echo(
        "latency ms: "
        + "  ".join(
            f"{label} {_percentile(done, q) * 1e3:.3f}"
            for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        )
    )
    if ok:
        click.echo(f"first result: {_json_result(first_result)}")
    if failures:
        click.echo("failures: " + ", ".join(f"{n} {name}" for name, n in sorted(failures.items())))
        assert first_error is not None
        _fail(f"{count - ok} of {count} calls failed; first: {_error_type(first_error)}: {first_error}")
