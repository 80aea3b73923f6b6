"""The records ``kservice plugins`` lists (built by :func:`kservice._plugins.plugin_states`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PluginInfo", "PluginState"]


@dataclass(frozen=True)
class PluginInfo:
    """What ``kservice plugins`` shows for one plugin."""

    name: str
    origin: str  # "entry point <dist> <version>", or "registered at run time"
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class PluginState:
    """One plugin as ``kservice plugins`` lists it: loaded, disabled or failed, and why."""

    name: str
    state: str  # "loaded", "disabled" or "failed"
    origin: str
    hooks: tuple[str, ...] = ()
    reason: str = ""
    required: bool = False
