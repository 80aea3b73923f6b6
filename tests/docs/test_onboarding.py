"""Onboarding from a fresh shell: install instructions, the test extra, what a null Ray address does, the replica warning."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_no_page_installs_kservice_from_an_index() -> None:
    """kservice is not published on an index: pages install it from a checkout or a built wheel."""
    from_index = re.compile(r"pip install\s+(?:-\S+\s+)*['\"]?kservice(?:\[[\w,]+\])?['\"]?(?:\s|$|`)")
    offenders = [
        f"{page.relative_to(REPO)}: {line.strip()}"
        for page in PAGES
        for line in page.read_text().splitlines()
        if from_index.search(line)
    ]
    assert offenders == []
    quickstart = (REPO / "docs" / "quickstart.md").read_text()
    assert "pip install -e '.[test]'" in quickstart  # from a checkout
    assert "pip wheel" in quickstart and "dist/kservice-" in quickstart  # from a built wheel


def test_the_test_extra_has_what_the_pytest_plugin_needs_and_the_quickstart_names_it() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    test_extra = re.search(r"^test = \[(.*?)\]$", pyproject, re.M)  # tomllib is not in Python 3.10
    assert test_extra is not None and re.search(r'"pytest>=', test_extra.group(1)), pyproject
    assert '[project.entry-points.pytest11]\nkservice = "kservice.testing"' in pyproject
    quickstart = (REPO / "docs" / "quickstart.md").read_text()
    assert "kservice[test]" in quickstart and "[test]" in quickstart.split("## 2.")[0]  # named in the install step


class _FakeRay:
    """Stands in for the ray module (a boundary kservice does not own): records how it was asked to connect."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def is_initialized(self) -> bool:
        return bool(self.calls)

    def init(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


@pytest.mark.parametrize(
    ("configured", "environment", "expected"),
    [
        (None, None, "local"),
        (None, "ray://head:10001", "ray://head:10001"),
        ("auto", "ray://head:10001", "auto"),
        ("local", None, "local"),
    ],
)
def test_a_null_ray_address_starts_a_private_local_ray(
    configured: str | None, environment: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kservice.plugins.ray import _ensure_ray

    if environment is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", environment)
    ray = _FakeRay()
    _ensure_ray(ray, {"address": configured, "namespace": "ns", "connect_timeout": 1.0})  # type: ignore[arg-type]
    assert ray.calls == [{"address": expected, "namespace": "ns"}]
    _ensure_ray(ray, {"address": configured, "namespace": "ns", "connect_timeout": 1.0})  # type: ignore[arg-type]
    assert len(ray.calls) == 1  # already connected: left alone


def test_the_docs_say_what_a_null_address_does_and_examples_start_a_local_ray() -> None:
    ray_page = (REPO / "docs" / "ray.md").read_text()
    assert "a new Ray instance of this process only" in " ".join(ray_page.split())
    readme = (REPO / "README.md").read_text()
    assert 'ray.init(address="local"' in readme and "ray.init(ignore_reinit_error=True)" not in readme


def test_the_docs_warn_that_replicas_do_not_share_state() -> None:
    for page in ("README.md", "docs/ray.md"):
        assert "replicas do not share state" in " ".join((REPO / page).read_text().split()).lower(), page
