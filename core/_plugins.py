"""The one plugin manager, and loading plugins from entry points.

Plugins are found in the ``kservice`` entry-point group and loaded one by one:
a plugin that fails to import is a warning naming it and the others still load
(``KSERVICE_STRICT_PLUGINS=1`` makes it a :class:`PluginError`; so does naming
it under ``plugins.require`` in the configuration).
``KSERVICE_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name, built-in
ones included, before they are imported; ``plugins.disable`` in the file named
by ``KSERVICE_CONFIG`` does the same, and in any other configuration it
unregisters and blocks them when that configuration is loaded. Everything derived from the plugin set (transports, task kinds,
schema, compiled call chains) is rebuilt when a plugin is registered or
unregistered, through :func:`on_plugins_changed`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType, FunctionType, MethodType, ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pluggy

from . import hookspecs
from ._config import Schema, core_schema, merge_schema
from ._errors import PluginError, ServiceError
from ._fork import renew_after_fork

if TYPE_CHECKING:
    from ._plugininfo import PluginInfo, PluginState
    from ._task import BaseServiceTask, ServiceFactory, TaskContext
    from ._transport import Transport

from ._entrypoints import EntryPointRef, entry_points
from ._startup import collector_paused

__all__ = [
    "PLUGIN_GROUP",
    "SERVICE_GROUP",
    "PluginState",
    "announce",
    "apply_plugin_config",
    "call_hook",
    "config_schema",
    "get_plugin_manager",
    "get_transport",
    "hookimpl",
    "on_plugins_changed",
    "plugin_infos",
    "plugin_states",
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


def __getattr__(name: str) -> Any:
    # The records ``kservice plugins`` lists are built only there: a caller does not pay for their classes.
    if name in ("PluginInfo", "PluginState"):
        from . import _plugininfo

        return getattr(_plugininfo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class KservicePluginManager(pluggy.PluginManager):
    """A PluginManager that tells subscribers whenever the plugin set changes."""

    def __init__(self) -> None:
        super().__init__("kservice")
        self.add_hookspecs(hookspecs)
        self.generation = 0
        self.origins: dict[str, str] = {}
        #: plugin name -> why it failed to load (import error, hook validation error)
        self.failures: dict[str, str] = {}
        #: plugin name -> what disabled it (the environment variable, or a config's plugins.disable)
        self.disabled: dict[str, str] = {}
        #: plugin name -> the config that requires it
        self.required: dict[str, str] = {}
        #: plugin name -> the config keys it declared, kept when a configuration disables it
        self.disabled_schemas: dict[str, Schema] = {}
        self._listeners: list[weakref.ReferenceType[Any] | Callable[[], None]] = []
        self._derived: dict[str, Any] = {}
        self._lock = threading.RLock()
        renew_after_fork(self, "_lock")

    def register(self, plugin: object, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        if registered is not None:
            self.origins.setdefault(registered, "registered at run time")
            self._changed()
        return registered

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> pluggy.HookimplOpts | None:
        # pluggy looks every name of a plugin up statically, walking the type's MRO (about 500
        # names over the installed plugins, a fifth of building the first manager). A module's
        # name that is no function or method wrapper cannot be a hook to pluggy either, and a
        # module's attribute is a plain entry of its __dict__: skip those without the lookup.
        opts: Any = _ASK_PLUGGY
        if type(plugin) is ModuleType:
            opts = _module_marker(plugin, name, self.project_name + "_impl")
        if opts is _ASK_PLUGGY:
            opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None:
            _refuse_async_hook(plugin, name)  # pluggy validates every hook before it registers any
        return cast("pluggy.HookimplOpts | None", opts)

    def parse_hookspec_opts(self, module_or_class: Any, name: str) -> pluggy.HookspecOpts | None:
        # As parse_hookimpl_opts: the specs module's names read from its __dict__, without pluggy's
        # static look-up of each (a sixth of building the process's plugin manager).
        if type(module_or_class) is ModuleType:
            found = _module_marker(module_or_class, name, self.project_name + "_spec")
            if found is not _ASK_PLUGGY:
                return cast("pluggy.HookspecOpts | None", found)
        return super().parse_hookspec_opts(module_or_class, name)

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


#: :func:`_module_marker`'s answer for a name only pluggy's own look-up can decide
_ASK_PLUGGY: Any = object()


def _refuse_async_hook(plugin: Any, name: str) -> None:
    """PluginError when hook implementation ``name`` of ``plugin`` is ``async def``: hooks are called, never awaited.

    Its coroutine would be its answer, and a lifecycle hook would silently
    never run. Raised while pluggy validates the plugin, so nothing of it is
    registered (an entry point's plugin is then skipped with a warning).
    """
    function = getattr(plugin, name, None)
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        label = plugin.__name__ if type(plugin) is ModuleType else type(plugin).__qualname__
        raise PluginError(
            f"hook {name} of plugin {label} is async def: kservice calls its hooks and never awaits them "
            "(a coroutine would be the hook's answer); make it a plain function (def)"
        )


def _module_marker(module: ModuleType, name: str, attribute: str) -> Any:
    """The hook marker (``attribute``: pluggy's ``<project>_impl`` or ``_spec`` dict) of ``module``'s name ``name``.

    What pluggy's static look-up finds for a module's function is the
    function itself, so its marker is read as pluggy reads it (None: no
    hook; most of a module's functions are helpers or its own API). A name
    that is no function or method wrapper cannot be a hook either (None);
    for a method wrapper, ``_ASK_PLUGGY``: pluggy decides.
    """
    value = module.__dict__.get(name)
    if type(value) is FunctionType:
        marker = getattr(value, attribute, None)
        return marker if isinstance(marker, dict) else None
    if isinstance(value, (MethodType, staticmethod, classmethod)):
        return _ASK_PLUGGY
    return None


def _flatten(results: Iterable[Any]) -> list[Any]:
    """Hook results as one list: lists and tuples spliced in, Nones dropped."""
    flat: list[Any] = []
    for item in results:
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            flat.extend(x for x in item if x is not None)
        else:
            flat.append(item)
    return flat


_manager: KservicePluginManager | None = None
_manager_lock = threading.Lock()
renew_after_fork(sys.modules[__name__], "_manager_lock")


def env_disabled_names() -> set[str]:
    """The plugin names ``KSERVICE_DISABLE_PLUGINS`` blocks."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV_VAR, "").split(",") if n.strip()}


def disabled_plugin_names() -> set[str]:
    """Plugins blocked by ``KSERVICE_DISABLE_PLUGINS`` or by a loaded configuration's ``plugins.disable``."""
    names = env_disabled_names()
    if _manager is not None:
        names |= set(_manager.disabled)
    return names


def _env_config_disabled_names() -> dict[str, str]:
    """``plugins.disable`` of the file named by KSERVICE_CONFIG, read before any plugin is imported.

    A file that cannot be read or parsed disables nothing here: loading the
    configuration reports the problem.
    """
    from ._config import CONFIG_ENV_VAR, read_config_file

    path = os.environ.get(CONFIG_ENV_VAR)
    if not path:
        return {}
    try:
        raw = read_config_file(path)
    except Exception:  # noqa: BLE001 - reported (as one line) when the configuration is loaded
        return {}
    section = raw.get("plugins") if isinstance(raw, dict) else None
    names = section.get("disable") if isinstance(section, dict) else None
    if not isinstance(names, list):
        return {}
    return {str(n): f"plugins.disable in {path} (from {CONFIG_ENV_VAR})" for n in names if isinstance(n, str) and n}


def _strict() -> bool:
    return os.environ.get(STRICT_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _load_entry_point(pm: KservicePluginManager, ep: EntryPointRef) -> None:
    if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
        return
    origin = f"entry point of {ep.dist.name} {ep.dist.version}" if ep.dist is not None else "entry point"
    try:
        plugin = ep.load()
        pm.register(plugin, name=ep.name)
    except (Exception, SystemExit) as exc:  # a plugin module that exits when imported must not end the program
        message = f"kservice plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        pm.failures[ep.name] = f"{type(exc).__name__}: {exc}"
        pm.origins.setdefault(ep.name, origin)
        if _strict():
            raise PluginError(message) from exc
        warnings.warn(
            message + f" (skipped; set {STRICT_ENV_VAR}=1 to make this an error)", RuntimeWarning, stacklevel=3
        )
        return
    pm.origins[ep.name] = origin


def _report_plugin_name_clash(name: str, eps: list[EntryPointRef]) -> None:
    """Warn (PluginError in strict mode) that several distributions declare plugin ``name``; the first loads.

    Without it the others were skipped without a word: a plugin that never
    ran, or a built-in one (``metrics``) replaced by another of the same name.
    """
    origins = ", ".join(
        f"{ep.dist.name} {ep.dist.version} ({ep.value})" if ep.dist is not None else f"({ep.value})" for ep in eps
    )
    message = (
        f"kservice plugin name {name!r} is declared by {len(eps)} installed distributions: {origins}; "
        f"only the first on sys.path is loaded ({eps[0].value}): rename one entry point or uninstall one"
    )
    if _strict():
        raise PluginError(message)
    warnings.warn(message + f" (set {STRICT_ENV_VAR}=1 to make this an error)", RuntimeWarning, stacklevel=4)


def _warn_of_misspelt_disabled_names(installed: Iterable[str]) -> None:
    """Warn that a ``KSERVICE_DISABLE_PLUGINS`` name close to an installed plugin's disables nothing.

    Without it ``KSERVICE_DISABLE_PLUGINS=metric`` left ``metrics`` running
    without a word. A name like no installed plugin's is not warned of: it may
    name a plugin installed where the same environment is also used
    (``kservice config check`` notes it).
    """
    names = env_disabled_names().difference(installed)
    if not names:
        return
    from difflib import get_close_matches  # only when a name is unknown: a caller's start does not pay for it

    for name in sorted(names):
        close = get_close_matches(name, sorted(installed), n=1)
        if close:
            warnings.warn(
                f"{DISABLE_ENV_VAR} names {name!r}, which no installed kservice plugin is called: "
                f"did you mean {close[0]!r}? (as written it disables nothing)",
                RuntimeWarning,
                stacklevel=4,
            )


def get_plugin_manager() -> KservicePluginManager:
    """The process-wide plugin manager, with every enabled entry-point plugin loaded.

    Raises PluginError in strict mode when a plugin fails to load or a hook
    implementation does not match its spec.
    """
    global _manager
    if _manager is not None:
        return _manager
    with _manager_lock, collector_paused():
        if _manager is None:
            pm = KservicePluginManager()
            for name in env_disabled_names():
                pm.set_blocked(name)
                pm.disabled[name] = DISABLE_ENV_VAR
            for name, why in _env_config_disabled_names().items():
                if not pm.is_blocked(name):
                    pm.set_blocked(name)
                    pm.disabled[name] = why
            declared: dict[str, list[EntryPointRef]] = {}
            for ep in entry_points(group=PLUGIN_GROUP):
                declared.setdefault(ep.name, []).append(ep)
            for name in sorted(declared):
                eps = declared[name]
                if len({ep.value for ep in eps}) > 1 and not pm.is_blocked(name):
                    _report_plugin_name_clash(name, eps)
                # Only the first on sys.path loads (as a module earlier on sys.path shadows a later one).
                _load_entry_point(pm, eps[0])
            _warn_of_misspelt_disabled_names(declared)
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                culprit = pm.get_name(exc.plugin) if exc.plugin is not None else None
                if culprit is not None:
                    pm.failures[culprit] = f"PluginValidationError: {exc}"
                if _strict():
                    raise PluginError(str(exc)) from exc
                warnings.warn(f"kservice plugin problem: {exc}", RuntimeWarning, stacklevel=2)
            _manager = pm
    return _manager


def apply_plugin_config(disable: list[str], require: list[str], origin: str) -> None:
    """Apply a configuration's ``plugins`` section to the process's plugin manager.

    Each name in ``disable`` is unregistered (if loaded) and blocked for the
    rest of the process, as ``KSERVICE_DISABLE_PLUGINS`` does. Then every name
    in ``require`` must be loaded: otherwise PluginError naming each missing
    plugin and why (failed to load, disabled, not installed); nothing is
    changed by a require that fails after the disables, so callers should not
    go on.
    """
    if not disable and not require:
        return
    pm = get_plugin_manager()
    for name in disable:
        if name in pm.disabled:
            continue
        pm.disabled_schemas[name] = schema_of({name})[0]
        pm.disabled[name] = f"plugins.disable in {origin}"
        pm.set_blocked(name)  # unregisters it if loaded; tells subscribers the plugin set changed
    missing = []
    for name in require:
        pm.required.setdefault(name, origin)
        why = not_loaded_reason(pm, name)
        if why is not None:
            missing.append(f"required plugin {name!r} {why}")
    if missing:
        raise PluginError("; ".join(missing) + f" (plugins.require in {origin})")


def _installed_plugin_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)})


def installed_plugin_names(pm: KservicePluginManager | None = None) -> list[str]:
    """Every plugin name this process could load: the entry points of the group and the plugins registered now."""
    pm = pm or get_plugin_manager()
    return sorted({*_installed_plugin_names(), *(n for n, p in pm.list_name_plugin() if p is not None)})


def not_loaded_reason(pm: KservicePluginManager, name: str) -> str | None:
    """Why plugin ``name`` is not loaded, or None when it is."""
    if name in pm.disabled:
        return f"is disabled by {pm.disabled[name]}"
    if name in pm.failures:
        return f"failed to load: {pm.failures[name]}"
    if pm.has_plugin(name) and pm.get_plugin(name) is not None:
        return None
    installed = installed_plugin_names(pm)
    from difflib import get_close_matches  # only on this error path: a caller's start does not pay for it

    close = get_close_matches(name, installed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"is not installed (no entry point {name!r} in group {PLUGIN_GROUP!r}){hint}"


def plugin_states() -> list[PluginState]:
    """Every plugin this process knows of, loaded or not, sorted by name.

    Loaded plugins carry their hooks; disabled ones say what disabled them;
    failed ones say why they failed; a required plugin that is not installed
    is listed as failed too.
    """
    from ._plugininfo import PluginState

    pm = get_plugin_manager()
    states: dict[str, PluginState] = {}
    for info in plugin_infos():
        states[info.name] = PluginState(info.name, "loaded", info.origin, info.hooks, required=info.name in pm.required)
    known_origins = {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}
    for name, why in pm.disabled.items():
        origin = "entry point" if name in known_origins else "not installed"
        states[name] = PluginState(
            name, "disabled", pm.origins.get(name, origin), reason=f"disabled by {why}", required=name in pm.required
        )
    for name, why in pm.failures.items():
        if name not in states:
            states[name] = PluginState(
                name, "failed", pm.origins.get(name, "entry point"), reason=why, required=name in pm.required
            )
    for name in pm.required:
        if name not in states:
            states[name] = PluginState(
                name, "failed", "not installed", reason=not_loaded_reason(pm, name) or "", required=True
            )
    return [states[name] for name in sorted(states)]


def plugin_infos() -> list[PluginInfo]:
    """Every registered plugin: name, where it came from and the hooks it implements."""
    from ._plugininfo import PluginInfo

    pm = get_plugin_manager()
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name, pm.origins.get(name, "registered at run time"), hooks))
    return infos


