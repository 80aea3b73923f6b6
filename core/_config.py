"""Configuration: a schema with defaults, YAML loading and validation.

The schema is a tree of sections whose leaves are :class:`Setting` objects.
The core declares the seed's keys; plugins add their own keys and sections
through the ``kservice_config_schema`` hook, so ``kservice config show`` and
the configuration reference cover every installed plugin. A small hand-written
validator (rather than a schema library) is used because the tree is open to
plugins and every error must name the full key path and the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from ._errors import ConfigError

__all__ = ["Config", "Setting", "core_schema"]

CONFIG_ENV_VAR = "KSERVICE_CONFIG"


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type, default and meaning."""

    #: accepted Python types (``float`` also accepts ``int``)
    types: tuple[type, ...]
    default: Any
    doc: str
    #: allowed values, or a callable returning them (evaluated at validation time)
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    nullable: bool = False
    minimum: float | None = None

    def allowed(self) -> tuple[Any, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def type_names(self) -> str:
        names = [t.__name__ for t in self.types]
        if self.nullable:
            names.append("null")
        return " or ".join(names)


Schema = dict[str, Any]  # nested: section name -> Schema | Setting


def _setting(types: type | tuple[type, ...], default: Any, doc: str, **extra: Any) -> Setting:
    return Setting(types if isinstance(types, tuple) else (types,), default, doc, **extra)


def core_schema() -> Schema:
    """The keys the core itself understands (the seed's keys and defaults)."""
    return {
        "service": {
            "local": {
                "max_workers": _setting(int, 10, "Worker threads per service task.", minimum=1),
                "max_concurrency": _setting(
                    int,
                    100,
                    "Coroutine (async def) calls one service task awaits at once on its event loop; more wait their turn "
                    "(1 for a service declared not thread-safe).",
                    minimum=1,
                ),
                "queue_timeout": _setting(
                    float,
                    30.0,
                    "Seconds a caller waits for room in a full request queue before ServiceOverloadedError.",
                    minimum=0,
                ),
                "request_queue_size": _setting(
                    int, 10000, "Requests a task accepts beyond those running before it is overloaded.", minimum=1
                ),
                "inline_limit": _setting(
                    float,
                    0.0002,
                    "Seconds under which a method observed fast runs in an in-process sync caller's own thread "
                    "instead of the worker pool (no thread hand-off; thread-safe services only); 0 sends every call to the pool.",
                    minimum=0,
                ),
            },
            "ray": {
                "resources": _setting(dict, {}, "Ray resources each replica actor asks for, e.g. {CPU: 2}."),
                "lifetime": _setting(
                    str, "non_detached", "Actor lifetime: 'detached' outlives the driver.", choices=("detached", "non_detached")
                ),
                "max_restarts": _setting(int, 3, "Times Ray restarts a dead replica actor.", minimum=-1),
            },
        },
        "service_call": {
            "default_timeout": _setting(float, 30.0, "Timeout in seconds of a call that gives none.", minimum=0),
            "max_retries": _setting(int, 3, "Retries after the first attempt, for failures that are safe to retry.", minimum=0),
            "retry_interval": _setting(float, 1.0, "Seconds before the first retry.", minimum=0),
            "stream_window": _setting(
                int,
                64,
                "Items a streaming method may have sent ahead of its consumer before it waits (back-pressure).",
                minimum=1,
            ),
            "async_pool_size": _setting(
                int,
                20,
                "Kept for compatibility with the seed's configuration; async calls hold no thread, so it sets nothing.",
                minimum=1,
            ),
        },
        "plugins": {
            "disable": _setting(list, [], "Plugin names not to load (as KSERVICE_DISABLE_PLUGINS)."),
        },
    }


def service_entry_schema() -> Schema:
    """Keys of one entry under ``services:``."""
    return {
        "class": _setting(str, None, "Import path 'package.module:Class' of the service class.", nullable=True),
        "entry_point": _setting(str, None, "Name in the 'kservice.services' entry-point group.", nullable=True),
        "args": _setting(list, [], "Positional constructor arguments."),
        "kwargs": _setting(dict, {}, "Keyword constructor arguments."),
        "kind": _setting(str, "local", "Where the task runs: 'local', 'process', 'ray' (or a plugin's kind)."),
        "transports": _setting(list, [], "Extra transports the task listens on (e.g. [mmap]); 'local' tasks always serve in-process calls."),
        "replicas": _setting(int, 1, "Replica count, for kinds that replicate (ray).", minimum=1),
        "idempotent": _setting(list, [], "Method names safe to run more than once per call."),
        "enabled": _setting(bool, True, "Whether the environment registers this service."),
    }


def merge_schema(target: Schema, path: str, addition: Schema) -> None:
    """Merge ``addition`` into ``target`` at dotted ``path`` (plugins add keys this way)."""
    node = target
    for part in [p for p in path.split(".") if p]:
        node = node.setdefault(part, {})
        if isinstance(node, Setting):
            raise ConfigError(f"config schema: {path!r} is a setting, not a section")
    for key, value in addition.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            merge_schema(node, key, value)
        else:
            node[key] = value


def defaults_of(schema: Schema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        out[key] = copy.deepcopy(value.default) if isinstance(value, Setting) else defaults_of(value)
    return out


def iter_settings(schema: Schema, prefix: str = "") -> Iterator[tuple[str, Setting]]:
    """Every (dotted path, Setting) in the schema, depth first, in declaration order."""
    for key, value in schema.items():
        path = f"{prefix}{key}"
        if isinstance(value, Setting):
            yield path, value
        else:
            yield from iter_settings(value, path + ".")


def _check_value(path: str, setting: Setting, value: Any) -> Any:
    if value is None:
        if setting.nullable:
            return None
        raise ConfigError(f"{path}: expected {setting.type_names()}, got null")
    if float in setting.types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in setting.types:
        raise ConfigError(f"{path}: expected {setting.type_names()}, got a boolean ({value!r})")
    if not isinstance(value, setting.types):
        raise ConfigError(f"{path}: expected {setting.type_names()}, got {type(value).__name__} ({value!r})")
    allowed = setting.allowed()
    if allowed is not None and value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
    # isinstance() against a tuple of types narrows value to object; it is a number here.
    if setting.minimum is not None and cast(Any, value) < setting.minimum:
        raise ConfigError(f"{path}: {value!r} is below the minimum {setting.minimum}")
    return value


def _validate_section(prefix: str, schema: Schema, data: Any, *, fill_defaults: bool = True) -> dict[str, Any]:
    """Validate ``data`` against ``schema``; with ``fill_defaults`` unset keys take their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} ({data!r})")
    out = defaults_of(schema) if fill_defaults else {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            disabled = _disabled_plugins()
            if disabled:
                # A disabled plugin's keys are unknown only because it is not loaded: keep the file valid.
                warnings.warn(
                    f"config key {path!r} is not known to any loaded plugin and is ignored "
                    f"(disabled plugins that may own it: {', '.join(sorted(disabled))})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"; did you mean {((prefix + '.') if prefix else '') + close[0]!r}?" if close else ""
            valid = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key {path!r}{hint} (valid keys here: {valid})")
        spec = schema[key]
        if isinstance(spec, Setting):
            out[key] = _check_value(path, spec, value)
        else:
            out[key] = _validate_section(path, spec, value if value is not None else {}, fill_defaults=fill_defaults)
    return out


def _disabled_plugins() -> set[str]:
    from ._plugins import disabled_plugin_names

    return disabled_plugin_names()


def _overridable_sections(schema: Schema) -> Schema:
    """Sections a service entry may override: ``service.local``, ``service.ray``, ``service_call`` and plugin sections."""
    sections: Schema = {}
    for key, value in schema.items():
        if key in ("services", "plugins") or isinstance(value, Setting):
            continue
        if key == "service":
            sections.update(value)
        else:
            sections[key] = value
    return sections


class Config:
    """A validated configuration tree with every default filled in.

    ``Config.load`` accepts a YAML path, a mapping, or None (then the file
    named by ``KSERVICE_CONFIG``, if set). Errors raise :class:`ConfigError`
    naming the full key path and, for unknown keys, the closest valid one.
    """

    def __init__(self, data: Mapping[str, Any], schema: Schema, source: str = "<defaults>") -> None:
        self.source = source
        self.schema = schema
        self._data = dict(data)

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None) -> Config:
        if isinstance(source, Config):
            return source
        from ._plugins import config_schema

        schema = config_schema()
        origin = "<dict>"
        raw: Any
        if source is None:
            env_path = os.environ.get(CONFIG_ENV_VAR)
            if not env_path:
                return cls(cls._validate(schema, {}, "<defaults>"), schema, "<defaults>")
            source = env_path
            origin = f"{env_path} (from {CONFIG_ENV_VAR})"
        if isinstance(source, Mapping):
            raw = source
        elif not isinstance(source, (str, os.PathLike)):
            raise ConfigError(
                f"config must be a YAML file path, a mapping or a Config, got {type(source).__name__}: "
                "the top level must be a mapping"
            )
        else:
            path = Path(source)
            origin = origin if origin != "<dict>" else str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read config file {origin}: {exc.strerror or exc}") from None
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(exc, "problem", None) or str(exc)
                raise ConfigError(f"config file {origin} is not valid YAML{where}: {problem}") from None
            raw = raw or {}
        return cls(cls._validate(schema, raw, origin), schema, origin)

    @staticmethod
    def _validate(schema: Schema, raw: Any, origin: str) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config {origin}: the top level must be a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        services_raw = raw.pop("services", None) or {}
        data = _validate_section("", {k: v for k, v in schema.items() if k != "services"}, raw)
        if not isinstance(services_raw, Mapping):
            raise ConfigError(f"services: expected a mapping of service name to options, got {type(services_raw).__name__}")
        entry_schema = service_entry_schema()
        overridable = _overridable_sections(schema)
        services: dict[str, Any] = {}
        for name, entry in services_raw.items():
            if entry is None:
                entry = {}
            if isinstance(entry, str):
                entry = {"class": entry}
            prefix = f"services.{name}"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{prefix}: expected an import path or a mapping of options, got {type(entry).__name__}")
            own = {k: v for k, v in entry.items() if k not in overridable}
            validated = _validate_section(prefix, {**entry_schema, **overridable}, own)
            for key in overridable:
                validated.pop(key, None)
            # Section overrides keep only what the user wrote, so globals show through.
            for key in set(entry) & set(overridable):
                validated[key] = _validate_section(
                    f"{prefix}.{key}", overridable[key], entry[key] or {}, fill_defaults=False
                )
            services[str(name)] = validated
        data["services"] = services
        return data

    def get(self, dotted: str, default: Any = None) -> Any:
        """The value at a dotted path such as ``service.local.max_workers``."""
        node: Any = self._data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def as_dict(self) -> dict[str, Any]:
        """The effective configuration, defaults included."""
        return copy.deepcopy(self._data)

    def service_names(self) -> list[str]:
        return list(self._data.get("services", {}))

    def service_entry(self, name: str) -> dict[str, Any] | None:
        entry = self._data.get("services", {}).get(name)
        return None if entry is None else copy.deepcopy(entry)

    def for_service(self, name: str) -> dict[str, Any]:
        """Effective options of one service: global sections overlaid with its own entry.

        Returns a flat mapping of section name to settings: ``local``, ``ray``,
        ``service_call``, every plugin section, plus the entry's own keys.
        """
        overridable = _overridable_sections(self.schema)
        effective: dict[str, Any] = {}
        for section in overridable:
            source = self._data["service"][section] if section in self._data.get("service", {}) else self._data.get(section, {})
            effective[section] = copy.deepcopy(source)
        entry = self._data.get("services", {}).get(name) or defaults_of(service_entry_schema())
        for key, value in entry.items():
            if key in overridable:
                effective[key] = {**effective[key], **copy.deepcopy(value)}
            else:
                effective[key] = copy.deepcopy(value)
        return effective
