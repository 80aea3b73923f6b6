"""The pytest plugin ``kservice.testing``, used black-box as a user would: through pytester."""

from __future__ import annotations

import os
import textwrap
import uuid
from typing import Any

import pytest

from .helpers import marked_processes

pytest_plugins = ["pytester"]

USER_TESTS = """
    import os

    import pytest


    class KV:
        def __init__(self, initial=None):
            self.data = dict(initial or {})

        def get(self, key):
            return self.data.get(key)

        def put(self, key, value):
            self.data[key] = value

        def pid(self):
            return os.getpid()


    def test_local(kservice_service):
        kv = kservice_service(KV, {"a": 1})
        assert kv.get("a") == 1
        assert kv.pid() == os.getpid()


    def test_process(kservice_service):
        kv = kservice_service(KV, kind="process")
        assert kv.get("a") is None
        kv.put("a", [1, 2])
        assert kv.get("a") == [1, 2]
        assert kv.pid() != os.getpid()  # really another process


    def test_ray(kservice_service):
        kv = kservice_service(KV, kwargs={"initial": {"b": 2}}, kind="ray")
        assert kv.get("b") == 2


    def test_two_of_a_kind(kservice_service, kservice_environment):
        first = kservice_service(KV, {"n": 1})
        second = kservice_service(KV, {"n": 2})
        assert (first.get("n"), second.get("n")) == (1, 2)
        assert kservice_environment.service_names() == ["KV", "KV-2"]


    def test_manager_and_status(kservice_service, kservice_manager, kservice_environment):
        kservice_service(KV, name="store", timeout=5)
        assert kservice_manager.call_service_sync("store", "get", ("x",)) is None
        assert kservice_environment.get_task("store").get_service_status().requests_total == 1


    @pytest.fixture
    def kservice_config():
        return {"service": {"local": {"max_workers": 3}}}


    def test_config_override(kservice_service, kservice_environment):
        kservice_service(KV)
        assert kservice_environment.get_task("KV").max_workers == 3
"""


@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> str:
    """Tags every process the inner pytest run starts, to find any it leaves behind."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("KSERVICE_TEST_MARK", value)
    return value


@pytest.mark.timeout(90)
def test_user_tests_run_on_every_kind_and_clean_up(
    pytester: pytest.Pytester, mark: str, ray_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The inner session's Ray is the outer session's (the suite starts Ray once); its workers
    # import the user's test module from the inner run's directory.
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_user_kv=textwrap.dedent(USER_TESTS))
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*test_process PASSED*", "*test_ray PASSED*"])
    assert marked_processes(mark) == [], "a process started by the tests outlived the test session"


@pytest.mark.timeout(60)
def test_ray_tests_skip_with_a_reason_when_ray_is_missing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_user_kv=textwrap.dedent(USER_TESTS))
    # A package that shadows ray and fails to import, as if Ray were not installed.
    shadow = pytester.mkdir("shadow")
    (shadow / "ray").mkdir()
    (shadow / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = pytester.runpytest_subprocess("-rs", "-k", "local or ray", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*Ray is not installed (pip install 'kservice?ray?')*"])


@pytest.mark.timeout(60)
def test_a_service_that_fails_to_start_fails_the_test(pytester: pytest.Pytester, mark: str) -> None:
    pytester.makepyfile(
        test_broken=textwrap.dedent(
            """
            class Broken:
                def __init__(self):
                    raise RuntimeError("no database")


            def test_broken(kservice_service):
                kservice_service(Broken, kind="process")
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ServiceUnavailableError*no database*"])
    assert marked_processes(mark) == []
