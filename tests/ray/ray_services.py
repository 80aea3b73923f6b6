"""Service classes the Ray tests host in replica actors (imported by module name inside Ray's workers)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import kservice


class CodedError(Exception):
    """An exception whose constructor takes two arguments and keeps them as attributes."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


class EchoService:
    """Echoes, reports where it runs, raises on request, and sleeps on request."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.calls = 0
        self._lock = threading.Lock()

    def echo(self, value: Any) -> Any:
        with self._lock:
            self.calls += 1
        return value if not self.prefix else f"{self.prefix}{value}"

    def where(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "actor": ray.get_runtime_context().get_actor_name(),
        }

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def coded(self, code: int, detail: str) -> None:
        raise CodedError(code, detail)

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def timeout(self, method: str) -> str:
        """Parameters named like call options reach the method."""
        return method

    def _secret(self) -> str:
        return "private"

    def fetch(self, box: tuple[Any, ...]) -> Any:
        """The value of the ObjectRef inside ``box`` (Ray passes nested refs unresolved)."""
        import ray

        return ray.get(box[0])

    def adder(self, n: int) -> Any:
        """A closure: only cloudpickle can send it back."""
        return lambda x: x + n

    def shaped(self, value: int, kind: str = "plain") -> Any:
        """``value``, or a result only Ray can carry (``closure``), or one nothing can carry (``lock``)."""
        if kind == "closure":
            return lambda x: x + value
        if kind == "lock":
            return threading.Lock()
        return value

    def handle_of_self(self) -> Any:
        """This replica's own actor handle."""
        import ray

        return ray.get_runtime_context().current_actor


class SicklyService(EchoService):
    """An EchoService whose ``check_health()`` fails once told to (it still serves its calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.sick = False

    def sicken(self) -> None:
        self.sick = True

    def check_health(self) -> str | None:
        return "told to be sick" if self.sick else None


class BrokenService:
    """A service whose constructor raises."""

    def __init__(self) -> None:
        raise ValueError("cannot build BrokenService: missing setting 'dsn'")

    def ping(self) -> str:
        return "pong"


class LedgerService:
    """Appends one line per execution to a file, so tests count how often each call really ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def record(self, token: str, seconds: float = 0.0) -> str:
        with open(self.path, "a", encoding="utf-8") as ledger:
            ledger.write(f"{token}\n")
        if seconds:
            time.sleep(seconds)
        return token

    @kservice.idempotent
    def record_idempotent(self, token: str, seconds: float = 0.0) -> str:
        return self.record(token, seconds)

    def record_stream(self, token: str, count: int, seconds: float = 0.0) -> Any:
        """Records ``token`` once, then yields ``count`` items, ``seconds`` apart."""
        self.record(token)
        for item in range(count):
            if seconds:
                time.sleep(seconds)
            yield item

    def where(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "actor": ray.get_runtime_context().get_actor_name()}


class ShoutMiddleware(kservice.ServiceMiddleware):
    """Server-side middleware: upper-cases string arguments of calls whose metadata asks for it."""

    def before_handle(self, request: kservice.ServiceRequest) -> kservice.ServiceRequest | None:
        if request.metadata.get("shout"):
            request.args = tuple(a.upper() if isinstance(a, str) else a for a in request.args)
            return request
        return None


class FirstReplica:
    """A replica balancer that always picks the lowest-numbered live replica."""

    def pick(self, live: Any) -> Any:
        return min(live, key=lambda replica: replica.index)


def without_breaker() -> dict[str, Any]:
    """Service options that turn the caller-side circuit breaker off, when that plugin is installed.

    Fault tests kill replicas on purpose; a service-wide breaker would then
    reject calls the surviving replica could serve and hide what the ray
    transport itself does.
    """
    schema = kservice.Config.load(None).schema
    return {"breaker": {"enabled": False}} if "breaker" in schema else {}


def quiet_config(services: dict[str, Any]) -> dict[str, Any]:
    """Config for services shared by a module's tests: no periodic health rounds spawning threads mid-test."""
    from kservice import Config

    config: dict[str, Any] = {"services": services}
    if "health" in Config.load(None).schema:
        config["health"] = {"enabled": False}
    return config


def _load_bomb(made_in: int) -> str:
    """Unpickled anywhere but in process ``made_in``: SystemExit, as ``sys.exit()`` in a class's ``__setstate__``."""
    if os.getpid() != made_in:
        raise SystemExit(12)
    return "loaded where it was made"


class IndexPicker:
    """A balancer with a plausible mistake: it answers an index, not one of the replicas it is given."""

    def pick(self, live: Any) -> Any:
        return 0


class AsyncPicker:
    """A balancer whose ``pick`` is ``async def``."""

    async def pick(self, live: Any) -> Any:
        return live[0]


class LoadBomb:
    """A value whose unpickling raises SystemExit in any process but the one that made it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_bomb, (os.getpid(),))


class PickleBomb:
    """A value whose pickling raises SystemExit."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(13)


class Bombs:
    """Answers a value whose pickling raises SystemExit; reports the replica's process."""

    def bomb(self) -> PickleBomb:
        return PickleBomb()

    def echo(self, value: Any) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    def bomb_items(self, how: str) -> Iterator[Any]:
        """Two items, then one whose pickling raises SystemExit.

        ``how``: ``"sharing-an-object"``, all three made at once; ``"alone"``, the last after a pause (a Ray
        object of its own); ``"beside-a-ray-only-item"``, the second a numpy array, which only Ray's serializer
        carries (its buffer travels out of band), so the three cannot be pickled together before the last.
        """
        import numpy

        yield 1
        yield numpy.arange(3) if how == "beside-a-ray-only-item" else 2
        if how == "alone":
            time.sleep(0.5)
        yield PickleBomb()


class Clocks:
    """What a replica's method sees of its call's deadline (``kservice.remaining_time()``)."""

    def remaining(self) -> float | None:
        return kservice.remaining_time()

    def remaining_items(self, count: int) -> Iterator[float | None]:
        for _ in range(count):
            yield kservice.remaining_time()


class Napper:
    """Naps, then says how long its call has left."""

    def nap(self, seconds: float) -> float | None:
        time.sleep(seconds)
        return kservice.remaining_time()
