"""Connecting to Ray: a local cluster by default, an existing one with ``ray.address``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmser_ray.config import RayConfig
from llmser_ray.errors import ConfigError


def init_ray(cfg: RayConfig, quiet: bool = False) -> str | None:
    """Start or join Ray once per process and return the dashboard URL (if any).

    Nothing of a local Ray is exposed beyond this machine by default: the dashboard binds to
    ``cfg.dashboard_host`` and, with ``cfg.loopback_only``, every other port to 127.0.0.1.
    """
    import ray

    if ray.is_initialized():
        return _dashboard_url()
    # Workers must import the package from the same place as the driver.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        if cfg.address:
            ctx = ray.init(address=cfg.address, log_to_driver=True)
        else:
            with loopback_node(cfg.loopback_only):
                ctx = ray.init(
                    num_cpus=local_cpus(cfg),
                    include_dashboard=cfg.include_dashboard,
                    dashboard_host=cfg.dashboard_host,
                    log_to_driver=True,
                )
    except ConnectionError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at '{cfg.address}': {e}",
            "check the address (ray://host:10001 or host:6379) and that the cluster is up, "
            "or drop --address to start a local Ray",
        ) from None
    url = getattr(ctx, "dashboard_url", None) or None
    url = (url if url.startswith("http") else f"http://{url}") if url else None
    if url and not quiet:
        print(f"[ray] dashboard: {url}", flush=True)
    return url


# Ray's switch for "a cluster of this machine only" (its default on macOS and Windows): the node
# address becomes 127.0.0.1, and every gRPC server of Ray (GCS, raylet, core workers) and its
# agents then listen on loopback only. ``ray.init(_node_ip_address="127.0.0.1")`` does not do it:
# Ray resolves a loopback address to the machine's own.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_node(enabled: bool = True) -> Iterator[None]:
    """Start a local Ray inside this block to keep all its ports on 127.0.0.1.

    The processes ``ray.init`` starts (GCS, raylet, agents; the raylet's workers after them)
    inherit the environment variable; this process read Ray's constant at import, so that is set
    too. Both are restored afterwards: a later ``ray.init(address=...)`` in the same process must
    advertise a reachable address to a remote cluster.
    """
    if not enabled:
        yield
        return
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = old_env


def local_cpus(cfg: RayConfig) -> float:
    """Logical CPUs of a local Ray: ``ray.num_cpus``, else the cores but at least 4.

    An augmentation stage holds several fractional actors at once (prompter, vLLM engine,
    grounder, FAISS) and Ray Data still needs a whole CPU for its own tasks; on a 2-core laptop
    Ray's default (2) leaves the last actor unscheduled and the stage waits forever. Four logical
    CPUs on two cores oversubscribes a little; every one of those actors is mostly idle.
    """
    if cfg.num_cpus is not None:
        return cfg.num_cpus
    return float(max(os.cpu_count() or 1, 4))


def _dashboard_url() -> str | None:
    import ray

    try:
        url = ray.get_runtime_context().dashboard_url  # type: ignore[attr-defined]
    except AttributeError:
        url = None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def plain_column(values: Any) -> Any:
    """A Ray Data numpy column (2-D array, object array of arrays, or scalars) as plain Arrow.

    Ray Data stores list columns as tensor extension types; our Parquet schemas are plain
    ``list<...>`` so that any reader (pandas, DuckDB, Spark) can open a stage's output.
    """
    import numpy as np
    import pyarrow as pa

    arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if arr.dtype == object or arr.ndim > 1:
        rows = [np.asarray(v).tolist() for v in arr]
        return pa.array(rows)
    return pa.array(arr)


def from_arrow_blocks(table: Any, blocks: int) -> Any:
    """A Ray Dataset of ``table`` cut into ``blocks`` contiguous blocks, made in the driver.

    Not ``from_arrow(table).repartition(blocks)``: a repartition is an all-to-all step whose split
    tasks each need a whole free CPU, and the stages' actor pools (the vLLM engine, FAISS, the
    scorers) are started first and may leave less than one: ARV with ``llm.cpus_per_engine=2``
    on a 4-CPU local Ray waited forever there.
    """
    import numpy as np
    import ray.data

    n = max(1, min(int(blocks), table.num_rows))
    bounds = np.linspace(0, table.num_rows, n + 1).astype(int)
    return ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def iter_plain_batches(ds: Any, batch_size: int | None = None) -> Iterator[Any]:
    """Stream a Ray Dataset back to the driver as plain ``pyarrow.Table`` batches."""
    import pyarrow as pa

    for batch in ds.iter_batches(batch_format="numpy", batch_size=batch_size):
        yield pa.table({k: plain_column(v) for k, v in batch.items()})


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress log floods a terminal; keep warnings only."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
