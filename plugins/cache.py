"""The ``cache`` plugin: answer repeated calls of pure or idempotent methods from a TTL cache.

Off by default (``cache.enabled: false``); turn it on globally or per service
(``services.<name>.cache.enabled: true``). Which methods are cached:

- the names in ``cache.methods`` (declaring them pure for caching), or, when
  that list is empty,
- the methods declared idempotent: the service's ``idempotent:`` config list,
  and ``@kservice.idempotent`` / ``idempotent_methods`` on the class when the
  caller's environment holds the service (its class is then known here).

Methods in ``cache.exclude`` are never cached, and neither are streams
(``manager.stream``): every stream reaches the service and yields its own
items; a method seen streamed is not looked up again. The key is ``(method, args,
kwargs)`` with argument types (so ``f(1)`` and ``f(True)`` do not share an
entry); a call whose arguments are unhashable bypasses the cache. Only
successful, non-degraded responses are stored; errors never are. A hit is a
response with ``metadata["kservice.cache"] = "hit"``. Every answer is the
caller's own object, as a call over the wire gives: the cache keeps a pickle
of a result a caller could change (a list, a dict, an object), made when it
is stored, and each hit unpickles it, so a caller changing what it got
changes nothing another caller gets. Numbers, strings, bytes, None and
tuples of them are kept as they are; a result that cannot be pickled is
not cached.

One ``cachetools.TTLCache`` per service and process (``ttl`` seconds,
``maxsize`` entries, least recently used evicted first), guarded by a lock
because TTLCache is not thread-safe. Ordering: ``tryfirst``, outside the
breaker, so a hit is served even while the breaker is open and never counts
as a breaker probe.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from _pickle import dumps as _dumps  # the C pickler itself, as the mmap codec; loaded by the core already
from _pickle import loads as _loads
from collections.abc import Callable, Hashable
from typing import Any

from kservice import (
    ServiceMiddleware,
    ServiceRequest,
    ServiceResponse,
    Setting,
    hookimpl,
    is_idempotent,
)
from kservice._fork import renew_after_fork
from kservice.keys import CACHE, STREAM_ITEMS

__all__ = ["ResultCache", "cache_info", "clear_cache"]


class ResultCache(ServiceMiddleware):
    """The result cache of one service and the middleware that uses it.

    ``cacheable(method_name) -> bool`` is decided once per method name.
    ``clock`` returns seconds for the TTL (tests drive it).
    """

    def __init__(
        self,
        service_name: str,
        settings: dict[str, Any],
        cacheable: Callable[[str], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service_name = service_name
        self.settings = dict(settings)
        #: what the cache was built from; a route with other settings gets a new cache
        self.identity: Any = None
        self._cacheable = cacheable
        self._decided: dict[str, bool] = {}
        import cachetools  # when a service first caches: a process that caches nothing does not import it

        self._cache: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(
            maxsize=settings["maxsize"], ttl=settings["ttl"], timer=clock
        )
        self._lock = threading.Lock()
        renew_after_fork(self, "_lock")
        self.hits = 0
        self.misses = 0

    def _key(self, request: ServiceRequest) -> Hashable | None:
        method = request.method_name
        decided = self._decided.get(method)
        if decided is None:
            decided = self._decided[method] = self._cacheable(method)
        if not decided:
            return None
        args, kwargs = request.args, request.kwargs
        key: tuple[Any, ...] = (
            method,
            args,
            tuple(map(type, args)),
            tuple(sorted((k, type(v), v) for k, v in kwargs.items())) if kwargs else (),
        )
        try:
            hash(key)
        except TypeError:
            return None  # unhashable arguments: bypass, never fail the call
        return key

    def before_call(self, request: ServiceRequest) -> ServiceResponse | None:
        key = self._key(request)
        if key is None:
            return None
        with self._lock:
            result = self._cache.get(key, _MISS)
        if result is _MISS:
            self.misses += 1
            return None
        self.hits += 1
        value, pickled = result
        if pickled:
            value = _loads(value)
        return ServiceResponse(True, value, None, request.request_id, metadata={CACHE: "hit"})

    def after_call(self, response: ServiceResponse, request: ServiceRequest) -> None:
        if STREAM_ITEMS in response.metadata:
            # A stream's end: its items went to the caller, its result is None. Stored, it would answer the
            # next stream of these arguments with no items; the method is a generator, so never cache it.
            if response.success:
                self._decided[request.method_name] = False
            return
        if not response.success or response.degraded:
            return
        key = self._key(request)
        if key is None:
            return
        entry = _snapshot(response.result)
        if entry is None:
            return  # it cannot be pickled: not cached, so no caller shares it with another
        with self._lock:
            self._cache[key] = entry

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def info(self) -> dict[str, Any]:
        with self._lock:
            size = len(self._cache)
        return {"hits": self.hits, "misses": self.misses, "size": size, **self.settings}


_MISS = object()

#: Types of results the cache keeps as they are: no caller can change them.
_UNCHANGEABLE = frozenset({type(None), bool, int, float, complex, str, bytes})


def _snapshot(result: Any) -> tuple[Any, bool] | None:
    """What the cache keeps of ``result``: (the value, False) when no caller can change it, else (its pickle, True).

    None: it cannot be pickled (an in-process object: a lock, a generator).
    """
    kind = type(result)
    if kind in _UNCHANGEABLE or (kind is tuple and all(type(item) in _UNCHANGEABLE for item in result)):
        return result, False
    try:
        return _dumps(result, 5), True
    except BaseException:  # noqa: BLE001 - whatever its pickling raises (SystemExit too): the answer stands, uncached
        return None


# --------------------------------------------------------------- registries

_caches: weakref.WeakValueDictionary[str, ResultCache] = weakref.WeakValueDictionary()
_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_lock")


def clear_cache(service_name: str | None = None) -> None:
    """Drop cached results of one service, or of every service in this process."""
    with _lock:
        caches = [c for name, c in _caches.items() if service_name is None or name == service_name]
    for cache in caches:
        cache.clear()


def cache_info(service_name: str) -> dict[str, Any] | None:
    """Hits, misses and size of a service's cache in this process; None without one."""
    cache = _caches.get(service_name)
    return None if cache is None else cache.info()


