"""``kservice bench``: kservice's transports beside stdlib baselines, measured in one run.

Every kservice row goes through the public API only (a ServiceEnvironment
hosting an echo service, a ServiceManager calling it), exactly as users call
their services; the baseline rows echo the same payload through the
standard library with no framework. Figures from one run on one machine are
comparable with each other, not with another machine's.

Two figures per row:

- sync round trip: one call at a time, each timed on its own (percentiles
  in microseconds);
- pipelined: a window of calls in flight at once (asynchronous calls for
  kservice, batches of puts then gets for the baselines), in calls/s.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from multiprocessing.connection import Connection as PipeEnd

    from rich.console import Console
    from rich.table import Table

    from .hookspecs import KindRuntime

__all__ = ["BenchResult", "BenchSettings", "Echo", "plot", "require_matplotlib", "results_table", "run", "select"]

#: Least time each row warms up before it is measured (see _measure).
WARMUP_SECONDS = 0.2

#: every row ``kservice bench`` knows, in display order
NAMES = ("inproc", "mmap", "ray", "threadpool", "mp-queue", "mp-pipe")

DESCRIPTIONS = {
    "inproc": "kservice, 'local' task in this process",
    "mmap": "kservice, 'process' task in a child process (shared memory)",
    "ray": "kservice, 'ray' task (one Ray actor)",
    "threadpool": "baseline: ThreadPoolExecutor.submit().result()",
    "mp-queue": "baseline: multiprocessing.Queue pair to a child",
    "mp-pipe": "baseline: multiprocessing.Pipe to a child",
}


class Echo:
    """The service every kservice row calls: returns its argument."""

    def echo(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure. ``make`` gives the defaults of ``--quick`` and of a full run."""

    calls: int
    warmup: int
    pipelined_calls: int
    window: int
    payload: int

    @classmethod
    def make(cls, *, quick: bool = False, calls: int | None = None, payload: int = 90) -> BenchSettings:
        calls = calls if calls is not None else (300 if quick else 3000)
        return cls(
            calls=calls,
            warmup=max(10, calls // 10),
            pipelined_calls=max(100, calls * (2 if quick else 3)),
            window=100,
            payload=payload,
        )


@dataclass
class BenchResult:
    """One row: sync latencies in microseconds and pipelined throughput, or why it was skipped."""

    name: str
    description: str
    latencies_us: list[float] = field(default_factory=list)
    pipelined_calls_per_s: float | None = None
    skipped: str = ""

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile of the sync latencies (NaN when there are none)."""
        if not self.latencies_us:
            return math.nan
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready numbers (latencies summarised, not listed)."""
        if self.skipped:
            return {"name": self.name, "description": self.description, "skipped": self.skipped}
        return {
            "name": self.name,
            "description": self.description,
            "calls": len(self.latencies_us),
            "p50_us": self.percentile(0.5),
            "p90_us": self.percentile(0.9),
            "p99_us": self.percentile(0.99),
            "mean_us": statistics.fmean(self.latencies_us),
            "pipelined_calls_per_s": self.pipelined_calls_per_s,
        }


# --------------------------------------------------------------------------
# subjects: something that echoes a payload, sync and pipelined
# --------------------------------------------------------------------------


class _Subject:
    """A thing to measure; ``start`` may raise ``_Skip``; ``close`` releases everything."""

    def start(self) -> None:
        """Bring the subject up (processes, actors)."""

    def round_trip(self, payload: bytes) -> None:
        raise NotImplementedError

    def pipelined(self, payload: bytes, count: int) -> None:
        """Echo ``count`` payloads, all in flight at once."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything; idempotent."""


class _Skip(Exception):
    """The subject cannot run here; the message says why and what to install."""


class _KserviceSubject(_Subject):
    """An Echo service of one task kind, called through a ServiceManager."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.environment: Any = None
        self.manager: Any = None
        self.name = f"bench-echo-{kind}"

    def start(self) -> None:
        from . import ServiceEnvironment, ServiceFactory
        from ._plugins import task_kinds

        if self.kind not in task_kinds():
            raise _Skip(f"no plugin provides the {self.kind!r} task kind here")
        # An explicit empty config: the figures are for the defaults, whatever KSERVICE_CONFIG says.
        self.environment = ServiceEnvironment(f"bench-{uuid.uuid4().hex[:8]}", {})
        self.environment.register_service(self.name, ServiceFactory(self.name, Echo), kind=self.kind)
        self.environment.start()
        self.manager = self.environment.manager()

    def round_trip(self, payload: bytes) -> None:
        self.manager.call_service_sync(self.name, "echo", (payload,))

    def pipelined(self, payload: bytes, count: int) -> None:
        futures = [self.manager.call_service_async(self.name, "echo", (payload,)) for _ in range(count)]
        for future in futures:
            future.result()

    def close(self) -> None:
        if self.environment is not None:
            self.environment.stop()
            self.environment = None


class _RuntimeSubject(_KserviceSubject):
    """A row of a task kind that needs a runtime (Ray for ``ray``): its plugin's KindRuntime brings it up and down."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.runtime: KindRuntime | None = None

    def start(self) -> None:
        from ._plugins import get_plugin_manager

        runtime = get_plugin_manager().hook.kservice_kind_runtime(kind=self.kind)
        if runtime is not None:
            reason = runtime.unavailable()
            if reason is not None:
                raise _Skip(reason)
            # Joins a runtime this process is already connected to; else a private local one
            # (the row measures this machine, not whatever cluster it can reach).
            runtime.start()
            self.runtime = runtime
        super().start()

    def close(self) -> None:
        super().close()
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None


def _echo(value: bytes) -> bytes:
    return value


class _ThreadPoolSubject(_Subject):
    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bench-pool")
        self.started = True

    def round_trip(self, payload: bytes) -> None:
        self.pool.submit(_echo, payload).result()

    def pipelined(self, payload: bytes, count: int) -> None:
        futures: list[Future[bytes]] = [self.pool.submit(_echo, payload) for _ in range(count)]
        for future in futures:
            future.result()

    def close(self) -> None:
        if self.started:
            self.started = False
            self.pool.shutdown()


def _queue_echo_server(requests: Any, responses: Any) -> None:
    """Child of the mp-queue baseline: echo until None."""
    while True:
        item = requests.get()
        if item is None:
            return
        responses.put(item)


def _pipe_echo_server(end: PipeEnd) -> None:
    """Child of the mp-pipe baseline: echo until None."""
    while True:
        item = end.recv()
        if item is None:
            return
        end.send(item)


class _QueueSubject(_Subject):
    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.requests = context.Queue()
        self.responses = context.Queue()
        self.process = context.Process(target=_queue_echo_server, args=(self.requests, self.responses), daemon=True)
        self.process.start()
        self.started = True

    def round_trip(self, payload: bytes) -> None:
        self.requests.put(payload)
        self.responses.get()

    def pipelined(self, payload: bytes, count: int) -> None:
        for _ in range(count):
            self.requests.put(payload)
        for _ in range(count):
            self.responses.get()

    def close(self) -> None:
        if not self.started:
            return
        self.started = False
        process = self.process
        self.requests.put(None)
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        for queue in (self.requests, self.responses):
            queue.close()
            queue.join_thread()


class _PipeSubject(_Subject):
    def __init__(self, payload: int) -> None:
        # Requests and responses in flight must fit the pipe's kernel buffer, or both ends block writing.
        self.window = max(1, min(100, (32 << 10) // (payload + 64)))
        self.started = False

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.end, child_end = context.Pipe()
        self.process = context.Process(target=_pipe_echo_server, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()
        self.started = True

    def round_trip(self, payload: bytes) -> None:
        self.end.send(payload)
        self.end.recv()

    def pipelined(self, payload: bytes, count: int) -> None:
        sent = 0
        while sent < count:
            batch = min(self.window, count - sent)
            for _ in range(batch):
                self.end.send(payload)
            for _ in range(batch):
                self.end.recv()
            sent += batch

    def close(self) -> None:
        if not self.started:
            return
        self.started = False
        process = self.process
        try:
            self.end.send(None)
        except OSError:
            pass
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        self.end.close()


def _make_subject(name: str, settings: BenchSettings) -> _Subject:
    if name == "inproc":
        return _KserviceSubject("local")
    if name == "mmap":
        return _KserviceSubject("process")
    if name == "ray":
        return _RuntimeSubject("ray")
    if name == "threadpool":
        return _ThreadPoolSubject()
    if name == "mp-queue":
        return _QueueSubject()
    if name == "mp-pipe":
        return _PipeSubject(settings.payload)
    raise ValueError(name)


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def select(names: Sequence[str] | None) -> list[str]:
    """The rows to measure: ``names`` in display order, or all of them.

    Raises click.BadParameter naming the valid rows for an unknown name.
    """
    if not names:
        return list(NAMES)
    wanted = [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in NAMES]
    if unknown or not wanted:
        raise click.BadParameter(
            f"unknown row {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(NAMES)}",
            param_hint="--transports",
        )
    return [n for n in NAMES if n in wanted]


def _measure(
    subject: _Subject, settings: BenchSettings, payload: bytes, advance: Callable[[int], None]
) -> tuple[list[float], float]:
    # Warm up by count and for at least WARMUP_SECONDS: right after a child process starts, the
    # kernel may run it on the caller's CPU for a few tens of milliseconds, and two processes
    # handing messages back and forth on one CPU are about three times slower than on two.
    warm_until = time.perf_counter() + WARMUP_SECONDS
    warmed = 0
    while warmed < settings.warmup or time.perf_counter() < warm_until:
        subject.round_trip(payload)
        warmed += 1
    advance(settings.warmup)
    latencies: list[float] = []
    clock = time.perf_counter_ns
    step = max(1, settings.calls // 50)
    for index in range(settings.calls):
        started = clock()
        subject.round_trip(payload)
        latencies.append((clock() - started) / 1e3)
        if index % step == step - 1:
            advance(step)
    advance(settings.calls % step)
    done = 0
    started_s = time.perf_counter()
    while done < settings.pipelined_calls:
        batch = min(settings.window, settings.pipelined_calls - done)
        subject.pipelined(payload, batch)
        done += batch
        advance(batch)
    throughput = settings.pipelined_calls / (time.perf_counter() - started_s)
    return latencies, throughput


def run(names: Iterable[str], settings: BenchSettings, console: Console | None = None) -> list[BenchResult]:
    """Measure each named row in turn, showing a progress bar on ``console``.

    A row that cannot run here (Ray missing) is returned with ``skipped``
    set. Everything a row starts is stopped before the next row starts, even
    when a measurement fails (the error then propagates).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    payload = b"x" * settings.payload
    names = list(names)
    per_row = settings.warmup + settings.calls + settings.pipelined_calls
    results: list[BenchResult] = []
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        overall = progress.add_task("all rows", total=len(names))
        for name in names:
            row = progress.add_task(name, total=per_row)
            subject = _make_subject(name, settings)
            result = BenchResult(name, DESCRIPTIONS[name])
            try:
                progress.update(row, description=f"{name} (start)")
                subject.start()
                progress.update(row, description=name)
                result.latencies_us, result.pipelined_calls_per_s = _measure(
                    subject,
                    settings,
                    payload,
                    lambda n, row=row: progress.advance(row, n),  # type: ignore[misc]
                )
            except _Skip as skip:
                result.skipped = str(skip)
            finally:
                subject.close()
                progress.remove_task(row)
                progress.advance(overall)
            results.append(result)
    return results


def results_table(results: Sequence[BenchResult], settings: BenchSettings) -> Table:
    """A rich Table of the results: one row per transport or baseline."""
    from rich.table import Table

    table = Table(
        title=(
            f"round trips of a {settings.payload}-byte argument: {settings.calls} sync calls, "
            f"{settings.pipelined_calls} pipelined ({settings.window} in flight)"
        ),
        title_justify="left",
        header_style="bold",
    )
    table.add_column("row")
    table.add_column("what is measured")
    for column in ("p50 µs", "p90 µs", "p99 µs", "pipelined calls/s"):
        table.add_column(column, justify="right")
    for result in results:
        if result.skipped:
            table.add_row(result.name, result.description, "-", "-", "-", f"skipped: {result.skipped}")
            continue
        table.add_row(
            result.name,
            result.description,
            f"{result.percentile(0.5):,.1f}",
            f"{result.percentile(0.9):,.1f}",
            f"{result.percentile(0.99):,.1f}",
            f"{result.pipelined_calls_per_s or 0:,.0f}",
        )
    return table


# --------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Raise a one-line ClickException naming the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--plot needs matplotlib, which is not installed: pip install 'kservice[plot]'"
        ) from None


_plot_lock = threading.Lock()


def plot(results: Sequence[BenchResult], path: str, settings: BenchSettings) -> None:
    """Draw each row's sync latency distribution (cumulative, log scale) to a PNG at ``path``."""
    require_matplotlib()
    import matplotlib

    with _plot_lock:
        matplotlib.use("Agg")  # files only: no display is needed or wanted
        import matplotlib.pyplot as plt

        measured = [r for r in results if not r.skipped and r.latencies_us]
        figure, (cdf, box) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
        try:
            for result in measured:
                ordered = sorted(result.latencies_us)
                fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
                cdf.plot(ordered, fractions, label=f"{result.name} (p50 {result.percentile(0.5):,.1f} µs)")
            cdf.set_xscale("log")
            cdf.set_xlabel("sync round trip (µs, log scale)")
            cdf.set_ylabel("fraction of calls at most this long")
            cdf.grid(True, which="both", alpha=0.3)
            cdf.legend(loc="lower right", fontsize="small")
            cdf.set_title(f"{settings.calls} sync calls per row, {settings.payload}-byte argument")
            if measured:
                top_down = measured[::-1]  # the first row at the top, as in the table
                box.boxplot(
                    [r.latencies_us for r in top_down],
                    orientation="horizontal",
                    showfliers=False,
                    whis=(1, 99),
                    tick_labels=[r.name for r in top_down],
                )
            box.set_xscale("log")
            box.set_xlabel("µs (whiskers: p1 and p99)")
            box.set_title("spread per row")
            box.grid(True, which="both", alpha=0.3)
            figure.tight_layout()
            figure.savefig(path, dpi=110)
        finally:
            plt.close(figure)
