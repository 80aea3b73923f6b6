"""The README's Ray snippet runs as written, as a second driver of the session's cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from tests.conftest import clean_environ
from tests.readme_blocks import block_containing, write_kvstore


@pytest.mark.timeout(180)
def test_readme_ray_block_runs(ray_cluster: Cluster, tmp_path: Path) -> None:
    write_kvstore(tmp_path)
    # The snippet's own ray.init() then joins this cluster; its workers import kvstore from tmp_path.
    prelude = (
        "import ray\n"
        f"ray.init(address={ray_cluster.address!r}, runtime_env={{'env_vars': {{'PYTHONPATH': {str(tmp_path)!r}}}}},"
        " log_to_driver=False)\n"
    )
    env = clean_environ()
    result = subprocess.run(
        [sys.executable, "-c", prelude + block_containing('kind="ray"')],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
