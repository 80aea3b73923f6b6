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
import functools
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from reprlib import recursive_repr
from typing import Any, cast

from ._errors import ConfigError

__all__ = ["Config", "Setting", "core_schema"]

CONFIG_ENV_VAR = "KSERVICE_CONFIG"

#: Largest config file read (bytes); a bigger one is refused before it is parsed.
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of mappings and lists accepted in a config file.
MAX_YAML_DEPTH = 64
#: Most worker threads one task may start (they are all started with the task).
MAX_WORKERS = 1024
#: Most requests one task may queue beyond those running.
MAX_REQUEST_QUEUE_SIZE = 1_000_000
#: Longest integer literal accepted in a config file (digits); every count kservice reads is far shorter.
MAX_INT_DIGITS = 30


@dataclass(frozen=True, init=False, repr=False, eq=False)  # the methods written out: see _messages.FACTORY
class Setting:
    """One configuration key: its type, default and meaning.

    A setting that may be None is declared ``nullable=True`` (``Setting((str,),
    None, "...", nullable=True)``); ``type(None)`` among ``types`` means the
    same and is folded into ``nullable``. Floats must be finite (NaN and the
    infinities are refused); ``minimum`` and ``maximum`` bound numbers, and a
    float without a ``maximum`` is at most ``threading.TIMEOUT_MAX`` (about
    9.2e9, the longest wait Python's locks take).
    """

    #: accepted Python types (``float`` also accepts ``int``)
    types: tuple[type, ...]
    default: Any
    doc: str
    #: allowed values, or a callable returning them (evaluated at validation time)
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None

    def __init__(
        self,
        types: tuple[type, ...],
        default: Any,
        doc: str,
        choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None,
        nullable: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> None:
        setattr = object.__setattr__  # frozen: the field is set past __setattr__, as dataclass's __init__ does
        setattr(self, "types", types)
        setattr(self, "default", default)
        setattr(self, "doc", doc)
        setattr(self, "choices", choices)
        setattr(self, "nullable", nullable)
        setattr(self, "minimum", minimum)
        setattr(self, "maximum", maximum)
        self.__post_init__()

    @recursive_repr()
    def __repr__(self) -> str:
        return (
            f"{self.__class__.__qualname__}(types={self.types!r}, default={self.default!r}, doc={self.doc!r}, "
            f"choices={self.choices!r}, nullable={self.nullable!r}, minimum={self.minimum!r}, "
            f"maximum={self.maximum!r})"
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return (self.types, self.default, self.doc, self.choices, self.nullable, self.minimum, self.maximum) == (
                other.types,
                other.default,
                other.doc,
                other.choices,
                other.nullable,
                other.minimum,
                other.maximum,
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.types, self.default, self.doc, self.choices, self.nullable, self.minimum, self.maximum))

    def __post_init__(self) -> None:
        types: Any = self.types
        if not isinstance(types, tuple):
            types = (types,)
        if type(None) in types:
            # One meaning for both spellings: ``(str, type(None))`` is ``(str,)`` with nullable=True.
            types = tuple(t for t in types if t is not type(None))
            object.__setattr__(self, "nullable", True)
        object.__setattr__(self, "types", types)

    def allowed(self) -> tuple[Any, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def type_names(self) -> str:
        names = [t.__name__ for t in self.types]
        if self.nullable:
            names.append("null")
        return " or ".join(names)


Schema = dict[str, Any]  # nested: section name -> Schema | Setting

#: The largest float setting without a ``maximum`` of its own: most are seconds, and a longer wait
#: makes Python's locks, joins and sleeps raise OverflowError in whatever thread waits on it.
_FLOAT_MAX = threading.TIMEOUT_MAX


def _setting(types: type | tuple[type, ...], default: Any, doc: str, **extra: Any) -> Setting:
    return Setting(types if isinstance(types, tuple) else (types,), default, doc, **extra)


def core_schema() -> Schema:
    """The keys the core itself understands (the seed's keys and defaults)."""
    return {
        "service": {
            "local": {
                "max_workers": _setting(
                    int,
                    10,
                    "Worker threads per service task (each is started with the task).",
                    minimum=1,
                    maximum=MAX_WORKERS,
                ),
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
                    int,
                    10000,
                    "Requests a task accepts beyond those running before it is overloaded.",
                    minimum=1,
                    maximum=MAX_REQUEST_QUEUE_SIZE,
                ),
                "inline_limit": _setting(
                    float,
                    0.0002,
                    "Seconds under which a method observed fast runs in an in-process sync caller's own thread "
                    "instead of the worker pool (no thread hand-off; thread-safe services only); 0 sends every call to the pool.",
                    minimum=0,
                ),
            },
        },
        "service_call": {
            "default_timeout": _setting(float, 30.0, "Timeout in seconds of a call that gives none.", minimum=0),
            "max_retries": _setting(
                int, 3, "Retries after the first attempt, for failures that are safe to retry.", minimum=0
            ),
            "retry_interval": _setting(float, 1.0, "Seconds before the first retry.", minimum=0),
            "stream_window": _setting(
                int,
                64,
                "Items a streaming method may have sent ahead of its consumer before it waits (back-pressure).",
                minimum=1,
            ),
            "transports": _setting(
                list,
                [],
                "Transports callers prefer, in order (e.g. [mmap, ray]); a service offering none of them is "
                "reached through its cheapest transport (each declares a cost: inproc, then mmap, then ray).",
            ),
            "async_pool_size": _setting(
                int,
                20,
                "Kept so the seed's configuration files load; async calls hold no thread, so it sets nothing: a "
                "value other than 20 is a RuntimeWarning when the config loads, and `kservice config check` notes "
                "the key.",
                minimum=1,
            ),
        },
        "plugins": {
            "disable": _setting(
                list,
                [],
                "Plugin names not to use, as KSERVICE_DISABLE_PLUGINS (process-wide, from when this config is loaded).",
            ),
            "require": _setting(
                list,
                [],
                "Plugin names that must be loaded: one missing, broken or disabled is a PluginError and nothing starts.",
            ),
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
        "transports": _setting(
            list, [], "Extra transports the task listens on (e.g. [mmap]); 'local' tasks always serve in-process calls."
        ),
        "replicas": _setting(int, 1, "Replica count, for kinds that replicate (ray).", minimum=1),
        "idempotent": _setting(list, [], "Method names safe to run more than once per call."),
        "enabled": _setting(bool, True, "Whether the environment registers this service."),
    }


@functools.cache
def _entry_defaults() -> dict[str, Any]:
    """The defaults of a service entry (shared: copied by whoever reads them)."""
    return defaults_of(service_entry_schema())


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


_PLAIN = frozenset((str, int, float, bool, type(None)))


def _copied(value: Any) -> Any:
    """A deep copy of a configuration value: its dicts and lists copied, plain values shared, anything else deep-copied.

    What ``copy.deepcopy`` returns for the trees a configuration holds, at a
    fifth of its cost (no memo): every service's options are copied when its
    route is built. Only aliasing inside one value (a list held twice) is
    not kept, which validated configuration values never have.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is dict:
        return {key: _copied(item) for key, item in value.items()}
    if kind is list:
        return [_copied(item) for item in value]
    return copy.deepcopy(value)


def defaults_of(schema: Schema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        out[key] = _copied(value.default) if isinstance(value, Setting) else defaults_of(value)
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
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(
                f"{path}: an integer too large for a float is above the maximum {_FLOAT_MAX:.2g}"
            ) from None
    if isinstance(value, bool) and bool not in setting.types:
        raise ConfigError(f"{path}: expected {setting.type_names()}, got a boolean ({value!r})")
    if not isinstance(value, setting.types):
        raise ConfigError(f"{path}: expected {setting.type_names()}, got {type(value).__name__} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    allowed = setting.allowed()
    if allowed is not None and value not in allowed:
        value = _declared_spelling(path, value, allowed)
    # isinstance() against a tuple of types narrows value to object; it is a number here.
    if setting.minimum is not None and cast(Any, value) < setting.minimum:
        raise ConfigError(f"{path}: {value!r} is below the minimum {setting.minimum:g}")
    if setting.maximum is not None and cast(Any, value) > setting.maximum:
        raise ConfigError(f"{path}: {value!r} is above the maximum {setting.maximum:g}")
    if setting.maximum is None and isinstance(value, float) and value > _FLOAT_MAX:
        raise ConfigError(f"{path}: {value!r} is above the maximum {_FLOAT_MAX:.2g} (seconds a wait can take)")
    return value


def _declared_spelling(path: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """The one allowed choice that ``value`` spells in another case (``info`` -> ``INFO``), else ConfigError.

    Choices differing only in case are told apart by their exact spelling only.
    The error suggests the closest choice whatever the case of either.
    """
    if isinstance(value, str):
        folded = value.casefold()
        same = [a for a in allowed if isinstance(a, str) and a.casefold() == folded]
        if len(same) == 1:
            return same[0]
    by_folded: dict[str, str] = {}
    for choice in allowed:
        by_folded.setdefault(str(choice).casefold(), str(choice))
    close = _closest(str(value).casefold(), by_folded)
    hint = f"; did you mean {by_folded[close]!r}?" if close else ""
    raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}")


class ConfigProblems(ConfigError):
    """Every problem found in one configuration, in file order.

    ``str()`` is the first problem (plus how many more), one line; ``problems``
    holds each one, for ``kservice config check`` to print them all.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        more = len(problems) - 1
        suffix = (
            f" (and {more} more problem{'s' if more > 1 else ''}; 'kservice config check FILE' lists them all)"
            if more
            else ""
        )
        super().__init__(problems[0] + suffix)


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    from difflib import get_close_matches  # error paths only: a caller's start does not import it

    close = get_close_matches(word, list(candidates), n=1)
    return close[0] if close else None


def _validate_section(
    prefix: str,
    schema: Schema,
    data: Any,
    problems: list[str],
    *,
    disabled: frozenset[str] = frozenset(),
    disabled_schema: Schema | None = None,
    fill_defaults: bool = True,
    also_valid: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Validate ``data`` against ``schema``, appending each problem to ``problems``.

    With ``fill_defaults`` unset keys (and keys with a problem) take their
    defaults. An unknown key that a disabled plugin declares (in
    ``disabled_schema``) is ignored with a warning; so is any unknown key while
    ``disabled`` names plugins whose keys cannot be known (blocked before they
    were imported). Any other unknown key is a problem.
    """
    disabled_schema = disabled_schema or {}
    out = defaults_of(schema) if fill_defaults else {}
    if not isinstance(data, Mapping):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} ({data!r})")
        return out
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            if key in disabled_schema:
                warnings.warn(
                    f"config key {path!r} belongs to a disabled plugin and is ignored", RuntimeWarning, stacklevel=4
                )
                continue
            if disabled:
                # A disabled plugin's keys are unknown only because it is not loaded: keep the file valid.
                warnings.warn(
                    f"config key {path!r} is not known to any loaded plugin and is ignored "
                    f"(disabled plugins that may own it: {', '.join(sorted(disabled))})",
                    RuntimeWarning,
                    stacklevel=4,
                )
                continue
            valid = sorted([*schema, *also_valid])
            close = _closest(str(key), valid)
            hint = f"; did you mean {((prefix + '.') if prefix else '') + close!r}?" if close else ""
            problems.append(f"unknown config key {path!r}{hint} (valid keys here: {', '.join(valid)})")
            continue
        spec = schema[key]
        if isinstance(spec, Setting):
            try:
                out[key] = _check_value(path, spec, value)
            except ConfigError as exc:
                problems.append(str(exc))
        else:
            inner = disabled_schema.get(key)
            out[key] = _validate_section(
                path,
                spec,
                value if value is not None else {},
                problems,
                disabled=disabled,
                disabled_schema=inner if isinstance(inner, dict) else None,
                fill_defaults=fill_defaults,
            )
    return out


def _overridable_sections(schema: Schema) -> Schema:
    """Sections a service entry may override: ``service.local``, plugins' ``service.<kind>``, ``service_call`` and plugin sections."""
    sections: Schema = {}
    for key, value in schema.items():
        if key in ("services", "plugins") or isinstance(value, Setting):
            continue
        if key == "service":
            sections.update(value)
        else:
            sections[key] = value
    return sections


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------- ${VAR} interpolation

#: A pattern, compiled (and cached by re) on its first use, not at import.
_VARIABLE_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE_FORMS = "write ${VAR} or ${VAR:-default}; a literal '${' is written '$${'"


class _BadReference(Exception):
    """A ``${...}`` that cannot be expanded; the message says which and what to write."""


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """``text`` with each ``${VAR}`` / ``${VAR:-default}`` replaced from ``environ`` and ``$${`` made ``${``.

    As in the shell, ``${VAR:-default}`` takes the default when VAR is unset or
    empty, and the default may itself hold references (expanded only when it is
    used). Any other ``$`` is kept as written. Raises :class:`_BadReference` for
    a variable that is unset with no default, and for a ``${`` that is not one of
    the two forms (including nameko's ``${VAR:default}``, which suggests ``:-``).
    """
    expanded, _ = _expand(text, 0, environ, evaluate=True, nested=False)
    return expanded


def _expand(text: str, start: int, environ: Mapping[str, str], *, evaluate: bool, nested: bool) -> tuple[str, int]:
    """Expand ``text[start:]``; when ``nested``, stop at the ``}`` closing a default (returns its index)."""
    out: list[str] = []
    index = start
    while index < len(text):
        if text.startswith("$${", index):
            out.append("${")
            index += 3
        elif text.startswith("${", index):
            value, index = _reference(text, index, environ, evaluate=evaluate)
            out.append(value)
        elif nested and text[index] == "}":
            return "".join(out), index
        else:
            out.append(text[index])
            index += 1
    if nested:
        raise _BadReference(f"{text!r} has no closing '}}' for a default; {_REFERENCE_FORMS}")
    return "".join(out), index


def _reference(text: str, start: int, environ: Mapping[str, str], *, evaluate: bool) -> tuple[str, int]:
    """(value, index after) of the reference ``${...}`` at ``text[start]``."""
    name_match = re.compile(_VARIABLE_NAME).match(text, start + 2)
    after = name_match.end() if name_match else start + 2
    close = text.find("}", start)
    written = text[start : close + 1] if close >= 0 else text[start:]
    if name_match is None:
        if close < 0:
            raise _BadReference(f"{written!r} has no closing '}}'; {_REFERENCE_FORMS}")
        raise _BadReference(f"{written!r} does not name a variable (letters, digits and '_'); {_REFERENCE_FORMS}")
    name = name_match.group()
    if text.startswith("}", after):
        value = environ.get(name) if evaluate else ""
        if value is None:
            raise _BadReference(
                f"environment variable {name} is not set and has no default; set it, or write '${{{name}:-default}}'"
            )
        return value, after + 1
    if text.startswith(":-", after):
        current = environ.get(name) if evaluate else None
        # The default is expanded only when it is used, as in the shell: its own variables may be unset.
        default, closing = _expand(text, after + 2, environ, evaluate=evaluate and not current, nested=True)
        return (current or default), closing + 1
    if close < 0:
        raise _BadReference(f"{written!r} has no closing '}}'; {_REFERENCE_FORMS}")
    hint = f" (did you mean '${{{name}:-{text[after + 1 : close]}}}'?)" if text.startswith(":", after) else ""
    raise _BadReference(f"{written!r} is not a reference{hint}; {_REFERENCE_FORMS}")


_STR_TAG = "tag:yaml.org,2002:str"


class _InKey:
    """Marks, in the loader's key path, a mapping key being composed (keys are not interpolated)."""


@functools.cache
def _config_loader() -> Any:
    """The YAML loader class of config files, built on first use (PyYAML is imported only when a file is read)."""
    import yaml

    class _ConfigLoader(yaml.SafeLoader):
        """A safe YAML loader that refuses duplicate keys, deep nesting and absurdly long integers.

        Each refusal is a ``yaml.MarkedYAMLError`` carrying the line and column, so
        it reads like any other YAML error.
        """

        def __init__(self, stream: str, origin: str = "<string>", environ: Mapping[str, str] | None = None) -> None:
            super().__init__(stream)
            self._depth = 0
            self._origin = origin
            self._environ = os.environ if environ is None else environ
            #: where the node being composed sits: key names, sequence indexes, _InKey while composing a key
            self._path: list[Any] = []
            #: one line per ${...} that could not be expanded, in file order
            self.problems: list[str] = []
            # Nodes whose ${...} failed: left out of their mapping or list so the key keeps its default
            # (one problem per mistake, not a second "wrong type" for the same key). Held, so ids stay unique.
            self._failed: list[Any] = []

        def compose_node(self, parent: Any, index: Any) -> Any:
            self._depth += 1
            if isinstance(parent, yaml.MappingNode):
                self._path.append(_InKey if index is None else getattr(index, "value", "?"))
            elif isinstance(parent, yaml.SequenceNode):
                self._path.append(index)
            else:
                self._path.append(None)
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        f"nested deeper than {MAX_YAML_DEPTH} levels",
                        self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                    )
                return super().compose_node(parent, index)
            finally:
                self._path.pop()
                self._depth -= 1

        def _dotted_path(self) -> str:
            out = ""
            for part in self._path:
                if part is None:
                    continue
                if isinstance(part, int):
                    out += f"[{part}]"
                else:
                    out += f".{part}" if out else str(part)
            return out or "config"

        def compose_scalar_node(self, anchor: Any) -> Any:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            plain = event.tag is None and event.implicit[0]
            node = super().compose_scalar_node(anchor)
            if "${" not in node.value or _InKey in self._path:
                return node
            try:
                node.value = interpolate(node.value, self._environ)
            except _BadReference as exc:
                self.problems.append(f"{self._dotted_path()}: {exc} (config file {self._origin})")
                self._failed.append(node)
                return node
            if plain:
                # Typed as if the text had been written there: 8080 an int, true a bool, empty or null a null.
                node.tag = self.resolve(yaml.ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]
            return node

        def compose_sequence_node(self, anchor: Any) -> Any:
            node = super().compose_sequence_node(anchor)
            if self._failed:
                node.value = [item for item in node.value if not any(item is bad for bad in self._failed)]
            return node

        def compose_mapping_node(self, anchor: Any) -> Any:
            node = super().compose_mapping_node(anchor)
            if self._failed:
                node.value = [
                    (key, value) for key, value in node.value if not any(value is bad for bad in self._failed)
                ]
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges may repeat keys on purpose: the mapping's own value wins
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it below
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {key!r} (first at line {first.line + 1}); remove one of them",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep)

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, LookupError, TypeError):
                # An explicit tag on text it cannot read ('!!int ""', '!!bool "maybe"', often from a ${VAR}):
                # a YAML error at the value's line, not a bare IndexError.
                if not isinstance(node, yaml.ScalarNode):
                    raise
                tag = "!!" + str(node.tag).rsplit(":", 1)[-1]
                raise yaml.constructor.ConstructorError(
                    None, None, f"{node.value!r} is not a valid {tag} value", node.start_mark
                ) from None

        def construct_yaml_int(self, node: Any) -> Any:
            digits = sum(ch.isdigit() for ch in str(node.value))
            if digits > MAX_INT_DIGITS:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are accepted)",
                    node.start_mark,
                )
            return super().construct_yaml_int(node)

    _ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
    return _ConfigLoader


