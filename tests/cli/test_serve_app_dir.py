"""``kservice serve`` searches the working directory only when told to (``--app-dir .``), with and without --reload."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from .helpers import cli_env, run_cli
from .test_serve_operator import Host, _await_reload, _call, _greeter, _module

#: A module named like one of the standard library's that the host imports, planted in the working directory:
#: imported, it leaves a marker file.
_PLANTED = "import pathlib\npathlib.Path(__file__).with_name('planted-imported').write_text('imported')\n"


def _env(tmp_path: Path) -> dict[str, str]:
    # Nothing on PYTHONPATH names the working directory: only --app-dir can.
    return cli_env(KSERVICE_QUEUE_DIR=str(tmp_path / "queues"), KSERVICE_REGISTRY_DIR=str(tmp_path / "registry"))


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    _module(app, "cwdsvc", _greeter("here"))
    (app / "json.py").write_text(_PLANTED)
    return app


@pytest.mark.timeout(120)
def test_serve_refuses_a_module_of_the_working_directory_without_app_dir(tmp_path: Path) -> None:
    app, env = _app(tmp_path), _env(tmp_path)
    result = run_cli("serve", f"op-{uuid.uuid4().hex[:8]}=cwdsvc:Greeter", env=env, cwd=app, timeout=30)
    assert result.returncode == 1
    assert "cannot import module 'cwdsvc'" in result.stderr and "--app-dir ." in result.stderr, result.stderr
    assert not (app / "planted-imported").exists()


@pytest.mark.timeout(120)
def test_serve_reload_refuses_a_module_of_the_working_directory_without_app_dir(tmp_path: Path) -> None:
    # Before, the host and the check of new code ran as `python -c`, which puts the working directory first
    # on sys.path: with --reload the module was served, and a json.py there replaced the standard library's.
    name = f"op-{uuid.uuid4().hex[:8]}"
    app, env = _app(tmp_path), _env(tmp_path)
    host = Host(f"{name}=cwdsvc:Greeter", "--reload", cwd=app, env=env)
    try:
        host.wait_line(host.err, "reload: watching")
        refused = host.wait_line(host.err, "cannot import module 'cwdsvc'")
        assert "--app-dir ." in refused
        host.wait_line(host.err, "the host exited with status")
        # The check of changed code refuses it too, so no host is started.
        _module(app, "cwdsvc", _greeter("changed"))
        checked = host.wait_line(host.err, "not restarting")
        assert "no host is running" in checked and "cannot import module 'cwdsvc'" in checked, checked
        assert _call(name, "hello", env, app).startswith("error ")
    finally:
        status = host.stop()
    assert status == 0, host.err
    assert not [line for line in host.out if line.startswith("serving")], host.out
    assert not (app / "planted-imported").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reload", [False, True], ids=["serve", "serve-reload"])
def test_serve_takes_a_module_of_the_working_directory_with_app_dir_dot(tmp_path: Path, reload: bool) -> None:
    name = f"op-{uuid.uuid4().hex[:8]}"
    app, env = _app(tmp_path), _env(tmp_path)
    (app / "json.py").unlink()  # --app-dir . puts the directory first: a json.py there would be imported
    host = Host("--app-dir", ".", f"{name}=cwdsvc:Greeter", *(["--reload"] if reload else []), cwd=app, env=env)
    try:
        host.wait_line(host.out, f"serving {name}")
        assert _call(name, "hello", env, app) == '"here"'
        if reload:
            _module(app, "cwdsvc", _greeter("changed"))
            _await_reload(host, name, '"changed"', env, app)
    finally:
        status = host.stop()
    assert status == 0, host.err
