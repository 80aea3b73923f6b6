"""Another local user cannot run code as this one through the working directory, nor stop it from serving."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.helpers import assert_user_error, cli_env, run_cli
from tests.other_user import OtherUser, other_user

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-writable directory (like /tmp, or a shared project directory)."""
    path = Path(tempfile.mkdtemp(prefix="kservice-shared-"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _plant(user: OtherUser, shared: Path, *modules: str) -> Path:
    """``user`` leaves modules in ``shared`` that, if imported, append to a marker file; returns the marker."""
    marker = shared / "imported"
    for module in modules:
        code = f"open({str(marker)!r}, 'a').write({module!r} + ' ran as uid %d\\n' % __import__('os').getuid())\n"
        user.run(["sh", "-c", 'cat > "$1"', "sh", str(shared / f"{module}.py")], input=code)
    assert (shared / f"{modules[0]}.py").stat().st_uid == user.uid
    return marker


@pytest.mark.timeout(120)
def test_a_command_run_in_another_users_directory_imports_nothing_from_it(shared: Path) -> None:
    with other_user() as user:
        marker = _plant(user, shared, "tenacity", "cachetools", "sample_services")
        result = run_cli("services", cwd=shared)
        assert result.returncode == 0, result
        assert not marker.exists(), marker.read_text()


@pytest.mark.timeout(120)
def test_a_process_task_started_in_another_users_directory_imports_nothing_from_it(
    tmp_path: Path, shared: Path
) -> None:
    program = tmp_path / "program.py"
    program.write_text(
        "from kservice import ServiceEnvironment, ServiceFactory, ServiceManager\n"
        "from tests.mmap.services import KV\n"
        "with ServiceEnvironment('cwd') as env:\n"
        "    env.register_service('kv', ServiceFactory('kv', KV), kind='process')\n"
        "    with ServiceManager(env) as manager:\n"
        "        assert manager.call_service_sync('kv', 'add', (2, 3)) == 5\n"
        "print('ok')\n"
    )
    with other_user() as user:
        marker = _plant(user, shared, "json", "pickle", "selectors")
        env = cli_env()
        env["PYTHONPATH"] = str(REPO_ROOT)
        done = subprocess.run(
            [sys.executable, str(program)], cwd=shared, env=env, capture_output=True, text=True, timeout=90
        )
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
        assert not marker.exists(), marker.read_text()


@pytest.mark.timeout(60)
def test_serve_looks_in_the_working_directory_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "kvstore_here.py").write_text("class KeyValue:\n    def get(self, key):\n        return key\n")
    result = run_cli("serve", "kv=kvstore_here:KeyValue", cwd=tmp_path, timeout=30)
    assert_user_error(result, "cannot import module 'kvstore_here'", "working directory", "--app-dir .", status=1)
    assert result.stdout == ""  # nothing started


def test_a_process_childs_path_searches_the_working_directory_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kservice.plugins.mmap.host import _child_sys_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", "/opt/app", "/usr/lib/python3", str(tmp_path), "lib"])
    assert _child_sys_path() == ["/opt/app", "/usr/lib/python3", str(tmp_path), str(tmp_path / "lib")]
    monkeypatch.setattr(sys, "path", ["", "/usr/lib/python3"])
    assert _child_sys_path() == ["/usr/lib/python3", str(tmp_path)]
