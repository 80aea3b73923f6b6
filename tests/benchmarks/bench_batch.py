"""ServiceManager.map (batch calls) beside its baselines, measured in the same run.

``python tests/benchmarks/bench_batch.py [--quick] [--no-ray]``

mmap rows: trivial calls (``echo`` of a 90-byte bytes) through ``manager.map``
to a ``process`` task, with the core plugins only and with every installed
plugin at its defaults (each in its own process, as bench_mmap does), beside
the same process's pipelined ``call_service_async`` and the bare shared-memory
ring (pickled payloads echoed by a bare loop, no kservice; the floor).
Target: map >= 600k calls/s and >= 0.8x the bare ring.

Ray rows: ``manager.map`` over a ray service beside a bare
``ray.get([actor.echo.remote(x) for x in xs])`` on an actor of the same class
and concurrency. Target: >= 10x the bare form.

Rates are the median of several rounds (the machine is shared and noisy).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for entry in (str(ROOT), str(Path(__file__).resolve().parent)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _timing import print_table  # noqa: E402

SMALL = b"x" * 90


def run_mmap(quick: bool) -> list[dict[str, Any]]:
    """This process's rows (its plugin set comes from KSERVICE_DISABLE_PLUGINS)."""
    from bench_mmap import _Baseline
    from kservice import ServiceEnvironment, ServiceFactory

    from tests.mmap.services import KV

    calls = 100_000 if quick else 400_000
    pipelined = 20_000
    rounds = 3 if quick else 5
    environment = ServiceEnvironment("bench-batch", {"health": {"enabled": False}} if _has_plugin("health") else None)
    environment.register_service("echo", ServiceFactory("echo", KV), kind="process")
    environment.start()
    bare = _Baseline("bare ring")
    try:
        manager = environment.manager()
        items = [SMALL] * calls

        def mapped() -> float:
            start = time.perf_counter()
            for _ in manager.map("echo", "echo", items, timeout=120):
                pass
            return calls / (time.perf_counter() - start)

        def async_calls() -> float:
            start = time.perf_counter()
            futures = [manager.call_service_async("echo", "echo", (SMALL,), timeout=120) for _ in range(pipelined)]
            for future in futures:
                future.result()
            return pipelined / (time.perf_counter() - start)

        mapped()  # warm up: the method's cost becomes known, so the host runs it in its listener
        rates: dict[str, list[float]] = {"map": [], "async": [], "bare": []}
        for _ in range(rounds):  # interleaved: drift on a noisy machine hits every row alike
            rates["map"].append(mapped())
            rates["async"].append(async_calls())
            rates["bare"].append(bare.pipelined(SMALL, calls // 4))
        return [{name: statistics.median(values) for name, values in rates.items()}]
    finally:
        environment.stop()
        with _suppress():
            bare.requests_ring.put(b"stop")
            bare.process.join(10)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _has_plugin(name: str) -> bool:
    from kservice import get_plugin_manager

    return any(plugin_name == name for plugin_name, _ in get_plugin_manager().list_name_plugin())


def mmap_rows(quick: bool) -> list[dict[str, Any]]:
    import json

    from bench_mmap import _optional_plugins

    rows = []
    for label, disabled in (("core plugins", ",".join(_optional_plugins())), ("all plugins", "")):
        env = {**os.environ, "KSERVICE_DISABLE_PLUGINS": disabled}
        argv = [sys.executable, str(Path(__file__).resolve()), "--mmap-json", *(["--quick"] if quick else [])]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=1800).stdout
        measured = json.loads(out.strip().splitlines()[-1])[0]
        bare = measured["bare"]
        rows.append(_row(f"mmap map ({label})", measured["map"], "bare ring pipelined", bare, 0.8, 600_000))
        rows.append(
            _row(f"mmap call_service_async ({label})", measured["async"], "bare ring pipelined", bare, None, None)
        )
        rows.append(
            _row(f"mmap map vs async ({label})", measured["map"], "call_service_async", measured["async"], None, None)
        )
    return rows


def _row(
    name: str, ours: float, baseline_name: str, baseline: float, ratio_target: float | None, rate_target: float | None
) -> dict[str, Any]:
    ratio = ours / baseline if baseline else None
    holds = None
    if ratio_target is not None and ratio is not None:
        holds = "yes" if ratio >= ratio_target and (rate_target is None or ours >= rate_target) else "no"
    return {
        "row": name,
        "calls_s": ours,
        "baseline": baseline_name,
        "baseline_calls_s": baseline,
        "ratio": ratio,
        "target": (f">= {rate_target:,.0f}/s and " if rate_target else "")
        + (f">= {ratio_target}x" if ratio_target else "-"),
        "holds": holds or "-",
    }


def ray_rows(quick: bool) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        print("ray rows skipped: Ray is not installed (pip install 'kservice[ray]')")
        return []
    from bench_ray import BenchEcho as RayEcho  # Ray's workers import it by this name (this script is __main__)
    from kservice import ServiceEnvironment

    calls = 5_000 if quick else 20_000
    bare_calls = 1_000 if quick else 4_000
    rounds = 3
    concurrency = 8
    # A Ray of this process only, even when another cluster runs on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        bare = ray.remote(RayEcho).options(max_concurrency=concurrency).remote()
        ray.get(bare.echo.remote(SMALL))
        config = {
            "services": {
                "echo": {"class": "bench_ray:BenchEcho", "kind": "ray", "ray": {"max_concurrency": concurrency}}
            },
        }
        with ServiceEnvironment("bench-batch-ray", config) as env, env.manager() as manager:
            items = [SMALL] * calls

            def mapped() -> float:
                start = time.perf_counter()
                for _ in manager.map("echo", "echo", items, timeout=300):
                    pass
                return calls / (time.perf_counter() - start)

            def bare_get() -> float:
                start = time.perf_counter()
                ray.get([bare.echo.remote(SMALL) for _ in range(bare_calls)])
                return bare_calls / (time.perf_counter() - start)

            mapped()
            bare_get()
            ours, theirs = [], []
            for _ in range(rounds):
                ours.append(mapped())
                theirs.append(bare_get())
        return [
            _row(
                "ray map",
                statistics.median(ours),
                "ray.get([a.f.remote(x) ...])",
                statistics.median(theirs),
                10.0,
                None,
            )
        ]
    finally:
        ray.shutdown()


def main() -> None:
    quick = "--quick" in sys.argv
    if "--mmap-json" in sys.argv:
        import json

        print(json.dumps(run_mmap(quick)))
        return
    title = "ServiceManager.map (batch calls) beside its baselines, same run (ratio: ours / baseline)"
    print_table(title, mmap_rows(quick))
    if "--no-ray" not in sys.argv:
        print_table(title.replace("ServiceManager.map", "ServiceManager.map on Ray"), ray_rows(quick))


if __name__ == "__main__":
    main()
