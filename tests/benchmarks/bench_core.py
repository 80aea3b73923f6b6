"""Core benchmark: in-process calls through LocalServiceTask beside ThreadPoolExecutor(1), in one run.

Rows:
- sync call, 90-byte argument: kservice (core plugins only, and every installed
  plugin at its defaults) vs ``ThreadPoolExecutor(1).submit(f).result()``;
- pipelined async calls/s vs the same executor;
- the cost of 3 middlewares (chain alone, and whole-call difference);
- per-call cost with 0 and 20 registered no-op plugins (hooks are not on the per-call path).

Run: ``python tests/benchmarks/bench_core.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kservice
from _timing import best_of, interleaved, print_table, throughput
from kservice import ServiceEnvironment, ServiceManager, ServiceMiddleware, ServiceRequest, ServiceResponse, hookimpl
from kservice._middleware import MiddlewareChain

PAYLOAD = b"x" * 90
CORE_PLUGINS = {"inproc"}


class Echo:
    def echo(self, value: Any) -> Any:
        return value


def echo(value: Any) -> Any:
    return value


class NoOp(ServiceMiddleware):
    def before_call(self, request: ServiceRequest) -> None:
        return None

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        return None


class NoOpPlugin:
    """Implements hooks that exist but contribute nothing (as many real plugins do for most services)."""

    @hookimpl
    def kservice_middleware(self, service_name: str, options: dict[str, Any]) -> None:
        return None

    @hookimpl
    def kservice_task_status(self, task: Any, status: Any) -> None:
        return None

    @hookimpl
    def kservice_known_services(self) -> list[str]:
        return []


class PluginSet:
    """Temporarily unregisters every plugin but the core's, to measure the bare runtime."""

    def __enter__(self) -> None:
        pm = kservice.get_plugin_manager()
        self.removed = [
            (name, plugin) for name, plugin in pm.list_name_plugin() if name not in CORE_PLUGINS and plugin is not None
        ]
        for name, _ in self.removed:
            pm.unregister(name=name)

    def __exit__(self, *exc: object) -> None:
        pm = kservice.get_plugin_manager()
        for name, plugin in self.removed:
            pm.register(plugin, name=name)


def _environment(*middlewares: ServiceMiddleware) -> ServiceEnvironment:
    env = ServiceEnvironment("bench")
    for middleware in middlewares:
        env.add_middleware(middleware)
    env.register_service("echo", Echo)
    return env.start()


