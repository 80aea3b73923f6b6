"""Call-policy overhead: retry, breaker, deadline and metrics enabled vs none, in one run.

Rows (medians over interleaved rounds, so machine drift hits both sides alike):

- a successful sync in-process call with the policies (retry budget counter,
  closed breaker, the core's deadline, metrics client and server side) vs the
  same call with none of them (target: <= 3 µs more);
- the same policies' client chain alone (no thread hand-off noise);
- a flood of calls to a service whose breaker is open: whole call per call
  (request built, rejected, error raised and caught), the rejection path of the
  chain alone, and the same with a fallback value answering (target: <= 2 µs);
- the sync call over ``mmap`` to a ``process`` service, when that transport is
  installed (client-side policies toggled; the server side runs in the child).

Deadlines are part of the core call contract (every call carries one), so they
are on in both columns. Run: ``python tests/benchmarks/bench_policies.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kservice
from _timing import interleaved, latencies, print_table
from kservice import ServiceEnvironment, ServiceManager, ServiceRequest, ServiceResponse

PAYLOAD = b"x" * 90
SERVICE = "bench_policies_echo"

#: Every per-call plugin off: the chain is empty.
NONE: dict[str, Any] = {
    "service_call": {"max_retries": 0},
    "breaker": {"enabled": False},
    "fallback": {"enabled": False},
    "cache": {"enabled": False},
    "metrics": {"enabled": False},
    "tracing": {"enabled": False},
}
#: Retry, breaker and metrics at their defaults (plus the core's deadline); nothing else.
POLICIES: dict[str, Any] = {
    "breaker": {"enabled": True},
    "fallback": {"enabled": False},
    "cache": {"enabled": False},
    "metrics": {"enabled": True},
    "tracing": {"enabled": False},
}


class Echo:
    def echo(self, value: Any) -> Any:
        return value

    def fail(self) -> None:
        raise ConnectionError("down")


def _known(config: dict[str, Any]) -> dict[str, Any]:
    """Drop sections of plugins that are not installed (or disabled), so the config validates."""
    schema = kservice.Config.load({}).schema
    out = {k: v for k, v in config.items() if k in schema or k == "services"}
    if "service_call" in out:
        out["service_call"] = {k: v for k, v in out["service_call"].items() if k in schema["service_call"]}
    return out


def _env(config: dict[str, Any], name: str = SERVICE, **options: Any) -> ServiceEnvironment:
    env = ServiceEnvironment("bench", _known(config))
    env.register_service(name, kservice.ServiceFactory(name, Echo), **options)
    return env.start()


def _paired(subjects: dict[str, Any], n: int, rounds: int) -> dict[str, float]:
    """Median µs per subject over many short interleaved rounds, plus the median of per-round differences.

    Each round measures every subject back to back, so a burst of load from
    other processes hits a pair alike; the median of the paired differences
    is far steadier than the difference of two medians on a shared machine.
    """
    per_round: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(rounds):
        for name, call in subjects.items():
            per_round[name].append(statistics.median(latencies(call, n, warmup=50)) * 1e6)
    names = list(subjects)
    out = {name: statistics.median(v) for name, v in per_round.items()}
    out["difference"] = statistics.median(a - b for a, b in zip(per_round[names[1]], per_round[names[0]], strict=True))
    return out


def _per_call(fn: Any, n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean µs per call of ``n`` calls."""
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        results.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(results)


def _chain_names(manager: ServiceManager, name: str = SERVICE) -> str:
    chain = manager._route(name).chain
    return "+".join(type(m).__name__ for m in (chain.middlewares if chain else ())) or "empty"


def _flood(manager: ServiceManager, name: str, n: int, rounds: int) -> float:
    def one() -> None:
        try:
            manager.call_service_sync(name, "echo", (PAYLOAD,))
        except kservice.ServiceUnavailableError:
            pass

    return _per_call(one, n, rounds)


