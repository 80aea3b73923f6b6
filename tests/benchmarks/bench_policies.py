"""Call-policy overhead: retry, breaker, deadline and metrics enabled vs none, in one run.

Rows:

- a successful sync call, in process and over ``mmap`` to a ``process``
  service, with the policies (retry budget counter, closed breaker, the core's
  deadline, metrics client and server side) vs the same call with none of
  them (target: <= 3 µs more), each followed by an A/A control: the same
  no-policy call to another set of identical environments, whose
  "difference" is what this run cannot tell from zero;
- the policies' client chain alone, split by owner, and the server chain
  alone: their CPU cost per call without the thread or process hand-off;
- a flood of calls to a service whose breaker is open: the rejection in the
  client chain (target: <= 2 µs), the whole call (request built, rejected,
  error raised and caught) beside the core's own floor for a call a
  middleware fails (no policy at all), and the same flood answered by a
  fallback value.

How whole calls are timed: each arm (no policy, policies, no policy again)
runs in ``REPLICAS`` environments (``PROCESS_REPLICAS`` for a process
service, which varies more), created round-robin over the arms, because
an environment's own threads, process and memory layout alone can make it a
microsecond or two faster or slower than its twin. Every round times a block
of single calls in every environment, in a shuffled order, and keeps each
block's median; an arm's round value is the mean over its environments. An
arm's figure is the median of its round values, and the difference is the
median of the per-round differences, with its range over five consecutive
stretches of the run (what a rerun would see; rounds next to each other share
the machine's load, so a textbook confidence interval would be too narrow).
Chain rows and the open-breaker rows run in the calling thread only: each is
the mean per call of a tight loop, the lowest over interleaved rounds
(timeit's convention: such code is only ever slowed down by other load, so
the lowest round is the least disturbed; on a loaded 2-CPU machine medians of
these rows move by 1.5-2x between runs, their minima by a few percent).

Reading the whole-call rows: each call hands off to a worker thread (inproc)
or a child process (mmap) and back, 20-60 µs on a 2-CPU machine shared with
other work, and that hand-off does not add work linearly: calibrated in this
harness (in process, back-to-back calls, load average 5-8), 2 µs of spinning
in a client before-hook costs about +4.4 µs per call, 2 µs in a server
before-hook +2.6 µs, 5 µs in a server before-hook +6.7 µs, and a server hook
that does nothing +0.3 µs. So the whole-call difference is about 1.5-2x the
chains' CPU cost (the chain rows) and moves with the machine's load, which is
printed under the table.

Deadlines are part of the core call contract (every call carries one), so they
are on in both columns. Run: ``python tests/benchmarks/bench_policies.py [--quick]``.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kservice
from _timing import print_table
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


def _env(config: dict[str, Any], name: str = SERVICE, env_name: str = "bench") -> ServiceEnvironment:
    env = ServiceEnvironment(env_name, _known(config))
    env.register_service(name, kservice.ServiceFactory(name, Echo))
    return env.start()


# ------------------------------------------------------------------ measuring


def _block_median(call: Callable[[], Any], block: int) -> float:
    """Median seconds of ``block`` single calls, after two untimed ones (this round's warm-up)."""
    call()
    call()
    perf = time.perf_counter
    samples = []
    for _ in range(block):
        start = perf()
        call()
        samples.append(perf() - start)
    return statistics.median(samples)


def _parts_range(differences: list[float], parts: int = 5) -> tuple[float, float]:
    """(lowest, highest) median difference over ``parts`` consecutive stretches of the run.

    Rounds next to each other share the machine's load, so they are not
    independent samples and a textbook confidence interval would be too
    narrow; the spread between whole stretches of the run is what a rerun
    would see.
    """
    size = max(1, len(differences) // parts)
    medians = [
        statistics.median(differences[i : i + size]) for i in range(0, size * parts, size) if differences[i : i + size]
    ]
    return min(medians), max(medians)


def _arms(arms: dict[str, list[Callable[[], Any]]], block: int, rounds: int) -> dict[str, Any]:
    """Whole-call timing of arms of replicate environments: µs per arm and differences from the first arm.

    An arm is one setup (plugins on or off) in several identical
    environments: each environment has its own worker threads (or process)
    and memory, which alone can make it a microsecond or two faster or slower
    than its twin; averaging replicates keeps that out of the difference.
    Every round times a block of every environment, in a shuffled order
    (seeded, so runs are comparable); the arm's round value is the mean of its
    environments' block medians. Returns ``{arm: median of round values}`` and,
    for each later arm, ``{arm + " - " + first: (median, lowest, highest)}``
    of the per-round differences (see :func:`_parts_range`).
    """
    rng = random.Random(20240501)
    slots = [(arm, call) for arm, calls in arms.items() for call in calls]
    for _ in range(3):  # warm every path (routes, shards, worker threads) before timing
        for _, call in slots:
            _block_median(call, block)
    per_round: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(rounds):
        order = list(range(len(slots)))
        rng.shuffle(order)
        sums = dict.fromkeys(arms, 0.0)
        for index in order:
            arm, call = slots[index]
            sums[arm] += _block_median(call, block)
        for arm, total in sums.items():
            per_round[arm].append(total / len(arms[arm]) * 1e6)
    out: dict[str, Any] = {arm: statistics.median(values) for arm, values in per_round.items()}
    first = next(iter(arms))
    for arm in list(arms)[1:]:
        differences = [a - b for a, b in zip(per_round[arm], per_round[first], strict=True)]
        out[f"{arm} - {first}"] = (statistics.median(differences), *_parts_range(differences))
    return out


def _loops(subjects: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    """Tight-loop timing: the lowest over interleaved rounds of the mean µs per call of ``n`` calls."""
    per_round: dict[str, list[float]] = {name: [] for name in subjects}
    perf = time.perf_counter
    for index in range(rounds + 1):
        for name, fn in subjects.items() if index % 2 == 0 else reversed(subjects.items()):
            start = perf()
            for _ in range(n):
                fn()
            if index:  # round 0 warms up
                per_round[name].append((perf() - start) / n * 1e6)
    return {name: min(values) for name, values in per_round.items()}


def _row(
    measure: str,
    project: float | None,
    baseline: float | None = None,
    difference: tuple[float, float, float] | float | None = None,
    target: str = "-",
) -> dict[str, Any]:
    if isinstance(difference, tuple):
        diff, low, high = difference
        spread: str | None = f"{low:+.2f} .. {high:+.2f}"
    else:
        diff, spread = difference, None
    return {
        "measure": measure,
        "project": project,
        "baseline (none)": baseline,
        "difference µs": diff,
        "range over fifths": spread,
        "ratio": round(project / baseline, 3) if project is not None and baseline else None,
        "target": target,
    }


def _chain_names(manager: ServiceManager, name: str = SERVICE) -> str:
    chain = manager._route(name).chain
    return "+".join(type(m).__name__ for m in (chain.middlewares if chain else ())) or "empty"


def _whole_call_rows(
    label: str, managers: dict[str, list[tuple[ServiceManager, str]]], block: int, rounds: int
) -> list[dict[str, Any]]:
    """The policies row and its A/A control for one transport.

    ``managers`` maps the arms ``none``, ``policies`` and ``none again`` to
    (manager, service name) per replicate environment.
    """

    def caller(manager: ServiceManager, name: str) -> Callable[[], Any]:
        return lambda: manager.call_service_sync(name, "echo", (PAYLOAD,))

    timing = _arms({arm: [caller(m, n) for m, n in pairs] for arm, pairs in managers.items()}, block, rounds)
    for arm in ("none", "none again"):
        assert all(_chain_names(m, n) == "empty" for m, n in managers[arm])
    replicas = len(managers["none"])
    full_m, full_name = managers["policies"][0]
    return [
        _row(
            f"{label} ({_chain_names(full_m, full_name)})",
            timing["policies"],
            timing["none"],
            timing["policies - none"],
            "<= +3 µs",
        ),
        _row(
            f"  A/A control: {label}, no policy ({replicas} more environments)",
            timing["none again"],
            timing["none"],
            timing["none again - none"],
            "~ 0",
        ),
    ]


#: The arms of a whole-call comparison: the policies, and no policy twice (the A/A control).
ARMS: dict[str, dict[str, Any]] = {"none": NONE, "policies": POLICIES, "none again": NONE}
#: Environments per arm (see :func:`_arms`); a process service varies more from one environment to the next.
REPLICAS = 3
PROCESS_REPLICAS = 6


@contextmanager
def _arm_managers(
    started_env: Callable[[str, dict[str, Any], int], tuple[ServiceEnvironment, str]],
    replicas: int = REPLICAS,
) -> Iterator[dict[str, list[tuple[ServiceManager, str]]]]:
    """``replicas`` environments per arm from ``started_env(arm, config, replica)``, each with its manager.

    Created round-robin over the arms: whatever depends on creation order
    (thread and process placement, memory layout) is spread over every arm.
    """
    with ExitStack() as stack:
        managers: dict[str, list[tuple[ServiceManager, str]]] = {arm: [] for arm in ARMS}
        for replica in range(replicas):
            for arm, config in ARMS.items():
                env, name = started_env(arm, config, replica)
                stack.callback(env.stop)
                managers[arm].append((stack.enter_context(ServiceManager(env)), name))
        yield managers


# ------------------------------------------------------------------ rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    block = 20
    rounds = 150 if quick else 600
    n_loop = 2000
    loop_rounds = 15 if quick else 41
    rows: list[dict[str, Any]] = []
    metrics_loaded = kservice.get_plugin_manager().has_plugin("metrics")

    # 1. Successful sync calls in process: policies vs none, and none vs none.
    def inproc(arm: str, config: dict[str, Any], replica: int) -> tuple[ServiceEnvironment, str]:
        return _env(config, env_name=f"bench-{arm}-{replica}"), SERVICE

    with _arm_managers(inproc) as managers:
        rows.extend(_whole_call_rows("inproc sync call", managers, block, rounds))
        bare_m = managers["none"][0][0]
        full_m = managers["policies"][0][0]
        chain = full_m._route(SERVICE).chain
        assert chain is not None
        request = ServiceRequest("1", SERVICE, "echo", (PAYLOAD,), deadline=time.time() + 3600)
        response = ServiceResponse(True, PAYLOAD)

        def through(c: Any) -> Callable[[], None]:
            def run_chain() -> None:
                began = time.perf_counter()
                sent, _, limit = c.run_before(request)
                c.run_after(sent, response, limit, began)

            return run_chain

        def nothing() -> None:
            # What the core does with no chain: one truth test of the route's chain.
            if bare_m._routes[SERVICE].chain:
                pass

        # The same chain split by owner: the call policies (retry budget counter + breaker) and metrics.
        from kservice._middleware import MiddlewareChain

        mine = MiddlewareChain(
            [m for m in chain.middlewares if type(m).__module__.startswith("kservice.plugins.")], "client"
        )
        others = MiddlewareChain(
            [m for m in chain.middlewares if not type(m).__module__.startswith("kservice.plugins.")], "client"
        )
        subjects = {"none": nothing, "all": through(chain)}
        if mine:
            subjects["policies"] = through(mine)
        if others:
            subjects["metrics"] = through(others)
        loops = _loops(subjects, n_loop * 5, loop_rounds)
        empty = loops["none"]
        rows.append(_row("client chain alone, success path", loops["all"], empty, loops["all"] - empty, "<= +3 µs"))
        for key, label in (("policies", "retry + breaker"), ("metrics", "metrics (client side)")):
            if key in loops:
                rows.append(_row(f"  of which {label}, chain alone", loops[key], empty, loops[key] - empty))
        assert full_m.environment is not None
        server_chain = full_m.environment.get_task(SERVICE)._server_chain
        if server_chain is not None:
            server = _loops({"none": nothing, "server": through(server_chain)}, n_loop * 5, loop_rounds)
            rows.append(
                _row(
                    "server chain alone (metrics, server side)",
                    server["server"],
                    server["none"],
                    server["server"] - server["none"],
                )
            )

    # 2. Open breaker: the fail-fast path, with and without a fallback answering.
    rows.extend(_open_breaker_rows(n_loop, loop_rounds))

    # 3. Over mmap to a process-hosted service, when that transport is installed.
    if "process" in kservice._plugins.task_kinds():
        try:
            rows.extend(_mmap_rows(block, rounds))
        except Exception as exc:
            rows.append(_row(f"mmap: not measured ({type(exc).__name__}: {exc})"[:100], None))
    if not metrics_loaded:
        rows.append(_row("(metrics plugin not installed: measured without it)", None))
    return rows


class _Refuse(kservice.ServiceMiddleware):
    """The core's floor for a failed call: a middleware answers with a ready failed response.

    ServiceOverloadedError (a ServiceUnavailableError the core does not re-resolve the route
    for), rebuilt by the core from its type name for each call, as the caller must get a fresh one.
    """

    def __init__(self) -> None:
        self.refusal = ServiceResponse(False, None, "refused", "", "ServiceOverloadedError", "runtime")

    def before_call(self, request: ServiceRequest) -> ServiceResponse:
        return self.refusal


def _open_breaker_rows(n: int, rounds: int) -> list[dict[str, Any]]:
    open_cfg = {
        **POLICIES,
        "breaker": {"enabled": True, "failure_threshold": 1, "cooldown": 3600.0, "count_service_errors": True},
    }
    with_fallback = {
        **open_cfg,
        "fallback": {"enabled": True},
        "services": {
            "fb_" + SERVICE: {"class": f"{_module()}:Echo", "fallback": {"methods": {"echo": {"value": "degraded"}}}}
        },
    }
    env = _env(open_cfg)
    fb_env = ServiceEnvironment("bench-fb", _known(with_fallback))
    floor_env = _env(NONE, env_name="bench-floor")
    floor_env.add_middleware(_Refuse())
    try:
        fb_env.start()
        with ServiceManager(env) as m, ServiceManager(fb_env) as fm, ServiceManager(floor_env) as floor_m:
            for manager, name in ((m, SERVICE), (fm, "fb_" + SERVICE)):
                try:
                    manager.call_service_sync(name, "fail")
                except ConnectionError:
                    pass
            from kservice.plugins.breaker import breaker_state

            assert breaker_state(SERVICE) == "open"
            assert fm.call_service_sync("fb_" + SERVICE, "echo", (PAYLOAD,)) == "degraded"
            chain = m._route(SERVICE).chain
            assert chain is not None
            request = ServiceRequest("1", SERVICE, "echo", (PAYLOAD,), deadline=time.time() + 3600)

            def rejected() -> None:
                began = time.perf_counter()
                sent, response, limit = chain.run_before(request)
                chain.run_after(sent, response, limit, began)  # type: ignore[arg-type]

            def flood() -> None:
                try:
                    m.call_service_sync(SERVICE, "echo", (PAYLOAD,))
                except kservice.ServiceUnavailableError:
                    pass

            def floor() -> None:
                try:
                    floor_m.call_service_sync(SERVICE, "echo", (PAYLOAD,))
                except kservice.ServiceUnavailableError:
                    pass

            loops = _loops(
                {
                    "chain": rejected,
                    "flood": flood,
                    "floor": floor,
                    "degraded": lambda: fm.call_service_sync("fb_" + SERVICE, "echo", (PAYLOAD,)),
                },
                n,
                rounds,
            )
    finally:
        floor_env.stop()
        fb_env.stop()
        env.stop()
    return [
        _row("open breaker: rejection in the client chain", loops["chain"], target="<= 2 µs"),
        _row(
            "open breaker: whole call, raise + catch", loops["flood"], loops["floor"], loops["flood"] - loops["floor"]
        ),
        _row("  core floor: no policy, a middleware answers a failure, raise + catch", loops["floor"]),
        _row("open breaker + fallback value: whole call", loops["degraded"]),
    ]


def _mmap_rows(block: int, rounds: int) -> list[dict[str, Any]]:
    def hosted(arm: str, config: dict[str, Any], replica: int) -> tuple[ServiceEnvironment, str]:
        # Services of the host share one namespace: each replica hosts its own name.
        name = f"{SERVICE}_{arm.replace(' ', '_')}_{replica}"
        services = {name: {"class": f"{_module()}:Echo", "kind": "process"}}
        return ServiceEnvironment(f"bench-mmap-{name}", _known({**config, "services": services})).start(), name

    with _arm_managers(hosted, PROCESS_REPLICAS) as managers:
        return _whole_call_rows("mmap sync call to a process service", managers, block, rounds)


def _module() -> str:
    # The child process imports Echo by path: name this file's module so it can.
    return "bench_policies" if __name__ == "__main__" else __name__


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    load_before = os.getloadavg()[0]
    results = run(quick=quick)
    print_table(
        "Call-policy overhead (µs per call; whole calls: medians, chains: lowest rounds; see the docstring)", results
    )
    # Whole calls hand off between threads (and processes): on a machine busier than its cores
    # they wait for a CPU, so the load is part of the result.
    print(f"\n{os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
