"""The ``kservice`` command group, and what its commands share: the error line, option types and help."""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from .._errors import ServiceError

if TYPE_CHECKING:
    from rich.console import Console


_CONFIG_OPTION_HELP = "YAML config file (default: the file named by KSERVICE_CONFIG, else built-in defaults)."


class FiniteFloatRange(click.FloatRange):
    """A FloatRange of seconds that also refuses NaN, the infinities and more than ``threading.TIMEOUT_MAX``.

    Each is a usage error naming the option: a longer wait makes Python's
    locks, joins and sleeps raise OverflowError.
    """

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        converted = super().convert(value, param, ctx)
        if not math.isfinite(converted):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if converted > threading.TIMEOUT_MAX:
            self.fail(
                f"{value!r} is longer than a wait can take: at most {threading.TIMEOUT_MAX:.2g} seconds", param, ctx
            )
        return converted


class _Group(click.Group):
    """Turns kservice errors raised by sub-commands into one line on stderr and exit status 1.

    ``lazy_commands`` maps a command's name to where it is defined: a module
    that adds it to this group when imported, or ``"module:attribute"``, a
    command added when first needed. The module is imported when the command
    is run or listed, so ``kservice call`` imports neither the status table,
    the dashboard, the benchmark, the config reference nor ``kservice serve``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = self.lazy_commands.get(cmd_name)
        if cmd_name not in self.commands and where is not None:
            from importlib import import_module

            module_name, _, attribute = where.partition(":")
            module = import_module(module_name)
            if attribute:
                self.add_command(getattr(module, attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

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


def _narrow(console: Console) -> bool:
    """Whether a table should keep to its essential columns (the terminal is narrower than the full table)."""
    return console.width < 140