def run(quick: bool = False) -> list[dict[str, Any]]:
    n_sync = 2000 if quick else 6000
    n_fast = 5000 if quick else 20000
    rounds = 3 if quick else 5
    rows: list[dict[str, Any]] = []
    metrics_loaded = kservice.get_plugin_manager().has_plugin("metrics")

    # 1. Successful sync calls: policies vs none, interleaved.
    bare, full = _env(NONE), _env(POLICIES)
    try:
        with ServiceManager(bare) as bare_m, ServiceManager(full) as full_m:
            timing = _paired(
                {
                    "none": lambda: bare_m.call_service_sync(SERVICE, "echo", (PAYLOAD,)),
                    "policies": lambda: full_m.call_service_sync(SERVICE, "echo", (PAYLOAD,)),
                },
                200,
                n_sync // 100,
            )
            chain_desc = _chain_names(full_m)
            assert _chain_names(bare_m) == "empty", _chain_names(bare_m)
            rows.append(
                {
                    "measure": f"inproc sync call ({chain_desc})",
                    "project": timing["policies"],
                    "baseline (none)": timing["none"],
                    "difference µs": timing["difference"],
                    "ratio": round(timing["policies"] / timing["none"], 3),
                    "target": "<= +3 µs",
                }
            )
            chain = full_m._route(SERVICE).chain
            request = ServiceRequest("1", SERVICE, "echo", (PAYLOAD,), deadline=time.time() + 3600)
            response = ServiceResponse(True, PAYLOAD)

            def through(c: Any) -> None:
                sent, _, limit = c.run_before(request)
                c.run_after(sent, response, limit)

            def nothing() -> None:
                # What the core does with no chain: one truth test of the route's chain.
                if bare_m._routes[SERVICE].chain:
                    pass

            chain_cost = _per_call(lambda: through(chain), n_fast * 5, rounds)
            empty_cost = _per_call(nothing, n_fast * 5, rounds)
            rows.append(
                {
                    "measure": "client chain alone, success path",
                    "project": chain_cost,
                    "baseline (none)": empty_cost,
                    "difference µs": chain_cost - empty_cost,
                    "ratio": round(chain_cost / empty_cost, 2),
                    "target": "<= +3 µs",
                }
            )
            # The same split by owner: the call policies (retry budget counter + breaker) and metrics.
            from kservice._middleware import MiddlewareChain

            mine = MiddlewareChain([m for m in chain.middlewares if type(m).__module__.startswith("kservice.plugins.")], "client")
            others = MiddlewareChain([m for m in chain.middlewares if not type(m).__module__.startswith("kservice.plugins.")], "client")
            for label, part in (("retry + breaker", mine), ("metrics (client side)", others)):
                if part:
                    cost = _per_call(lambda part=part: through(part), n_fast * 5, rounds)
                    rows.append(
                        {
                            "measure": f"  of which {label}, chain alone",
                            "project": cost,
                            "baseline (none)": empty_cost,
                            "difference µs": cost - empty_cost,
                            "ratio": None,
                            "target": "-",
                        }
                    )
    finally:
        full.stop()
        bare.stop()

    # 2. Open breaker: the fail-fast path, with and without a fallback answering.
    open_cfg = {**POLICIES, "breaker": {"enabled": True, "failure_threshold": 1, "cooldown": 3600.0, "count_service_errors": True}}
    with_fallback = {
        **open_cfg,
        "fallback": {"enabled": True},
        "services": {"fb_" + SERVICE: {"class": f"{_module()}:Echo", "fallback": {"methods": {"echo": {"value": "degraded"}}}}},
    }
    env = _env(open_cfg)
    fb_env = ServiceEnvironment("bench-fb", _known(with_fallback))
    bare = _env(NONE)
    try:
        fb_env.start()
        with ServiceManager(env) as m, ServiceManager(fb_env) as fm, ServiceManager(bare) as bare_m:
            for manager, name in ((m, SERVICE), (fm, "fb_" + SERVICE)):
                try:
                    manager.call_service_sync(name, "fail")
                except ConnectionError:
                    pass
            from kservice.plugins.breaker import breaker_state

            assert breaker_state(SERVICE) == "open"
            flood = _flood(m, SERVICE, n_fast, rounds)
            degraded = _per_call(lambda: fm.call_service_sync("fb_" + SERVICE, "echo", (PAYLOAD,)), n_fast, rounds)
            assert fm.call_service_sync("fb_" + SERVICE, "echo", (PAYLOAD,)) == "degraded"
            chain = m._route(SERVICE).chain
            request = ServiceRequest("1", SERVICE, "echo", (PAYLOAD,), deadline=time.time() + 3600)

            def rejected() -> None:
                sent, response, limit = chain.run_before(request)
                chain.run_after(sent, response, limit)  # type: ignore[arg-type]

            reject_chain = _per_call(rejected, n_fast, rounds)
            success = interleaved({"none": lambda: bare_m.call_service_sync(SERVICE, "echo", (PAYLOAD,))}, n_sync, rounds)["none"][0]
            # The core's own cost of a call that fails in the caller's process (no transport): the floor.
            floor = _per_call(lambda: _refused(bare_m), n_fast, rounds)
            rows.append(
                {
                    "measure": "open breaker: whole call, raise + catch",
                    "project": flood,
                    "baseline (none)": success,
                    "difference µs": flood - success,
                    "ratio": round(flood / success, 3),
                    "target": "-",
                }
            )
            rows.append(
                {
                    "measure": "  same, no policies: a call refused by a raising middleware",
                    "project": floor,
                    "baseline (none)": None,
                    "difference µs": None,
                    "ratio": None,
                    "target": "-",
                }
            )
            rows.append(
                {
                    "measure": "open breaker: rejection in the chain alone",
                    "project": reject_chain,
                    "baseline (none)": None,
                    "difference µs": None,
                    "ratio": None,
                    "target": "<= 2 µs",
                }
            )
            rows.append(
                {
                    "measure": "open breaker + fallback value: whole call",
                    "project": degraded,
                    "baseline (none)": success,
                    "difference µs": degraded - success,
                    "ratio": round(degraded / success, 3),
                    "target": "-",
                }
            )
    finally:
        bare.stop()
        fb_env.stop()
        env.stop()

    # 3. Over mmap to a process-hosted service, when that transport is installed.
    if "process" in kservice._plugins.task_kinds():
        try:
            rows.extend(_mmap_rows(n_sync // 2, rounds))
        except Exception as exc:
            rows.append({"measure": f"mmap: not measured ({type(exc).__name__}: {exc})"[:100], "project": None,
                         "baseline (none)": None, "difference µs": None, "ratio": None, "target": "-"})
    if not metrics_loaded:
        rows.append({"measure": "(metrics plugin not installed: measured without it)", "project": None,
                     "baseline (none)": None, "difference µs": None, "ratio": None, "target": "-"})
    return rows


class _Refuse(kservice.ServiceMiddleware):
    def before_call(self, request: ServiceRequest) -> None:
        raise kservice.ServiceUnavailableError("refused")


_refusing: dict[int, ServiceManager] = {}


def _refused(manager: ServiceManager) -> None:
    """A call the client side refuses: request built, hook raised, error raised and caught (no transport)."""
    env = manager.environment
    assert env is not None
    refusing = _refusing.get(id(env))
    if refusing is None:
        env.add_middleware(_Refuse())
        refusing = _refusing[id(env)] = ServiceManager(env)
    try:
        refusing.call_service_sync(SERVICE, "echo", (PAYLOAD,))
    except kservice.ServiceUnavailableError:
        pass


def _mmap_rows(n: int, rounds: int) -> list[dict[str, Any]]:
    bare = ServiceEnvironment("bench-mmap-none", _known({**NONE, "services": {SERVICE: {"class": f"{_module()}:Echo", "kind": "process"}}}))
    full = ServiceEnvironment("bench-mmap-full", _known({**POLICIES, "services": {SERVICE + "_p": {"class": f"{_module()}:Echo", "kind": "process"}}}))
    try:
        bare.start()
        full.start()
        with ServiceManager(bare) as bare_m, ServiceManager(full) as full_m:
            timing = _paired(
                {
                    "none": lambda: bare_m.call_service_sync(SERVICE, "echo", (PAYLOAD,)),
                    "policies": lambda: full_m.call_service_sync(SERVICE + "_p", "echo", (PAYLOAD,)),
                },
                200,
                max(5, n // 100),
            )
            return [
                {
                    "measure": f"mmap sync call to a process service ({_chain_names(full_m, SERVICE + '_p')})",
                    "project": timing["policies"],
                    "baseline (none)": timing["none"],
                    "difference µs": timing["difference"],
                    "ratio": round(timing["policies"] / timing["none"], 3),
                    "target": "<= +3 µs",
                }
            ]
    finally:
        full.stop()
        bare.stop()


def _module() -> str:
    # The child process imports Echo by path: name this file's module so it can.
    return "bench_policies" if __name__ == "__main__" else __name__


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    results = run(quick=quick)
    print_table("Call-policy overhead (µs per call; medians)", results)