def read_config_file(path: str | os.PathLike[str], origin: str | None = None, problems: list[str] | None = None) -> Any:
    """The parsed YAML of a config file, ``${VAR}`` references expanded; ConfigError (one line) for anything but a readable, valid file.

    Refused without hanging or a traceback: a path that is not a regular file
    (a FIFO, a directory, a device), a file over ``MAX_CONFIG_BYTES``, text that
    is not UTF-8, YAML nested deeper than ``MAX_YAML_DEPTH``, an integer longer
    than ``MAX_INT_DIGITS`` digits, and a mapping with a duplicate key.

    Every ``${VAR}`` / ``${VAR:-default}`` in a value (not in a key) is
    replaced from the environment, and ``$${`` becomes ``${``; a plain
    (unquoted, untagged) value is then typed by YAML as if its text had been
    written there, a quoted one stays a string. A reference that cannot be
    expanded (an unset variable with no default, a malformed ``${``) is one
    line naming its key path, the variable and the file: with ``problems``
    given, each is appended there and its key left out (so it keeps its
    default); without, they raise :class:`ConfigProblems`.
    """
    origin = origin or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {origin}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            what = (
                "a directory"
                if stat.S_ISDIR(info.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(info.st_mode)
                else "not a regular file"
            )
            raise ConfigError(f"cannot read config file {origin}: it is {what}; give the path of a YAML file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {origin} is too large ({info.st_size} bytes; at most {MAX_CONFIG_BYTES} are read)"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {origin}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {origin} is too large (more than {MAX_CONFIG_BYTES} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {origin} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save it as UTF-8"
        ) from None
    import yaml

    try:
        loader = _config_loader()(text, origin)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if mark is not None and _dollar_before(text, mark.line, mark.column):
            # YAML ends an unquoted value at '{' inside {...} or [...]: the reference must be quoted there.
            problem += (
                "; a ${...} inside {...} or [...] must be quoted: '\"${VAR}\"' for a string, "
                "'!!int \"${VAR}\"' (or !!float, !!bool) for a typed value, or write that mapping in block style"
            )
        raise ConfigError(f"config file {origin} is not valid YAML{where}: {problem}") from None
    except (RecursionError, ValueError) as exc:  # a last resort: the loader's own limits come first
        raise ConfigError(f"config file {origin} cannot be read: {type(exc).__name__}: {exc}") from None
    if loader.problems:
        if problems is None:
            raise ConfigProblems(loader.problems)
        problems.extend(loader.problems)
    return raw if raw is not None else {}


def _dollar_before(text: str, line: int, column: int) -> bool:
    """Whether the character before (0-based) ``line``:``column`` of ``text`` is a '$'."""
    lines = text.splitlines()
    if line >= len(lines) or not 0 < column <= len(lines[line]):
        return False
    return lines[line][column - 1] == "$"


def _read_source(source: Any, problems: list[str] | None = None) -> tuple[Any, str]:
    """(raw configuration, where it came from) for what ``Config.load`` accepts.

    Files are interpolated (see :func:`read_config_file`); a mapping is taken
    as given: Python code reads the environment itself, and a Config's own
    ``as_dict()`` (what child hosts receive) must not be expanded twice.
    """
    if source is None:
        env_path = os.environ.get(CONFIG_ENV_VAR)
        if not env_path:
            return {}, "<defaults>"
        origin = f"{env_path} (from {CONFIG_ENV_VAR})"
        return read_config_file(env_path, origin, problems), origin
    if isinstance(source, Mapping):
        return source, "<dict>"
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"config must be a YAML file path, a mapping or a Config, got {type(source).__name__}: "
            "the top level must be a mapping"
        )
    return read_config_file(source, str(source), problems), str(source)


class Config:
    """A validated configuration tree with every default filled in.

    ``Config.load`` accepts a YAML path, a mapping, or None (then the file
    named by ``KSERVICE_CONFIG``, if set). A file's ``${VAR}`` and
    ``${VAR:-default}`` references are expanded from the environment (see
    :func:`read_config_file`); a mapping is used as written. A choice is
    accepted in any case and kept in its declared spelling. Errors raise :class:`ConfigError`
    naming the full key path and, for unknown keys, the closest valid one;
    a file with several problems raises one ConfigError naming the first and
    how many more there are (``ConfigProblems.problems`` holds every one).

    Loading applies the ``plugins`` section to the process's plugin manager
    (``plugins.disable`` unregisters and blocks, ``plugins.require`` raises
    :class:`PluginError` for a plugin that is not loaded), after the whole
    file validated: an invalid file changes nothing.
    """

    def __init__(self, data: Mapping[str, Any], schema: Schema, source: str = "<defaults>") -> None:
        self.source = source
        self.schema = schema
        self._data = dict(data)

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None) -> Config:
        if isinstance(source, Config):
            return source
        problems: list[str] = []
        raw, origin = _read_source(source, problems)
        data, schema, disable, require = cls._validate(raw, origin, problems)
        if problems:
            raise ConfigProblems(problems)
        for path, value, is_default in _keys_that_set_nothing(raw):
            if not is_default:
                warnings.warn(
                    f"config key {path} = {value!r} ({origin}) sets nothing: {_sets_nothing_why(path)}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        from ._plugins import apply_plugin_config

        apply_plugin_config(disable, require, origin)
        return cls(data, schema, origin)

    @staticmethod
    def _validate(raw: Any, origin: str, problems: list[str]) -> tuple[dict[str, Any], Schema, list[str], list[str]]:
        """(validated data, schema used, plugins to disable, plugins required); problems appended."""
        from ._plugins import config_schema, disabled_plugin_names, schema_of

        if not isinstance(raw, Mapping):
            problems.append(f"config {origin}: the top level must be a mapping, got {_type_name(raw)}")
            raw = {}
        raw = dict(raw)
        # The plugins section first: the schema to check the rest against leaves out disabled plugins.
        plugin_options = _validate_section("plugins", core_schema()["plugins"], raw.get("plugins") or {}, problems)
        disable = [str(name) for name in plugin_options["disable"]]
        require = [str(name) for name in plugin_options["require"]]
        for name in sorted(set(disable) & set(require)):
            problems.append(
                f"plugins.require: plugin {name!r} is also listed under plugins.disable; keep it in one of them"
            )
        disabled_names = disabled_plugin_names() | set(disable)
        # Keys of disabled plugins whose schema is known are ignored (with a warning); other unknown keys are
        # errors, unless some disabled plugin was never imported (its keys cannot be known).
        disabled_schema, unknowable = schema_of(disabled_names)
        disabled = frozenset(unknowable)
        schema = config_schema(without=frozenset(disable))
        services_raw = raw.pop("services", None) or {}
        data = _validate_section(
            "",
            {k: v for k, v in schema.items() if k != "services"},
            raw,
            problems,
            disabled=disabled,
            disabled_schema=disabled_schema,
            also_valid=("services",),
        )
        services: dict[str, Any] = {}
        if not isinstance(services_raw, Mapping):
            problems.append(f"services: expected a mapping of service name to options, got {_type_name(services_raw)}")
            services_raw = {}
        entry_schema = service_entry_schema()
        overridable = _overridable_sections(schema)
        disabled_overridable = _overridable_sections(disabled_schema)
        for name, entry in services_raw.items():
            if entry is None:
                entry = {}
            if isinstance(entry, str):
                entry = {"class": entry}
            prefix = f"services.{name}"
            if not isinstance(entry, Mapping):
                problems.append(f"{prefix}: expected an import path or a mapping of options, got {_type_name(entry)}")
                continue
            own = {k: v for k, v in entry.items() if k not in overridable}
            validated = _validate_section(
                prefix,
                {**entry_schema, **overridable},
                own,
                problems,
                disabled=disabled,
                disabled_schema=disabled_overridable,
            )
            for key in overridable:
                validated.pop(key, None)
            # Section overrides keep only what the user wrote, so globals show through.
            for key in set(entry) & set(overridable):
                validated[key] = _validate_section(
                    f"{prefix}.{key}",
                    overridable[key],
                    entry[key] or {},
                    problems,
                    disabled=disabled,
                    disabled_schema=disabled_overridable.get(key),
                    fill_defaults=False,
                )
            services[str(name)] = validated
        data["services"] = services
        return data, schema, disable, require

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
            source = (
                self._data["service"][section]
                if section in self._data.get("service", {})
                else self._data.get(section, {})
            )
            effective[section] = _copied(source)
        entry = self._data.get("services", {}).get(name) or _entry_defaults()
        for key, value in entry.items():
            if key in overridable:
                effective[key] = {**effective[key], **_copied(value)}
            else:
                effective[key] = _copied(value)
        return effective


# --------------------------------------------------------------------------- checking what would fail at start


#: Keys of the seed's configuration that are accepted (its files load) but set nothing here, and why.
_SETS_NOTHING: dict[tuple[str, str], str] = {
    ("service_call", "async_pool_size"): (
        "async calls hold no thread, so there is no pool to size, and calls in flight are not bounded by it; "
        "remove the key (ServiceManager.map bounds its calls in flight with max_in_flight)"
    ),
}


def _keys_that_set_nothing(raw: Any) -> list[tuple[str, Any, bool]]:
    """(key path, value, whether it is the default) of each key in ``raw`` that sets nothing (``_SETS_NOTHING``).

    Looked for at the top level and in each ``services`` entry. A file
    kept from the seed carries them at their defaults, meaning nothing by
    it: only another value says that its author expected an effect.
    """
    if not isinstance(raw, Mapping):
        return []
    places: list[tuple[str, Any]] = [("", raw)]
    services = raw.get("services")
    if isinstance(services, Mapping):
        places.extend((f"services.{name}.", entry) for name, entry in services.items())
    found = []
    defaults = core_schema()
    for prefix, place in places:
        if not isinstance(place, Mapping):
            continue
        for (section, key), _why in _SETS_NOTHING.items():
            options = place.get(section)
            if isinstance(options, Mapping) and key in options:
                setting = defaults[section][key]
                value = options[key]
                found.append(
                    (f"{prefix}{section}.{key}", value, isinstance(setting, Setting) and value == setting.default)
                )
    return found


def _sets_nothing_why(path: str) -> str:
    section, key = path.split(".")[-2:]
    return _SETS_NOTHING[(section, key)]


def check_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None, *, import_modules: bool = False
) -> tuple[Config, list[str], list[str]]:
    """Everything in a configuration that would fail when it is loaded or its services start.

    Returns (the config, problems, notes), each problem one line beginning with
    its key path. Nothing is started and the process's plugin set is left as
    it is. Class paths are resolved without running the service's code: the
    module is found with importlib's finders and the attribute looked up in its
    source (``ast``); where that cannot tell (an extension module, a star
    import, a module ``__getattr__``) a note says so, and ``import_modules``
    imports the module instead. A file that cannot be read at all raises
    ConfigError (one line).
    """
    problems: list[str] = []
    raw, origin = _read_source(source, problems)
    data, schema, disable, require = Config._validate(raw, origin, problems)
    config = Config(data, schema, origin)
    from ._plugins import get_plugin_manager, installed_plugin_names, not_loaded_reason

    pm = get_plugin_manager()
    for name in require:
        if name in disable:
            continue  # already reported
        why = not_loaded_reason(pm, name)
        if why is not None:
            problems.append(f"plugins.require: plugin {name!r} {why}")
    notes: list[str] = []
    installed = installed_plugin_names(pm)
    _check_disabled_names([f"plugins.disable[{i}]" for i in range(len(disable))], disable, installed, problems, notes)
    from ._plugins import DISABLE_ENV_VAR, env_disabled_names

    env_names = sorted(env_disabled_names())
    _check_disabled_names([DISABLE_ENV_VAR] * len(env_names), env_names, installed, problems, notes)
    for name in config.service_names():
        entry = config.service_entry(name) or {}
        if entry.get("enabled", True):
            _check_service(name, entry, problems, notes, import_modules)
    for path, value, _is_default in _keys_that_set_nothing(raw):
        notes.append(f"{path} ({value!r}) sets nothing: {_sets_nothing_why(path)}")
    return config, problems, notes


