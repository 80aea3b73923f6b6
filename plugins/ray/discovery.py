"""Finding deployments in the cluster by their actors' names."""

from __future__ import annotations

import secrets
import time
from types import ModuleType

from .common import ACTOR_PREFIX

# ---------------------------------------------------------------------------
# Finding deployments in the cluster
# ---------------------------------------------------------------------------


def _deployments(ray: ModuleType, namespace: str | None) -> dict[str, dict[str, dict[int, str]]]:
    """Live replica actors by service, deployment and index (``namespace`` None: every namespace)."""
    found: dict[str, dict[str, dict[int, str]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name, actor_namespace = entry["name"], entry["namespace"]
        if not name.startswith(ACTOR_PREFIX) or (namespace is not None and actor_namespace != namespace):
            continue
        try:
            head, deployment, index = name.rsplit(":", 2)
            found.setdefault(head[len(ACTOR_PREFIX) :], {}).setdefault(deployment, {})[int(index)] = name
        except ValueError:
            continue
    return found


def _newest_deployment(deployments: dict[str, dict[int, str]]) -> str | None:
    # Deployment ids start with the start time in hex, so the newest sorts last.
    return max(deployments, default=None)


def _new_deployment_id() -> str:
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(3)}"
