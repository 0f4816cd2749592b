"""``llmser-ray serve``: the ``Recommender`` deployment, its Serve application and the command.

One deployment, with the FastAPI ingress built inside each replica (``serving.api``) and the
forward passes behind ``serve.batch``: concurrent requests share one padded ``[B, L]`` forward
instead of B small ones. ``app_builder`` is the RayService / ``serve run`` entry
(``llmser_ray.serving:app_builder``); ``bare_app`` runs the same handlers without Ray.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from ray import serve as ray_serve

from llmser_ray import ports
from llmser_ray.config import Config, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.errors import ConfigError, StageError
from llmser_ray.serving.api import build_api
from llmser_ray.serving.ingress import effective_ingress, start_local_serve
from llmser_ray.serving.state import Query, ServingState, check_llm_pseudo, pick_model

APP_NAME = "llmser"
DEPLOYMENT_NAME = "Recommender"
# How long a replica may go unanswered before the controller replaces it. Small so a killed
# replica is noticed in seconds (each check is one cheap actor call).
HEALTH_CHECK_PERIOD_S = 2.0


@ray_serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=HEALTH_CHECK_PERIOD_S,
                      # Serve's per-request access log costs CPU on every request; errors still log.
                      logging_config={"enable_access_log": False})
@ray_serve.ingress()
class Recommender:
    """One replica: the model state plus the batched forward passes behind the FastAPI ingress."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = Config.model_validate(config)
        sc = self.cfg.serve
        # As many torch threads as whole CPUs reserved (at least one): fractional replicas on a
        # small machine must not each spin up a thread per core.
        torch.set_num_threads(max(1, math.floor(sc.cpus_per_replica)))
        self.state = ServingState(self.cfg)
        self.state.ingress = effective_ingress()
        for method in (self._score, self._candidates):
            method.set_max_batch_size(sc.max_batch_size)
            method.set_batch_wait_timeout_s(sc.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.state, self._score, self._candidates, f"llmser-ray: {self.state.model_name}")

    @ray_serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _score(self, queries: list[Query]) -> list[tuple[list[tuple[int, float]], int]]:
        n = len(queries)
        return [(r, n) for r in self.state.score(queries)]

    @ray_serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _candidates(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        return self.state.candidates(histories)

    def check_health(self) -> None:
        """Serve's periodic probe: the replica is healthy when its model is loaded."""
        if self.state.model is None:
            raise RuntimeError("model not loaded")


def deployment_options(cfg: Config) -> dict[str, Any]:
    """Replicas, autoscaling and resources from ``cfg.serve``."""
    sc = cfg.serve
    # A replica must accept a whole batch at once, and autoscaling needs headroom above its target.
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": sc.cpus_per_replica},
        "max_ongoing_requests": max(sc.max_batch_size, math.ceil(1.5 * sc.target_ongoing_requests)),
    }
    if sc.num_replicas == "auto":
        if sc.min_replicas > sc.max_replicas:
            raise ConfigError(f"serve.min_replicas ({sc.min_replicas}) exceeds serve.max_replicas "
                              f"({sc.max_replicas})", "set min_replicas <= max_replicas")
        opts["autoscaling_config"] = {"min_replicas": sc.min_replicas, "max_replicas": sc.max_replicas,
                                      "target_ongoing_requests": sc.target_ongoing_requests}
    else:
        if sc.num_replicas < 1:
            raise ConfigError(f"serve.num_replicas must be >= 1 or 'auto' (got {sc.num_replicas})",
                              "set serve.num_replicas=1 (or auto with min/max_replicas)")
        opts["num_replicas"] = sc.num_replicas
    return opts


def build_app(cfg: Config) -> Any:
    """The bound Serve application (``serve.run`` it, or return it from a RayService builder)."""
    cfg = cfg.model_copy(update={"workdir": str(cfg.workdir_path)})  # replicas may start elsewhere
    return Recommender.options(**deployment_options(cfg)).bind(cfg.model_dump(mode="json"))


def app_builder(args: dict[str, Any]) -> Any:
    """RayService / ``serve run`` entry: ``import_path: llmser_ray.serving:app_builder``.

    ``args`` (all optional): ``config`` (a YAML path on the cluster), ``workdir`` (absolute, on
    storage every node reads), ``overrides`` (``["serve.max_k=50", ...]`` or a mapping of dotted
    keys to values). HTTP host and port come from the RayService's ``http_options``, not from
    ``serve.host``/``serve.port``.
    """
    args = dict(args or {})
    unknown = set(args) - {"config", "workdir", "overrides"}
    if unknown:
        raise ConfigError(f"unknown app_builder args {sorted(unknown)}",
                          "use config, workdir and overrides")
    raw = args.get("overrides") or []
    overrides = ([f"{k}={json.dumps(v)}" for k, v in raw.items()] if isinstance(raw, dict)
                 else [str(x) for x in raw])
    if args.get("workdir"):
        overrides.append(f"workdir={args['workdir']}")
    return build_app(load_config(args.get("config"), overrides))