def _describe_failure(exc: BaseException) -> str:
    """``Type: message`` of ``exc``; never raises (the message of an exception may)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - a __str__ that raises
        return f"{type(exc).__name__} (its message could not be formatted)"


def call_hook(hook_name: str, **kwargs: Any) -> Any:
    """``get_plugin_manager().hook.<hook_name>(**kwargs)`` for a hook whose answer the caller needs.

    Pluggy's call, unchanged (order, wrappers, first-result hooks), except
    that an implementation raising something other than a ServiceError (a
    typed answer, passed on as raised) becomes a PluginError naming the
    plugin and the hook, the error chained: a bare KeyError from a call or a
    start says nothing of where it came from.
    """
    caller = getattr(get_plugin_manager().hook, hook_name)
    try:
        return caller(**kwargs)
    except ServiceError:
        raise
    except Exception as exc:
        raise PluginError(
            f"kservice {_raised_in(caller, exc)}: its {hook_name} raised {_describe_failure(exc)}"
        ) from exc


def _implementation_codes(caller: Any) -> dict[Any, str]:
    """The code object of each implementation of the hook ``caller``, with its plugin's name."""
    codes = {}
    for impl in caller.get_hookimpls():
        function = getattr(impl.function, "__func__", impl.function)
        code = getattr(function, "__code__", None)
        if code is not None:
            codes[code] = impl.plugin_name
    return codes


