"""docs/life-of-a-call.md names only functions that exist: every `module:qualname` it lists is imported."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "life-of-a-call.md"
NAME = re.compile(r"`(kservice(?:\.\w+)*):([\w.]+)`")


def documented_names() -> list[tuple[str, str]]:
    return sorted(set(NAME.findall(PAGE.read_text(encoding="utf-8"))))


def test_every_documented_step_resolves_to_a_function_or_class() -> None:
    names = documented_names()
    assert len(names) >= 30, names  # the page maps the whole path, not a few steps
    missing = []
    for module_name, qualname in names:
        found: object = importlib.import_module(module_name)
        try:
            for part in qualname.split("."):
                found = getattr(found, part)
        except AttributeError:
            missing.append(f"{module_name}:{qualname}")
            continue
        assert callable(found), f"{module_name}:{qualname} is not a function or class"
    assert not missing, f"docs/life-of-a-call.md names what does not exist: {missing}"


def test_the_page_covers_both_call_kinds_and_the_service_side() -> None:
    names = {f"{module}:{qualname}" for module, qualname in documented_names()}
    for needed in (
        "kservice._manager:ServiceManager.call_service_sync",
        "kservice._manager:ServiceManager.call_service_async",
        "kservice._task:BaseServiceTask.execute",
        "kservice._task:BaseServiceTask.submit",
        "kservice._middleware:MiddlewareChain._generate",
    ):
        assert needed in names, needed
