"""``llmser-ray serve``: the trained recommender behind Ray Serve (docs/SERVING.md).

Why this shape:
- One deployment, ``Recommender``, with a FastAPI ingress built inside each replica
  (``__serve_build_asgi_app__``): the request schema carries the real limits of this catalogue
  and this config (item id range, ``serve.max_k``, ``serve.max_history``), so the OpenAPI spec at
  ``/openapi.json`` is exact and a fuzzer generating from it (schemathesis, in the tests) probes
  the real boundaries.
- Every request is resolved first (ids checked, titles matched, a known user's sequence looked
  up), then only the model forward passes go through ``serve.batch``: concurrent requests share
  one padded ``[B, L]`` forward instead of B small ones. Resolution errors never enter a batch,
  so one bad request cannot fail its neighbours.
- Bad input is the client's problem and says so: every 4xx body is ``{"error", "fix",
  "details"}``. Bodies are parsed by FastAPI (a decode failure is a 400), validated strictly
  (``"5"`` is not an item id), size-limited before parsing (413), and rendered with
  ``ensure_ascii`` so that even a lone surrogate in an echoed title cannot turn into a 500.
- Known users are served exactly as the evaluation scores them: the full known sequence, with
  the stored pseudo-prior prefix (``llmser_ray.augment.weights``) only when the served model is
  a dual-channel model, using the dual settings recorded with that model.
- The same request handlers run without Ray (``bare_app``): the benchmark's floor, and a way to
  debug the API without a cluster.

Nothing here unpickles: models are safetensors + JSON (``training.load_trained``), the rest is
Parquet and JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from ray import serve as ray_serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmser_ray import ports
from llmser_ray.config import Config, DualConfig, ServeConfig, load_config
from llmser_ray.data.dataset import SeqDataset, load_dataset
from llmser_ray.data.padding import pad_left
from llmser_ray.errors import ConfigError, StageError
from llmser_ray.io import read_manifest

APP_NAME = "llmser"
DEPLOYMENT_NAME = "Recommender"
MAX_TITLE_CHARS = 1000
# How long a replica may go unanswered before the controller replaces it. Small so a killed
# replica is noticed in seconds (each check is one cheap actor call).
HEALTH_CHECK_PERIOD_S = 2.0
EXAMPLE_BODY = '{"item_ids": [1, 2, 3], "k": 10}'


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A client error: rendered as ``{"error": problem, "fix": fix}`` with ``status``."""

    def __init__(self, status: int, problem: str, fix: str, details: list[dict[str, Any]] | None = None):
        super().__init__(problem)
        self.status = status
        self.problem = problem
        self.fix = fix
        self.details = details or []