def run(quick: bool = False) -> list[dict[str, Any]]:
    n_sync = 2000 if quick else 6000
    n_pipe = 5000 if quick else 20000
    rounds = 3
    rows: list[dict[str, Any]] = []
    executor = ThreadPoolExecutor(1)
    try:
        with PluginSet():
            bare = _environment()
            bare_manager = ServiceManager(bare)
            mw = _environment(NoOp(), NoOp(), NoOp())
            mw_manager = ServiceManager(mw)
            timing = interleaved(
                {
                    "executor": lambda: executor.submit(echo, PAYLOAD).result(),
                    "kservice": lambda: bare_manager.call_service_sync("echo", "echo", (PAYLOAD,)),
                    "kservice+3mw": lambda: mw_manager.call_service_sync("echo", "echo", (PAYLOAD,)),
                },
                n_sync,
                rounds,
            )
            base = timing["executor"]
            rows.append(
                _row("sync call, core plugins only", timing["kservice"], "ThreadPoolExecutor(1)", base, "<= 1.15")
            )
            # The chain's own cost, without thread hand-off noise.
            chain = MiddlewareChain([NoOp(), NoOp(), NoOp()], "client")
            request = ServiceRequest("1", "echo", "echo", (PAYLOAD,))
            response = ServiceResponse(True, PAYLOAD)
            chain_cost = _per_call(
                lambda: chain.run_after(request, response, chain.run_before(request)[2], time.perf_counter()),
                200_000 if not quick else 50_000,
            )
            rows.append(
                {
                    "measure": "3 middlewares: chain alone / whole-call median difference",
                    "kservice": round(chain_cost, 2),
                    "baseline": round(timing["kservice+3mw"][0] - timing["kservice"][0], 2),
                    "unit": "µs",
                    "ratio": None,
                    "target": "<= 3 µs",
                }
            )
            pipe_bare = best_of(
                rounds,
                lambda: throughput(
                    lambda: bare_manager.call_service_async("echo", "echo", (PAYLOAD,)), lambda fs: _wait(fs), n_pipe
                ),
            )
            pipe_exec = best_of(
                rounds, lambda: throughput(lambda: executor.submit(echo, PAYLOAD), lambda fs: _wait(fs), n_pipe)
            )
            rows.append(
                {
                    "measure": "pipelined async calls/s, core plugins only",
                    "kservice": pipe_bare,
                    "baseline": pipe_exec,
                    "unit": "calls/s",
                    "ratio": round(pipe_bare / pipe_exec, 2),
                    "target": ">= 1.0",
                }
            )
            # 0 vs 20 registered no-op plugins.
            pm = kservice.get_plugin_manager()
            zero = interleaved(
                {"p0": lambda: bare_manager.call_service_sync("echo", "echo", (PAYLOAD,))}, n_sync, rounds
            )["p0"]
            names = [pm.register(NoOpPlugin(), name=f"noop{i}") for i in range(20)]
            twenty = interleaved(
                {"p20": lambda: bare_manager.call_service_sync("echo", "echo", (PAYLOAD,))}, n_sync, rounds
            )["p20"]
            for name in names:
                pm.unregister(name=name)
            rows.append(
                {
                    "measure": "sync call median with 20 no-op plugins vs 0",
                    "kservice": twenty[0],
                    "baseline": zero[0],
                    "unit": "µs",
                    "ratio": round(twenty[0] / zero[0], 2),
                    "target": "equal within noise",
                }
            )
            for env, manager in ((bare, bare_manager), (mw, mw_manager)):
                manager.close()
                env.stop()
        # Every installed plugin at its defaults (retry, breaker, metrics, ...).
        full = _environment()
        full_manager = ServiceManager(full)
        timing = interleaved(
            {
                "executor": lambda: executor.submit(echo, PAYLOAD).result(),
                "kservice": lambda: full_manager.call_service_sync("echo", "echo", (PAYLOAD,)),
            },
            n_sync,
            rounds,
        )
        rows.append(
            _row(
                "sync call, all installed plugins at defaults",
                timing["kservice"],
                "ThreadPoolExecutor(1)",
                timing["executor"],
                "-",
            )
        )
        pipe_full = best_of(
            rounds,
            lambda: throughput(
                lambda: full_manager.call_service_async("echo", "echo", (PAYLOAD,)), lambda fs: _wait(fs), n_pipe
            ),
        )
        pipe_exec = best_of(
            rounds, lambda: throughput(lambda: executor.submit(echo, PAYLOAD), lambda fs: _wait(fs), n_pipe)
        )
        rows.append(
            {
                "measure": "pipelined async calls/s, all installed plugins at defaults",
                "kservice": pipe_full,
                "baseline": pipe_exec,
                "unit": "calls/s",
                "ratio": round(pipe_full / pipe_exec, 2),
                "target": "-",
            }
        )
        full_manager.close()
        full.stop()
    finally:
        executor.shutdown()
    return rows


def _row(
    measure: str, subject: tuple[float, float], baseline_name: str, baseline: tuple[float, float], target: str
) -> dict[str, Any]:
    return {
        "measure": f"{measure} (median / p99 µs) vs {baseline_name}",
        "kservice": f"{subject[0]:.1f} / {subject[1]:.1f}",
        "baseline": f"{baseline[0]:.1f} / {baseline[1]:.1f}",
        "unit": "µs",
        "ratio": round(subject[0] / baseline[0], 2),
        "target": target,
    }


def _per_call(call: Any, n: int) -> float:
    best = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            call()
        best.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(best)


def _wait(futures: list[Any]) -> None:
    done, not_done = wait(futures, timeout=120)
    assert not not_done
    for future in done:
        future.result()


if __name__ == "__main__":
    print_table("kservice core: in-process calls (ratio = kservice / baseline)", run(quick="--quick" in sys.argv))
