"""``llmser-ray serve``: the trained recommender behind Ray Serve (docs/SERVING.md).

One concern a module:

- ``schema``: the request/response models and every 4xx (``{"error", "fix", "details"}``);
- ``state``: what a replica holds (``ServingState``) and does per request: resolution, the
  batched forward passes, the per-request LLM call;
- ``api``: the FastAPI routes, built per replica so the schema carries this deployment's limits;
- ``ingress``: Serve's ingress flags, the ports, the local Ray + Serve start;
- ``deployment``: the ``Recommender`` deployment, its application builders and ``serve``;
- ``haproxy``: the ``llmser-ray-haproxy`` wrapper that keeps Serve's HAProxy off the network.

The names below are re-exported here, and ``llmser_ray.serving:app_builder`` stays the
RayService / ``serve run`` import path. They load on first use (PEP 562) instead of at import:
Serve runs ``llmser-ray-haproxy`` (``serving.haproxy``) at every HAProxy start and reload, and
importing it imports this package first, which must therefore not pull in torch, Ray or FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmser_ray.serving.api import CandidatesFn, ScoreFn, build_api
    from llmser_ray.serving.deployment import (
        APP_NAME,
        DEPLOYMENT_NAME,
        HEALTH_CHECK_PERIOD_S,
        Recommender,
        app_builder,
        bare_app,
        build_app,
        deployment_options,
        serve,
    )
    from llmser_ray.serving.ingress import (
        check_explicit_ports,
        effective_ingress,
        serve_env,
        serve_process_ids,
        start_local_serve,
    )
    from llmser_ray.serving.schema import (
        EXAMPLE_BODY,
        MAX_TITLE_CHARS,
        ApiError,
        ErrorResponse,
        HealthResponse,
        ItemResponse,
        RecommendedItem,
        RecommendResponse,
        ResolvedTitle,
        SafeJSONResponse,
        request_model,
    )
    from llmser_ray.serving.state import Query, ServingState, check_llm_pseudo, pick_model

_EXPORTS = {
    "api": ("CandidatesFn", "ScoreFn", "build_api"),
    "deployment": ("APP_NAME", "DEPLOYMENT_NAME", "HEALTH_CHECK_PERIOD_S", "Recommender", "app_builder",
                   "bare_app", "build_app", "deployment_options", "serve"),
    "ingress": ("check_explicit_ports", "effective_ingress", "serve_env", "serve_process_ids",
                "start_local_serve"),
    "schema": ("EXAMPLE_BODY", "MAX_TITLE_CHARS", "ApiError", "ErrorResponse", "HealthResponse",
               "ItemResponse", "RecommendResponse", "RecommendedItem", "ResolvedTitle", "SafeJSONResponse",
               "request_model"),
    "state": ("Query", "ServingState", "check_llm_pseudo", "pick_model"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [  # the names of _EXPORTS (a test checks), spelled out for linters and type checkers
    "APP_NAME", "DEPLOYMENT_NAME", "EXAMPLE_BODY", "HEALTH_CHECK_PERIOD_S", "MAX_TITLE_CHARS",
    "ApiError", "CandidatesFn", "ErrorResponse", "HealthResponse", "ItemResponse", "Query",
    "RecommendResponse", "RecommendedItem", "Recommender", "ResolvedTitle", "SafeJSONResponse",
    "ScoreFn", "ServingState", "app_builder", "bare_app", "build_api", "build_app", "check_explicit_ports",
    "check_llm_pseudo", "deployment_options", "effective_ingress", "pick_model", "request_model", "serve",
    "serve_env", "serve_process_ids", "start_local_serve",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
