"""A tour of kservice in well under a minute: ``python -m kservice.demo`` (``make demo``).

Two services, a key-value store and a text processor, hosted three ways:

- ``kv``: a ``local`` task in this process (the ``inproc`` transport);
- ``text``: a ``process`` task in a child process (the ``mmap`` transport);
- ``text-ray``: a ``ray`` task with two replica actors (the ``ray`` transport);
- ``model``: a stand-in language model written with ``async def`` methods, in
  this process. It and both text services stream an answer word by word
  (generator methods), so a stream is shown on each transport.

The demo calls them synchronously and asynchronously through one
ServiceManager, runs a middleware chain around every call (metadata set by the
caller's middleware is read by the service in the other process), kills a Ray
replica while calls are in flight and watches it come back, prints the status
table, and stops everything. It exits 0 only when every step behaved as
described and nothing is left behind: no child process, no shared-memory
segment. Without Ray installed it says so and runs the rest.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

from . import (
    KindRuntime,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    current_request,
    idempotent,
)

__all__ = ["KeyValueStore", "TextService", "TokenModel", "main"]

# A pipe or a log file gets a wide fixed width so the status table is not squeezed into 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# --------------------------------------------------------------------------
# the services: ordinary classes, nothing kservice-specific but a decorator
# --------------------------------------------------------------------------


class KeyValueStore:
    """An in-memory key-value store with a hit counter."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value

    @idempotent
    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            self.hits += 1
            return self._data.get(key, default)

    @idempotent
    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)


