"""The mmap plugin's commands, ``kservice serve`` and ``kservice cleanup``.

Kept apart from :mod:`.host` so that a process which only calls services
(building a ``ServiceManager`` loads the plugin) never imports click or the
CLI: they are imported when the CLI adds its commands.
"""

from __future__ import annotations

import os
import sys

import click
from kservice.cli import FiniteFloatRange

from .codec import ORPHAN_SEGMENT_GRACE
from .host import _LOG_LEVELS, DRAIN_TIMEOUT, _configure_logging, reclaim, serve


@click.command("serve")
@click.option("-c", "--config", "config_path", type=click.Path(), default=None, help="YAML config file.")
@click.option(
    "--drain-timeout",
    type=FiniteFloatRange(min=0),
    default=DRAIN_TIMEOUT,
    show_default=True,
    help="Seconds calls in flight get on stop.",
)
@click.option(
    "--app-dir",
    type=click.Path(exists=True, file_okay=False, resolve_path=True),
    default=None,
    help="Look for services' modules in this directory first (the working directory is not searched unless named, e.g. '--app-dir .').",
)
@click.option(
    "--host-locally",
    is_flag=True,
    help="Host a service declared with another kind (process, ray) or replicas > 1 as one local instance in this "
    "process, with a note saying so, instead of refusing it.",
)
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="Log records at or above this level go to stderr (the call log's, call_log.enabled, are INFO).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve this host's Prometheus metrics at http://HOST:PORT/metrics (0: any free port; needs kservice[metrics]).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics endpoint listens on.")
@click.option(
    "--reload",
    is_flag=True,
    help="Development: restart the host (draining calls) when a watched file changes; needs kservice[reload].",
)
@click.option(
    "--reload-dir",
    "reload_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory to watch with --reload (repeatable; default: the working directory).",
)
@click.argument("services", nargs=-1)
def serve_command(
    config_path: str | None,
    drain_timeout: float,
    app_dir: str | None,
    host_locally: bool,
    log_level: str,
    metrics_port: int | None,
    metrics_host: str,
    reload: bool,
    reload_dirs: tuple[str, ...],
    services: tuple[str, ...],
) -> None:
    """Host services so any process of this user on this host can call them by name.

    SERVICE is a name declared under 'services:' in the config, a name in the
    'kservice.services' entry-point group, or an import path
    [NAME=]package.module:Class, found on PYTHONPATH, among installed
    packages, or in --app-dir. With no SERVICE, every configured service is
    hosted, each as one instance in this process: a service declared with
    another kind or replicas > 1 is refused (or, with --host-locally, hosted as
    one local instance with a note saying so). Stop with Ctrl-C, SIGTERM or
    SIGHUP (the terminal or ssh session closed): calls in flight finish first,
    then the queues and registry records are removed. A second Ctrl-C or
    SIGTERM stops at once; a second SIGHUP does not.

    With --reload the host runs in a child process that is replaced when a
    .py file under the watched directories (or the config file) changes: the
    new code is imported in a fresh interpreter first, and when that fails
    the old host keeps serving and the error is printed.

    \b
    Example:
      kservice serve --app-dir . kv=kvstore:KeyValue
      kservice serve kv=myapp.services:KeyValue
      kservice serve -c services.yaml --log-level INFO --metrics-port 9464
      kservice serve kv=myapp.services:KeyValue --reload
    """
    if app_dir is not None:
        sys.path.insert(0, app_dir)  # asked for by name: an absolute path, never the changing working directory
    if reload:
        from ._reload import serve_with_reload

        sys.exit(serve_with_reload(click.get_current_context(), config_path, services, reload_dirs or (os.getcwd(),)))
    _configure_logging(log_level)
    sys.exit(
        serve(
            config_path,
            services,
            drain_timeout=drain_timeout,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            host_locally=host_locally,
        )
    )


_CLEANUP_HELP = f"""Remove what processes that ended left in this user's queue and registry directories.

Removed at once: request and response rings whose owner process is dead;
registry records of hosts that are dead; pooled segments (pool-PID-*.seg) whose
owner is dead; one-shot segments (oob-SENDER-RECEIVER-*.seg) whose receiver is
dead; temporary files of processes killed while writing them.

Removed only once older than {ORPHAN_SEGMENT_GRACE / 60:g} minutes: one-shot segments whose sender
is dead but whose receiver lives (the record naming one may still be queued
for that receiver). Run it again after that to remove them.

Nothing of a live process is removed. Each removal is printed. The same sweep runs the first time any process
uses the directories (every kservice command, every host start, every program
using the library).

\b
Example:
  kservice cleanup
"""


@click.command("cleanup", help=_CLEANUP_HELP)
def cleanup_command() -> None:
    from . import reclaimed_at_start

    for removed in (*reclaimed_at_start(), reclaim()):
        for kind, names in removed.items():
            for name in names:
                click.echo(f"removed {kind[:-1]} {name}")
