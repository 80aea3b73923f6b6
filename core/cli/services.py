"""``kservice plugins`` and ``kservice services``: what is installed, configured and running."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from .._config import Config
from .._errors import ConfigError, ServiceError
from .._plugins import PLUGIN_ANSWER_TIMEOUT, ask_each_plugin

if TYPE_CHECKING:
    from .._manager import ServiceManager

from ._group import _CONFIG_OPTION_HELP, FiniteFloatRange, _box, _console, _fail, _narrow, cli

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
    from .._errors import PluginError
    from .._plugins import plugin_states

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
                    {
                        "name": st.name,
                        "state": st.state,
                        "origin": st.origin,
                        "hooks": list(st.hooks),
                        "reason": st.reason,
                        "required": st.required,
                    }
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


def _answer_items(plugin: str, hook_name: str, answer: Any, notes: list[str]) -> list[Any]:
    """The items of a plugin's list answer; a note naming the plugin when it is no list."""
    if answer is None:
        return []
    if isinstance(answer, (list, tuple)):
        return list(answer)
    notes.append(f"plugin {plugin!r}: its {hook_name} returned {type(answer).__name__}, not a list; left out")
    return []


def running_services(notes: list[str] | None = None, within: float = PLUGIN_ANSWER_TIMEOUT) -> list[dict[str, Any]]:
    """Every service a plugin reports as running on this host, one dict per name, sorted by name.

    Comes from the ``kservice_running_services`` hook; plugins that only
    implement ``kservice_known_services`` contribute their names with
    ``transport`` set to ``"?"``. A name reported twice keeps the first report.
    Takes at most about ``within`` seconds: a plugin that raises, has not
    answered by then, or answers something that is not a list of records
    (of names) is left out, and a line naming it and what happened is
    appended to ``notes``.
    """
    notes = [] if notes is None else notes
    hooks = ("kservice_running_services", "kservice_known_services")
    answers = ask_each_plugin(hooks, within, notes)
    found: dict[str, dict[str, Any]] = {}
    for plugin, answer in answers["kservice_running_services"]:
        for record in _answer_items(plugin, "kservice_running_services", answer, notes):
            name = str(record.get("name", "")) if isinstance(record, dict) else ""
            if name and name not in found:
                found[name] = dict(record)
    for plugin, answer in answers["kservice_known_services"]:
        for name in _answer_items(plugin, "kservice_known_services", answer, notes):
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


def service_listing(
    config: Config, manager: ServiceManager, notes: list[str] | None = None, within: float = PLUGIN_ANSWER_TIMEOUT
) -> list[dict[str, Any]]:
    """Installed, configured and running services together, one dict per name, sorted by name.

    Each row says which it is (``installed``, ``configured``, ``running``
    booleans, and ``state``: ``running``, else ``configured``, else
    ``installed``) and, for a running service, the ``transport`` a caller in
    this process would use (see ``ServiceManager.service_addresses``) and the
    others it offers (``transports``). Numbers are numbers; what is unknown is None.
    A plugin that could not say what runs within ``within`` seconds is named in ``notes`` (see
    :func:`running_services`).
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

    from .._environment import ServiceEnvironment

    for name, path in ServiceEnvironment.available_services().items():
        found = row(name)
        found.update(installed=True, source="entry point")
        found["class"] = path
    for name in config.service_names():
        entry = config.service_entry(name) or {}
        found = row(name)
        found.update(configured=True, kind=entry.get("kind", "local"), source=f"config {config.source}")
        found["class"] = str(entry.get("class") or entry.get("entry_point") or found["class"] or name)
    for record in running_services(notes, within):
        found = row(str(record["name"]))
        started = record.get("started_at")
        found.update(
            running=True,
            pid=record.get("pid"),
            address=record.get("address") or record.get("queue"),
            uptime_s=round(max(0.0, time.time() - float(started)), 1)
            if isinstance(started, (int, float)) and started > 0
            else None,
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


@cli.command("services")
@click.option("--running", is_flag=True, help="Only services running on this host.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option("--wide", is_flag=True, help="Every column, however wide the terminal.")
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0, min_open=True),
    default=PLUGIN_ANSWER_TIMEOUT,
    show_default=True,
    help="Seconds the plugins get to say what runs; one that does not answer is named in a note.",
)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def services_command(running: bool, as_json: bool, wide: bool, timeout: float, config_path: str | None) -> None:
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
    from .._manager import ServiceManager

    config = Config.load(config_path)
    notes: list[str] = []
    with ServiceManager(config=config) as manager:
        rows = service_listing(config, manager, notes, timeout)
    for note in notes:
        click.echo(f"note: {note}", err=True)
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
        table.add_column(
            column,
            overflow="fold",
            no_wrap=column == "name",
            justify="right" if column in ("pid", "uptime") else "left",
        )
    for r in rows:
        state = {"running": "[green]running[/]"}.get(r["state"], r["state"])
        cells = [
            r["name"],
            state,
            r["transport"] or "-",
            r["class"] or "-",
            str(r["pid"] or "-"),
            _uptime(r["uptime_s"]),
        ]
        if wide:
            cells += [r["address"] or "-", r["kind"] or "-", r["source"] or "-"]
        table.add_row(*cells)
    console.print(table)
    idle = [r["name"] for r in rows if not r["running"]]
    if idle:
        hints = "; ".join(_serve_hint(name, config, config_path) for name in idle[:3]) + (
            "; ..." if len(idle) > 3 else ""
        )
        click.echo(f"not running: {', '.join(idle)} (start with: {hints})", err=True)
