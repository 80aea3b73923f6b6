"""The one plugin manager, and loading plugins from entry points.

Plugins are found in the ``kservice`` entry-point group and loaded one by one:
a plugin that fails to import is a warning naming it and the others still load
(``KSERVICE_STRICT_PLUGINS=1`` makes it a :class:`PluginError`).
``KSERVICE_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name, built-in
ones included. Everything derived from the plugin set (transports, task kinds,
schema, compiled call chains) is rebuilt when a plugin is registered or
unregistered, through :func:`on_plugins_changed`.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pluggy

from . import hookspecs
from ._config import Schema, core_schema, merge_schema
from ._errors import PluginError

if TYPE_CHECKING:
    from ._task import BaseServiceTask, ServiceFactory, TaskContext
    from ._transport import Transport

from importlib.metadata import EntryPoint, entry_points

__all__ = [
    "PLUGIN_GROUP",
    "SERVICE_GROUP",
    "config_schema",
    "get_plugin_manager",
    "get_transport",
    "hookimpl",
    "on_plugins_changed",
    "plugin_infos",
    "registered_services",
    "task_kinds",
    "transports",
]

PLUGIN_GROUP = "kservice"
SERVICE_GROUP = "kservice.services"
STRICT_ENV_VAR = "KSERVICE_STRICT_PLUGINS"
DISABLE_ENV_VAR = "KSERVICE_DISABLE_PLUGINS"

hookimpl = pluggy.HookimplMarker("kservice")

_T = TypeVar("_T")


@dataclass(frozen=True)
class PluginInfo:
    """What ``kservice plugins`` shows for one plugin."""

    name: str
    origin: str  # "entry point <dist> <version>", or "registered at run time"
    hooks: tuple[str, ...]


class KservicePluginManager(pluggy.PluginManager):
    """A PluginManager that tells subscribers whenever the plugin set changes."""

    def __init__(self) -> None:
        super().__init__("kservice")
        self.add_hookspecs(hookspecs)
        self.generation = 0
        self.origins: dict[str, str] = {}
        self._listeners: list[weakref.ReferenceType[Any] | Callable[[], None]] = []
        self._derived: dict[str, Any] = {}
        self._lock = threading.RLock()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        if registered is not None:
            self.origins.setdefault(registered, "registered at run time")
            self._changed()
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        removed = super().unregister(plugin, name)
        self._changed()
        return removed

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change; bound methods are held weakly."""
        ref: Any = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else callback
        with self._lock:
            self._listeners.append(ref)

    def derived(self, key: str, compute: Callable[[], _T]) -> _T:
        """``compute()`` cached until the plugin set changes."""
        with self._lock:
            if key not in self._derived:
                self._derived[key] = compute()
            return cast(_T, self._derived[key])

    def _changed(self) -> None:
        with self._lock:
            self.generation += 1
            self._derived.clear()
            listeners = list(self._listeners)
        dead = []
        for ref in listeners:
            callback = ref() if isinstance(ref, weakref.WeakMethod) else ref
            if callback is None:
                dead.append(ref)
            else:
                callback()
        if dead:
            with self._lock:
                self._listeners = [r for r in self._listeners if r not in dead]


_manager: KservicePluginManager | None = None
_manager_lock = threading.Lock()