def hook_running(frame: FrameType | None) -> tuple[str, str] | None:
    """(plugin name, hook name) of the innermost hook implementation ``frame`` (a thread's current frame) is in.

    None when no plugin's hook is on that stack (or ``frame`` is None). For
    saying which plugin holds up a thread that waits too long.
    """
    codes: dict[Any, tuple[str, str]] = {}
    for hook_name, caller in vars(get_plugin_manager().hook).items():
        for code, plugin_name in _implementation_codes(caller).items():
            codes[code] = (plugin_name, hook_name)
    while frame is not None:
        found = codes.get(frame.f_code)
        if found is not None:
            return found
        frame = frame.f_back
    return None


def _raised_in(caller: Any, exc: BaseException) -> str:
    """Which implementation of the hook ``caller`` raised ``exc``: 'plugin NAME', from the frames it passed."""
    codes = _implementation_codes(caller)
    traceback = exc.__traceback__
    while traceback is not None:
        name = codes.get(traceback.tb_frame.f_code)
        if name is not None:
            return f"plugin {name!r}"
        traceback = traceback.tb_next
    return "a plugin"


#: Seconds a question to every plugin (which services run, which names are known) waits for their answers.
PLUGIN_ANSWER_TIMEOUT = 5.0

# Each plugin's question still unanswered, by (hook, plugin): the thread asking it and when it began. A
# plugin that hangs is not asked again until it answers (a dashboard asks every second: one thread, not one
# per round).
_unanswered: dict[tuple[str, str], tuple[threading.Thread, float]] = {}
_unanswered_lock = threading.Lock()


