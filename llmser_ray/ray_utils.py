"""Connecting to Ray: a local cluster by default, an existing one with ``ray.address``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmser_ray.config import RayConfig
from llmser_ray.errors import ConfigError


def cluster_address(cfg: RayConfig) -> str | None:
    """The existing cluster a command joins (``ray.address``, else ``RAY_ADDRESS``), or None.

    None means "start a Ray of our own": no address anywhere, or ``RAY_ADDRESS=local``.
    """
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


def init_ray(cfg: RayConfig, quiet: bool = False) -> str | None:
    """Start or join Ray once per process and return the dashboard URL (if any).

    Nothing of a local Ray is exposed beyond this machine by default: the dashboard binds to
    ``cfg.dashboard_host`` and, with ``cfg.loopback_only``, every other port to 127.0.0.1.

    A local Ray is started with ``address="local"``: a plain ``ray.init()`` would join any
    ``ray start`` cluster already running on the machine (and then fail on ``num_cpus``).
    """
    import ray

    from llmser_ray import console

    if ray.is_initialized():
        return _dashboard_url()
    # Workers must import the package from the same place as the driver.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = cluster_address(cfg)
    try:
        if address:
            _forget_local_env()
            ctx = ray.init(address=address, log_to_driver=True, **console.ray_init_options())
        else:
            with local_start_lock(), loopback_node(cfg.loopback_only):
                dashboard_port = _local_ray_env(cfg)
                ctx = ray.init(
                    address="local",
                    num_cpus=local_cpus(cfg),
                    include_dashboard=cfg.include_dashboard,
                    dashboard_host=cfg.dashboard_host,
                    log_to_driver=True,
                    **({"dashboard_port": dashboard_port} if dashboard_port else {}),
                    **console.ray_init_options(),
                )
    except ConnectionError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at '{address}': {e}",
            "check the address (ray://host:10001 or host:6379) and that the cluster is up, "
            "or drop --address (and unset RAY_ADDRESS) to start a local Ray",
        ) from None
    console.install_driver_filters()
    url = getattr(ctx, "dashboard_url", None) or None
    url = (url if url.startswith("http") else f"http://{url}") if url else None
    if url and not quiet:
        print(f"[ray] dashboard: {url}", flush=True)
    return url


# Where a process's Ray state API client looks for its cluster's dashboard. Without it, a Ray
# worker that queries the state API (Ray Train's PlacementGroupCleaner does, every few seconds)
# auto-detects "the" local cluster and fails with "Found multiple active Ray instances" as soon as
# a second Ray runs on the machine (another user's `ray start`, another command's local Ray).
_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Ray Train's preemption watcher polls for node drains, which a one-machine Ray never has; each
# watcher also logs an error-level line at creation (console.py).
_PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


_DEFAULT_DASHBOARD_PORT = 8265
# The values _local_ray_env put into os.environ, so that a later join of a cluster from the same
# process does not hand them on (Ray Train propagates the preemption switch to its controller).
_set_here: dict[str, str] = {}


# Held by a process while it picks the ports of a local Ray and starts it (tempfile.gettempdir()).
LOCAL_START_LOCK = "llmser-ray-local-start.lock"


@contextmanager
def local_start_lock() -> Iterator[None]:
    """One local Ray start at a time on this machine, from choosing its dashboard port until
    ``ray.init`` returns (the dashboard has bound it by then, or failed).

    Without it, two commands started within a second or two both found 8265 free, both asked Ray
    for it, and the second Ray died with "Failed to find a valid port for dashboard" (seen with
    two trainings started together). An ``flock``, so a killed holder never blocks the next;
    the wait is one Ray start, a few seconds.
    """
    import tempfile

    from llmser_ray.lock import file_lock

    with file_lock(Path(tempfile.gettempdir()) / LOCAL_START_LOCK):
        yield


def _local_ray_env(cfg: RayConfig) -> int | None:
    """Prepare this process's environment (inherited by the raylet and every worker) for a local
    Ray; return the dashboard port chosen for it, or None without a dashboard.

    The port is chosen here (Ray's 8265 while it is free, else ``ports.pick_port``) so that the
    state API address can be named before the workers exist: two local Rays on one machine then
    each query their own. Without a dashboard there is no state API at all, and the address names
    a port nothing listens on: the queries then fail at once with the error the cleaner tolerates
    instead of auto-detecting some other cluster. A preemption setting the user made is kept.
    """
    from llmser_ray.ports import pick_port, port_free

    if _PREEMPTION_ENV not in os.environ:
        _set_here[_PREEMPTION_ENV] = os.environ[_PREEMPTION_ENV] = "0"
    host = cfg.dashboard_host if cfg.dashboard_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    port = (_DEFAULT_DASHBOARD_PORT if cfg.include_dashboard and port_free(host, _DEFAULT_DASHBOARD_PORT)
            else pick_port(host))
    shown = f"[{host}]" if ":" in host else host
    _set_here[_API_SERVER_ENV] = os.environ[_API_SERVER_ENV] = f"http://{shown}:{port}"
    return port if cfg.include_dashboard else None


def _forget_local_env() -> None:
    for key, value in list(_set_here.items()):
        if os.environ.get(key) == value:
            del os.environ[key]
        del _set_here[key]


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


def iter_plain_batches(ds: Any, batch_size: int | None = None, *, label: str | None = None,
                       total: int | None = None, unit: str = "users") -> Iterator[Any]:
    """Stream a Ray Dataset back to the driver as plain ``pyarrow.Table`` batches.

    With ``label`` (and the expected row count ``total``) it reports the stream's progress
    (``console.Progress``: counts, rate, ETA, and a summary line at the end). In a terminal only
    the summary: Ray Data's own bars show the rest there; in a log file a line every 15 s, and
    Ray Data's multi-line progress blocks are switched off for this stream.
    """
    import pyarrow as pa

    from llmser_ray import console

    bar = None
    if label is not None:
        interactive = console.interactive()
        bar = console.Progress(label, total, unit, every=float("inf") if interactive else 15.0)
        if not interactive:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
    for batch in ds.iter_batches(batch_format="numpy", batch_size=batch_size):
        table = pa.table({k: plain_column(v) for k, v in batch.items()})
        yield table
        if bar is not None:
            bar.update(table.num_rows)
    if bar is not None:
        bar.close()


# Seconds between Ray Data's progress blocks in a log file (its default, 10, floods a long run).
_LOG_PROGRESS_EVERY_S = 30


def quiet_ray_data() -> None:
    """Ray Data's console for the stages: progress on, its other INFO chatter off.

    In a terminal Ray Data draws its bars (rows done, rate, ETA, per operator). Writing to a
    file (nohup, CI) it logs a "Total Progress: n/N" block instead, here every 30 s and without
    the per-operator lines. ``--verbose`` keeps all of Ray Data's output.
    """
    import logging

    import ray.data

    from llmser_ray import console

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    if console.is_verbose():
        return
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not console.interactive():
        from ray.data._internal.progress import logging_progress

        ctx.enable_operator_progress_bars = False
        logging.getLogger(logging_progress.__name__).setLevel(logging.INFO)
        if "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL" not in os.environ:
            logging_progress.LoggingExecutionProgressManager.LOG_REPORT_INTERVAL_SEC = _LOG_PROGRESS_EVERY_S
