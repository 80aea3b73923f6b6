"""The guides' code runs as written, and the names they promise exist."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.helpers import cli_env

DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.timeout(120)
def test_middleware_guide_blocks_run(tmp_path: Path) -> None:
    blocks = python_blocks("guide-middleware.md")
    hooks, environment, rules, batch, plugin, test_file = blocks
    for block in (hooks, environment, rules, batch):
        result = run_python(block, tmp_path)
        assert result.returncode == 0, (block, result.stderr)

    # The plugin block, registered as a plugin would be, really prints one line per call.
    registered = plugin + textwrap.dedent(
        """
        import sys
        from kservice import ServiceEnvironment, get_plugin_manager

        get_plugin_manager().register(sys.modules[__name__], name="audit")

        class Store:
            def get(self, key):
                return key

        with ServiceEnvironment("audited", {"audit": {"enabled": True, "label": "checked"}}) as env:
            env.register_service("store", Store)
            env.manager().call_service_sync("store", "get", ("a",))
        """
    )
    result = run_python(registered, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[checked] store.get: ok" in result.stdout

    # The testing block, with the environment block saved as the module it imports.
    (tmp_path / "my_middleware.py").write_text(environment)
    (tmp_path / "test_timing.py").write_text(test_file)
    env = cli_env()
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_timing.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


@pytest.mark.timeout(60)
def test_migration_example_runs(tmp_path: Path) -> None:
    (example,) = python_blocks("migration.md")
    result = run_python(example, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(60)
def test_task_kind_guide_example_runs(tmp_path: Path) -> None:
    """The guide's kind warms its service before serving, and a warm-up that raises fails the start."""
    example = python_blocks("guide-task-kind.md")[0]
    result = run_python(example, tmp_path)
    assert result.returncode == 0, result.stderr
    served, reported, failed = result.stdout.splitlines()
    assert served == "2"  # the table warm_up() filled was there for the first call
    assert reported == "True"  # report_status() added its part to get_service_status()
    assert failed.startswith("failed - ") and "RuntimeError: the table is missing" in failed


def test_task_kind_guide_names_the_seam() -> None:
    """Every step the guide's table documents is a public method of BaseServiceTask."""
    from kservice import BaseServiceTask

    text = (DOCS / "guide-task-kind.md").read_text(encoding="utf-8")
    steps = re.findall(r"^\| `(\w+)\(", text, re.M)
    assert steps == ["host_instance", "open_listeners", "release_instance", "report_status"]
    for step in [*steps, "adopt_running", "close_listeners"]:
        assert callable(getattr(BaseServiceTask, step)) and BaseServiceTask.__dict__[step].__doc__, step


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


def test_every_kservice_name_in_the_migration_guide_exists() -> None:
    text = (DOCS / "migration.md").read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"`(kservice(?:\.\w+)+)`", text)))
    assert len(names) >= 20, names
    for name in names:
        _resolve(name)  # raises naming what is missing


def test_concepts_name_every_hook() -> None:
    import kservice.hookspecs

    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    hooks = [name for name in vars(kservice.hookspecs) if name.startswith("kservice_")]
    missing = [hook for hook in hooks if f"`{hook}`" not in text]
    assert not missing, f"docs/concepts.md does not mention hooks {missing}"


GUIDES = (
    "index.md",
    "quickstart.md",
    "concepts.md",
    "configuration.md",
    "guide-transport.md",
    "guide-middleware.md",
    "guide-task-kind.md",
    "life-of-a-call.md",
    "migration.md",
)


def test_doc_links_resolve() -> None:
    for page in (DOCS / name for name in GUIDES):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
