"""The ``kservice`` command-line tool.

Every command prints one actionable line on stderr and exits non-zero for a
user error (bad arguments, unknown or unreachable service, malformed config):
no tracebacks. Usage errors exit with status 2, every other error with 1.
Plugins add commands through the ``kservice_register_commands`` hook (the
``mmap`` plugin adds ``serve``).

Layout: ``_group`` holds the command group and what its commands share; one
module per command group adds its commands to it when imported (``services``:
``plugins`` and ``services``; ``call``; ``status``: ``status`` and
``dashboard``; ``bench``; ``config``), which happens when one of its commands
is run or listed (``_Group.lazy_commands``); this module holds :func:`main`,
the console script's entry point.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from .._errors import ServiceError
from .._plugins import get_plugin_manager
from ._group import FiniteFloatRange as FiniteFloatRange
from ._group import _fail
from ._group import cli as cli

if TYPE_CHECKING:
    from .config import config_reference as config_reference
    from .services import running_services as running_services
    from .services import service_listing as service_listing
    from .status import REPLICAS_NOTE as REPLICAS_NOTE
    from .status import _collect_statuses as _collect_statuses
    from .status import status_rows as status_rows
    from .status import status_table as status_table

#: command name -> the module of this package that defines it (imported when the command is used)
cli.lazy_commands.update(
    {
        "bench": f"{__name__}.bench",
        "call": f"{__name__}.call",
        "config": f"{__name__}.config",
        "dashboard": f"{__name__}.status",
        "plugins": f"{__name__}.services",
        "services": f"{__name__}.services",
        "status": f"{__name__}.status",
    }
)
#: name re-exported here -> the module of this package it is read from when first used
_LAZY_NAMES = {
    "config_reference": "config",
    "running_services": "services",
    "service_listing": "services",
    "REPLICAS_NOTE": "status",
    "_collect_statuses": "status",
    "status_rows": "status",
    "status_table": "status",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


__all__ = [
    "FiniteFloatRange",
    "cli",
    "config_reference",
    "main",
    "running_services",
    "status_rows",
    "status_table",
]


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
