"""Entry points of the ``kservice`` groups, read once per installation and kept in a cache file.

Reading entry points with :mod:`importlib.metadata` costs a process 20-50 ms
before its first call: importing it loads ``email``, ``zipfile``, ``socket``,
``datetime`` and more, then every distribution's metadata is parsed. A
short-lived caller (``kservice call``, a worker) would pay that on every start
although the installed set rarely changes. So what each ``sys.path``
directory holds (its distributions' names, versions and entry points of the
two groups) is kept in a JSON file under the user's cache directory
(``$KSERVICE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kservice``, else
``~/.cache/kservice``), one file per interpreter prefix.

What is guaranteed:

- The result is what :func:`importlib.metadata.entry_points` returns for the
  same ``sys.path``: directories in order, the first distribution of a
  (normalised) name wins, and a directory is read afresh with
  :mod:`importlib.metadata` whenever its modification time differs from the
  cached one (installing or removing a distribution adds or removes a
  ``*.dist-info`` directory in it). A directory holding no ``*.dist-info`` or
  ``*.egg-info`` is known to declare nothing without importing anything.
- A directory modified in the last :data:`_RACY_SECONDS` is not cached (its
  timestamp may not yet show a change made in the same clock tick, the racy
  case git's index also guards against): it is read afresh each time. One
  whose time is ahead of the clock (the clock stepped back after it changed)
  is cached: a later change gives it a time unlike the cached one.
- A cache that is missing, unreadable, not owned by this user, or of another
  format or Python is ignored and rewritten; a cache directory that cannot be
  written only costs the speed. ``KSERVICE_CACHE_DIR=off`` turns it off.
"""

from __future__ import annotations

import os
import re
import sys
import time
from stat import S_ISDIR
from typing import Any

__all__ = ["EntryPointRef", "entry_points"]

#: The groups read together (a miss reads both, so one file serves both).
GROUPS = ("kservice", "kservice.services")
CACHE_ENV_VAR = "KSERVICE_CACHE_DIR"
_FORMAT = 2
#: Directories remembered before those not on the current sys.path are forgotten.
_MAX_DIRECTORIES = 64
#: A sys.path directory changed this recently may change again within its timestamp's granularity.
_RACY_SECONDS = 2.0


class _Distribution:
    """The name and version of the distribution declaring an entry point (what origins show)."""

    __slots__ = ("name", "version")

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version


class EntryPointRef:
    """One entry point: ``name = value`` in ``group``, declared by ``dist``; ``load()`` imports it.

    The same attributes and ``load()`` semantics as
    :class:`importlib.metadata.EntryPoint` (``module:attr.attr``, extras
    ignored), without importing :mod:`importlib.metadata`.
    """

    __slots__ = ("dist", "group", "name", "value")

    def __init__(self, name: str, value: str, group: str, dist: _Distribution | None) -> None:
        self.name = name
        self.value = value
        self.group = group
        self.dist = dist

    def load(self) -> Any:
        """Import the module and return the object the entry point names (ImportError/AttributeError if absent)."""
        from importlib import import_module

        module_name, _, attrs = self.value.partition(":")
        target: Any = import_module(module_name.strip())
        for attr in attrs.split("[", 1)[0].strip().split("."):
            if attr:
                target = getattr(target, attr)
        return target

    def __repr__(self) -> str:
        return f"EntryPointRef(name={self.name!r}, value={self.value!r}, group={self.group!r})"


#: A distribution as cached: its normalised name, name, version, and ``{group: [[name, value], ...]}``.
_Dist = list[Any]
#: sys.path directory -> [its modification time, the distributions in it], as read this process.
_known: dict[str, list[Any]] | None = None


def entry_points(group: str) -> list[EntryPointRef]:
    """The entry points of ``group`` (one of :data:`GROUPS`) visible on the current ``sys.path``.

    As :func:`importlib.metadata.entry_points` finds them: directories in
    ``sys.path`` order, the first distribution of a (normalised) name wins.
    """
    global _known
    path = _cache_file()
    if _known is None:
        _known = _read_cache(path) if path is not None else {}
    seen: set[str] = set()
    found: list[EntryPointRef] = []
    changed = False
    for entry in sys.path:
        dists, learned = _dists_in(_absolute(entry), _known)
        changed = changed or learned
        for normalised, name, version, groups in dists:
            if normalised in seen:
                continue
            seen.add(normalised)
            for ep_name, value in groups.get(group, ()):
                found.append(EntryPointRef(ep_name, value, group, _Distribution(name, version)))
    if changed and path is not None:
        _write_cache(path, _known)
    return found


