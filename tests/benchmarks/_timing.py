"""Shared measuring helpers for the benchmarks: medians over interleaved rounds, and table printing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def latencies(call: Callable[[], Any], n: int, warmup: int = 200) -> list[float]:
    """Seconds per call for ``n`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    out = []
    perf = time.perf_counter
    for _ in range(n):
        start = perf()
        call()
        out.append(perf() - start)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interleaved(subjects: dict[str, Callable[[], Any]], n: int, rounds: int = 3) -> dict[str, tuple[float, float]]:
    """(median µs, p99 µs) per subject; subjects alternate over ``rounds`` so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(rounds):
        for name, call in subjects.items():
            samples[name].extend(latencies(call, n // rounds))
    return {name: (statistics.median(v) * 1e6, percentile(v, 0.99) * 1e6) for name, v in samples.items()}


def throughput(submit: Callable[[], Any], collect: Callable[[list[Any]], None], n: int) -> float:
    """Calls per second for ``n`` pipelined submissions followed by collecting them all."""
    start = time.perf_counter()
    handles = [submit() for _ in range(n)]
    collect(handles)
    return n / (time.perf_counter() - start)


def best_of(rounds: int, measure: Callable[[], float]) -> float:
    """Median of ``rounds`` measurements (throughputs vary a lot on shared machines)."""
    return statistics.median(measure() for _ in range(rounds))


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows as an aligned table (every row has the same keys)."""
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=False))))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.2f}"
    return str(value)
