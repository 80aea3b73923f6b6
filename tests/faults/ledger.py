"""The fault suite's ledger: what the service really ran, what each caller was told, and the checks between them.

The service appends ``<call id> <pid>`` to a ledger file *before* it does its
work, in one ``O_APPEND`` write (atomic for a line this short), so a line means
"the call started"; a host killed after the line and before the answer leaves
a call that may have run. Callers append one JSON line per finished call to a
file of their own. :func:`check` joins the two.
"""

from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the environment variable naming the service's ledger file (inherited by hosts and replicas)
LEDGER_VARIABLE = "FAULT_LEDGER"
#: how late past its deadline a caller may get its answer on a loaded 2-core machine
DEADLINE_SLACK = 1.0


class Ledger:
    """A service whose one method is not idempotent: each run is a line in the ledger."""

    def __init__(self, path: str | None = None) -> None:
        self._path = path or os.environ[LEDGER_VARIABLE]

    def record(self, call_id: str, seconds: float) -> str:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{call_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        if seconds:
            time.sleep(seconds)
        return call_id


def runs(path: Path) -> collections.Counter[str]:
    """How many times each call id started on the service side."""
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def outcome(call_id: str, began: float, timeout: float, value: Any = None, error: BaseException | None = None) -> str:
    """One caller-side JSON line for a finished call."""
    return json.dumps(
        {
            "id": call_id,
            "ok": error is None,
            "value": value if error is None else None,
            "error": None if error is None else type(error).__name__,
            "never_ran": None if error is None else never_ran(error),
            "elapsed": time.monotonic() - began,
            "timeout": timeout,
        }
    )


def never_ran(error: BaseException) -> bool:
    """Whether the error claims the call provably never reached the service (the runtime's own claim).

    An error says so with ``may_have_run`` False (``kservice.MAY_HAVE_RUN``); an unknown name, an
    overloaded queue and an open breaker are documented as never sent.
    """
    from kservice import ServiceNotFoundError, ServiceOverloadedError

    if getattr(error, "may_have_run", None) is False:
        return True
    return (
        isinstance(error, (ServiceNotFoundError, ServiceOverloadedError)) or type(error).__name__ == "CircuitOpenError"
    )


@dataclass
class Figures:
    """What a fault run did and found."""

    calls: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_may_have_run: int = 0
    failed_and_ran: int = 0
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    ran_twice: list[str] = field(default_factory=list)
    success_not_run_once: list[str] = field(default_factory=list)
    claimed_never_ran_but_ran: list[str] = field(default_factory=list)
    late: list[tuple[str, float]] = field(default_factory=list)
    wrong_value: list[str] = field(default_factory=list)
    max_overshoot: float = 0.0

    def violations(self) -> list[str]:
        found = []
        if self.ran_twice:
            found.append(f"{len(self.ran_twice)} calls ran more than once: {self.ran_twice[:5]}")
        if self.success_not_run_once:
            found.append(
                f"{len(self.success_not_run_once)} successes did not run exactly once: {self.success_not_run_once[:5]}"
            )
        if self.claimed_never_ran_but_ran:
            found.append(
                f"{len(self.claimed_never_ran_but_ran)} errors claimed the call never ran, but it did: "
                f"{self.claimed_never_ran_but_ran[:5]}"
            )
        if self.late:
            found.append(f"{len(self.late)} callers waited past their deadline (+{DEADLINE_SLACK} s): {self.late[:5]}")
        if self.wrong_value:
            found.append(f"{len(self.wrong_value)} successes returned another call's value: {self.wrong_value[:5]}")
        return found

    def table(self, title: str) -> str:
        rows = [
            ("calls answered", self.calls),
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("failed, may have run", self.failed_may_have_run),
            ("failed, and had run", self.failed_and_ran),
            ("kills and signals", ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items())) or "0"),
            ("ran twice", len(self.ran_twice)),
            ("successes not run exactly once", len(self.success_not_run_once)),
            ("claimed never ran, but ran", len(self.claimed_never_ran_but_ran)),
            ("past deadline", len(self.late)),
            ("largest overshoot of a deadline (s)", f"{self.max_overshoot:.3f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def check(ledger_path: Path, outcome_paths: list[Path], kills: collections.Counter[str]) -> Figures:
    """Join the service's ledger with every caller's outcomes; the figures say what was violated."""
    ran = runs(ledger_path)
    figures = Figures(kills=kills)
    figures.ran_twice = sorted(call_id for call_id, count in ran.items() if count > 1)
    for path in outcome_paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line of a caller killed mid-write
            figures.calls += 1
            call_id = record["id"]
            overshoot = record["elapsed"] - record["timeout"]
            figures.max_overshoot = max(figures.max_overshoot, overshoot)
            if overshoot > DEADLINE_SLACK:
                figures.late.append((call_id, round(overshoot, 3)))
            if record["ok"]:
                figures.succeeded += 1
                if ran[call_id] != 1:
                    figures.success_not_run_once.append(call_id)
                if record["value"] != call_id:
                    figures.wrong_value.append(call_id)
            else:
                figures.failed += 1
                if not record["never_ran"]:
                    figures.failed_may_have_run += 1
                if ran[call_id]:
                    figures.failed_and_ran += 1
                    if record["never_ran"]:
                        figures.claimed_never_ran_but_ran.append(f"{call_id} ({record['error']})")
    return figures
