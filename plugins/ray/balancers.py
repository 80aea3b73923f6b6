"""Replica selection: the balancer protocol, the built-in policies and their registry."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kservice import (
    ConfigError,
)

# ---------------------------------------------------------------------------
# Replica selection
# ---------------------------------------------------------------------------


class ReplicaView(Protocol):
    """What a balancer may read of a replica."""

    #: position of the replica in its deployment (stable across restarts)
    index: int
    #: calls this process has sent to the replica and not yet seen answered
    in_flight: int


class ReplicaBalancer(Protocol):
    """Chooses the replica of each call among the live ones.

    ``pick`` runs on every call, in the caller's thread, and must be cheap;
    ``live`` is never empty, and ``pick`` returns one of its replicas (a call
    fails with TypeError naming the balancer otherwise). It is a plain
    function: an ``async def`` one is refused when the service is
    configured. One balancer object serves one service in one process (it
    may keep state, e.g. a counter).
    """

    def pick(self, live: Sequence[Any]) -> Any: ...


class PowerOfTwoChoices:
    """Two live replicas at random, the one with fewer calls in flight from this process wins."""

    def __init__(self) -> None:
        # random (and its hashlib seeding) loads with the first balancer, not with the plugin: a
        # process that calls no ray service never imports it.
        import random

        self._randrange = random.randrange

    def pick(self, live: Sequence[Any]) -> Any:
        count = len(live)
        if count == 1:
            return live[0]
        first = self._randrange(count)
        second = self._randrange(count - 1)
        if second >= first:
            second += 1
        a, b = live[first], live[second]
        return a if a.in_flight <= b.in_flight else b


class RoundRobin:
    """Each live replica in turn."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(self, live: Sequence[Any]) -> Any:
        return live[next(self._next) % len(live)]


_balancers: dict[str, Callable[[], ReplicaBalancer]] = {
    "power_of_two": PowerOfTwoChoices,
    "round_robin": RoundRobin,
}


def register_balancer(name: str, factory: Callable[[], ReplicaBalancer]) -> None:
    """Make a replica-selection policy selectable as ``service.ray.balancer: <name>``.

    Plugins call this when imported. Registering a taken name with another
    factory raises ValueError.
    """
    existing = _balancers.get(name)
    if existing is not None and existing is not factory:
        raise ValueError(f"a replica balancer named {name!r} is already registered ({existing!r})")
    _balancers[name] = factory


def balancer_names() -> tuple[str, ...]:
    """Names accepted by ``service.ray.balancer``."""
    return tuple(sorted(_balancers))


def _make_balancer(name: str) -> ReplicaBalancer:
    factory = _balancers.get(name)
    if factory is None:
        raise ConfigError(f"service.ray.balancer: {name!r} is not one of {', '.join(map(repr, balancer_names()))}")
    balancer = factory()
    if inspect.iscoroutinefunction(getattr(balancer, "pick", None)):
        raise ConfigError(
            f"service.ray.balancer: {name!r}: {type(balancer).__qualname__}.pick is async def: it runs on every call "
            "and is never awaited; make it a plain function returning one of the replicas it is given"
        )
    return balancer


def wrong_pick(balancer: ReplicaBalancer, picked: Any) -> TypeError:
    """The error of a call whose balancer's ``pick`` answered something that is none of the replicas it was given."""
    from kservice._plugins import _describe_value

    return TypeError(
        f"replica balancer {type(balancer).__qualname__}.pick returned {_describe_value(picked)}; it returns one of "
        "the replicas it is given (service.ray.balancer)"
    )