def bare_app(cfg: Config) -> FastAPI:
    """The same API and model without Ray: one forward pass per request, no batching (the
    benchmark's floor; also handy to debug the API). Torch threads are the caller's choice."""
    state = ServingState(cfg)

    async def score(q: Query) -> tuple[list[tuple[int, float]], int]:
        return state.score([q])[0], 1

    async def candidates(history: np.ndarray) -> np.ndarray:
        return state.candidates([history])[0]

    return build_api(state, score, candidates, f"llmser-ray (bare): {state.model_name}")


def _preflight(cfg: Config) -> None:
    """Fail fast, in one line, on what the replicas would otherwise fail on after a long start."""
    deployment_options(cfg)
    load_dataset(cfg.workdir_path / "dataset")
    pick_model(cfg)
    check_llm_pseudo(cfg)


def serve(cfg: Config, *, blocking: bool = True, app_name: str = APP_NAME,
          log: Callable[[str], None] | None = None) -> str:
    """Deploy the best checkpoint of ``cfg``'s run with Ray Serve; return the base URL.

    Starts (or joins, with ``ray.address``) Ray, starts Serve's HTTP proxy on
    ``serve.host:serve.port`` (127.0.0.1:8000 by default) and deploys the ``Recommender``
    application at ``/``. With ``blocking`` it serves until Ctrl-C, then deletes the
    application; without, it returns once every replica is up (the caller's Ray must outlive
    this call: an existing cluster, or a Ray the caller started).
    """
    import ray

    from llmser_ray.ray_utils import init_ray

    say = log or (lambda text: print(text, flush=True))
    sc = cfg.serve
    local = not cfg.ray.address and not os.environ.get("RAY_ADDRESS")
    owns_ray = local and not ray.is_initialized()
    if not blocking and owns_ray:
        raise ConfigError("--no-blocking returns at once, and the local Ray this call would start "
                          "stops with this process",
                          "pass --address of a running cluster (`ray start --head`), or drop --no-blocking")
    if local or cfg.workdir_path.is_dir():
        _preflight(cfg)
    if sc.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"[serve] note: listening on {sc.host}, reachable from other machines")
    if owns_ray:
        start_local_serve(cfg, log=say)
    else:
        init_ray(cfg.ray)
        ray_serve.start(http_options={"host": sc.host, "port": sc.port or ports.pick_port(sc.host)})
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if running.host != sc.host or (sc.port and int(running.port) != sc.port):
        raise ConfigError(f"Ray Serve already runs on this cluster at {running.host}:{running.port}",
                          f"serve there with --port {running.port} --host {running.host}, or stop it "
                          "first (`serve shutdown`)")
    t0 = time.perf_counter()
    try:
        ray_serve.run(build_app(cfg), name=app_name, route_prefix="/", blocking=False)
    except RuntimeError as e:
        raise StageError(f"the deployment failed to start: {str(e).strip().splitlines()[-1]}",
                         "read the replica error above (or in the Ray logs), fix it and rerun") from None
    url = f"http://{'[' + sc.host + ']' if ':' in sc.host else sc.host}:{int(running.port)}"
    ingress = _ingress_of(url)
    say(f"[serve] {app_name} up in {time.perf_counter() - t0:.1f}s: {url}  "
        f"(POST {url}/recommend, docs {url}/docs; ingress {ingress})")
    if ingress not in (sc.ingress, "unknown"):
        say(f"[serve] note: serve.ingress={sc.ingress} but this Ray's Serve runs '{ingress}': Serve "
            "reads its ingress flags when Ray starts; start the cluster with the variables of "
            "llmser_ray.serving.serve_env (docs/SERVING.md, cluster/) or set serve.ingress="
            f"{'proxy' if ingress == 'proxy' else 'haproxy'}")
    if not blocking:
        return url
    say("[serve] Ctrl-C to stop")
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, kill) stops as cleanly as Ctrl-C instead of Ray's crash dump.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("[serve] stopping")
        try:
            ray_serve.delete(app_name)
        except Exception as e:  # the cluster may already be going down with us
            print(f"[serve] could not delete the application cleanly: {e}", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return url


def _ingress_of(url: str, timeout_s: float = 15.0) -> str:
    """The ingress a replica reports on /health (the routes may take a moment to reach HAProxy)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                return str(json.loads(r.read()).get("ingress", "unknown"))
        except Exception:
            if time.monotonic() > deadline:
                return "unknown"
            time.sleep(0.5)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
