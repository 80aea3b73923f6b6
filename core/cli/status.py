"""``kservice status`` (and its rows and table, shared with the dashboard) and ``kservice dashboard``."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import click

from .._config import Config
from .._errors import ServiceError
from .._plugins import collect

if TYPE_CHECKING:
    from rich.table import Table

    from .._manager import ServiceManager

from ._group import _CONFIG_OPTION_HELP, FiniteFloatRange, _box, _console, _fail, _narrow, _one_line, cli
from .services import running_services

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
    # 1 s for a plugin's cells (not kservice's own): the table refreshes every second or so.
    for cells in collect("kservice_status_columns", 1.0, status=data, extra=extra):
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
            rows.append(
                {
                    "service": name,
                    "kind": data.get("kind", "?"),
                    "state": "unreachable",
                    "health": data["error"],
                    "extra": {},
                }
            )
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
        shown = (
            value
            if isinstance(value, (str, int, float, bool)) or value is None
            else json.dumps(value, default=repr, separators=(",", ":"))
        )
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


def status_table(
    rows: Iterable[dict[str, Any]], title: str | None = None, wide: bool = True, notes: Iterable[str] = ()
) -> Table:
    """A rich Table of :func:`status_rows` rows: one line per service.

    With ``wide`` False only the essential columns are shown (what fits 80
    columns). When a row has more than one replica the table's caption warns
    that replicas do not share state; ``notes`` (plugins that did not answer)
    follow in the caption.
    """
    from rich.table import Table

    rows = list(rows)
    replicated = any(int(row.get("replicas") or 1) > 1 for row in rows)
    caption = "\n".join([*([REPLICAS_NOTE] if replicated else []), *(f"note: {note}" for note in notes)])
    table = Table(
        title=title,
        title_justify="left",
        header_style="bold",
        box=_box(),
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        caption=caption or None,
        caption_justify="left",
    )
    shown = [(name, justify) for name, justify, essential in _STATUS_COLUMNS if wide or essential]
    for column, justify in shown:
        # Names stay whole (they are what one copies); other cells fold when the terminal is narrow.
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column == "service")  # type: ignore[arg-type]
    for row in rows:
        cells: dict[str, str]
        if row["state"] == "unreachable":
            cells = {
                "service": row["service"],
                "kind": str(row["kind"]),
                "state": "[red]unreachable[/]",
                "health": _one_line(str(row["health"]))[:60],
            }
        else:
            state_style = {"running": "green", "failed": "red", "stopping": "yellow", "starting": "yellow"}.get(
                str(row["state"]), ""
            )
            health_style = "green" if row["health"] == "ok" else "red"
            breaker_style = {"closed": "green", "open": "red", "half_open": "yellow", "half-open": "yellow"}.get(
                row["breaker"], ""
            )
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


#: Seconds ``kservice status`` (and the dashboard) waits for each service's status by default.
STATUS_TIMEOUT = 3.0
#: Services asked for their status at once; more wait for a free thread.
_STATUS_THREADS = 32


def _status_pool() -> ThreadPoolExecutor:
    """Threads that ask services for their status at once; one pool for a whole ``--watch`` or dashboard.

    Why one pool: each thread that calls over mmap gets a response ring, which
    a pool made per refresh would create and remove again every time.
    """
    return ThreadPoolExecutor(_STATUS_THREADS, thread_name_prefix="kservice-status")


def _collect_statuses(
    manager: ServiceManager,
    names: Sequence[str],
    explicit: bool,
    timeout: float = STATUS_TIMEOUT,
    pool: ThreadPoolExecutor | None = None,
) -> list[Any]:
    """Each named service's status, in order; unreachable ones become ``{"error": ...}`` (or raise when named explicitly).

    The services are asked at once (up to ``_STATUS_THREADS`` at a time, in
    ``pool`` or in threads made for this call), each for at most ``timeout``
    seconds where its transport takes a timeout (mmap), so a listing of up to
    that many services that do not answer takes about ``timeout``, not
    ``timeout`` per service. Named explicitly, the first failure in ``names``
    order is raised, once every service was asked.
    """

    def one(name: str) -> dict[str, Any]:
        try:
            status = _status_dict(manager.get_service_status(name, timeout=timeout))
        except ServiceError as exc:
            if explicit:
                raise
            # A host that just stopped may still be listed: show why instead of failing the listing.
            manager.forget(name)
            return {"service_name": name, "kind": "?", "error": f"{type(exc).__name__}: {exc}"}
        status.setdefault("service_name", name)
        return status

    if pool is not None:
        return list(pool.map(one, names))
    if len(names) <= 1:
        return [one(name) for name in names]
    with _status_pool() as own:
        return list(own.map(one, names))


@cli.command("status")
@click.argument("services", nargs=-1)
@click.option("--watch", is_flag=True, help="Keep the table on screen and refresh it until Ctrl-C.")
@click.option(
    "--interval",
    type=FiniteFloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch, stop after this many refreshes.")
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0, min_open=True),
    default=STATUS_TIMEOUT,
    show_default=True,
    help="Seconds each service gets to answer; services are asked at once, and one that does not answer "
    "is shown unreachable, saying so.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON array of rows instead of a table ([] when nothing runs)."
)
@click.option("--wide", is_flag=True, help="Every column, however wide the terminal.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def status_command(
    services: tuple[str, ...],
    watch: bool,
    interval: float,
    count: int | None,
    timeout: float,
    as_json: bool,
    wide: bool,
    config_path: str | None,
) -> None:
    """Show state, health, replicas, load, calls/s, latency and breaker state of running services.

    Without SERVICES it shows every service running on this host (see
    'kservice services --running'). Columns a plugin does not provide show
    '-'; other plugin fields appear under 'details'. Without --watch, calls/s
    is averaged since each service started; with --watch it is the rate over
    the last interval. A terminal narrower than the table gets its essential
    columns only; --wide shows them all. A service with several replicas gets
    a note: replicas do not share state. Services are asked at once; one that
    does not answer within --timeout seconds is shown unreachable.

    \b
    Example:
      kservice status
      kservice status kv --json
      kservice status --timeout 10
      kservice status --watch --interval 0.5
    """
    from .._manager import ServiceManager

    if as_json and watch:
        raise click.UsageError("--json and --watch cannot be combined")
    with ServiceManager(config=Config.load(config_path)) as manager, contextlib.ExitStack() as stack:
        explicit = bool(services)

        def names(notes: list[str]) -> list[str]:
            return list(services) if explicit else [r["name"] for r in running_services(notes, within=timeout)]

        previous: dict[str, tuple[float, int]] = {}
        console = _console()
        wide = wide or not _narrow(console)
        if not watch:
            notes: list[str] = []
            listed = names(notes)
            for note in notes:
                click.echo(f"note: {note}", err=True)
            if not listed:
                if as_json:
                    click.echo("[]")  # still valid JSON: json.load sees no services
                click.echo("no running services (start one with: kservice serve NAME=package.module:Class)", err=True)
                return
            rows = status_rows(_collect_statuses(manager, listed, explicit, timeout))
            if as_json:
                click.echo(json.dumps(rows, indent=2, default=repr))
            else:
                console.print(status_table(rows, wide=wide))
            return

        from rich.live import Live

        pool = stack.enter_context(_status_pool())

        def render() -> Table:
            notes: list[str] = []
            rows = status_rows(_collect_statuses(manager, names(notes), explicit, timeout, pool), previous)
            stamp = time.strftime("%H:%M:%S")
            return status_table(
                rows, title=f"kservice status at {stamp} (every {interval:g}s, Ctrl-C to stop)", wide=wide, notes=notes
            )

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
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (the default lets only this host in)."
)
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=8321,
    show_default=True,
    help="TCP port (0: any free port).",
)
@click.option(
    "--interval",
    type=FiniteFloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between samples of the services.",
)
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
        from .. import dashboard
    except ImportError as exc:
        _fail(f"the dashboard needs its extra: pip install 'kservice[dashboard]' ({exc})")
    config = Config.load(config_path)
    try:
        sock = dashboard.bind(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host} port {port}: {exc.strerror or exc} (choose another with --port)")
    sys.exit(dashboard.run(sock, config, interval=interval))
