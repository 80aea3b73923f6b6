"""ServiceEnvironment: configuration, the services it holds, and their start and stop."""

from __future__ import annotations

import inspect
import os
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._config import Config
from ._errors import ConfigError, ServiceError, _short_repr
from ._fork import renew_after_fork
from ._middleware import check_plain_hooks
from ._task import BaseServiceTask, ServiceFactory, TaskContext, import_service_class, stop_timeout

if TYPE_CHECKING:
    import os

    from ._manager import ServiceManager

__all__ = ["ServiceEnvironment", "import_service_class"]


class ServiceEnvironment:
    """Holds a configuration and the service tasks registered in it.

    ``config`` is a YAML path, a mapping, a Config, or None (the file named by
    ``KSERVICE_CONFIG``, else defaults); a ``name`` that is not a str (a
    config passed first) is a TypeError. Services declared under ``services:``
    are registered at construction. ``start()`` starts every task (tasks
    registered later into a started environment start at once); ``stop()``
    stops them in reverse order. Use it as a context manager.
    """

    def __init__(
        self,
        name: str = "default",
        config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    ) -> None:
        if not isinstance(name, str):
            # ServiceEnvironment(config): the config would land in ``name`` and the defaults be used.
            raise TypeError(
                f"ServiceEnvironment's name must be a str, not {type(name).__name__} {_short_repr(name)}; "
                "a configuration goes second: ServiceEnvironment(name, config)"
            )
        self.name = name
        self.config = Config.load(config)
        self._tasks: dict[str, BaseServiceTask] = {}
        self._middlewares: list[Any] = []
        self._lock = threading.RLock()
        self._started = False
        self._managers: weakref.WeakSet[ServiceManager] = weakref.WeakSet()
        renew_after_fork(self, "_lock")  # start() holds it for seconds while hosts start
        for service_name in self.config.service_names():
            entry = self.config.service_entry(service_name) or {}
            if entry.get("enabled", True):
                self._register_from_config(service_name, entry)

    # ------------------------------------------------------------ registering

    def _register_from_config(self, service_name: str, entry: dict[str, Any]) -> BaseServiceTask:
        if entry.get("class"):
            service_class = import_service_class(entry["class"])
        elif entry.get("entry_point"):
            service_class = self.load_entry_point_service(entry["entry_point"])
        else:
            service_class = self.load_entry_point_service(service_name)
        factory = ServiceFactory(
            service_name, service_class, tuple(entry.get("args", ())), dict(entry.get("kwargs", {}))
        )
        return self.register_service(service_name, factory)

    @staticmethod
    def available_services() -> dict[str, str]:
        """Services advertised by installed distributions (``kservice.services``) and plugins: name -> class path."""
        from ._plugins import registered_services, service_entry_point_clashes, service_entry_points

        found = {name: ep.value for name, ep in service_entry_points().items()}
        for name, eps in service_entry_point_clashes().items():
            found[name] = "ambiguous: " + " or ".join(ep.value for ep in eps)
        for name, cls in registered_services().items():
            found.setdefault(name, f"{cls.__module__}:{cls.__qualname__}")
        return dict(sorted(found.items()))

    @staticmethod
    def load_entry_point_service(name: str) -> type:
        """The class a distribution advertises as service ``name``.

        ConfigError if none does, if it fails to import or is not a class, and
        if several distributions advertise ``name`` with different classes
        (naming each: which one the user meant cannot be guessed).
        """
        from ._plugins import (
            describe_service_entry_point_clash,
            registered_services,
            service_entry_point_clashes,
            service_entry_points,
        )

        clash = service_entry_point_clashes().get(name)
        if clash is not None:
            raise ConfigError(describe_service_entry_point_clash(name, clash))
        eps = service_entry_points()
        if name in eps:
            try:
                loaded = eps[name].load()
            except Exception as exc:
                raise ConfigError(f"service entry point {name!r} ({eps[name].value}) failed to load: {exc}") from exc
            if not isinstance(loaded, type):
                raise ConfigError(f"service entry point {name!r} ({eps[name].value}) is not a class")
            return loaded
        contributed = registered_services()
        if name in contributed:
            return contributed[name]
        known = sorted({*eps, *contributed})
        raise ConfigError(
            f"no installed service named {name!r} (entry-point group 'kservice.services'; "
            f"known: {', '.join(known) or 'none'}); give 'class: package.module:Class' instead"
        )

    def register_service(self, name: str, service: Any, *args: Any, **kwargs: Any) -> BaseServiceTask:
        """Register a service under ``name`` and return its task.

        - ``register_service(name, ServiceClass, *args, **kwargs)``: the
          arguments go to the class's constructor verbatim, whatever their
          names; the task kind comes from the config (default ``local``).
          A keyword the constructor does not take and that is a
          registration option (``kind``, ``replicas``, ``transports``,
          ``local``...) is a TypeError showing the ServiceFactory form.
        - ``register_service(name, ServiceFactory(...), kind=..., **options)``:
          keyword arguments are options of this service (``kind``,
          ``transports``, ``replicas``, ``local={...}``...), as in config.
        - ``register_service(name, task)``: a ready BaseServiceTask.

        Registering a name twice raises ServiceError. In a started
        environment the task starts at once.
        """
        if isinstance(service, BaseServiceTask):
            if args or kwargs:
                raise TypeError("register_service(name, task) takes no further arguments")
            task = service
        elif isinstance(service, ServiceFactory):
            if args:
                raise TypeError("register_service(name, factory, ...) takes options as keywords only")
            if service.service_name != name:
                service = ServiceFactory(name, service.service_class, service.args, service.kwargs)
            task = self._make_task(service, kwargs)
        elif isinstance(service, type):
            _refuse_registration_options(name, service, args, kwargs)
            task = self._make_task(ServiceFactory(name, service, args, kwargs), {})
        else:
            raise TypeError(
                f"register_service({name!r}, ...) expects a class, a ServiceFactory or a BaseServiceTask, "
                f"got {type(service).__name__}"
            )
        with self._lock:
            if name in self._tasks:
                raise ServiceError(f"a service named {name!r} is already registered in environment {self.name!r}")
            self._tasks[name] = task
            start_now = self._started
        if start_now:
            task.start_service()
        return task

    def _make_task(self, factory: ServiceFactory, options: dict[str, Any]) -> BaseServiceTask:
        from ._plugins import task_kinds

        config = self.config
        if options:
            entry = {**(config.service_entry(factory.service_name) or {}), **options}
            entry.pop("class", None)
            entry.pop("entry_point", None)
            raw = config.as_dict()
            raw["services"] = {**raw.get("services", {}), factory.service_name: entry}
            config = Config.load(raw)
        kind = config.for_service(factory.service_name)["kind"]
        kinds = task_kinds()
        if kind not in kinds:
            raise ConfigError(
                f"services.{factory.service_name}.kind: no task kind {kind!r} is registered "
                f"(registered: {', '.join(sorted(kinds)) or 'none'}); is its plugin installed (e.g. pip install kservice[ray])?"
            )
        ctx = TaskContext(self.name, config, (), self)
        task = kinds[kind](factory, ctx)
        if config is not self.config:
            # The environment's config gains the options (only once the task exists: a refused
            # registration changes nothing), so its managers see them too (breaker, retry...).
            self.config = config
            for manager in list(self._managers):
                manager.forget(factory.service_name)
        return task

    def unregister_service(self, name: str, timeout: float | None = None) -> None:
        """Stop and remove a service; managers forget their route to it.

        ``timeout`` is the drain, as for ``BaseServiceTask.stop_service``; one
        that is no number raises before the service is touched.
        """
        stop_timeout(timeout)  # refuse a bad timeout while the service is still registered and serving
        with self._lock:
            task = self._tasks.pop(name, None)
        if task is not None:
            task.stop_service(timeout)
            for manager in list(self._managers):
                manager.forget(name)

    def _addresses_changed(self, name: str) -> None:
        """A task of this environment started, stopped or moved: managers drop their route to it."""
        for manager in list(self._managers):
            manager.forget(name)

    def add_middleware(self, middleware: Any) -> None:
        """Add a ServiceMiddleware for every service of this environment, after those added before.

        It applies at once to the environment's managers and to its tasks
        running in this process; a task hosted elsewhere (a ``process`` child,
        Ray replicas) gets it when it next starts. TypeError (nothing added)
        when one of its hooks is ``async def``: hooks are never awaited.
        """
        check_plain_hooks(middleware)
        with self._lock:
            self._middlewares.append(middleware)
            tasks = list(self._tasks.values())
        for manager in list(self._managers):
            manager._invalidate_routes()
        for task in tasks:
            task._plugins_changed()

    @property
    def middlewares(self) -> tuple[Any, ...]:
        return tuple(self._middlewares)

    # -------------------------------------------------------------- listing

    def get_task(self, name: str) -> BaseServiceTask | None:
        return self._tasks.get(name)

    def service_names(self) -> list[str]:
        return list(self._tasks)

    def tasks(self) -> dict[str, BaseServiceTask]:
        """Registered tasks by service name, in registration order."""
        return dict(self._tasks)

    def __iter__(self) -> Iterator[BaseServiceTask]:
        return iter(list(self._tasks.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    # ------------------------------------------------------------ lifecycle

    def start(self) -> ServiceEnvironment:
        """Start every registered task; on a failure, stop those started and re-raise."""
        started: list[BaseServiceTask] = []
        with self._lock:
            try:
                for task in list(self._tasks.values()):
                    task.start_service()
                    started.append(task)
            except BaseException:
                for task in reversed(started):
                    task.stop_service()
                raise
            self._started = True
        from ._plugins import announce

        announce("kservice_environment_started", environment=self)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Close managers bound to this environment, then stop every task in reverse order. Idempotent.

        Always completes: a task whose stop raises is reported (a RuntimeWarning)
        and the others still stop; a plugin's ``kservice_environment_stopped``
        that raises is reported the same way. ``timeout`` is each task's drain
        (see ``BaseServiceTask.stop_service``: one of more than about 146
        years, or infinity, drains without limit); one that is no number (NaN, a bool,
        a string) raises ValueError or TypeError before anything stops.
        """
        stop_timeout(timeout)  # refuse a bad timeout while everything still runs
        with self._lock:
            was_started, self._started = self._started, False
            tasks = list(self._tasks.values())
        for manager in list(self._managers):
            manager.close()
        for task in reversed(tasks):
            try:
                task.stop_service(timeout)
            except Exception as exc:  # noqa: BLE001 - one task must not keep the others running
                warnings.warn(
                    f"stopping service {task.service_name!r} raised {type(exc).__name__}; the others still stop",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if was_started:
            from ._plugins import announce

            announce("kservice_environment_stopped", environment=self)

    def manager(self) -> ServiceManager:
        """A new ServiceManager bound to this environment (closed by ``stop()``)."""
        from ._manager import ServiceManager

        return ServiceManager(self)

    def __enter__(self) -> ServiceEnvironment:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServiceEnvironment {self.name!r} services={list(self._tasks)}>"


def _registration_option_names() -> set[str]:
    """Keywords ``register_service(name, factory, **options)`` takes: service entry keys and overridable sections."""
    from ._config import service_entry_schema
    from ._plugins import config_schema

    schema = config_schema()
    names = set(service_entry_schema()) | set(schema.get("service", {}))  # local, and each task kind's section
    names.update(
        key
        for key, value in schema.items()
        if isinstance(value, dict) and key not in ("service", "services", "plugins")
    )
    return names


def _refuse_registration_options(name: str, service_class: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """TypeError when a keyword meant as a registration option would reach a constructor that does not take it.

    Keywords the constructor names, or takes through ``**kwargs``, are its
    own and pass verbatim; so does everything when its signature cannot be read.
    """
    if not kwargs:
        return
    options = _registration_option_names()
    suspects = [key for key in kwargs if key in options]
    if not suspects:
        return
    try:
        parameters = inspect.signature(service_class).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    takes = {key for key, p in parameters.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    rejected = [key for key in suspects if key not in takes]
    if not rejected:
        return
    own = {key: value for key, value in kwargs.items() if key not in rejected}
    cls = service_class.__name__
    factory = f"ServiceFactory({name!r}, {cls}, {args!r}" + (f", {own!r})" if own else ")")
    written = ", ".join(f"{key}={kwargs[key]!r}" for key in rejected)
    plural = "s" if len(rejected) > 1 else ""
    raise TypeError(
        f"register_service({name!r}, {cls}, ...): {cls}() takes no keyword argument{plural} "
        f"{', '.join(repr(k) for k in rejected)}, which {'are registration options' if plural else 'is a registration option'}; "
        f"arguments after a class go to its constructor verbatim. Give options with a ServiceFactory: "
        f"register_service({name!r}, {factory}, {written})"
    )