def _absolute(entry: str) -> str:
    """``entry`` as an absolute path: ``""`` (the working directory) is cached as the directory it is now.

    Cached under ``""`` it would be one entry for every directory a command runs from, read afresh
    (and the cache rewritten) whenever the directory differs from the last one's.
    """
    if os.path.isabs(entry):
        return entry
    try:
        return os.path.abspath(entry)
    except OSError:  # the working directory is gone
        return entry


def _dists_in(entry: str, known: dict[str, list[Any]]) -> tuple[list[_Dist], bool]:
    """The distributions in sys.path ``entry``, and whether they were read afresh into ``known``."""
    try:
        stat = os.stat(entry or ".")
    except (OSError, ValueError):
        return [], False
    if not S_ISDIR(stat.st_mode):
        return _from_metadata(entry), False  # a zip or egg file: rare, read it every time
    cached = known.get(entry)
    if cached is not None and cached[0] == stat.st_mtime_ns:
        return cached[1], False
    try:
        names = os.listdir(entry or ".")
    except OSError:
        return [], False
    # What importlib.metadata looks for in a directory: without one, nothing to read (and no import).
    dists = _from_metadata(entry) if any(n.endswith((".dist-info", ".egg-info")) for n in names) else []
    if 0 <= time.time_ns() - stat.st_mtime_ns <= _RACY_SECONDS * 1e9:
        # Changed moments ago: it may change again without its time showing it. A time ahead of the clock (the
        # clock stepped back since) is cached: a later change gives the directory a time unlike this one.
        return dists, False
    known[entry] = [stat.st_mtime_ns, dists]
    return dists, True


def _from_metadata(entry: str) -> list[_Dist]:
    from importlib import metadata

    dists: list[_Dist] = []
    for dist in metadata.distributions(path=[entry]):
        name = dist.metadata["Name"] or ""
        groups: dict[str, list[list[str]]] = {}
        for ep in dist.entry_points:
            if ep.group in GROUPS:
                groups.setdefault(ep.group, []).append([ep.name, ep.value])
        dists.append([re.sub(r"[-_.]+", "_", name).lower() or f"<unnamed {len(dists)}>", name, dist.version, groups])
    return dists


def _cache_file() -> str | None:
    chosen = os.environ.get(CACHE_ENV_VAR, "").strip()
    if chosen.lower() in ("0", "false", "no", "off"):
        return None
    if not chosen:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        chosen = os.path.join(base, "kservice")
    if not os.path.isabs(chosen):
        return None
    return os.path.join(chosen, f"entry-points-{_digest(sys.prefix)}.json")


def _digest(text: str) -> str:
    """A 32-bit FNV-1a hash of ``text``, in hex: which interpreter prefix a cache file is for.

    Computed here rather than with ``zlib.crc32``: loading zlib's shared
    library was 0.3 ms of every caller's start, for one short string.
    """
    value = 0x811C9DC5
    for byte in text.encode("utf-8", "surrogateescape"):
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"


def _read_cache(path: str) -> dict[str, list[Any]]:
    import json

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return {}
    try:
        if os.fstat(fd).st_uid != os.getuid():
            return {}  # someone else's file: never trust what it says to import
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = json.loads(stream.read())
        if isinstance(data, dict) and data.get("format") == _FORMAT and data.get("python") == sys.version:
            directories = data["directories"]
            if isinstance(directories, dict):
                # An entry of any other shape is dropped (and that directory read afresh): never an error.
                return {entry: known for entry, known in directories.items() if _well_formed(known)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    finally:
        os.close(fd)
    return {}


def _well_formed(known: Any) -> bool:
    """Whether a cached directory entry is ``[mtime, [[normalised, name, version, {group: [[name, value]]}]]]``."""

    def is_str(value: Any) -> bool:
        return type(value) is str

    def well_formed_dist(dist: Any) -> bool:
        if type(dist) is not list or len(dist) != 4 or not all(map(is_str, dist[:3])) or type(dist[3]) is not dict:
            return False
        return all(
            is_str(group)
            and type(pairs) is list
            and all(type(pair) is list and len(pair) == 2 and all(map(is_str, pair)) for pair in pairs)
            for group, pairs in dist[3].items()
        )

    return (
        type(known) is list
        and len(known) == 2
        and type(known[0]) is int
        and type(known[1]) is list
        and all(map(well_formed_dist, known[1]))
    )


def _write_cache(path: str, known: dict[str, list[Any]]) -> None:
    import json

    if len(known) > _MAX_DIRECTORIES:  # keep what this sys.path uses; forget the rest
        in_use = {_absolute(e) for e in sys.path}
        for entry in [e for e in known if e not in in_use]:
            del known[entry]
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump({"format": _FORMAT, "python": sys.version, "directories": known}, stream)
        os.replace(temporary, path)  # readers see the old file or the new one, never half of one
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