class TextService:
    """Text processing: word counts, slugs, a summary of who is calling."""

    @idempotent
    def word_count(self, text: str) -> dict[str, int]:
        return dict(Counter(re.findall(r"[a-z']+", text.lower())).most_common(3))

    @idempotent
    def slugify(self, text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    @idempotent
    def where(self) -> dict[str, Any]:
        """The process serving the call, and the tenant the caller's middleware attached."""
        request = current_request()
        tenant = request.metadata.get("tenant") if request is not None else None
        return {"pid": os.getpid(), "tenant": tenant}

    @idempotent
    def slow_upper(self, text: str, seconds: float = 0.02) -> str:
        time.sleep(seconds)
        return text.upper()

    def generate(self, prompt: str, delay: float = 0.01) -> Iterator[str]:
        """A stand-in for a model streaming its answer: one word at a time (a generator method streams)."""
        for word in _answer(prompt):
            time.sleep(delay)
            yield word


class TokenModel:
    """A stand-in language model written with asyncio: ``async def`` methods run on the task's event loop."""

    async def complete(self, prompt: str) -> str:
        """The whole answer at once (an ``async def`` method is awaited on the task's event loop)."""
        await asyncio.sleep(0.01)
        return " ".join(_answer(prompt))

    async def generate(self, prompt: str, delay: float = 0.01) -> AsyncIterator[str]:
        """The answer one word at a time (an async generator method streams)."""
        for word in _answer(prompt):
            await asyncio.sleep(delay)
            yield word


def _answer(prompt: str) -> list[str]:
    return f"{prompt.strip().rstrip('?')}: services stream their answers word by word".split()


# --------------------------------------------------------------------------
# a middleware chain: runs in the caller around every call
# --------------------------------------------------------------------------


class TenantMiddleware(ServiceMiddleware):
    """Attaches the caller's tenant to every request; services read it with ``current_request()``."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def before_call(self, request: ServiceRequest) -> ServiceRequest | None:
        request.metadata["tenant"] = self.tenant
        return None


class CallCounter(ServiceMiddleware):
    """Counts calls and failures per service (after-hooks see failures too)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()

    # Environment middleware travels to Ray replicas (for their server-side hooks): pickle without the lock.
    def __getstate__(self) -> dict[str, Any]:
        return {"calls": self.calls, "failures": self.failures}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        with self._lock:
            self.calls[request.service_name] += 1
            if not response.success:
                self.failures[request.service_name] += 1


# --------------------------------------------------------------------------
# the tour
# --------------------------------------------------------------------------


def _step(title: str) -> None:
    console.print()
    console.print(Rule(f"[bold]{title}", align="left"))


def _ray_runtime() -> tuple[KindRuntime | None, str | None]:
    """The ``ray`` kind's runtime from the plugin hosting it, or None and why the Ray part cannot run."""
    from . import get_plugin_manager

    runtime = get_plugin_manager().hook.kservice_kind_runtime(kind="ray")
    if runtime is None:
        return None, "no installed plugin hosts the 'ray' kind"
    reason = runtime.unavailable()
    return (None, reason) if reason is not None else (runtime, None)


def _shm_segments_of(pid: int) -> list[str]:
    """Shared-memory files of this user that name ``pid`` (queues and out-of-band segments)."""
    found = []
    for directory in Path("/dev/shm").glob(f"kservice-{os.getuid()}*"):
        if directory.is_dir():
            found += [str(p) for p in directory.iterdir() if re.search(rf"(^|[^0-9]){pid}([^0-9]|$)", p.name)]
    return found


def _async_burst(
    manager: ServiceManager, service: str, method: str, args: tuple[Any, ...], count: int
) -> tuple[int, float]:
    """``count`` asynchronous calls all in flight at once; returns (successes, seconds)."""
    started = time.perf_counter()
    futures = [manager.call_service_async(service, method, args, timeout=30) for _ in range(count)]
    wait(futures)
    return sum(1 for f in futures if f.exception() is None), time.perf_counter() - started


def _kill_a_replica_under_load(runtime: KindRuntime, manager: ServiceManager, environment: ServiceEnvironment) -> bool:
    """Kill one Ray replica while callers keep calling; True when no call failed and both replicas are back."""
    task = environment.get_task("text-ray")
    assert task is not None
    results: Counter[str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def record(future: Future[Any]) -> None:
        error = future.exception()
        with lock:
            results["ok" if error is None else type(error).__name__] += 1

    def load() -> None:
        # A steady stream of asynchronous calls, 20 in flight at a time.
        while not stop.is_set():
            batch = [manager.call_service_async("text-ray", "slow_upper", ("load",), timeout=30) for _ in range(20)]
            for future in batch:
                future.add_done_callback(record)
            wait(batch)

    caller = threading.Thread(target=load, name="demo-load")
    caller.start()
    try:
        time.sleep(1.0)  # deliberate: calls flow for a while before the kill
        killed_at = time.monotonic()
        victim = runtime.kill_replica(task, 0)
        console.print(f"  killed replica [bold]{victim}[/] (Ray restarts it: service.ray.max_restarts)")
        time.sleep(2.0)  # deliberate: calls keep flowing while the replica is down and restarting
    finally:
        stop.set()
        caller.join()
    back = _wait_until(lambda: _replicas_up(environment) == 2, timeout=30)
    console.print(
        f"  calls during the kill: {results['ok']} ok, {sum(results.values()) - results['ok']} failed"
        + (f" ({dict((k, v) for k, v in results.items() if k != 'ok')})" if len(results) > 1 else "")
    )
    console.print(
        f"  replicas healthy again: {_replicas_up(environment)}/2"
        + (f" after {time.monotonic() - killed_at:.1f}s" if back else " (not yet)")
    )
    return back and results["ok"] > 0 and sum(results.values()) == results["ok"]


def _replicas_up(environment: ServiceEnvironment) -> int:
    """Replicas of text-ray alive, as ``kservice status`` shows them (the Ray plugin renders the column)."""
    from .cli import status_rows

    task = environment.get_task("text-ray")
    if task is None:
        return 0
    return int(status_rows([task.get_service_status()])[0].get("replicas_alive") or 0)


def _chain_names(environment: ServiceEnvironment, service_name: str) -> list[str]:
    """Class names of a service's middleware, in chain order, as its managers compile it."""
    from . import get_plugin_manager

    task = environment.get_task(service_name)
    contributed = get_plugin_manager().hook.kservice_middleware(
        service_name=service_name,
        options=environment.config.for_service(service_name),
        service_class=None if task is None else task.service_factory.service_class,
        address=None,
    )
    chain: list[Any] = list(environment.middlewares)
    for item in contributed:
        chain += item if isinstance(item, (list, tuple)) else [item] if item is not None else []
    return [type(m).__name__ for m in chain]


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def main(argv: list[str] | None = None) -> int:
    """Run the tour; returns the exit status (0 when every step behaved as described)."""
    import argparse

    import psutil

    from .cli import status_rows, status_table

    parser = argparse.ArgumentParser(
        prog="python -m kservice.demo",
        description="A tour of kservice: two services in-process, in a child process and on Ray.",
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray part even when Ray is installed")
    options = parser.parse_args(argv)

    started = time.monotonic()
    ray_runtime, ray_missing = (None, "--no-ray") if options.no_ray else _ray_runtime()
    problems: list[str] = []
    me = psutil.Process()
    console.print(
        "[bold]kservice demo[/]: a key-value store and a text service, in-process, in a child process and on Ray"
    )
    if options.no_ray:
        console.print("[yellow]--no-ray: the Ray part is skipped.[/]")
    elif ray_runtime is None:
        console.print(f"[yellow]{ray_missing}: the Ray part is skipped.[/]")
    else:
        _step("starting Ray (once per driver: it takes a few seconds)")
        # A private local instance unless RAY_ADDRESS names a cluster: never attach to whatever runs nearby.
        console.print(f"  {ray_runtime.start()}")

    # Explicit config rather than the user's KSERVICE_CONFIG: the demo shows the defaults.
    environment = ServiceEnvironment("demo", {"service_call": {"default_timeout": 30}})
    counter = CallCounter()
    environment.add_middleware(TenantMiddleware("acme"))
    environment.add_middleware(counter)
    try:
        _step("registering and starting the services")
        environment.register_service("kv", ServiceFactory("kv", KeyValueStore), kind="local")
        environment.register_service("model", ServiceFactory("model", TokenModel), kind="local")
        environment.register_service("text", ServiceFactory("text", TextService), kind="process")
        if ray_runtime is not None:
            environment.register_service("text-ray", ServiceFactory("text-ray", TextService), kind="ray", replicas=2)
        t0 = time.perf_counter()
        environment.start()
        console.print(f"  started {', '.join(environment.service_names())} in {time.perf_counter() - t0:.1f}s")
        for task in environment:
            console.print(
                f"  [bold]{task.service_name:<9}[/] kind {task.kind:<8} reachable at {', '.join(a.transport for a in task.addresses)}"
            )
        manager = environment.manager()

        _step("synchronous calls: the same API whatever the transport")
        manager.call_service_sync("kv", "put", ("greeting", "hello, services"))
        text = manager.call_service_sync("kv", "get", ("greeting",))
        console.print(f"  kv.get('greeting')            -> {text!r}")
        targets = ["text", "text-ray"] if ray_runtime is not None else ["text"]
        for name in targets:
            proxy = manager.proxy(name)
            console.print(f"  {name}.slugify(...)".ljust(32) + f"-> {proxy.slugify(text)!r}")
            counted = proxy.word_count("the cat and the hat and the bat")
            console.print(f"  {name}.word_count(...)".ljust(32) + f"-> {counted}")
            where = proxy.where()
            console.print(
                f"  {name}.where()".ljust(32)
                + f"-> pid {where['pid']} (this is {os.getpid()}), tenant {where['tenant']!r}"
            )
            if where["pid"] == os.getpid():
                problems.append(f"{name} ran in this process")
            if where["tenant"] != "acme":
                problems.append(f"{name} did not see the tenant set by the middleware")

        _step("asynchronous calls: 500 in flight at once, no thread per call")
        for name, method, args in [("kv", "get", ("greeting",)), *[(t, "slugify", ("A B C",)) for t in targets]]:
            ok, seconds = _async_burst(manager, name, method, args, 500)
            console.print(
                f"  {name:<9} 500 calls of {method:<8} {ok} ok in {seconds * 1e3:7.1f} ms ({500 / seconds:>9,.0f} calls/s)"
            )
            if ok != 500:
                problems.append(f"{500 - ok} async calls to {name} failed")

        _step("batch calls: manager.map ships many calls per message, one outcome each")
        phrases = [f"Item {i} of the batch" for i in range(2000)]
        for name in targets:
            began = time.perf_counter()
            counts = list(manager.map(name, "word_count", phrases, timeout=30))
            seconds = time.perf_counter() - began
            console.print(
                f"  {name:<9} map of 2,000 word_count calls in {seconds * 1e3:7.1f} ms ({2000 / seconds:>9,.0f} calls/s)"
            )
            if counts != [dict(Counter(re.findall(r"[a-z']+", phrase.lower())).most_common(3)) for phrase in phrases]:
                problems.append(f"map over {name} gave wrong or misordered results")
        outcomes = list(manager.map("kv", "get", ["greeting", ("missing", "default")], return_exceptions=True))
        console.print(f"  kv map over get with return_exceptions -> {outcomes}")

        _step("async def methods and streamed answers: items arrive as they are made")
        answer = manager.call_service_sync("model", "complete", ("why stream",))
        console.print(f"  model.complete(...) (async def) -> {answer!r}")
        for name in ["model", *targets]:
            began = time.perf_counter()
            words: list[str] = []
            first_at = 0.0
            for word in manager.stream(name, "generate", ("why stream",)):
                if not words:
                    first_at = time.perf_counter() - began
                words.append(word)
            total = time.perf_counter() - began
            console.print(
                f"  {name}.generate(...)".ljust(32)
                + f"-> {len(words)} words, first after {first_at * 1e3:5.1f} ms, all after {total * 1e3:6.1f} ms: {' '.join(words[:4])} ..."
            )
            if " ".join(words) != answer:
                problems.append(f"{name} streamed {words!r}, not the answer")
            elif first_at >= total * 0.8:
                problems.append(f"{name}'s first word came only at the end of its stream")
        with manager.stream("text", "generate", ("stop early",)) as stream:
            first_word = next(stream)
        text_task = environment.get_task("text")
        stopped = _wait_until(lambda: text_task is not None and text_task.get_service_status().in_flight == 0, 5.0)
        console.print(
            f"  a stream closed after its first word ({first_word!r}) stops the generator in the service: {stopped}"
        )
        if not stopped:
            problems.append("closing a stream did not stop the generator in the service")

        _step("the middleware chain")
        console.print(f"  middleware of 'text', outermost first: {' -> '.join(_chain_names(environment, 'text'))}")
        console.print(
            "  (the environment's own first, then what installed plugins contribute; each runs its caller-side"
        )
        console.print("  hooks in this process and its service-side hooks where the service runs)")
        console.print(f"  CallCounter saw: {dict(counter.calls)}; failures: {dict(counter.failures) or 'none'}")

        if ray_runtime is not None:
            _step("a Ray replica killed under load, and recovered")
            if not _kill_a_replica_under_load(ray_runtime, manager, environment):
                problems.append("the Ray replica kill was not survived cleanly")

        _step("status of every service")
        console.print(status_table(status_rows(task.get_service_status() for task in environment)))
    finally:
        # Stop first, print after: an interrupted or closed terminal must not leave processes behind.
        environment.stop()
        if ray_runtime is not None:
            ray_runtime.stop()
        _step("stopped")
    children = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        time.sleep(0.2)
        children = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    segments = _shm_segments_of(os.getpid())
    console.print(
        f"  child processes left: {len(children)}; shared-memory segments left: {len(segments)}"
        + (f" {segments}" if segments else "")
    )
    if children:
        problems.append(f"child processes left behind: {[p.pid for p in children]}")
    if segments:
        problems.append(f"shared-memory segments left behind: {segments}")
    console.print()
    if problems:
        for problem in problems:
            console.print(f"[red]problem:[/] {problem}")
        return 1
    console.print(f"[green]done in {time.monotonic() - started:.1f}s[/]: every step behaved as described.")
    return 0


if __name__ == "__main__":
    # Run from the importable module, not __main__: child processes and Ray
    # workers import the service classes by their module's real name.
    from . import demo  # `python -m` sets __package__, so this imports kservice.demo

    try:
        sys.exit(demo.main())
    except KeyboardInterrupt:
        # Everything was already stopped by main()'s finally block.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
