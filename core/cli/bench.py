"""``kservice bench``: round-trip latency and throughput per transport."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    pass

from ._group import _console, cli

# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------


@cli.command("bench")
@click.option("--quick", is_flag=True, help="Fewer calls per transport (a rough figure in a few seconds).")
@click.option(
    "--calls",
    type=click.IntRange(min=10),
    default=None,
    help="Sync round trips per transport (default 3000, 300 with --quick).",
)
@click.option(
    "--payload",
    type=click.IntRange(min=0),
    default=90,
    show_default=True,
    help="Approximate bytes per request argument.",
)
@click.option(
    "--transports",
    "only",
    default=None,
    metavar="A,B",
    help="Comma-separated subset of: inproc, mmap, ray, threadpool, mp-queue, mp-pipe.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also draw latency distributions to this PNG file (needs kservice[plot]).",
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON instead of a table.")
def bench_command(
    quick: bool, calls: int | None, payload: int, only: str | None, plot_path: str | None, as_json: bool
) -> None:
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
    from .. import _bench

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
