"""The ``serve`` stage: a finished model behind Ray Serve (``POST /recommend``, docs/SERVING.md).

It produces no folder: it reads the best dual-channel model of the workdir (else the baseline)
and the dataset, and deploys them. The serving package (``llmser_ray.serving``) holds the
request schema, the replica state, the routes and the ingress; this module is the stage's one
entry point, so the CLI, the cluster manifests and the tests start serving the same way.
Serving holds no workdir lock: it only reads, so it never blocks a training in the same workdir.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmser_ray.stages.base import Stage

if TYPE_CHECKING:
    from llmser_ray.config import Config

STAGE = Stage(
    name="serve", output="(none: a Ray Serve application)", schema_version=1,
    inputs=("prepare", "train"), identity=("serve.* (which model, ingress, ports, replicas)",),
    schema="docs/SERVING.md", summary="the trained recommender behind Ray Serve, on 127.0.0.1 by default")


def serve(cfg: Config, *, blocking: bool = True, log: Callable[[str], None] | None = None) -> str:
    """Deploy ``cfg``'s best finished model; return the base URL (``serving.deployment.serve``).

    Imported on call: Ray Serve and FastAPI load only when something is served.
    """
    from llmser_ray.serving.deployment import serve as deploy

    return deploy(cfg, blocking=blocking, log=log)