def _cacheable_methods(options: dict[str, Any], service_class: type | None) -> Callable[[str], bool]:
    settings = options["cache"]
    listed = frozenset(settings["methods"])
    excluded = frozenset(settings["exclude"])
    configured_idempotent = frozenset(options.get("idempotent", ()))

    def cacheable(method: str) -> bool:
        if method in excluded:
            return False
        if listed:
            return method in listed
        return is_idempotent(service_class, method, configured_idempotent)

    return cacheable


# --------------------------------------------------------------------- hooks


@hookimpl
def kservice_config_schema(register: Callable[[str, dict[str, Any]], None]) -> None:
    register(
        "cache",
        {
            "enabled": Setting((bool,), False, "Whether results of the service's cacheable methods are cached."),
            "ttl": Setting((float,), 60.0, "Seconds a cached result is served.", minimum=0.000001),
            "maxsize": Setting(
                (int,), 1024, "Cached results kept per service (least recently used evicted).", minimum=1
            ),
            "methods": Setting((list,), [], "Methods to cache; empty: the methods declared idempotent."),
            "exclude": Setting((list,), [], "Methods never cached."),
        },
    )


@hookimpl(tryfirst=True)
def kservice_middleware(
    service_name: str, options: dict[str, Any], service_class: type | None
) -> ServiceMiddleware | None:
    # tryfirst: outside the breaker (trylast), so hits skip it and never act as probes.
    settings = options.get("cache")
    if not settings or not settings["enabled"]:
        return None
    identity = (sorted(settings.items(), key=repr), sorted(options.get("idempotent", ())), service_class)
    with _lock:
        cache = _caches.get(service_name)
        if cache is None or cache.identity != identity:
            cache = ResultCache(service_name, settings, _cacheable_methods(options, service_class))
            cache.identity = identity
            _caches[service_name] = cache
    return cache
