"""Suite-wide guards: every test leaves no kservice threads, child processes or shared-memory segments behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# Every test session (and every process it starts, which inherits the environment) keeps its queues
# and service registry in directories of its own, so the suite runs beside a user's own
# `kservice serve` and beside another checkout's suite, and the leak guard sees only this session's
# segments. Set before anything imports kservice.
# (a random part: another local user cannot create them first and make the run fail)
SHM_DIR = Path(f"/dev/shm/kservice-{os.getuid()}-test-{os.getpid()}-{secrets.token_hex(6)}")
REGISTRY_DIR = SHM_DIR.with_name(SHM_DIR.name + "-services")
os.environ["KSERVICE_QUEUE_DIR"] = str(SHM_DIR)
os.environ["KSERVICE_REGISTRY_DIR"] = str(REGISTRY_DIR)
# The entry-point cache of the session's processes, so the suite writes nothing under the user's home
# (made when first written; a process started by the session keeps the session's).
_INHERITED_CACHE = os.environ.get("KSERVICE_CACHE_DIR", "").startswith(tempfile.gettempdir())
CACHE_DIR = (
    Path(os.environ["KSERVICE_CACHE_DIR"])
    if _INHERITED_CACHE
    else Path(tempfile.gettempdir()) / f"kservice-test-cache-{os.getpid()}-{secrets.token_hex(6)}"
)
os.environ["KSERVICE_CACHE_DIR"] = str(CACHE_DIR)
#: the variables every child process of the suite keeps (the session's runtime and cache directories)
SESSION_VARIABLES = ("KSERVICE_QUEUE_DIR", "KSERVICE_REGISTRY_DIR", "KSERVICE_CACHE_DIR")


#: a terminal's size, which pytest-xdist's workers set (80x24): a subprocess writing to a pipe has none
TERMINAL_SIZE_VARIABLES = ("COLUMNS", "LINES")


def clean_environ() -> dict[str, str]:
    """This process's environment without kservice settings or a terminal size, but with the session's runtime directories."""
    return {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("KSERVICE_") or k in SESSION_VARIABLES) and k not in TERMINAL_SIZE_VARIABLES
    }


def install_distribution(project: Path, root: Path) -> Path:
    """``pip install`` the distribution whose source is ``project`` into ``root/site``; returns that directory.

    Put it on ``PYTHONPATH`` (or ``sys.path``) to have the distribution installed, discovered through its
    entry points. Never into this interpreter's environment: the suite's workers share it, and the
    plugin would join their other tests. Built from a copy under ``root``: pip builds in the source
    tree and would leave build/ and *.egg-info there.
    """
    source, site = root / project.name, root / "site"
    shutil.copytree(project, source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


RAY_TEST_DIR = Path(__file__).resolve().parent / "ray"
#: small object stores and few CPUs: two nodes fit beside the rest of the suite
RAY_NODE_ARGS: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 80 * 1024**2}


def _kservice_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("kservice-") and t.is_alive()}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=False)}


def _describe(pids: set[int]) -> list[str]:
    described = []
    for pid in sorted(pids):
        try:
            described.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.Error:
            described.append(f"{pid} (gone)")
    return described


def _segments() -> set[str]:
    try:
        return {p.name for p in SHM_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def _settle(check, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns an empty collection or ``timeout`` passes; returns the last value (the leak)."""
    from kservice.testing import WaitTimeoutError, wait_for  # here: the environment above is set first

    seen = [None]

    def settled() -> bool:
        seen[0] = check()
        return not seen[0]

    with contextlib.suppress(WaitTimeoutError):
        wait_for(settled, timeout=timeout, what="leftovers to go", interval=0.05)
    return seen[0]


#: The call policies' per-process registries: (module, name). Each keeps a service's object (a breaker,
#: a result cache, a retry budget) while anything uses it, and hands it to any later user with the same
#: settings.
_POLICY_REGISTRIES = (
    ("kservice.plugins.breaker", "_breakers"),
    ("kservice.plugins.cache", "_caches"),
    ("kservice.plugins.retry", "_budgets"),
)


@pytest.fixture(autouse=True)
def fresh_policy_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no circuit breaker, result cache or retry budget, as a new process does.

    Otherwise a breaker another test left open (its objects not yet collected) refuses this test's
    first calls to a service of the same name, a cache answers them, or a spent budget refuses retries.
    """
    for module_name, registry in _POLICY_REGISTRIES:
        module = sys.modules.get(module_name)
        if module is not None:
            monkeypatch.setattr(module, registry, weakref.WeakValueDictionary())


def _tracer_provider_set() -> bool:
    """Whether an OpenTelemetry tracer provider is set in this process (without importing the API)."""
    trace = sys.modules.get("opentelemetry.trace")
    return trace is not None and getattr(trace, "_TRACER_PROVIDER", None) is not None


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Fail a test that leaks threads, child processes, shared-memory segments or a tracer provider.

    A provider left set would put tracing in every later test's chains (auto mode) in this worker.
    """
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = _kservice_threads()
    children_before = _children()
    segments_before = _segments()
    provider_before = _tracer_provider_set()
    yield
    leaked_threads = _settle(lambda: _kservice_threads() - threads_before)
    leaked_children = _settle(
        lambda: {
            pid
            for pid in _children() - children_before
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        }
    )
    leaked_segments = _settle(lambda: _segments() - segments_before)
    assert not leaked_threads, f"test leaked threads: {sorted(leaked_threads)}"
    assert not leaked_children, f"test leaked child processes: {_describe(leaked_children)}"
    assert not leaked_segments, f"test leaked shared-memory segments in {SHM_DIR}: {sorted(leaked_segments)}"
    assert provider_before or not _tracer_provider_set(), (
        "test left an OpenTelemetry tracer provider set: withdraw it after the test "
        "(see tests/observability/test_tracing.py::_withdraw_provider)"
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """The one Ray of the test session: a head node (resource ``node_a``) and a worker node (``node_b``).

    This process is connected as a driver; tests that start Ray drivers in
    subprocesses (the demo, the pytest plugin) point them here with
    ``RAY_ADDRESS`` instead of starting a Ray of their own.
    """
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kservice[ray]')")
    from ray.cluster_utils import Cluster

    # Replica actors import the test services by module name; Ray's workers inherit this from the raylets.
    paths = [str(RAY_TEST_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if str(RAY_TEST_DIR) not in sys.path:
        sys.path.insert(0, str(RAY_TEST_DIR))
    if ray.is_initialized():
        # Another session fixture started a local Ray; every Ray test of the session shares this cluster instead.
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={**RAY_NODE_ARGS, "resources": {"node_a": 10}, "include_dashboard": False},
    )
    cluster.add_node(**RAY_NODE_ARGS, resources={"node_b": 10})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's queue and registry directories when the suite left them empty, and its cache."""
    for directory in (SHM_DIR, REGISTRY_DIR):
        try:
            directory.rmdir()
        except OSError:
            pass  # absent, or in use by another kservice process of this user
    if not _INHERITED_CACHE:
        shutil.rmtree(CACHE_DIR, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leaks: the test manages long-lived resources (session fixtures) itself")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs a group's tests on one worker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses Ray is in one group: on several workers (``-n 2 --dist loadgroup``), one starts Ray.

    Each worker is a session of its own (its own runtime directories, see above), so the rest needs no
    grouping; Ray is the one thing a session starts once and keeps.
    """
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) or RAY_TEST_DIR in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("ray"))