def _forget_questions_after_fork() -> None:
    global _unanswered, _unanswered_lock
    _unanswered = {}  # the threads asking them did not come along: a child asks again
    _unanswered_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_questions_after_fork)


def _ask_unless_asked(
    key: tuple[str, str], function: Callable[[], None], now: float
) -> tuple[threading.Thread, float, bool]:
    """Run ``function`` in a daemon thread as the question ``key`` (hook, plugin), unless it is still being answered.

    ``(the thread answering it, when it began, whether it began now)``. The
    question is forgotten when ``function`` returns or raises, so a plugin
    that hangs is asked once, not once per caller.
    """

    def answer() -> None:
        try:
            function()
        finally:
            with _unanswered_lock:
                _unanswered.pop(key, None)

    with _unanswered_lock:
        running = _unanswered.get(key)
        if running is not None:
            return running[0], running[1], False
        thread = threading.Thread(target=answer, name=f"kservice-ask-{key[1]}", daemon=True)
        _unanswered[key] = (thread, now)
        thread.start()
    return thread, now, True


def ask_each_plugin(hook_names: tuple[str, ...], within: float, notes: list[str]) -> dict[str, list[tuple[str, Any]]]:
    """(plugin name, answer) of each implementation of ``hook_names`` (hooks taking no arguments), by hook; asked at once.

    Each implementation runs in a daemon thread of its own, so one that
    hangs holds the others up for at most ``within`` seconds in all. An
    implementation that raises, or has not answered by then, is left out,
    with a note in ``notes`` naming the plugin, the hook and what happened;
    one still answering an earlier question is not asked again meanwhile,
    nor waited for. A ServiceError an implementation raises (a typed answer,
    such as a refused runtime directory) is raised here once every
    implementation has answered or the time is up, as :func:`call_hook` does.
    """
    answers: dict[tuple[str, str], Any] = {}
    failures: dict[tuple[str, str], str] = {}
    typed: list[ServiceError] = []
    asked: list[tuple[str, str, threading.Thread]] = []
    started: list[threading.Thread] = []

    def ask(key: tuple[str, str], function: Any) -> None:
        try:
            answers[key] = function()
        except ServiceError as exc:
            typed.append(exc)
            failures[key] = "raised"
        except Exception as exc:  # noqa: BLE001 - one plugin's failure is a note; the others are listed
            failures[key] = f"raised {type(exc).__name__}: {exc}"

    now = time.monotonic()
    hook = get_plugin_manager().hook
    for hook_name in hook_names:
        for impl in reversed(getattr(hook, hook_name).get_hookimpls()):  # pluggy's order: the last registered first
            if impl.hookwrapper or impl.wrapper:
                continue
            key = (hook_name, impl.plugin_name)
            thread, _, began_now = _ask_unless_asked(key, functools.partial(ask, key, impl.function), now)
            if began_now:
                started.append(thread)
            asked.append((*key, thread))
    deadline = now + within
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    if typed:
        raise typed[0]
    found: dict[str, list[tuple[str, Any]]] = {hook_name: [] for hook_name in hook_names}
    for hook_name, plugin, thread in asked:
        key = (hook_name, plugin)
        if key in answers:
            found[hook_name].append((plugin, answers[key]))
            continue
        if key in failures:
            what = failures[key]
        else:
            with _unanswered_lock:
                began = _unanswered.get(key, (thread, now))[1]
            what = f"has not answered for {time.monotonic() - began:.1f} s"
        notes.append(f"plugin {plugin!r}: its {hook_name} {what}; what it knows is not listed")
    return found


