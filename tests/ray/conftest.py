"""One real two-node Ray cluster for every test in this directory (Ray starts once per session: it costs seconds).

The head node carries the custom resource ``node_a`` and the worker node
``node_b``, so a test can pin a replica to either node. The driver (the test
process) connects with ``ray.init(address=cluster.address)``. Ray's own
processes are started before any test runs, so the suite's leak guard only
counts what a test itself spawns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kservice[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402

HERE = Path(__file__).resolve().parent

#: small object stores and few CPUs: two nodes fit beside the rest of the suite
NODE_ARGS: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 80 * 1024**2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session", autouse=True)
def ray_cluster() -> Iterator[Cluster]:
    """A head node (resource ``node_a``) and a worker node (``node_b``), with this process connected as a driver."""
    # Replica actors import the test services by module name; Ray's workers inherit this from the raylets.
    paths = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if ray.is_initialized():
        # Another session fixture started a local Ray; every Ray test of the session shares this cluster instead.
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={**NODE_ARGS, "resources": {"node_a": 10}, "include_dashboard": False},
    )
    cluster.add_node(**NODE_ARGS, resources={"node_b": 10})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def node_ids(ray_cluster: Cluster) -> dict[str, str]:
    """Ray node id of each test node, by its custom resource name."""
    found = {}
    for node in ray.nodes():
        for resource in ("node_a", "node_b"):
            if node["Alive"] and resource in node["Resources"]:
                found[resource] = node["NodeID"]
    return found
