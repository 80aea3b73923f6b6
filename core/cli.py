"""The ``kservice`` command-line tool.

Every command prints one actionable line on stderr and exits non-zero for a
user error (bad arguments, unknown or unreachable service, malformed config):
no tracebacks. Usage errors exit with status 2, every other error with 1.
Plugins add commands through the ``kservice_register_commands`` hook (the
``mmap`` plugin adds ``serve``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import click

from ._config import Config
from ._errors import ConfigError, ServiceCallError, ServiceError, ServiceNotFoundError
from ._plugins import collect, get_plugin_manager

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._manager import ServiceManager

__all__ = [
    "FiniteFloatRange",
    "cli",
    "config_reference",
    "main",
    "running_services",
    "status_rows",
    "status_table",
]

_CONFIG_OPTION_HELP = "YAML config file (default: the file named by KSERVICE_CONFIG, else built-in defaults)."


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses NaN and the infinities (a usage error naming the option)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        converted = super().convert(value, param, ctx)
        if not math.isfinite(converted):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return converted


class _Group(click.Group):
    """Turns kservice errors raised by sub-commands into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServiceError as exc:
            _fail(str(exc))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(message: str, status: int = 1) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``status``."""
    click.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(status)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kservice")
def cli() -> None:
    """kservice: call Python services by name, in-process, across processes, or on Ray.

    \b
    Example:
      kservice serve kv=myapp.kv:KV &            # host a service (mmap plugin)
      kservice call kv get '["greeting"]'        # call it from another process
      kservice status --watch                    # watch every running service
    """


# --------------------------------------------------------------------------
# plugins, services
# --------------------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def plugins_command(as_json: bool, config_path: str | None) -> None:
    """List plugins: loaded, disabled and failed ones, where each came from, its hooks or why it is not loaded.

    The config's plugins.disable and plugins.require apply (KSERVICE_CONFIG,
    or -c FILE). Exits 1 when a required plugin is not loaded, after listing.

    \b
    Example:
      kservice plugins
      kservice plugins --json -c services.yaml
      KSERVICE_DISABLE_PLUGINS=mmap kservice plugins
    """
    from ._errors import PluginError
    from ._plugins import plugin_states

    required_error: PluginError | None = None
    try:
        Config.load(config_path)
    except PluginError as exc:  # listed first, then the error: the table shows why
        required_error = exc
    states = plugin_states()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {"name": st.name, "state": st.state, "origin": st.origin, "hooks": list(st.hooks), "reason": st.reason, "required": st.required}
                    for st in states
                ],
                indent=2,
            )
        )
    else:
        from rich.table import Table

        table = Table(title="kservice plugins", title_justify="left")
        for column in ("plugin", "state", "origin", "hooks / reason"):
            table.add_column(column, overflow="fold")
        styles = {"loaded": "green", "disabled": "yellow", "failed": "red"}
        for st in states:
            detail = st.reason if st.state != "loaded" else ", ".join(h.removeprefix("kservice_") for h in st.hooks)
            state = f"[{styles[st.state]}]{st.state}[/]" + (" (required)" if st.required else "")
            table.add_row(st.name, state, st.origin, detail)
        _console().print(table)
    if required_error is not None:
        _fail(str(required_error))


def running_services() -> list[dict[str, Any]]:
    """Every service a plugin reports as running on this host, one dict per name, sorted by name.

    Comes from the ``kservice_running_services`` hook; plugins that only
    implement ``kservice_known_services`` contribute their names with
    ``transport`` set to ``"?"``. A name reported twice keeps the first report.
    """
    hook = get_plugin_manager().hook
    found: dict[str, dict[str, Any]] = {}
    for contributed in hook.kservice_running_services():
        for record in contributed or ():
            name = str(record.get("name", ""))
            if name and name not in found:
                found[name] = dict(record)
    for names in hook.kservice_known_services():
        for name in names or ():
            found.setdefault(str(name), {"name": str(name), "transport": "?"})
    return [found[name] for name in sorted(found)]


def _age(started_at: Any) -> str:
    if not isinstance(started_at, (int, float)) or started_at <= 0:
        return "-"
    seconds = max(0.0, time.time() - float(started_at))
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _caller_transports(manager: ServiceManager, name: str) -> list[str]:
    """The transports a caller of ``name`` would try, in order (empty when it does not resolve now)."""
    try:
        return list(dict.fromkeys(address.transport for address in manager.service_addresses(name)))
    except ConfigError:
        raise
    except ServiceError:
        return []


def service_listing(config: Config, manager: ServiceManager) -> list[dict[str, Any]]:
    """Installed, configured and running services together, one dict per name, sorted by name.

    Each row says which it is (``installed``, ``configured``, ``running``
    booleans, and ``state``: ``running``, else ``configured``, else
    ``installed``) and, for a running service, the ``transport`` a caller in
    this process would use (see ``ServiceManager.service_addresses``) and the
    others it offers (``transports``). Numbers are numbers; what is unknown is None.
    """
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        return rows.setdefault(
            name,
            {
                "name": name,
                "state": "",
                "running": False,
                "configured": False,
                "installed": False,
                "transport": None,
                "transports": [],
                "class": None,
                "kind": None,
                "pid": None,
                "address": None,
                "uptime_s": None,
                "source": None,
            },
        )

    from ._environment import ServiceEnvironment

    for name, path in ServiceEnvironment.available_services().items():
        found = row(name)
        found.update(installed=True, source="entry point")
        found["class"] = path
    for name in config.service_names():
        entry = config.service_entry(name) or {}
        found = row(name)
        found.update(configured=True, kind=entry.get("kind", "local"), source=f"config {config.source}")
        found["class"] = str(entry.get("class") or entry.get("entry_point") or found["class"] or name)
    for record in running_services():
        found = row(str(record["name"]))
        started = record.get("started_at")
        found.update(
            running=True,
            pid=record.get("pid"),
            address=record.get("address") or record.get("queue"),
            uptime_s=round(max(0.0, time.time() - float(started)), 1) if isinstance(started, (int, float)) and started > 0 else None,
        )
        found["kind"] = found["kind"] or record.get("kind")
        found["class"] = found["class"] or record.get("class") or None
        offered = _caller_transports(manager, found["name"])
        found["transports"] = offered
        found["transport"] = offered[0] if offered else record.get("transport")
        found["source"] = found["source"] or "running"
    for found in rows.values():
        found["state"] = "running" if found["running"] else "configured" if found["configured"] else "installed"
    return [rows[name] for name in sorted(rows)]


def _serve_hint(name: str, config: Config, config_path: str | None) -> str:
    """The command that hosts ``name``: with ``-c FILE`` when FILE declares it."""
    if config_path and name in config.service_names():
        return f"kservice serve -c {config_path} {name}"
    return f"kservice serve {name}"


def _uptime(seconds: Any) -> str:
    return "-" if seconds is None else _age(time.time() - float(seconds))


def _narrow(console: Console) -> bool:
    """Whether a table should keep to its essential columns (the terminal is narrower than the full table)."""
    return console.width < 140


@cli.command("services")
@click.option("--running", is_flag=True, help="Only services running on this host.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option("--wide", is_flag=True, help="Every column, however wide the terminal.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def services_command(running: bool, as_json: bool, wide: bool, config_path: str | None) -> None:
    """List services installed (entry points), configured (-c FILE) and running on this host, together.

    STATE says which: running, configured or installed. For a running
    service, TRANSPORT is the one a caller here would use (the
    service_call.transports preference, else the fastest the service
    offers). A service installed or configured but not running gets a hint
    to start it with 'kservice serve NAME'. --wide adds the address, the
    kind and where each is declared.

    \b
    Example:
      kservice services -c services.yaml
      kservice services --running --json
    """
    from ._manager import ServiceManager

    config = Config.load(config_path)
    with ServiceManager(config=config) as manager:
        rows = service_listing(config, manager)
    if running:
        rows = [r for r in rows if r["running"]]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=repr))
        return
    if not rows:
        click.echo(
            "no running services (start one with: kservice serve NAME=package.module:Class)"
            if running
            else "no services installed ('kservice.services' entry points), configured (-c FILE or KSERVICE_CONFIG) or running",
            err=True,
        )
        return
    from rich.table import Table

    console = _console()
    wide = wide or not _narrow(console)
    table = Table(header_style="bold", box=_box(), show_edge=False, pad_edge=False, collapse_padding=True)
    columns = ["name", "state", "transport", "class", "pid", "uptime"] + (["address", "kind", "source"] if wide else [])
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column == "name", justify="right" if column in ("pid", "uptime") else "left")
    for r in rows:
        state = {"running": "[green]running[/]"}.get(r["state"], r["state"])
        cells = [r["name"], state, r["transport"] or "-", r["class"] or "-", str(r["pid"] or "-"), _uptime(r["uptime_s"])]
        if wide:
            cells += [r["address"] or "-", r["kind"] or "-", r["source"] or "-"]
        table.add_row(*cells)
    console.print(table)
    idle = [r["name"] for r in rows if not r["running"]]
    if idle:
        hints = "; ".join(_serve_hint(name, config, config_path) for name in idle[:3]) + ("; ..." if len(idle) > 3 else "")
        click.echo(f"not running: {', '.join(idle)} (start with: {hints})", err=True)


# --------------------------------------------------------------------------
# call
# --------------------------------------------------------------------------


def _parse_json(text: str, hint: str, expected: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}", param_hint=hint) from None
    if not isinstance(value, expected):
        example = "'[1, \"a\"]'" if expected is list else "'{\"key\": 1}'"
        raise click.BadParameter(f"must be a JSON {'array' if expected is list else 'object'}, e.g. {example}", param_hint=hint)
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
@click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True), default=None, help="Seconds before ServiceTimeoutError (default: service_call.default_timeout).")
@click.option(
    "--async",
    "concurrency",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Make N concurrent asynchronous calls and print a summary (count, failures, calls/s, latency percentiles).",
)
@click.option("--stream", "streamed", is_flag=True, help="Stream a generator method: print each item as it arrives, one per line.")
@click.option("--json", "as_json", is_flag=True, help="With --stream: print each item as one line of JSON (JSON lines).")
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
    from ._manager import ServiceManager

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
    from ._environment import ServiceEnvironment

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
        + "  ".join(f"{label} {_percentile(done, q) * 1e3:.3f}" for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)))
    )
    if ok:
        click.echo(f"first result: {_json_result(first_result)}")
    if failures:
        click.echo("failures: " + ", ".join(f"{n} {name}" for name, n in sorted(failures.items())))
        assert first_error is not None
        _fail(f"{count - ok} of {count} calls failed; first: {_error_type(first_error)}: {first_error}")


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------


def _status_dict(status: Any) -> dict[str, Any]:
    """A status as a dict: a ServiceStatus, a transport's dict of its fields, or an error row."""
    if isinstance(status, dict):
        return dict(status)
    to_dict = getattr(status, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return {"error": f"the service answered the status request with {type(status).__name__} {status!r}"}


#: what a row shows in the columns plugins fill (``kservice_status_columns``) when none fills them
_PLUGIN_COLUMN_DEFAULTS: dict[str, Any] = {
    "replicas": 1,
    "replicas_alive": None,
    "calls_per_second": None,
    "p50_ms": None,
    "p99_ms": None,
    "breaker": "-",
}


def _plugin_cells(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(columns, details)`` of one status: each plugin renders its own sections of ``extra``.

    Columns come from ``kservice_status_columns``; the sections of ``extra``
    no plugin took are kept as they are, under details, beside what plugins
    returned for columns the table does not have.
    """
    extra = dict(data.get("extra") or {})
    columns = dict(_PLUGIN_COLUMN_DEFAULTS)
    details: dict[str, Any] = {}
    for cells in collect("kservice_status_columns", status=data, extra=extra):
        for key, value in dict(cells).items():
            (columns if key in _PLUGIN_COLUMN_DEFAULTS else details)[key] = value
    if columns["replicas_alive"] is None:
        columns["replicas_alive"] = columns["replicas"]
    return columns, {**details, **extra}


def status_rows(statuses: Iterable[Any], previous: dict[str, tuple[float, int]] | None = None) -> list[dict[str, Any]]:
    """Flatten ServiceStatus objects (or their dicts) into table rows.

    ``previous`` maps a service name to ``(time.monotonic(), requests_total)``
    of the last sample; it is updated in place and gives ``calls_per_second``
    over the interval since. Without a previous sample the rate is a
    plugin's (``kservice_status_columns``), else the average since the task
    started. Replicas, latency and breaker columns are what plugins render
    from their sections of ``extra``; the sections none renders go to
    ``extra`` (the details column). Status dicts carrying an ``error`` key
    become rows that show it.
    """
    now_mono, now_wall = time.monotonic(), time.time()
    rows: list[dict[str, Any]] = []
    for status in statuses:
        data = _status_dict(status)
        name = str(data.get("service_name", data.get("name", "?")))
        if "error" in data:
            rows.append({"service": name, "kind": data.get("kind", "?"), "state": "unreachable", "health": data["error"], "extra": {}})
            continue
        total = int(data.get("requests_total") or 0)
        columns, details = _plugin_cells(data)
        # Watching: the rate over the last interval. Otherwise a plugin's (a metrics window), else since start.
        rate: float | None = None
        if previous is not None and name in previous and total >= previous[name][1]:
            then, before = previous[name]
            rate = (total - before) / max(now_mono - then, 1e-6)
        if rate is None:
            rate = columns["calls_per_second"]
        if rate is None and data.get("started_at"):
            rate = total / max(now_wall - float(data["started_at"]), 1e-6)
        if previous is not None:
            previous[name] = (now_mono, total)
        healthy = bool(data.get("healthy"))
        rows.append(
            {
                "service": name,
                "kind": data.get("kind", "?"),
                "state": data.get("state", "?"),
                "health": "ok" if healthy else (data.get("health_reason") or "unhealthy"),
                "replicas": columns["replicas"],
                "replicas_alive": columns["replicas_alive"],
                "in_flight": int(data.get("in_flight") or 0),
                "queue_depth": int(data.get("queue_depth") or 0),
                "requests_total": total,
                "errors_total": int(data.get("errors_total") or 0),
                "calls_per_second": rate,
                "p50_ms": columns["p50_ms"],
                "p99_ms": columns["p99_ms"],
                "breaker": columns["breaker"],
                "extra": details,
            }
        )
    return rows


def _fmt_number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _fmt_extra(extra: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(extra.items()):
        shown = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, default=repr, separators=(",", ":"))
        parts.append(f"{key}={shown}")
    text = " ".join(parts)
    return text if len(text) <= 80 else text[:77] + "..."


#: the columns of ``kservice status``; those marked essential are the ones a narrow terminal keeps
_STATUS_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("service", "left", True),
    ("kind", "left", False),
    ("state", "left", True),
    ("health", "left", True),
    ("replicas", "right", True),
    ("in-flight", "right", False),
    ("queue", "right", False),
    ("calls", "right", False),
    ("errors", "right", True),
    ("calls/s", "right", True),
    ("p50 ms", "right", True),
    ("p99 ms", "right", True),
    ("breaker", "left", False),
    ("details", "left", False),
)

#: the note under a table listing a service with several replicas
REPLICAS_NOTE = (
    "replicas do not share state: each replica is its own instance of the service, and calls are spread "
    "across them (keep shared state in a store the replicas call)"
)


def status_table(rows: Iterable[dict[str, Any]], title: str | None = None, wide: bool = True) -> Table:
    """A rich Table of :func:`status_rows` rows: one line per service.

    With ``wide`` False only the essential columns are shown (what fits 80
    columns). When a row has more than one replica the table's caption warns
    that replicas do not share state.
    """
    from rich.table import Table

    rows = list(rows)
    replicated = any(int(row.get("replicas") or 1) > 1 for row in rows)
    table = Table(
        title=title,
        title_justify="left",
        header_style="bold",
        box=_box(),
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        caption=REPLICAS_NOTE if replicated else None,
        caption_justify="left",
    )
    shown = [(name, justify) for name, justify, essential in _STATUS_COLUMNS if wide or essential]
    for column, justify in shown:
        # Names stay whole (they are what one copies); other cells fold when the terminal is narrow.
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column == "service")  # type: ignore[arg-type]
    for row in rows:
        cells: dict[str, str]
        if row["state"] == "unreachable":
            cells = {"service": row["service"], "kind": str(row["kind"]), "state": "[red]unreachable[/]", "health": _one_line(str(row["health"]))[:60]}
        else:
            state_style = {"running": "green", "failed": "red", "stopping": "yellow", "starting": "yellow"}.get(str(row["state"]), "")
            health_style = "green" if row["health"] == "ok" else "red"
            breaker_style = {"closed": "green", "open": "red", "half_open": "yellow", "half-open": "yellow"}.get(row["breaker"], "")
            alive, total = row.get("replicas_alive", row["replicas"]), row["replicas"]
            cells = {
                "service": row["service"],
                "kind": str(row["kind"]),
                "state": f"[{state_style}]{row['state']}[/]" if state_style else str(row["state"]),
                "health": f"[{health_style}]{_one_line(str(row['health']))[:60]}[/]",
                "replicas": str(total) if alive == total else f"[red]{alive}[/]/{total}",
                "in-flight": str(row["in_flight"]),
                "queue": str(row["queue_depth"]),
                "calls": f"{row['requests_total']:,}",
                "errors": f"{row['errors_total']:,}",
                "calls/s": _fmt_number(row["calls_per_second"]),
                "p50 ms": _fmt_number(row["p50_ms"], 3),
                "p99 ms": _fmt_number(row["p99_ms"], 3),
                "breaker": f"[{breaker_style}]{row['breaker']}[/]" if breaker_style else row["breaker"],
                "details": _fmt_extra(row["extra"]),
            }
        table.add_row(*(cells.get(column, "-") for column, _ in shown))
    return table


def _console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr): the terminal's width, else ``COLUMNS``, else 220 for a pipe."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width: int | None = None
    if not stream.isatty():
        # A pipe gets a wide fixed width so tables are not squeezed, unless COLUMNS says otherwise.
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 0 else 220
    return Console(file=stream, width=width, soft_wrap=False)


def _box() -> Any:
    """The table border of every listing: a header rule, no vertical lines (narrow terminals keep more text)."""
    from rich import box

    return box.SIMPLE_HEAD


def _collect_statuses(manager: ServiceManager, names: Sequence[str], explicit: bool) -> list[Any]:
    """Each named service's status; unreachable ones become ``{"error": ...}`` (or raise when named explicitly)."""
    statuses: list[Any] = []
    for name in names:
        try:
            status = _status_dict(manager.get_service_status(name))
            status.setdefault("service_name", name)
            statuses.append(status)
        except ServiceError as exc:
            if explicit:
                raise
            # A host that just stopped may still be listed: show why instead of failing the listing.
            manager.forget(name)
            statuses.append({"service_name": name, "kind": "?", "error": f"{type(exc).__name__}: {exc}"})
    return statuses


@cli.command("status")
@click.argument("services", nargs=-1)
@click.option("--watch", is_flag=True, help="Keep the table on screen and refresh it until Ctrl-C.")
@click.option("--interval", type=FiniteFloatRange(min=0.05), default=1.0, show_default=True, help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch, stop after this many refreshes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of rows instead of a table ([] when nothing runs).")
@click.option("--wide", is_flag=True, help="Every column, however wide the terminal.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def status_command(
    services: tuple[str, ...], watch: bool, interval: float, count: int | None, as_json: bool, wide: bool, config_path: str | None
) -> None:
    """Show state, health, replicas, load, calls/s, latency and breaker state of running services.

    Without SERVICES it shows every service running on this host (see
    'kservice services --running'). Columns a plugin does not provide show
    '-'; other plugin fields appear under 'details'. Without --watch, calls/s
    is averaged since each service started; with --watch it is the rate over
    the last interval. A terminal narrower than the table gets its essential
    columns only; --wide shows them all. A service with several replicas gets
    a note: replicas do not share state.

    \b
    Example:
      kservice status
      kservice status kv --json
      kservice status --watch --interval 0.5
    """
    from ._manager import ServiceManager

    if as_json and watch:
        raise click.UsageError("--json and --watch cannot be combined")
    with ServiceManager(config=Config.load(config_path)) as manager:
        explicit = bool(services)

        def names() -> list[str]:
            return list(services) if explicit else [r["name"] for r in running_services()]

        previous: dict[str, tuple[float, int]] = {}
        console = _console()
        wide = wide or not _narrow(console)
        if not watch:
            listed = names()
            if not listed:
                if as_json:
                    click.echo("[]")  # still valid JSON: json.load sees no services
                click.echo("no running services (start one with: kservice serve NAME=package.module:Class)", err=True)
                return
            rows = status_rows(_collect_statuses(manager, listed, explicit))
            if as_json:
                click.echo(json.dumps(rows, indent=2, default=repr))
            else:
                console.print(status_table(rows, wide=wide))
            return

        from rich.live import Live

        def render() -> Table:
            rows = status_rows(_collect_statuses(manager, names(), explicit), previous)
            stamp = time.strftime("%H:%M:%S")
            return status_table(rows, title=f"kservice status at {stamp} (every {interval:g}s, Ctrl-C to stop)", wide=wide)

        refreshes = 0
        try:
            with Live(render(), console=console, auto_refresh=False, transient=False) as live:
                refreshes = 1
                while count is None or refreshes < count:
                    time.sleep(interval)
                    live.update(render(), refresh=True)
                    refreshes += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends: not an error


# --------------------------------------------------------------------------
# dashboard
# --------------------------------------------------------------------------


@cli.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (the default lets only this host in).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8321, show_default=True, help="TCP port (0: any free port).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between samples of the services.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def dashboard_command(host: str, port: int, interval: float, config_path: str | None) -> None:
    """Serve a live web page of every running service, its load and latency, recent errors and plugins.

    The page lists what 'kservice status' lists (services hosted on this
    host, and Ray services where Ray is connected), updates itself every
    INTERVAL seconds and charts calls/s and p50/p99 latency of the last five
    minutes. It needs no network access. Stop with Ctrl-C.

    \b
    Example:
      kservice dashboard                  # then open http://127.0.0.1:8321/
      kservice dashboard --port 9000 -c services.yaml
    """
    try:
        from . import dashboard
    except ImportError as exc:
        _fail(f"the dashboard needs its extra: pip install 'kservice[dashboard]' ({exc})")
    config = Config.load(config_path)
    try:
        sock = dashboard.bind(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host} port {port}: {exc.strerror or exc} (choose another with --port)")
    sys.exit(dashboard.run(sock, config, interval=interval))


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------


@cli.command("bench")
@click.option("--quick", is_flag=True, help="Fewer calls per transport (a rough figure in a few seconds).")
@click.option("--calls", type=click.IntRange(min=10), default=None, help="Sync round trips per transport (default 3000, 300 with --quick).")
@click.option("--payload", type=click.IntRange(min=0), default=90, show_default=True, help="Approximate bytes per request argument.")
@click.option(
    "--transports",
    "only",
    default=None,
    metavar="A,B",
    help="Comma-separated subset of: inproc, mmap, ray, threadpool, mp-queue, mp-pipe.",
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None, help="Also draw latency distributions to this PNG file (needs kservice[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON instead of a table.")
def bench_command(quick: bool, calls: int | None, payload: int, only: str | None, plot_path: str | None, as_json: bool) -> None:
    """Measure kservice's transports beside stdlib baselines, in one run, on this machine.

    Rows: inproc (same process), mmap (a 'process' task in a child process),
    ray (a Ray actor, when Ray is installed), and the baselines
    ThreadPoolExecutor, multiprocessing.Queue and multiprocessing.Pipe pairs.
    Each row gives sync round-trip latency percentiles and pipelined calls/s.

    \b
    Example:
      kservice bench --quick
      kservice bench --transports inproc,mmap,mp-pipe --plot latency.png
    """
    from . import _bench

    if plot_path is not None:
        _bench.require_matplotlib()
    selected = _bench.select(only.split(",") if only else None)
    settings = _bench.BenchSettings.make(quick=quick, calls=calls, payload=payload)
    results = _bench.run(selected, settings, console=_console(stderr=True))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        _console().print(_bench.results_table(results, settings))
    if plot_path is not None:
        _bench.plot(results, plot_path, settings)
        click.echo(f"latency plot written to {plot_path}", err=True)


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


@cli.group("config", cls=_Group)
def config_group() -> None:
    """Check a configuration file, show the effective configuration, print the reference.

    \b
    Example:
      kservice config check services.yaml
      kservice config show -c services.yaml
      kservice config reference > docs/configuration.md
    """


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="The file to check (as PATH).")
@click.option(
    "--import",
    "import_modules",
    is_flag=True,
    help="Import each service's module to check its class (runs the module's top-level code); "
    "without it, modules are only found and read.",
)
def config_check_command(path: str | None, config_path: str | None, import_modules: bool) -> None:
    """Find everything in PATH (or -c FILE, like every other command) that would fail when its services start.

    Checks the schema of the core and every installed plugin, task kinds and
    transports against the registered ones, class paths (the module is found
    and its source read, without running it; --import imports it instead),
    service entry points and plugins.require. Prints 'ok' and the services it
    declares; otherwise one line per problem, each naming its key path and the
    closest valid key or name, and exit status 1. With neither PATH nor -c, the
    file named by KSERVICE_CONFIG is checked.

    \b
    Example:
      kservice config check -c services.yaml
      kservice config check services.yaml
      kservice config check --import services.yaml
    """
    if path is not None and config_path is not None and path != config_path:
        raise click.UsageError(f"two files given ({path} and -c {config_path}): check one at a time")
    path = path or config_path or os.environ.get("KSERVICE_CONFIG")
    if not path:
        raise click.UsageError("no file to check: give one with -c FILE (or as PATH, or in KSERVICE_CONFIG)")
    from ._config import check_config

    config, problems, notes = check_config(path, import_modules=import_modules)
    for note in notes:
        click.echo(f"note: {_one_line(note)}", err=True)
    if problems:
        for problem in problems:
            click.echo(f"error: {_one_line(problem)}", err=True)
        sys.exit(1)
    names = config.service_names()
    described = ", ".join(f"{n} ({(config.service_entry(n) or {}).get('kind', 'local')})" for n in names) or "none"
    click.echo(f"ok: {path} is valid; services: {described}")


@config_group.command("show")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def config_show_command(config_path: str | None) -> None:
    """Print the effective configuration as YAML: the file's values with every default filled in.

    \b
    Example:
      kservice config show
      kservice config show -c services.yaml > effective.yaml
    """
    import yaml

    config = Config.load(config_path)
    click.echo(f"# effective configuration from {config.source}")
    click.echo(yaml.safe_dump(config.as_dict(), sort_keys=False, default_flow_style=False).rstrip())


@config_group.command("reference")
@click.option("--builtin", is_flag=True, help="Only the core and the plugins shipped with kservice (how docs/configuration.md is made).")
def config_reference_command(builtin: bool) -> None:
    """Print the configuration reference (Markdown) generated from the schema of the core and installed plugins.

    docs/configuration.md is the --builtin output; a test keeps the two identical.

    \b
    Example:
      kservice config reference > my-configuration.md
      kservice config reference --builtin > docs/configuration.md
    """
    click.echo(config_reference(builtin_only=builtin), nl=False)


def _yaml_inline(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _setting_rows(schema: dict[str, Any], prefix: str) -> list[str]:
    from ._config import Setting

    lines = []
    for key, value in schema.items():
        if not isinstance(value, Setting):
            continue
        notes = []
        choices = value.choices
        if callable(choices):
            notes.append("one of the names installed plugins register")
        elif choices:
            notes.append("one of " + ", ".join(f"`{_yaml_inline(c)}`" for c in choices))
        if value.minimum is not None:
            notes.append(f"at least {value.minimum:g}")
        if value.maximum is not None:
            notes.append(f"at most {value.maximum:g}")
        doc = value.doc.rstrip(".") + (f" ({'; '.join(notes)})." if notes else ".")
        doc = doc.replace("|", r"\|")
        lines.append(f"| `{prefix}{key}` | {value.type_names()} | `{_yaml_inline(value.default)}` | {doc} |")
    return lines


def _sections(schema: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(dotted section path, section) for every section holding settings, depth first."""
    from ._config import Setting

    found: list[tuple[str, dict[str, Any]]] = []
    if any(isinstance(v, Setting) for v in schema.values()):
        found.append((prefix.rstrip("."), schema))
    for key, value in schema.items():
        if isinstance(value, dict):
            found.extend(_sections(value, f"{prefix}{key}."))
    return found


def _builtin_plugin(name: str) -> bool:
    """Whether plugin ``name`` ships inside the kservice distribution itself."""
    return get_plugin_manager().origins.get(name, "").startswith("entry point of kservice ")


def config_reference(builtin_only: bool = False) -> str:
    """The configuration reference in Markdown, from the schema of the core and the installed plugins.

    With ``builtin_only`` only the core's keys and those of the plugins shipped
    with kservice are included, so the text does not depend on what else is
    installed: ``docs/configuration.md`` is ``kservice config reference --builtin``.
    """
    import yaml

    from ._config import core_schema, defaults_of, merge_schema, service_entry_schema
    from ._plugins import _collect_registrations

    schema = core_schema()
    core_keys = {(section, key) for section, settings in _sections(schema) for key in settings}
    key_owner: dict[tuple[str, str], str] = {}
    for plugin_name, (path, addition) in _collect_registrations("kservice_config_schema"):
        if builtin_only and not _builtin_plugin(plugin_name):
            continue
        merge_schema(schema, path, addition)
        probe: dict[str, Any] = {}
        merge_schema(probe, path, addition)
        for section, settings in _sections(probe):
            for key in settings:
                key_owner.setdefault((section, key), plugin_name)

    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `kservice config reference --builtin` from the schema of the core and the",
        "     plugins shipped with kservice; do not edit by hand (tests/docs/test_configuration_reference.py",
        "     regenerates it and fails when it differs). -->",
        "",
        "kservice reads one YAML file: the `-c FILE` option of the command-line tool, the `config=`",
        "argument of `ServiceEnvironment` and `ServiceManager` (a path, a dict or a `Config`), or the",
        "file named by the `KSERVICE_CONFIG` environment variable. Every key is optional; a missing key",
        "takes the default below. An unknown key or a value of the wrong type is a `ConfigError` naming",
        "the full key path and the closest valid key. Check a file with `kservice config check FILE`",
        "and print the effective configuration with `kservice config show -c FILE`.",
        "",
        "## Where settings come from",
        "",
        "When the same thing is set in several places, the row higher in this table wins; a value that",
        "is wrong in any of them is an error, never silently replaced by one from a lower row.",
        "",
        "| source | what it sets | notes |",
        "|---|---|---|",
        "| arguments: `timeout=` of `call_service_sync` / `call_service_async` / `acall` / `proxy`, `kservice call --timeout` | that call's timeout | NaN and the infinities raise `ValueError` at once (a usage error, exit status 2, on the command line) |",
        "| arguments: `register_service(name, factory, kind=..., local={...})` | that service's options | merged over its `services.<name>` entry |",
        "| `services.<name>.<section>` in the configuration | one service's options | keys not given keep the global value |",
        "| the configuration: `config=` of `ServiceEnvironment` / `ServiceManager`, else `-c FILE`, else the file named by `KSERVICE_CONFIG` | everything on this page | exactly one file (or mapping) is read; they are not merged |",
        "| `KSERVICE_DISABLE_PLUGINS=a,b` | plugins not used | added to (never replaced by) `plugins.disable`; blocks the plugins before they are imported |",
        "| `plugins.disable` in the file named by `KSERVICE_CONFIG` | plugins not used | read before plugins are imported, like the variable |",
        "| `plugins.disable` in a `-c FILE` or `config=` | plugins not used | applied when that configuration is loaded: the plugins are unregistered and blocked for the rest of the process (they were imported, so an import error still warns) |",
        "| `plugins.require` (any configuration) | plugins that must be loaded | one that is not installed, failed to load or is disabled is a `PluginError` when the configuration is loaded: nothing starts |",
        "| `KSERVICE_STRICT_PLUGINS=1` | every plugin is required | any plugin that fails to load is a `PluginError` |",
        "| the defaults below | everything | |",
        "",
        "`kservice plugins` lists loaded, disabled and failed plugins and why (`-c FILE` applies a file's",
        "`plugins` section). `kservice config check FILE` reports every problem in the file at once, one",
        "line each with its key path and the closest valid key: unknown keys and wrong types, unknown task",
        "kinds and transports, class paths whose module or class does not exist (found and read without",
        "running the module; `--import` imports it), service entry points that are not installed, and",
        "required plugins that are not loaded.",
        "",
        "A config file is read only if it is a regular file of at most 1 MiB of UTF-8 YAML, nested at",
        "most 64 levels deep, with no integer longer than 30 digits and no key given twice in one",
        "mapping; anything else is a one-line `ConfigError` (from `kservice config check`, `config show`,",
        "`serve -c`, `status -c`...), never a traceback or a wait. Floats must be finite (`.nan` and",
        "`.inf` are refused). Settings that allocate have upper bounds, given in their rows below.",
        "",
        "`kservice serve -c FILE` hosts each declared service as one instance in its own process. A",
        "service declared with another kind (`process`, `ray`) or `replicas` above 1 is refused with an",
        "error naming it, before anything starts; `kservice serve --host-locally` hosts one local instance",
        "of such a service instead and prints a note saying so.",
        "",
        "Plugins add their own sections and keys. This page lists those of the plugins shipped with",
        "kservice; `kservice config reference` prints the same page for whatever is installed. Every",
        "top-level section other than `service`, `services` and `plugins` (and `service.local`,",
        "`service.ray`) can be overridden per service under `services.<name>.<section>`; keys not",
        "overridden keep their global value.",
        "",
        "## Environment variables in a config file",
        "",
        "Any value in a config file (`-c FILE`, `config=` given a path, or the file named by",
        "`KSERVICE_CONFIG`) may refer to environment variables:",
        "",
        "| written | becomes |",
        "|---|---|",
        "| `${VAR}` | the value of `VAR` (empty if it is set to the empty string); an unset `VAR` is an error, below |",
        "| `${VAR:-default}` | the value of `VAR`, or `default` when `VAR` is unset or empty, as in the shell; the default may hold references itself (`${PORT:-${DEFAULT_PORT}}`), expanded only when it is used |",
        "| `$${` | a literal `${` (`$${HOME}` stays `${HOME}`); any other `$` is kept as written |",
        "",
        "- A plain (unquoted) value is typed after the substitution as if its text had been written in",
        "  the file (as nameko types numbers and booleans): `max_workers: ${WORKERS}` with `WORKERS=8` is the integer 8,",
        "  `enabled: ${LOG_CALLS}` with `LOG_CALLS=true` a boolean, and an empty result or `null` is null.",
        "  A quoted value (`\"${PORT}\"`) or one tagged `!!str` stays a string, so a quoted reference in",
        "  an int or float setting is refused exactly as `\"8080\"` would be. A variable's text is never",
        "  parsed as YAML structure (unlike nameko): `[a, b]` or `a: b` coming from a variable is a string.",
        "- Inside `{...}` or `[...]` YAML ends an unquoted value at `{`, so a reference there must be",
        "  quoted; tag it to type it: `local: {max_workers: !!int \"${WORKERS}\"}` (or `!!float`, `!!bool`),",
        "  or write the mapping in block style. A tagged value that does not read as its tag",
        "  (`!!int \"\"`) is a one-line error naming its line.",
        "- References are expanded in values at every depth (a service's `args` and `kwargs`, lists),",
        "  never in keys.",
        "- An unset variable with no default, or a malformed reference (`${` with no `}`, a name that is",
        "  not letters, digits and `_`, nameko's `${VAR:default}`, which suggests `${VAR:-default}`), is a",
        "  one-line `ConfigError` naming the key path, the variable and the file; its key keeps its",
        "  default, so nothing else is reported for it. `kservice config check` lists every such line;",
        "  every other command stops on the first (saying how many more there are) before anything starts:",
        "",
        "  ```text",
        "  error: service.local.max_workers: environment variable WORKERS is not set and has no default; set it, or write '${WORKERS:-default}' (config file services.yaml)",
        "  ```",
        "",
        "- A mapping or `Config` given in Python (`ServiceEnvironment(config={...})`) is used as written,",
        "  not interpolated: Python code reads `os.environ` itself, and the effective configuration handed",
        "  to child hosts (already expanded) must not be expanded a second time.",
        "- Variables are read when the file is loaded, from that process's environment; a",
        "  `kservice serve --reload` restart reads the file again.",
        "",
        "## Choices are accepted in any case",
        "",
        "A setting whose row below says \"one of ...\" accepts each value in any case and keeps the",
        "spelling shown: `call_log.level: info` is `INFO`, `service.ray.lifetime: Detached` is `detached`,",
        "in the file, in a mapping given in Python and in `register_service(...)` options alike. A value",
        "that is none of them in any case is an error suggesting the closest one",
        "(`call_log.level: 'inf' is not one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'; did you mean 'INFO'?`).",
        "`kservice serve --log-level` also takes any case.",
        "",
    ]
    for section, settings in _sections(schema):
        plugins: dict[str, list[str]] = {}
        for key in settings:
            if (section, key) not in core_keys and (section, key) in key_owner:
                plugins.setdefault(key_owner[(section, key)], []).append(key)
        if any((section, key) in core_keys for key in settings):
            origin = "Declared by the core"
            origin += "".join(
                f"; plugin `{name}` adds {', '.join(f'`{k}`' for k in keys)}" for name, keys in sorted(plugins.items())
            )
        else:
            origin = "Declared by " + " and ".join(f"plugin `{name}`" for name in sorted(plugins))
        out += [f"## `{section}`", "", origin + ".", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += _setting_rows(settings, f"{section}.")
        out.append("")
    out += [
        "## `services.<name>`",
        "",
        "One entry per service the environment registers at construction. An entry may be just an",
        "import path (`kv: myapp.kv:KV`). Besides the keys below, an entry may hold any overridable",
        "section (`local`, `ray`, `service_call`, plugin sections) with the keys to change for this",
        "service only.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_setting_rows(service_entry_schema(), ""),
        "",
        "## Every default",
        "",
        "`kservice config show` with no file prints this (plus a comment line naming the source):",
        "",
        "```yaml",
        yaml.safe_dump(defaults_of(schema) | {"services": {}}, sort_keys=False, default_flow_style=False).rstrip(),
        "```",
        "",
        "## Example",
        "",
        "```yaml",
        "service_call:",
        "  default_timeout: ${CALL_TIMEOUT:-10}  # from the environment, 10 when CALL_TIMEOUT is unset",
        "services:",
        "  kv:",
        "    class: myapp.kv:KV",
        "    kind: process        # host it in a child process, reachable over shared memory",
        "    service_call:",
        "      default_timeout: 2 # calls to kv time out sooner than the others",
        "  text:",
        "    class: myapp.text:Text",
        "    kind: local",
        "    local:",
        "      max_workers: 4",
        "```",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def _usage_line(exc: click.UsageError) -> str:
    command = exc.ctx.command_path if exc.ctx is not None else "kservice"
    return f"{exc.format_message()} (see '{command} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``kservice`` console script.

    Exit status: 0 on success, 1 for a failed call or an invalid config or
    service, 2 for a usage error, 130 when interrupted.
    """
    # The working directory is not put on sys.path: in a directory another user can write, their
    # 'tenacity.py' would run as this user. 'kservice serve --app-dir DIR' (or PYTHONPATH) says where
    # 'module:Class' paths are found.
    try:
        get_plugin_manager().hook.kservice_register_commands(cli=cli)
    except ServiceError as exc:
        _fail(str(exc))
    try:
        status = cli.main(args=argv, prog_name="kservice", standalone_mode=False)
    except click.UsageError as exc:
        _fail(_usage_line(exc), 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code or 1)
    except ServiceError as exc:  # raised by commands registered outside the _Group
        _fail(str(exc))
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)  # `kservice ... | head` closing the pipe early is not an error
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