def check_answers(
    hook_name: str, answers: list[Any], valid: Callable[[Any], bool], expected: str, about: str, **kwargs: Any
) -> None:
    """PluginError naming the plugin when one of ``answers`` (the hook's answers, None left out) is not ``valid``.

    ``expected`` says what the hook returns, ``about`` what it was asked. The
    plugin is found by asking each implementation again with ``kwargs``, the
    hook's arguments (only on this error path: hooks whose answers are
    checked are queries and factories).
    """
    bad = next((answer for answer in answers if not valid(answer)), _UNSET)
    if bad is _UNSET:
        return
    names = []
    for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue
        try:
            answer = impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception:  # noqa: BLE001 - asked again only to name the plugin
            continue
        if answer is not None and not valid(answer):
            names.append(repr(impl.plugin_name))
    who = f"plugin {names[0]}" if len(names) == 1 else f"plugins {', '.join(names)}" if names else "a plugin"
    raise wrong_answer(who, hook_name, bad, expected, about)


def wrong_answer(who: str, hook_name: str, bad: Any, expected: str, about: str = "") -> PluginError:
    """The PluginError of plugin(s) ``who`` ("plugin 'x'") answering ``bad`` to ``hook_name``; ``expected`` as in :func:`check_answers`."""
    about = f" {about}" if about else ""
    return PluginError(f"kservice {who}: its {hook_name} answered {_describe_value(bad)}{about}; {expected}")


_UNSET = object()