def _check_disabled_names(
    where: list[str], disable: list[str], installed: list[str], problems: list[str], notes: list[str]
) -> None:
    """A name to disable (``plugins.disable``, ``KSERVICE_DISABLE_PLUGINS``) no plugin is installed under disables nothing.

    A name close to an installed plugin's is taken for a misspelling (a problem: the plugin meant stays
    enabled); any other is a note, as it may name a plugin installed where the file is also used.
    ``where[i]`` names where ``disable[i]`` was written.
    """
    for label, name in zip(where, disable, strict=True):
        if name in installed:
            continue
        close = _closest(name, installed)
        if close:
            problems.append(
                f"{label}: no plugin {name!r} is installed; did you mean {close!r}? (as written it disables nothing)"
            )
        else:
            notes.append(f"{label}: no plugin {name!r} is installed here, so this disables nothing")


def _check_service(
    name: str, entry: dict[str, Any], problems: list[str], notes: list[str], import_modules: bool
) -> None:
    from ._plugins import (
        describe_service_entry_point_clash,
        registered_services,
        service_entry_point_clashes,
        service_entry_points,
        task_kinds,
        transports,
    )

    prefix = f"services.{name}"
    kinds = sorted(task_kinds())
    kind = entry.get("kind", "local")
    if kind not in kinds:
        problems.append(
            f"{prefix}.kind: no task kind {kind!r} is registered{_did_you_mean(kind, kinds)} (registered: {', '.join(kinds) or 'none'})"
        )
    known_transports = sorted(transports())
    for index, transport in enumerate(entry.get("transports") or []):
        if transport not in known_transports:
            problems.append(
                f"{prefix}.transports[{index}]: no transport {transport!r} is registered"
                f"{_did_you_mean(str(transport), known_transports)} (registered: {', '.join(known_transports) or 'none'})"
            )
    if entry.get("class"):
        problem, note = _check_class_path(str(entry["class"]), import_modules)
        if problem:
            problems.append(f"{prefix}.class: {problem}")
        if note:
            notes.append(f"{prefix}.class: {note}")
        return
    key = "entry_point" if entry.get("entry_point") else None
    wanted = str(entry.get("entry_point") or name)
    installed = sorted({*service_entry_points(), *registered_services()})
    if wanted not in installed:
        where = f"{prefix}.entry_point" if key else prefix
        problems.append(
            f"{where}: no installed service named {wanted!r} (entry-point group 'kservice.services'){_did_you_mean(wanted, installed)} "
            f"(installed: {', '.join(installed) or 'none'}); give 'class: package.module:Class' instead"
        )
    clash = service_entry_point_clashes().get(wanted)
    if clash is not None:
        problems.append(
            f"{f'{prefix}.entry_point' if key else prefix}: {describe_service_entry_point_clash(wanted, clash)}"
        )


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = _closest(word, candidates)
    return f"; did you mean {close!r}?" if close else ""


