"""How HTTP reaches the replicas: Serve's ingress flags, the ports, and the local start.

Serve reads its ingress flags when Ray starts its processes, so they are environment
variables set before ``ray.init`` (``serve_env``), not deployment options. Ports the user set
are used as given and checked first; picked ones are picked again when lost to a race.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from ray import serve as ray_serve

from llmser_ray import ports
from llmser_ray.config import Config, ServeConfig
from llmser_ray.errors import ConfigError, StageError


def effective_ingress() -> str:
    """How this Serve process receives HTTP, as Serve's own flags (read when Ray started) say."""
    from ray.serve._private import constants as c

    if c.RAY_SERVE_ENABLE_HA_PROXY:
        return "haproxy"
    return "direct" if c.RAY_SERVE_ENABLE_DIRECT_INGRESS else "proxy"


def serve_env(sc: ServeConfig) -> dict[str, str]:
    """Environment variables the Ray processes need for ``sc.ingress`` (``serve.*`` config).

    Serve reads its ingress flags when its processes start, so they must be in the environment
    before Ray starts: ``start_local_serve`` sets them for the local Ray it starts; a cluster sets
    them on every node (cluster/ configs do). ``haproxy`` = Serve's throughput-optimised mode
    (direct ingress to the replicas, HAProxy in front, user code on the replica's event loop)
    with our ``llmser-ray-haproxy`` wrapper, which keeps HAProxy's listeners on ``sc.host`` and
    puts its stats page and Prometheus exporter on unix sockets unless a TCP port is asked for
    (serving/haproxy.py). The fallback proxy's port (HAProxy's backup server while no replica is
    up) is picked outside the ephemeral range each call, so two deployments on one machine do
    not collide and Ray's own connections cannot take it (ports.py). Explicit ports are used as
    given (``check_explicit_ports`` runs where Ray starts: ``start_local_serve``).
    """
    if sc.ingress != "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    wrapper = Path(sys.executable).with_name("llmser-ray-haproxy")
    if not (wrapper.is_file() and os.access(wrapper, os.X_OK)):
        raise ConfigError(f"serve.ingress=haproxy needs the llmser-ray-haproxy script in {wrapper.parent}",
                          "reinstall the package (`make install` or `pip install -e .`), or "
                          "set serve.ingress=proxy")
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper), "LLMSER_HAPROXY_BIND": sc.host,
           "LLMSER_HAPROXY_UNIX_LISTENERS": ",".join(
               name for name, port in (("stats", sc.stats_port), ("prometheus", sc.metrics_port))
               if not port),
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(sc.fallback_port or ports.pick_port(sc.host))}
    if sc.stats_port:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(sc.stats_port)
    if sc.metrics_port:
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(sc.metrics_port)
    return env


_EXPLICIT_PORTS = (("port", "--port N (or --set serve.port=N; 0 picks a free one)"),
                   ("stats_port", "--set serve.stats_port=N (0: a unix socket)"),
                   ("metrics_port", "--set serve.metrics_port=N (0: a unix socket)"),
                   ("fallback_port", "--set serve.fallback_port=N (0 picks a free one)"))


def check_explicit_ports(sc: ServeConfig) -> None:
    """A ``ConfigError`` naming the first port the user set that cannot be bound on ``sc.host``."""
    for key, how in _EXPLICIT_PORTS:
        port = getattr(sc, key)
        if key != "port" and sc.ingress != "haproxy":
            continue
        if port and not ports.port_free(sc.host, port):
            raise ConfigError(f"serve.{key}: port {port} on {sc.host} is already in use",
                              f"stop what listens there or pick another with {how}")


def _bind_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("address already in use", "cannot bind", "failed to bind", "errno 98"))


def start_local_serve(cfg: Config, attempts: int = 3, log: Callable[[str], None] | None = None) -> None:
    """Start this process's local Ray with Serve's ingress flags, and Serve's HTTP ingress on it.

    The one start that ``serve`` and the serving tests share. The ports are checked when picked
    and lie outside the ephemeral range, but another process may still bind one before HAProxy
    or the fallback proxy does; Serve then fails to start within seconds (HAProxy "cannot bind
    socket", the proxy "address already in use"). Such a start is torn down and retried with
    freshly picked ports; a port the user set is never replaced: its conflict is a
    ``ConfigError`` naming it.
    """
    import ray

    from llmser_ray.ray_utils import init_ray

    say = log or (lambda text: print(text, flush=True))
    sc = cfg.serve
    for attempt in range(1, attempts + 1):
        live = sc if sc.port else sc.model_copy(update={"port": ports.pick_port(sc.host)})
        check_explicit_ports(sc)
        os.environ.update(serve_env(live))  # Serve's processes read these when Ray starts them
        init_ray(cfg.ray)
        try:
            ray_serve.start(http_options={"host": live.host, "port": live.port})
            return
        except Exception as e:
            if not _bind_failure(e):
                raise
            reason = str(e).strip().splitlines()[-1][:200]
            ray_serve.shutdown()
            ray.shutdown()
            check_explicit_ports(sc)
            if attempt == attempts:
                raise StageError(f"Serve could not bind its ports in {attempts} tries: {reason}",
                                 "free some ports on this machine, or set serve.port, "
                                 "serve.fallback_port to free ones") from None
            say(f"[serve] a port was taken while Serve started ({reason}); retrying with fresh ports")


def serve_process_ids(app: str = "llmser") -> dict[str, int]:
    """PIDs by role: the Serve proxies (with HAProxy also the fallback proxy, HAProxy's backup
    while no replica is up), the controller, ``app``'s replicas, and the HAProxy children of the
    proxies on this node (psutil reads the local process table). Asked of the actors themselves,
    as other people's Serve processes on a shared machine carry the same names. Serve restarts
    HAProxy on every config reload (the old one drains and exits), so the ``haproxy-<pid>``
    entries are a snapshot that may go stale."""
    import psutil
    import ray

    pids: dict[str, int] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if a.get("namespace") != "serve":
            continue
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            role = f"replica-{name.rsplit('#', 1)[-1]}"
        elif name.startswith("SERVE_PROXY_ACTOR-fallback"):
            role = "fallback-proxy"
        elif name.startswith("SERVE_PROXY_ACTOR"):
            role = "proxy"
        elif name.startswith("SERVE_CONTROLLER_ACTOR"):
            role = "controller"
        else:
            continue
        if role in pids:  # one proxy per node: name the others by their node
            role = f"{role}-{name.rsplit('-', 1)[-1][:8]}"
        handle = ray.get_actor(name, namespace="serve")
        pids[role] = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()))
    for role, pid in list(pids.items()):
        if not role.startswith("proxy"):
            continue
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                if "haproxy" in child.name():
                    pids[f"haproxy-{child.pid}"] = child.pid
            except psutil.NoSuchProcess:
                continue
    return pids
