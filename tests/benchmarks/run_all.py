"""Run every benchmark, each in its own interpreter (a clean plugin set and no leftover threads).

Usage: ``python tests/benchmarks/run_all.py [--quick] [NAME ...]`` where NAME is
``core``, ``ring``, ``mmap``, ``batch``, ``peers``, ``pipelined_cpu``, ``ray``, ``policies``, ``observability``, ``streaming`` or ``tunings``.
Every table prints the project beside its baseline, measured in the same run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "core",
    "ring",
    "mmap",
    "batch",
    "peers",
    "pipelined_cpu",
    "policies",
    "observability",
    "streaming",
    "tunings",
    "ray",
]


def main(argv: list[str]) -> int:
    quick = [a for a in argv if a == "--quick"]
    names = [a for a in argv if not a.startswith("--")] or ORDER
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(ORDER)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n===== bench_{name} =====", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *quick]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
