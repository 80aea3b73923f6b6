"""Each hot-path tuning measured with and without it, side by side in one run.

A tuning is kept only while its row shows it pays more than the noise of the
row. "Without" is the plain code the tuning replaced, switched in here only
(a monkeypatch or a setting), never in the package. Each pair is measured
interleaved (``_timing.interleaved``, or best-of repeats for the in-process
costs), and the noise column is the spread between two runs of the *same*
subject in the same run, so a difference below it is not a difference.

Rows:

- ``compiled put``: the mmap connection's ``ShmQueue._compiled_put`` before
  ``ShmQueue.put`` (one put plus one get of a 90-byte record, one process).
- ``inline run``: ``BaseServiceTask.run_inline`` runs a fast method in the
  caller's thread instead of handing it to the pool (``service.local.inline_limit``,
  a documented setting; 0 turns it off); a ``local`` service called synchronously.
- ``plain reply``: the codec's ``_is_plain`` check sends a plain success as
  ``(request id, result)`` (encode_response of a small result).

Run ``python tests/benchmarks/bench_tunings.py [--quick]``.
"""

from __future__ import annotations

import sys
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, print_table
from kservice import ServiceEnvironment, ServiceFactory, ServiceResponse
from kservice._bench import Echo  # importable by the process hosting a kind='process' service


def _row(tuning: str, measured: dict[str, tuple[float, float]], unit: str = "µs median") -> dict[str, Any]:
    with_it, with_it_again, without = measured["with"][0], measured["with (again)"][0], measured["without"][0]
    noise = abs(with_it - with_it_again)
    saved = without - min(with_it, with_it_again)
    return {
        "tuning": tuning,
        "unit": unit,
        "with": round(with_it, 3),
        "with (again)": round(with_it_again, 3),
        "without": round(without, 3),
        "saved": round(saved, 3),
        "noise": round(noise, 3),
        "verdict": "keep" if saved > noise else "within noise",
    }


def _compiled_put(number: int, repeat: int) -> dict[str, Any]:
    from kservice.plugins.mmap import ring

    q = ring.create_queue(f"bench-tunings-{uuid.uuid4().hex[:8]}", 1 << 20)
    try:
        if q._compiled_put is None:
            return {"tuning": "compiled put", "verdict": "not applied here (no compiled extension)"}
        record, get, plain_put, fast_put = b"c" * 90, q.get, q.put, q._compiled_put

        def with_it() -> None:
            # What MmapConnection.send does: the compiled put, the full put only when it declines.
            if fast_put(record):
                plain_put(record)
            get()

        def without() -> None:
            plain_put(record)
            get()

        subjects: dict[str, Callable[[], None]] = {"with": with_it, "without": without, "with (again)": with_it}
        measured = {
            name: (min(timeit.repeat(op, number=number, repeat=repeat)) / number * 1e6, 0.0)
            for name, op in subjects.items()
        }
    finally:
        q.unlink()
        q.close()
    return _row("compiled put (put + get, 90 B)", measured)


def inline_run(n: int) -> dict[str, Any]:
    with ServiceEnvironment("bench-tunings-inline") as environment:
        environment.register_service("inline", ServiceFactory("inline", Echo))
        environment.register_service("pooled", ServiceFactory("pooled", Echo), local={"inline_limit": 0.0})
        with environment.manager() as manager:
            call = manager.call_service_sync
            measured = interleaved(
                {
                    "with": lambda: call("inline", "echo", (1,)),
                    "without": lambda: call("pooled", "echo", (1,)),
                    "with (again)": lambda: call("inline", "echo", (1,)),
                },
                n,
                rounds=5,
            )
    return _row("inline run (local, sync call)", measured)


def plain_reply(number: int, repeat: int) -> dict[str, Any]:
    from kservice.plugins.mmap import codec

    response = ServiceResponse.ok("r-1", {"value": 1})
    encode = codec.encode_response
    original = codec._is_plain

    def measure(is_plain: Callable[[ServiceResponse, int], bool]) -> float:
        codec._is_plain = is_plain
        try:
            return min(timeit.repeat(lambda: encode(response, 0, 1 << 16), number=number, repeat=repeat)) / number * 1e6
        finally:
            codec._is_plain = original

    measured = {
        "with": (measure(original), 0.0),
        "without": (measure(lambda response, threshold: False), 0.0),
        "with (again)": (measure(original), 0.0),
    }
    return _row("plain reply (encode_response)", measured)


def run(quick: bool = False) -> list[dict[str, Any]]:
    n = 3000 if quick else 20000
    number, repeat = (5000, 5) if quick else (20000, 9)
    return [_compiled_put(number, repeat), inline_run(n), plain_reply(number, repeat)]


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    keys = ["tuning", "unit", "with", "with (again)", "without", "saved", "noise", "verdict"]
    print_table(
        "hot-path tunings, with and without (µs per call; noise = |with - with again|)",
        [{k: r.get(k, "") for k in keys} for r in rows],
    )
