"""The FastAPI app: ``/recommend``, ``/items/{id}``, ``/health`` and the docs.

Built per replica (``__serve_build_asgi_app__``) from the replica's state, so the request
schema carries the real limits of this catalogue and this config and ``/openapi.json`` is
exact (a fuzzer generating from it probes the real boundaries). The model calls are passed in:
the Serve deployment hands its batched ones, ``bare_app`` direct ones, and the handlers are the
same in both. Every request is resolved first (ids checked, titles matched, a known user's
sequence looked up); only the forward passes go through ``score``/``candidates``, so a bad
request never enters a batch and cannot fail its neighbours.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmser_ray.serving.schema import (
    EXAMPLE_BODY,
    MAX_TITLE_CHARS,
    ApiError,
    ErrorResponse,
    HealthResponse,
    ItemResponse,
    RecommendResponse,
    SafeJSONResponse,
    _BodyLimit,
    _clip,
    _error,
    _validation_error,
    request_model,
)
from llmser_ray.serving.state import Query, ServingState


def _field_fixes(state: ServingState) -> dict[str, str]:
    sc = state.cfg.serve
    return {
        "k": f"ask for 1 <= k <= {sc.max_k} (serve.max_k)",
        "user_id": f"use a known user id 1..{state.num_users}, or send the history as item_ids or titles",
        "item_ids": f"send 1..{sc.max_history} item ids (1..{state.num_items}), oldest first",
        "titles": f"send 1..{sc.max_history} non-empty titles (at most {MAX_TITLE_CHARS} characters each)",
        "exclude": f"send at most {sc.max_history} item ids (1..{state.num_items})",
        "exclude_history": "send true or false",
        "pseudo": 'send "auto", "on" or "off"',
        "item_id": f"use an item id 1..{state.num_items}",
    }


_HTTP_FIXES = {
    404: "the API serves POST /recommend, GET /items/{id}, GET /health and the docs at /docs",
    405: "see /docs for the method each path takes",
    400: f"send a UTF-8 JSON object, e.g. {EXAMPLE_BODY}",
}


ScoreFn = Callable[[Query], Awaitable[tuple[list[tuple[int, float]], int]]]
CandidatesFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


def build_api(state: ServingState, score: ScoreFn, candidates: CandidatesFn, title: str) -> FastAPI:
    """The FastAPI app; ``score``/``candidates`` are the replica's batched calls (or direct ones)."""
    sc = state.cfg.serve
    Body = request_model(state.num_users, state.num_items, sc.max_k, sc.max_history)
    fields = list(Body.model_fields)
    fixes = _field_fixes(state)
    errors = {code: {"model": ErrorResponse} for code in (400, 404, 405, 413, 415, 422)}
    api = FastAPI(title=title, version="1", default_response_class=SafeJSONResponse,
                  description="Next-item recommendations from a trained LLMSeR recommender. "
                              "Every 4xx body is {error, fix, details}.")
    api.add_middleware(_BodyLimit, limit=sc.max_body_bytes)

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> SafeJSONResponse:
        return _error(exc.status, exc.problem, exc.fix, exc.details)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> SafeJSONResponse:
        return _validation_error(exc, fixes, fields)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        if exc.status_code == 404:
            problem = f"no such path: {_clip(request.url.path)}"
        elif exc.status_code == 405:
            problem = f"{request.method} is not allowed on {_clip(request.url.path)}"
        elif exc.status_code == 400:
            problem = "the request body could not be read (it is not UTF-8 JSON)"
        else:
            problem = str(exc.detail)
        return _error(exc.status_code, problem, _HTTP_FIXES.get(exc.status_code, "see /docs"),
                      headers=getattr(exc, "headers", None))

    async def recommend(body: Any) -> SafeJSONResponse:
        q = await state.resolve(body)
        if q.want_candidates:
            cands = await candidates(q.history)
            prefix = await state.llm_prefix(q.history, cands) if state.llm is not None else None
            if prefix is not None:
                q.prefix, q.pseudo_source = prefix, "llm"
            else:
                q.prefix, q.pseudo_source = state.pseudo_prefix(cands), "candidates"
        ranked, batch = await score(q)
        return SafeJSONResponse(state.render(q, ranked), headers={"x-batch-size": str(batch)})

    # The body model is built at run time, so its annotation is set here (a string annotation,
    # as ``from __future__ import annotations`` makes it, could not be resolved by FastAPI).
    recommend.__annotations__["body"] = Body
    api.post("/recommend", response_model=RecommendResponse, responses=errors,
             summary="Top-k next items for a known user or an ad-hoc history")(recommend)

    @api.get("/health", response_model=HealthResponse, summary="Liveness and what this replica serves")
    async def health() -> SafeJSONResponse:
        return SafeJSONResponse(state.health())

    @api.get("/items/{item_id}", response_model=ItemResponse, responses=errors, summary="One catalogue item")
    async def item(item_id: Annotated[int, PathParam(ge=1, description="Item id")]) -> SafeJSONResponse:
        found = state.items.get(item_id)
        if found is None:
            raise ApiError(404, f"item {item_id} does not exist (ids are 1..{state.num_items})",
                           fixes["item_id"])
        return SafeJSONResponse(found)

    return api