def announce(hook_name: str, within: float | None = None, **kwargs: Any) -> bool:
    """Call every implementation of the announcement hook ``hook_name``; never raises an Exception.

    An implementation that raises is reported (a RuntimeWarning naming the
    plugin, the hook and the error) and the other implementations still run,
    in pluggy's order. Used for the lifecycle announcements, whose callers
    (starting, stopping, failing tasks and environments) must finish whatever
    a plugin does.

    So an implementation that is not kservice's own runs in a daemon thread
    and is waited for at most ``within`` seconds (None: ``PLUGIN_ANSWER_TIMEOUT``);
    one that has not returned by then is reported the same way and left
    running, and while it runs it is not called again (each later
    announcement of that hook reports it skipped). Returns False when an
    implementation was left running or skipped: it may still act on the
    arguments. A hook wrapper among the implementations makes the call go
    through pluggy as a whole, in this thread (a wrapper must see every
    call): then a raise stops the implementations after it, and is reported
    the same way.
    """
    pm = get_plugin_manager()
    caller = getattr(pm.hook, hook_name)
    impls = caller.get_hookimpls()
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        try:
            caller(**kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, never stops the lifecycle
            _warn_hook_failed("a plugin", hook_name, exc)
        return True
    finished = True
    for returned, _ in _answers(hook_name, impls, kwargs, within, "the lifecycle goes on without it"):
        finished = returned and finished
    return finished


def _answers(
    hook_name: str, impls: list[Any], kwargs: dict[str, Any], within: float | None, outcome: str
) -> Iterator[tuple[bool, Any]]:
    """``(whether it returned, what it returned)`` of each implementation of ``hook_name``, in pluggy's order.

    kservice's own run in this thread: known not to block, and some must (the
    health plugin's stopping hook joins its scheduler, which may be the thread
    stopping the task). A plugin's run bounded by one deadline for them all,
    ``within`` seconds from the first (None: ``PLUGIN_ANSWER_TIMEOUT``; see
    :func:`_call_bounded`). One that raises is reported with ``outcome`` and
    answers None.
    """
    deadline = None
    for impl in reversed(impls):
        args = [kwargs[name] for name in impl.argnames]
        if impl.function.__module__.startswith("kservice."):
            try:
                result = impl.function(*args)
            except Exception as exc:  # noqa: BLE001 - reported, never stops the caller
                _warn_hook_failed(f"plugin {impl.plugin_name!r}", hook_name, exc, outcome.removesuffix(" without it"))
                result = None
            yield True, result
            continue
        if deadline is None:
            deadline = time.monotonic() + (PLUGIN_ANSWER_TIMEOUT if within is None else within)
        yield _call_bounded(hook_name, impl, args, deadline, outcome)


def _call_bounded(
    hook_name: str, impl: Any, args: list[Any], deadline: float, outcome: str = "the lifecycle goes on without it"
) -> tuple[bool, Any]:
    """Run one plugin's implementation in a daemon thread, waiting for it until ``deadline``.

    ``(whether it returned, what it returned)``. One that raises, has not
    returned by then, or is still running from an earlier call (then it is
    not called) is a RuntimeWarning naming the plugin, the hook and ``outcome``.
    """
    failed: list[BaseException] = []
    answer: list[Any] = []

    def run() -> None:
        try:
            answer.append(impl.function(*args))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller (SystemExit too), never stops it
            failed.append(exc)

    now = time.monotonic()
    thread, began, began_now = _ask_unless_asked((hook_name, impl.plugin_name), run, now)
    if not began_now:
        warnings.warn(
            f"kservice plugin {impl.plugin_name!r}: its {hook_name} was not called: it has not returned from an "
            f"earlier call for {now - began:.1f} s ({outcome})",
            RuntimeWarning,
            stacklevel=4,
        )
        return False, None
    thread.join(max(0.0, deadline - time.monotonic()))
    if failed:
        _warn_hook_failed(f"plugin {impl.plugin_name!r}", hook_name, failed[0], outcome.removesuffix(" without it"))
        return True, None
    if answer:
        return True, answer[0]
    warnings.warn(
        f"kservice plugin {impl.plugin_name!r}: its {hook_name} has not returned within "
        f"{max(0.0, deadline - began):.1f} s (left running; {outcome})",
        RuntimeWarning,
        stacklevel=4,
    )
    return False, None


def collect(hook_name: str, within: float | None = None, **kwargs: Any) -> list[Any]:
    """Every non-None result of the hook ``hook_name``, in pluggy's order; never raises an Exception.

    Like :func:`announce`, an implementation that raises, or (not kservice's
    own) has not returned within ``within`` seconds (None: ``PLUGIN_ANSWER_TIMEOUT``),
    is reported (a RuntimeWarning naming the plugin, the hook and what
    happened) and left out; the others' results are kept. For hooks whose
    callers show what plugins contribute (``kservice_status_columns``) and
    must show the rest when one fails or hangs.
    """
    impls = getattr(get_plugin_manager().hook, hook_name).get_hookimpls()
    answers = _answers(hook_name, impls, kwargs, within, "its part is left out")
    return [result for _, result in answers if result is not None]


def _warn_hook_failed(who: str, hook_name: str, exc: BaseException, outcome: str = "the lifecycle goes on") -> None:
    warnings.warn(
        f"kservice {who}: its {hook_name} raised {_describe_failure(exc)} (reported and ignored: {outcome})",
        RuntimeWarning,
        stacklevel=3,
    )


def _describe_value(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _registration_problem(hook_name: str, args: tuple[Any, ...]) -> str | None:
    """What is wrong with ``register(*args)`` in ``hook_name`` (None when nothing is).

    Checked when the plugin calls ``register``, so that its hook raises where
    the mistake is and only that plugin's contributions are skipped: a wrong
    registration kept until later broke every lookup of its kind for every
    plugin (an IndexError listing services), or was hosted as a service.
    """
    if hook_name == "kservice_register_services":
        usage = "register(name, service_class)"
        if len(args) != 2 or not isinstance(args[0], str) or not args[0]:
            return f"{usage} takes a non-empty service name and a class, got {len(args)} argument(s)"
        if not isinstance(args[1], type):
            return f"{usage}: service {args[0]!r} must be a class, not {_describe_value(args[1])}"
    elif hook_name == "kservice_register_task_kinds":
        usage = "register(kind, make_task)"
        if len(args) != 2 or not isinstance(args[0], str) or not args[0]:
            return f"{usage} takes a non-empty kind name and a callable, got {len(args)} argument(s)"
        if not callable(args[1]):
            return f"{usage}: make_task of kind {args[0]!r} must be callable, not {_describe_value(args[1])}"
    elif hook_name == "kservice_register_transports":
        from ._transport import Transport

        usage = "register(transport)"
        if len(args) != 1 or not isinstance(args[0], Transport):
            got = _describe_value(args[0]) if len(args) == 1 else f"{len(args)} arguments"
            return f"{usage} takes one kservice.Transport instance, got {got}"
        if not isinstance(args[0].name, str) or not args[0].name:
            return f"{usage}: the transport's name must be a non-empty str, not {_describe_value(args[0].name)}"
    elif hook_name == "kservice_config_schema":
        usage = "register(section_path, {key: Setting})"
        if len(args) != 2 or not isinstance(args[0], str) or not isinstance(args[1], dict):
            return f"{usage} takes a section path (str) and a dict of settings, got {len(args)} argument(s)"
    return None


def _collect_registrations(hook_name: str) -> list[tuple[str, tuple[Any, ...]]]:
    """Call a register-callback hook; returns (plugin name, registered args) in call order.

    A ``register`` call with the wrong arguments raises TypeError in the
    plugin's hook: a warning naming the plugin (PluginError in strict mode),
    and that plugin's contributions to the hook are skipped.
    """
    pm = get_plugin_manager()
    collected: list[tuple[str, tuple[Any, ...]]] = []
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        registered: list[tuple[str, tuple[Any, ...]]] = []

        def register(*args: Any, _plugin: str = impl.plugin_name, _into: list[Any] = registered) -> None:
            problem = _registration_problem(hook_name, args)
            if problem is not None:
                raise TypeError(problem)
            _into.append((_plugin, args))

        # Called per implementation (not through pm.hook) to know which plugin registered what.
        try:
            impl.function(*[register for _ in impl.argnames])
        except Exception as exc:
            message = f"kservice plugin {impl.plugin_name!r}: its {hook_name} raised {_describe_failure(exc)}"
            if _strict():
                raise PluginError(message) from exc
            warnings.warn(
                message + f" (its contributions are skipped; set {STRICT_ENV_VAR}=1 to make this an error)",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        collected.extend(registered)
    return collected


def _unique_by_name(hook_name: str, what: str) -> dict[str, tuple[str, tuple[Any, ...]]]:
    table: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for plugin_name, args in _collect_registrations(hook_name):
        key = args[0] if isinstance(args[0], str) else args[0].name
        if key in table and table[key][0] != plugin_name:
            raise PluginError(
                f"{what} {key!r} is registered by both plugin {table[key][0]!r} and plugin {plugin_name!r}"
            )
        table[key] = (plugin_name, args)
    return table


def transports() -> dict[str, Transport]:
    """Every registered transport by name."""
    pm = get_plugin_manager()
    return pm.derived(
        "transports",
        lambda: {
            name: args[0] for name, (_, args) in _unique_by_name("kservice_register_transports", "transport").items()
        },
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
        "task_kinds",
        lambda: {
            name: args[1] for name, (_, args) in _unique_by_name("kservice_register_task_kinds", "task kind").items()
        },
    )


def registered_services() -> dict[str, type]:
    """Service classes contributed by plugins through ``kservice_register_services``."""
    pm = get_plugin_manager()
    return pm.derived(
        "services",
        lambda: {name: args[1] for name, (_, args) in _unique_by_name("kservice_register_services", "service").items()},
    )


def config_schema(without: frozenset[str] = frozenset()) -> Schema:
    """The core's configuration schema with every plugin's keys merged in (except those of plugins in ``without``).

    Raises PluginError naming the plugin and key when a plugin registers a
    setting whose default fails its own type, bounds or choices.
    """

    def compute() -> Schema:
        schema = core_schema()
        for plugin_name, (path, addition) in _collect_registrations("kservice_config_schema"):
            if plugin_name in without:
                continue
            check_settings(plugin_name, path, addition)
            merge_schema(schema, path, addition)
        return schema

    if without:
        return compute()
    return get_plugin_manager().derived("schema", compute)


def schema_of(names: set[str]) -> tuple[Schema, set[str]]:
    """(the config keys the named plugins declare, the names whose keys cannot be known).

    Keys are known for plugins that are registered, or were registered when a
    configuration disabled them; not for installed plugins blocked before they
    were imported. A name no plugin is installed under declares no keys.
    """
    pm = get_plugin_manager()
    schema: Schema = {}
    unknowable: set[str] = set()
    wanted = set(names)
    entry_point_names: set[str] | None = None
    for name in names:
        if name in pm.disabled_schemas:
            merge_schema(schema, "", copy.deepcopy(pm.disabled_schemas[name]))
            wanted.discard(name)
        elif pm.get_plugin(name) is None:
            if entry_point_names is None:
                entry_point_names = set(_installed_plugin_names())
            # Only an installed plugin may own keys: a misspelled name must not make every unknown key
            # a mere warning.
            if name in entry_point_names:
                unknowable.add(name)
            wanted.discard(name)
    if wanted:
        for plugin_name, (path, addition) in _collect_registrations("kservice_config_schema"):
            if plugin_name in wanted:
                merge_schema(schema, path, copy.deepcopy(addition))
    return schema, unknowable


def check_settings(owner: str, path: str, addition: Schema) -> None:
    """PluginError unless every Setting in ``addition`` is well formed and its default passes its own checks."""
    from ._config import Setting, _check_value

    prefix = ".".join(p for p in path.split(".") if p)
    for key, value in addition.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            check_settings(owner, dotted, value)
            continue
        if not isinstance(value, Setting):
            raise PluginError(
                f"plugin {owner!r} registers config key {dotted!r} as {type(value).__name__}; expected a Setting or a section (dict)"
            )
        if not value.types or not all(isinstance(t, type) for t in value.types):
            raise PluginError(
                f"plugin {owner!r} registers config setting {dotted!r} with types {value.types!r}; expected Python types"
            )
        try:
            if _check_value(dotted, value, value.default) != value.default and isinstance(value.default, str):
                # A default is used as declared, never normalised: it must be spelt as one of the choices.
                raise ValueError(f"it is spelt {_check_value(dotted, value, value.default)!r} among the choices")
        except Exception as exc:  # noqa: BLE001 - any failure of the check is the plugin's error
            hint = " (declare a setting that may be None with nullable=True)" if value.default is None else ""
            raise PluginError(
                f"plugin {owner!r} registers config setting {dotted!r} whose default {value.default!r} fails its own check: {exc}{hint}"
            ) from None


def on_plugins_changed(callback: Callable[[], None]) -> None:
    """Call ``callback()`` whenever a plugin is registered or unregistered (bound methods held weakly)."""
    get_plugin_manager().subscribe(callback)


def service_entry_points() -> dict[str, EntryPointRef]:
    """Services advertised under the ``kservice.services`` entry-point group, by name.

    A name several distributions advertise maps to the first on ``sys.path``
    (as ``importlib.metadata.entry_points(...)[name]`` does); see
    :func:`service_entry_point_clashes` for the names that are ambiguous.
    """
    found: dict[str, EntryPointRef] = {}
    for ep in entry_points(group=SERVICE_GROUP):
        found.setdefault(ep.name, ep)
    return found


def service_entry_point_clashes() -> dict[str, list[EntryPointRef]]:
    """Service names advertised by more than one installed distribution with different targets, each with them all.

    The same target declared twice is no clash: either would host the same class.
    """
    by_name: dict[str, list[EntryPointRef]] = {}
    for ep in entry_points(group=SERVICE_GROUP):
        by_name.setdefault(ep.name, []).append(ep)
    return {name: eps for name, eps in by_name.items() if len({ep.value for ep in eps}) > 1}


def describe_service_entry_point_clash(name: str, eps: list[EntryPointRef]) -> str:
    """Why service ``name`` cannot be loaded by name, and what to do instead (the text of the ConfigError)."""
    origins = ", ".join(
        f"{ep.dist.name} {ep.dist.version} ({ep.value})" if ep.dist is not None else f"({ep.value})" for ep in eps
    )
    return (
        f"service entry point {name!r} is advertised by {len(eps)} installed distributions: {origins}; "
        f"kservice does not guess which class to host: uninstall all but one, or name the class "
        f"(kservice serve {name}={eps[0].value}, or 'class: {eps[0].value}' under services.{name} in the config)"
    )
