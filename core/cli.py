"""The ``kservice`` command-line tool.

Every command prints one actionable line on stderr and exits non-zero for a
user error (bad arguments, unknown service, malformed config): no tracebacks.
Plugins add commands through the ``kservice_register_commands`` hook.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ._config import Config
from ._errors import ServiceError
from ._plugins import get_plugin_manager, plugin_infos

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Turns kservice errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServiceError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kservice")
def cli() -> None:
    """kservice: call Python services by name, in-process, across processes, or on Ray.

    \b
    Example:
      kservice plugins
      kservice call kv get '["key"]'
    """


@cli.command("plugins")
def plugins_command() -> None:
    """List loaded plugins: name, where each came from, the hooks it implements.

    \b
    Example:
      KSERVICE_DISABLE_PLUGINS=mmap kservice plugins
    """
    for info in plugin_infos():
        click.echo(f"{info.name}\t{info.origin}\t{', '.join(info.hooks)}")


@cli.command("services")
@click.option("-c", "--config", "config_path", type=click.Path(), default=None, help="YAML config file.")
def services_command(config_path: str | None) -> None:
    """List services advertised by installed distributions and declared in config.

    \b
    Example:
      kservice services -c services.yaml
    """
    from ._environment import ServiceEnvironment

    config = Config.load(config_path)
    for name, path in ServiceEnvironment.available_services().items():
        click.echo(f"{name}\t{path}\tentry point")
    for name in config.service_names():
        entry = config.service_entry(name) or {}
        click.echo(f"{name}\t{entry.get('class') or entry.get('entry_point') or name}\tconfig ({config.source})")


@cli.command("call")
@click.argument("service")
@click.argument("method")
@click.argument("args_json", required=False, default="[]")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments.")
@click.option("--timeout", type=float, default=None, help="Seconds before ServiceTimeoutError.")
@click.option("-c", "--config", "config_path", type=click.Path(), default=None, help="YAML config file.")
def call_command(
    service: str, method: str, args_json: str, kwargs_json: str, timeout: float | None, config_path: str | None
) -> None:
    """Call SERVICE.METHOD with a JSON array of arguments and print the JSON result.

    \b
    Example:
      kservice call kv put '["greeting", "hello"]'
      kservice call kv get '["greeting"]' --timeout 2
    """
    from ._manager import ServiceManager

    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="ARGS_JSON") from None
    if not isinstance(args, list):
        raise click.BadParameter("must be a JSON array, e.g. '[1, \"a\"]'", param_hint="ARGS_JSON")
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--kwargs") from None
    if not isinstance(kwargs, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--kwargs")
    with ServiceManager(config=Config.load(config_path)) as manager:
        result = manager.call_service_sync(service, method, tuple(args), kwargs, timeout=timeout)
    click.echo(json.dumps(result, default=repr))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``kservice`` console script."""
    try:
        get_plugin_manager().hook.kservice_register_commands(cli=cli)
    except ServiceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    cli.main(args=argv, prog_name="kservice")


if __name__ == "__main__":
    main()