def _find_module_spec(module_name: str) -> Any:
    """The module's spec, found without running any of its code (or its packages'); None if there is none."""
    import importlib.machinery
    import importlib.util
    import sys

    if module_name in sys.modules:
        return getattr(sys.modules[module_name], "__spec__", None) or True
    parts = module_name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name imports nothing
    except (ImportError, ValueError):
        return None
    for depth in range(1, len(parts)):
        locations = getattr(spec, "submodule_search_locations", None)
        if spec is None or locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: depth + 1]), list(locations))
    return spec


def _module_candidates(module_name: str) -> list[str]:
    """Names next to ``module_name`` (its siblings), for a suggestion."""
    import pkgutil

    parent, _, _ = module_name.rpartition(".")
    if not parent:
        return [m.name for m in pkgutil.iter_modules()]
    spec = _find_module_spec(parent)
    locations = getattr(spec, "submodule_search_locations", None)
    return [f"{parent}.{m.name}" for m in pkgutil.iter_modules(list(locations))] if locations else []


def _check_class_path(path: str, import_modules: bool) -> tuple[str | None, str | None]:
    """(problem, note) for one 'package.module:Class' path."""
    import ast
    import sys

    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        return f"{path!r} is not an import path like 'package.module:Class'", None
    if import_modules:
        from ._task import import_service_class

        try:
            import_service_class(path)
        except ConfigError as exc:
            return str(exc), None
        return None, None
    spec = _find_module_spec(module_name)
    if spec is None:
        return (
            f"no module named {module_name!r} on the path{_did_you_mean(module_name, _module_candidates(module_name))}",
            None,
        )
    first = attr.split(".")[0]
    if module_name in sys.modules:
        names = set(dir(sys.modules[module_name]))
        if first in names:
            return None, None
        return f"module {module_name!r} has no attribute {first!r}{_did_you_mean(first, names)}", None
    origin = getattr(spec, "origin", None)
    if not origin or not str(origin).endswith(".py"):
        return (
            None,
            f"{path}: {module_name!r} has no Python source to read; run 'kservice config check --import' to import it",
        )
    try:
        with open(origin, encoding="utf-8") as source_file:
            tree = ast.parse(source_file.read(), filename=origin)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read module {module_name!r} ({origin}): {exc}", None
    names, opaque = _top_level_names(tree)
    if first in names:
        return None, None
    if opaque:
        return (
            None,
            f"{path}: {module_name!r} may define {first!r} at import time ({opaque}); run 'kservice config check --import' to import it",
        )
    return f"module {module_name!r} ({origin}) defines no {first!r}{_did_you_mean(first, names)}", None


def _top_level_names(tree: Any) -> tuple[set[str], str]:
    """Names a module binds at top level, and why that list may be incomplete ('' when it is complete)."""
    import ast

    names: set[str] = set()
    opaque = ""

    def bind(target: Any) -> None:
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                bind(element)

    def visit(body: list[Any]) -> None:
        nonlocal opaque
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
                if node.name == "__getattr__":
                    opaque = "a module __getattr__"
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    bind(target)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                bind(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        opaque = "a star import"
                    else:
                        names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []) or [])
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body)

    visit(tree.body)
    if not opaque and any(isinstance(node, ast.Name) and node.id in ("globals", "vars") for node in ast.walk(tree)):
        opaque = "globals() written at import"
    return names, opaque
