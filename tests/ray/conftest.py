"""One real two-node Ray cluster for every test in this directory (Ray starts once per session: it costs seconds).

The head node carries the custom resource ``node_a`` and the worker node
``node_b``, so a test can pin a replica to either node. The driver (the test
process) connects with ``ray.init(address=cluster.address)``. Ray's own
processes are started before any test runs, so the suite's leak guard only
counts what a test itself spawns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kservice import ServiceEnvironment, ServiceManager

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kservice[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session", autouse=True)
def _ray_for_every_test(ray_cluster: Cluster) -> Cluster:
    """Every test here runs with the session's cluster (defined in tests/conftest.py) connected."""
    return ray_cluster


@pytest.fixture(scope="session")
def node_ids(ray_cluster: Cluster) -> dict[str, str]:
    """Ray node id of each test node, by its custom resource name."""
    found = {}
    for node in ray.nodes():
        for resource in ("node_a", "node_b"):
            if node["Alive"] and resource in node["Resources"]:
                found[resource] = node["NodeID"]
    return found


@pytest.fixture
def manager(env: ServiceEnvironment) -> Iterator[ServiceManager]:
    """A manager of the module's own ``env`` fixture (each module defines the services it needs)."""
    with ServiceManager(env) as created:
        yield created