def disabled_plugin_names() -> set[str]:
    """Plugins blocked by ``KSERVICE_DISABLE_PLUGINS``."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV_VAR, "").split(",") if n.strip()}


def _strict() -> bool:
    return os.environ.get(STRICT_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _load_entry_point(pm: KservicePluginManager, ep: EntryPoint) -> None:
    if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
        return
    dist = getattr(ep, "dist", None)
    origin = f"entry point of {dist.name} {dist.version}" if dist is not None else "entry point"
    try:
        plugin = ep.load()
        pm.register(plugin, name=ep.name)
    except Exception as exc:
        message = f"kservice plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        if _strict():
            raise PluginError(message) from exc
        warnings.warn(message + f" (skipped; set {STRICT_ENV_VAR}=1 to make this an error)", RuntimeWarning, stacklevel=3)
        return
    pm.origins[ep.name] = origin


def get_plugin_manager() -> KservicePluginManager:
    """The process-wide plugin manager, with every enabled entry-point plugin loaded.

    Raises PluginError in strict mode when a plugin fails to load or a hook
    implementation does not match its spec.
    """
    global _manager
    if _manager is not None:
        return _manager
    with _manager_lock:
        if _manager is None:
            pm = KservicePluginManager()
            for name in disabled_plugin_names():
                pm.set_blocked(name)
            for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
                _load_entry_point(pm, ep)
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                if _strict():
                    raise PluginError(str(exc)) from exc
                warnings.warn(f"kservice plugin problem: {exc}", RuntimeWarning, stacklevel=2)
            _manager = pm
    return _manager


def plugin_infos() -> list[PluginInfo]:
    """Every registered plugin: name, where it came from and the hooks it implements."""
    pm = get_plugin_manager()
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name, pm.origins.get(name, "registered at run time"), hooks))
    return infos


def _collect_registrations(hook_name: str) -> list[tuple[str, tuple[Any, ...]]]:
    """Call a register-callback hook; returns (plugin name, registered args) in call order."""
    pm = get_plugin_manager()
    collected: list[tuple[str, tuple[Any, ...]]] = []
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        def register(*args: Any, _plugin: str = impl.plugin_name) -> None:
            collected.append((_plugin, args))

        # Called per implementation (not through pm.hook) to know which plugin registered what.
        impl.function(*[register for _ in impl.argnames])
    return collected


def _unique_by_name(hook_name: str, what: str) -> dict[str, tuple[str, tuple[Any, ...]]]:
    table: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for plugin_name, args in _collect_registrations(hook_name):
        key = args[0] if isinstance(args[0], str) else args[0].name
        if key in table and table[key][0] != plugin_name:
            raise PluginError(f"{what} {key!r} is registered by both plugin {table[key][0]!r} and plugin {plugin_name!r}")
        table[key] = (plugin_name, args)
    return table


def transports() -> dict[str, Transport]:
    """Every registered transport by name."""
    pm = get_plugin_manager()
    return pm.derived(
        "transports", lambda: {name: args[0] for name, (_, args) in _unique_by_name("kservice_register_transports", "transport").items()}
    )


def get_transport(name: str) -> Transport:
    """The transport called ``name``; PluginError naming the registered ones if there is none."""
    found = transports().get(name)
    if found is None:
        known = ", ".join(sorted(transports())) or "none"
        raise PluginError(
            f"no transport named {name!r} is registered (registered: {known}); "
            f"is its plugin installed, or disabled by {DISABLE_ENV_VAR}?"
        )
    return found


def task_kinds() -> dict[str, Callable[[ServiceFactory, TaskContext], BaseServiceTask]]:
    """Every registered task kind and the callable that makes its tasks."""
    pm = get_plugin_manager()
    return pm.derived(
        "task_kinds", lambda: {name: args[1] for name, (_, args) in _unique_by_name("kservice_register_task_kinds", "task kind").items()}
    )


def registered_services() -> dict[str, type]:
    """Service classes contributed by plugins through ``kservice_register_services``."""
    pm = get_plugin_manager()
    return pm.derived(
        "services", lambda: {name: args[1] for name, (_, args) in _unique_by_name("kservice_register_services", "service").items()}
    )


def config_schema() -> Schema:
    """The core's configuration schema with every plugin's keys merged in."""

    def compute() -> Schema:
        schema = core_schema()
        for _, (path, addition) in _collect_registrations("kservice_config_schema"):
            merge_schema(schema, path, addition)
        return schema

    return get_plugin_manager().derived("schema", compute)


def on_plugins_changed(callback: Callable[[], None]) -> None:
    """Call ``callback()`` whenever a plugin is registered or unregistered (bound methods held weakly)."""
    get_plugin_manager().subscribe(callback)


def service_entry_points() -> dict[str, EntryPoint]:
    """Services advertised under the ``kservice.services`` entry-point group, by name."""
    return {ep.name: ep for ep in entry_points(group=SERVICE_GROUP)}