class SafeJSONResponse(JSONResponse):
    """JSON that cannot fail to encode: ASCII-escaped (lone surrogates survive), no NaN."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, problem: str, fix: str, details: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"error": problem, "fix": fix, "details": details or []}, status_code=status,
                            headers=headers)


def _clip(value: Any, n: int = 80) -> str:
    """A short, printable rendering of a client's value for an error message."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def _loc(loc: tuple[Any, ...]) -> str:
    """``("body", "item_ids", 3)`` -> ``item_ids[3]``."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


# ----------------------------------------------------------------------------- the model state


def _norm_title(title: str) -> str:
    """Case-, width- and whitespace-insensitive key for exact title matching."""
    return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


def pick_model(cfg: Config) -> tuple[str, Path]:
    """The model folder to serve: ``serve.model``, else ``<backbone>-llmser``, else ``<backbone>``."""
    models = cfg.workdir_path / "models"

    def ok(name: str) -> bool:
        return (models / name / "best" / "model.json").is_file()

    if cfg.serve.model:
        if not ok(cfg.serve.model):
            have = sorted(p.parent.parent.name for p in models.glob("*/best/model.json"))
            raise StageError(f"no trained model '{cfg.serve.model}' in {models}",
                             f"set serve.model to one of {have or '(none yet)'} or run `llmser-ray train`")
        return cfg.serve.model, models / cfg.serve.model
    for name in (f"{cfg.model.backbone}-llmser", cfg.model.backbone):
        if ok(name):
            return name, models / name
    raise StageError(f"no trained {cfg.model.backbone} model in {models}",
                     "run `llmser-ray train` with the same --workdir (or set serve.model)")


@dataclass
class Query:
    """One resolved request: what the model reads, what it must not return, and how it was built."""

    history: np.ndarray
    k: int
    exclude: np.ndarray
    source: str
    prefix: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pseudo_source: str = "none"
    want_candidates: bool = False
    resolved: list[dict[str, Any]] | None = None

    @property
    def sequence(self) -> np.ndarray:
        return np.concatenate([self.prefix, self.history]) if len(self.prefix) else self.history


class ServingState:
    """Everything one replica holds: the dataset, the served model, the reverse model (pseudo
    items for short ad-hoc histories), the known users' pseudo prefixes and the title index."""

    def __init__(self, cfg: Config) -> None:
        from llmser_ray.training import load_trained

        self.cfg = cfg
        sc = cfg.serve
        self.ds: SeqDataset = load_dataset(cfg.workdir_path / "dataset")
        self.model_name, model_dir = pick_model(cfg)
        self.model, self.meta = load_trained(model_dir)
        if int(self.meta["num_items"]) != self.ds.num_items:
            raise StageError(f"model {self.model_name} was trained on {self.meta['num_items']} items but "
                             f"the dataset has {self.ds.num_items}",
                             "retrain the model on this dataset (`llmser-ray train --force`)")
        self.num_items = self.ds.num_items
        self.num_users = self.ds.num_users
        self.titles = [""] * (self.num_items + 1)
        self.items: dict[int, dict[str, Any]] = {}
        self._build_catalogue()
        self.prefixes = self._known_prefixes()
        self.backbone = str(self.meta["model"]["backbone"])
        self.reverse = self._reverse_model()
        self.embedder: Any = None
        self.vectors: np.ndarray | None = None
        self.embedding_note = self._title_embeddings()
        self.llm: Any = self._llm_selector() if sc.llm_pseudo else None
        self.batches: dict[str, int] = {"score": 0, "candidates": 0}
        self.ingress = "bare"  # the Serve deployment sets its effective ingress

    # -- loading

    def _build_catalogue(self) -> None:
        t = self.ds.items_table
        ids = t.column("item_id").to_pylist()
        titles = t.column("title").to_pylist()
        attrs = t.column("attributes").to_pylist() if "attributes" in t.column_names else [[]] * len(ids)
        original = (t.column("original_item").to_pylist() if "original_item" in t.column_names
                    else [str(i) for i in ids])
        pop = self.ds.popularity
        index: dict[str, int] = {}
        for i, title, a, o in zip(ids, titles, attrs, original, strict=True):
            title = title or ""
            self.titles[i] = title
            self.items[i] = {"item_id": i, "title": title, "attributes": list(a or []),
                             "original_item": str(o), "popularity": int(pop[i])}
            key = _norm_title(title)
            # Duplicate titles: the most popular item wins (ties: the smaller id).
            if key and (key not in index or pop[i] > pop[index[key]]):
                index[key] = i
        self.title_index = index

    def _served_dual(self) -> DualConfig | None:
        """The dual settings the served model was trained with (None for a plain backbone)."""
        recorded = self.meta.get("dual")
        if not recorded:
            return None
        return DualConfig.model_validate(recorded)

    def _known_prefixes(self) -> dict[int, np.ndarray]:
        """Pseudo-prior prefix per augmented known user, exactly as dual training and evaluation
        build it; empty when the model is a plain backbone, when ``dual.infer_augmented`` is off
        (in the model's settings or this config), or when the augmentation folders are absent."""
        dual = self._served_dual()
        if dual is None or not (dual.infer_augmented and self.cfg.dual.infer_augmented):
            return {}
        try:
            from llmser_ray.augment.weights import load_augmentation
        except ImportError:
            return {}
        cfg = self.cfg.model_copy(update={"dual": dual})
        try:
            aug = load_augmentation(cfg, self.ds)
        except StageError as e:
            # Served anyway (every user from the whole sequence), but said: /health shows
            # augmented_users 0 and the replica log says why.
            print(f"[serve] {self.model_name}: no stored pseudo items ({e})", file=sys.stderr, flush=True)
            return {}
        return {u + 1: p for u, p in enumerate(aug.pseudo) if len(p)}

    def _reverse_model(self) -> Any:
        from llmser_ray.training import load_trained

        folder = self.cfg.workdir_path / "models" / f"{self.backbone}-reverse"
        if not (folder / "best" / "model.json").is_file():
            if self.cfg.serve.pseudo_for_short or self.cfg.serve.llm_pseudo:
                raise StageError(f"serve.pseudo_for_short needs the reverse-trained model {folder}",
                                 "train it with `llmser-ray train --set train.reverse=true` "
                                 "(or set serve.pseudo_for_short=0)")
            return None
        model, meta = load_trained(folder)
        if int(meta["num_items"]) != self.num_items:
            raise StageError(f"{folder} was trained on another dataset ({meta['num_items']} items)",
                             "retrain it with `llmser-ray train --set train.reverse=true --force`")
        return model

    def _title_embeddings(self) -> str:
        """Load the embedding fallback for titles when ``embeddings/`` exists; say why not otherwise."""
        folder = self.cfg.workdir_path / "embeddings"
        if read_manifest(folder) is None:
            return "there is no embedding index (run `llmser-ray embed` to match titles approximately)"
        try:
            from llmser_ray.text.embed import Embedder, load_item_vectors
        except ImportError as e:
            return f"the embedding index cannot be loaded ({e})"
        vectors = np.ascontiguousarray(load_item_vectors(self.cfg.workdir_path), dtype=np.float32)
        if vectors.shape[0] != self.num_items + 1:
            raise StageError(f"{folder} holds {vectors.shape[0] - 1} item vectors, the dataset "
                             f"{self.num_items} items", "rerun `llmser-ray embed --force`")
        self.embedder = Embedder(self.cfg.embed)
        if self.embedder.dim != vectors.shape[1]:
            raise StageError(f"embed.model gives {self.embedder.dim}-d vectors, {folder} holds "
                             f"{vectors.shape[1]}-d ones",
                             "serve with the embed.model the index was built with")
        self.vectors = vectors
        return ""

    def _llm_selector(self) -> Any:
        """The LLM that picks pseudo items among the candidates (``serve.llm_pseudo``): an
        OpenAI-compatible endpoint (a vLLM server, Ray Serve LLM, a hosted API), asked once per
        request that takes the candidate path."""
        check_llm_pseudo(self.cfg)
        from llmser_ray.llm.openai_backend import OpenAIBatch

        return OpenAIBatch(self.cfg.llm.model_dump(mode="json"), cache_dir=None)

    async def llm_prefix(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray | None:
        """SIA at request time: the LLM picks among the candidates with the augment stage's prompt
        and constrained answer, grounded the same way; None when it gives nothing usable (the
        caller then falls back to the collaborative candidates, so an LLM outage costs quality,
        never a failed request)."""
        from llmser_ray.augment.grounding import ground_numbers
        from llmser_ray.augment.prompts import selection_messages, selection_schema
        from llmser_ray.augment.weights import order_by_candidate_rank
        from llmser_ray.llm.requests import Request

        a = self.cfg.augment
        if not len(candidates):
            return None
        n = min(a.ask_items, len(candidates))
        texts = self.ds.item_text
        messages = selection_messages([texts[i] for i in history[-a.prompt_history:]],
                                      [texts[i] for i in candidates], n, numbered=True)
        request = Request(messages, json.dumps(selection_schema(len(candidates), n)), [])
        # OpenAIBatch.answer runs its own event loop: keep it off the replica's.
        reply = (await asyncio.to_thread(self.llm.answer, [request]))[0]
        if reply.status not in ("ok", "truncated"):
            return None
        picked = ground_numbers(reply.reply, candidates, n, truncated=reply.status == "truncated").items
        if not picked:
            return None
        dual = self._served_dual() or self.cfg.dual
        prefix = np.asarray(picked[: dual.num_pseudo], dtype=np.int64)
        return order_by_candidate_rank(prefix, candidates) if dual.order == "candidate" else prefix

    # -- request resolution (per request, before batching)

    async def resolve(self, req: Any) -> Query:
        sc = self.cfg.serve
        k = int(req.k)
        extra = np.asarray(req.exclude, dtype=np.int64)
        if req.user_id is not None:
            uid = int(req.user_id)
            history = self.ds.sequences[uid - 1]
            q = Query(history, k, extra, "user")
            prefix = self.prefixes.get(uid)
            if req.pseudo != "off" and prefix is not None:
                q.prefix, q.pseudo_source = prefix, "augmentation"
            elif req.pseudo == "on":
                q.want_candidates = True
        else:
            if req.item_ids is not None:
                history = np.asarray(req.item_ids, dtype=np.int64)
                q = Query(history, k, extra, "item_ids")
            else:
                ids, resolved = await self._resolve_titles(list(req.titles))
                q = Query(np.asarray(ids, dtype=np.int64), k, extra, "titles", resolved=resolved)
            q.want_candidates = req.pseudo == "on" or (
                req.pseudo == "auto" and 0 < len(q.history) <= sc.pseudo_for_short)
        if q.want_candidates and self.reverse is None:
            raise ApiError(422, "pseudo=\"on\" needs pseudo-prior items, but this deployment has no "
                                f"reverse-trained model ({self.backbone}-reverse)",
                           "send pseudo=\"auto\" or \"off\", or train the reverse model with "
                           "`llmser-ray train --set train.reverse=true` and redeploy")
        if req.exclude_history:
            q.exclude = np.concatenate([q.history, extra])
        return q

    async def _resolve_titles(self, titles: list[str]) -> tuple[list[int], list[dict[str, Any]]]:
        ids: list[int] = [0] * len(titles)
        resolved: list[dict[str, Any]] = [{}] * len(titles)
        pending: list[int] = []
        for i, title in enumerate(titles):
            key = _norm_title(title)
            if not key:
                raise ApiError(422, f"titles[{i}] is blank", "send the item's title, or its id in item_ids")
            hit = self.title_index.get(key)
            if hit is None:
                pending.append(i)
            else:
                ids[i] = hit
                resolved[i] = {"title": title, "item_id": hit, "match": "exact", "similarity": 1.0}
        if pending:
            if self.vectors is None:
                i = pending[0]
                raise ApiError(422, f"titles[{i}]={_clip(titles[i])} matches no catalogue title exactly "
                                    f"(case and spacing are ignored), and {self.embedding_note}",
                               "send an exact title (GET /items/{id} shows them) or the item ids in item_ids")
            best, sims = await asyncio.to_thread(self._nearest, [titles[i] for i in pending])
            floor = self.cfg.augment.min_similarity
            for j, i in enumerate(pending):
                item, sim = int(best[j]), float(sims[j])
                if not sim >= floor:
                    raise ApiError(
                        422, f"titles[{i}]={_clip(titles[i])} matches no catalogue item: the closest, "
                             f"item {item} {_clip(self.titles[item], 60)}, has cosine {sim:.2f} < {floor} "
                             "(augment.min_similarity)",
                        "send a more complete title (GET /items/{id} shows them) or the item ids in item_ids")
                ids[i] = item
                resolved[i] = {"title": titles[i], "item_id": item, "match": "embedding",
                               "similarity": round(sim, 4)}
        return ids, resolved

    def _nearest(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        assert self.vectors is not None and self.embedder is not None
        q = self.embedder.encode(texts)
        sims = q @ self.vectors[1:].T
        best = sims.argmax(axis=1)
        return best + 1, sims[np.arange(len(texts)), best]

    # -- batched model calls

    @staticmethod
    def _topk(model: Any, seqs: list[np.ndarray], exclude: list[np.ndarray], k: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """``[B, k]`` best items and scores; padding, excluded items and NaN scores never appear
        (their slots hold item 0 / -inf when fewer than k items are eligible)."""
        width = max(1, min(model.max_len, max(len(s) for s in seqs)))
        with torch.inference_mode():
            scores = model.score_all(torch.from_numpy(pad_left(seqs, width))).float()
            scores = scores.masked_fill(scores.isnan(), -math.inf)
            scores[:, 0] = -math.inf
            lens = [len(e) for e in exclude]
            if sum(lens):
                rows = torch.from_numpy(np.repeat(np.arange(len(seqs)), lens))
                cols = torch.from_numpy(np.concatenate(exclude).astype(np.int64, copy=False))
                scores[rows, cols] = -math.inf
            top = torch.topk(scores, min(k, scores.shape[1] - 1), dim=1)
        items, vals = top.indices.numpy(), top.values.numpy()
        items = np.where(np.isfinite(vals), items, 0)
        return items, vals

    def score(self, queries: list[Query]) -> list[list[tuple[int, float]]]:
        self.batches["score"] += 1
        kmax = max(q.k for q in queries)
        seqs, exclude = [q.sequence for q in queries], [q.exclude for q in queries]
        items, vals = self._topk(self.model, seqs, exclude, kmax)
        out = []
        for row, q in enumerate(queries):
            out.append([(int(i), float(v)) for i, v in zip(items[row, : q.k], vals[row, : q.k], strict=True)
                        if i > 0])
        return out

    def candidates(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        """The reverse model's top ``augment.num_candidates`` for the item before each history."""
        self.batches["candidates"] += 1
        k = self.cfg.augment.num_candidates
        items, _ = self._topk(self.reverse, [h[::-1].copy() for h in histories], list(histories), k)
        return [row[row > 0] for row in items]

    def pseudo_prefix(self, candidates: np.ndarray) -> np.ndarray:
        """Chronological prefix from ranked candidates: the top ``dual.num_pseudo``, reversed.

        The reverse model scores every item as *the one just before the first real item*; its
        best candidate is therefore placed last, next to the history, and weaker ones further
        back. This is the prefix the no-LLM dual-channel ablation trains on
        (``augment.weights.load_augmentation``, pseudo_source=candidates)."""
        n = (self._served_dual() or self.cfg.dual).num_pseudo
        return candidates[:n][::-1].copy()

    # -- responses

    def render(self, q: Query, ranked: list[tuple[int, float]]) -> dict[str, Any]:
        return {
            "items": [{"item_id": i, "title": self.titles[i], "score": s} for i, s in ranked],
            "model": self.model_name, "source": q.source, "history_len": int(len(q.history)),
            "pseudo_items": [int(x) for x in q.prefix], "pseudo_source": q.pseudo_source,
            "resolved_titles": q.resolved,
        }

    def health(self) -> dict[str, Any]:
        sc = self.cfg.serve
        return {"status": "ok", "model": self.model_name, "num_items": self.num_items,
                "num_users": self.num_users, "augmented_users": len(self.prefixes),
                "pseudo_for_short": sc.pseudo_for_short, "reverse_model": self.reverse is not None,
                "title_embeddings": self.vectors is not None, "max_k": sc.max_k,
                "max_history": sc.max_history, "batches": dict(self.batches), "ingress": self.ingress}


# ----------------------------------------------------------------------------- the HTTP API


class RecommendedItem(BaseModel):
    item_id: int
    title: str
    score: float


class ResolvedTitle(BaseModel):
    title: str
    item_id: int
    match: Literal["exact", "embedding"]
    similarity: float


class RecommendResponse(BaseModel):
    items: list[RecommendedItem] = Field(
        description="Best first; fewer than k when fewer items are eligible.")
    model: str = Field(description="The model folder that produced the scores.")
    source: Literal["user", "item_ids", "titles"]
    history_len: int = Field(
        description="Real items read (a known user's whole sequence, or the ad-hoc history).")
    pseudo_items: list[int] = Field(
        description="Pseudo-prior items prepended before the history (oldest first).")
    pseudo_source: Literal["none", "augmentation", "candidates", "llm"]
    resolved_titles: list[ResolvedTitle] | None = Field(
        None, description="For a titles request: the item each title resolved to, in order.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong with the request.")
    fix: str = Field(description="How to fix it.")
    details: list[dict[str, Any]] = Field(default_factory=list)


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    num_items: int
    num_users: int
    augmented_users: int
    pseudo_for_short: int
    reverse_model: bool
    title_embeddings: bool
    max_k: int
    max_history: int
    batches: dict[str, int]
    ingress: Literal["haproxy", "direct", "proxy", "bare"] = Field(
        description="how requests reach this replica: haproxy (HAProxy straight to the replica's own "
                    "HTTP server), direct (the replica's own port, no balancer), proxy (Serve's "
                    "Python HTTP proxy), bare (no Ray Serve)")


class ItemResponse(BaseModel):
    item_id: int
    title: str
    attributes: list[str]
    original_item: str
    popularity: int


class _RecommendBase(BaseModel):
    """Shared rules of the (per-deployment) request model: strict types, no unknown fields, no
    explicit nulls, exactly one of ``user_id`` / ``item_ids`` / ``titles``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [k for k, v in data.items() if v is None]
            if nulls:
                raise ValueError(f"'{nulls[0]}' is null: leave the field out instead")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> _RecommendBase:
        given = [k for k in ("user_id", "item_ids", "titles") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of user_id, item_ids or titles "
                             f"(got {', '.join(given) if given else 'none'})")
        return self


def _optional(schema: dict[str, Any]) -> None:
    """An optional field's schema without ``"default": null``: absent is the only way to omit it."""
    schema.pop("default", None)


def request_model(num_users: int, num_items: int, max_k: int, max_history: int) -> type[BaseModel]:
    """The ``/recommend`` body with this deployment's limits in its JSON schema.

    The three sources are typed without ``| None`` (their default, None, means "absent" and is
    never validated), so the schema says exactly what is accepted and errors point at the field,
    not at a branch of a union; ``oneOf`` states that exactly one source is given.
    """
    item = Annotated[int, Field(ge=1, le=num_items)]
    title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]
    one_of = [{"required": [k]} for k in ("user_id", "item_ids", "titles")]
    examples = [{"item_ids": [1, 2, 3], "k": 10}, {"user_id": 1, "k": 5},
                {"titles": ["some item title"], "k": 10, "exclude": [2]}]
    base = type("_RecommendLimits", (_RecommendBase,), {"model_config": ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"oneOf": one_of, "examples": examples})})
    return create_model(  # type: ignore[call-overload,no-any-return]
        "RecommendRequest",
        __base__=base,
        user_id=(int, Field(
            None, ge=1, le=num_users, json_schema_extra=_optional,
            description=f"A known user (1..{num_users}): served from the user's whole sequence.")),
        item_ids=(list[item], Field(
            None, min_length=1, max_length=max_history, json_schema_extra=_optional,
            description=f"An ad-hoc history of item ids (1..{num_items}), oldest first.")),
        titles=(list[title], Field(
            None, min_length=1, max_length=max_history, json_schema_extra=_optional,
            description="An ad-hoc history of item titles, oldest first: matched exactly (ignoring case "
                        "and spacing), else by text embedding when the index exists.")),
        k=(int, Field(min(10, max_k), ge=1, le=max_k, description="How many items to return.")),
        exclude=(list[item], Field(default_factory=list, max_length=max_history,
                                   description="Item ids never to return.")),
        exclude_history=(bool, Field(True, description="Never return items of the real history.")),
        pseudo=(Literal["auto", "on", "off"], Field(
            "auto", description="Pseudo-prior items: auto = a known augmented user's stored prefix, or "
                                "collaborative candidates for an ad-hoc history of at most "
                                "serve.pseudo_for_short items; on = always; off = never.")),
    )


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


def _validation_error(exc: RequestValidationError, fixes: dict[str, str],
                      fields: list[str]) -> SafeJSONResponse:
    errors = list(exc.errors())
    details = [{"loc": _loc(tuple(e.get("loc", ()))), "type": e.get("type", ""), "msg": e.get("msg", "")}
               for e in errors[:20]]
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    where = _loc(loc)
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        pos = loc[1] if len(loc) > 1 else "?"
        return _error(400, f"the request body is not valid JSON ({ctx.get('error', 'decode error')} at "
                           f"character {pos})", f"send a JSON object, e.g. {EXAMPLE_BODY}", details)
    if loc == ("body",) and isinstance(exc.body, bytes | bytearray):
        return _error(415, "the request body was not sent as JSON",
                      f"send it with 'Content-Type: application/json', e.g. {EXAMPLE_BODY}", details)
    if loc == ("body",) and kind in ("missing", "model_type", "dict_type", "model_attributes_type"):
        return _error(422, "the request body must be a JSON object", f"send e.g. {EXAMPLE_BODY}", details)
    if kind == "extra_forbidden":
        return _error(422, f"unknown field '{where}'", f"allowed fields: {', '.join(fields)}", details)
    field_name = next((str(p) for p in loc[1:] if isinstance(p, str)), "")
    fix = fixes.get(field_name, f"see the request schema at /docs, e.g. {EXAMPLE_BODY}")
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    if kind == "value_error" and loc in (("body",), ()):
        problem = msg
        fix = f"send e.g. {EXAMPLE_BODY}"
    elif "input" in first and kind != "missing":
        problem = f"{where}: {msg} (got {_clip(first['input'])})"
    else:
        problem = f"{where}: {msg}"
    return _error(422, problem, fix, details)


_HTTP_FIXES = {
    404: "the API serves POST /recommend, GET /items/{id}, GET /health and the docs at /docs",
    405: "see /docs for the method each path takes",
    400: f"send a UTF-8 JSON object, e.g. {EXAMPLE_BODY}",
}


class _BodyLimit:
    """Reject bodies over ``limit`` bytes with a 413 before anything parses them: by the
    Content-Length header when there is one, by counting the streamed chunks otherwise."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fix = f"send at most {self.limit} bytes (serve.max_body_bytes): a shorter history or fewer exclusions"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _error(400, "the Content-Length header is not a number",
                                 "send a valid Content-Length")(scope, receive, send)
                    return
                if declared > self.limit:
                    problem = f"the request body has {declared} bytes, over the limit of {self.limit}"
                    await _error(413, problem, fix, headers={"connection": "close"})(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _error(413, f"the request body exceeds the limit of {self.limit} bytes", fix,
                             headers={"connection": "close"})(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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


# ----------------------------------------------------------------------------- Ray Serve


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
    (serve_haproxy.py). The fallback proxy's port (HAProxy's backup server while no replica is
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


def check_llm_pseudo(cfg: Config) -> None:
    """``serve.llm_pseudo`` asks an endpoint per request: a vLLM engine inside a replica is not
    what a latency-bound server should hold, so only the OpenAI-compatible backend is accepted."""
    if cfg.serve.llm_pseudo and cfg.llm.backend != "openai":
        raise ConfigError("serve.llm_pseudo asks an OpenAI-compatible endpoint per request, but "
                          f"llm.backend is '{cfg.llm.backend}'",
                          "set llm.backend=openai and llm.base_url (e.g. a vLLM server at "
                          "http://127.0.0.1:8001/v1), or serve.llm_pseudo=false")


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
