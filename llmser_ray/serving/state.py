"""What one replica holds and does per request: the catalogue, the served model, title
resolution, the batched forward passes and the per-request LLM call.

Known users are served exactly as the evaluation scores them: the full known sequence, with
the stored pseudo-prior prefix (``llmser_ray.augment.weights``) only when the served model is
a dual-channel model, using the dual settings recorded with that model. Top-k and the
pseudo-prefix rules are the augmentation stages' own (``augment.scoring.topk_scores``,
``augment.weights``), so a served prefix cannot drift from the one the model was trained on.

Nothing here unpickles: models are safetensors + JSON (``training.load_trained``), the rest is
Parquet and JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.augment.scoring import topk_scores
from llmser_ray.augment.weights import candidate_prefix, load_augmentation, selection_prefix
from llmser_ray.config import Config, DualConfig
from llmser_ray.data.dataset import SeqDataset, load_dataset
from llmser_ray.errors import ConfigError, StageError
from llmser_ray.io import read_manifest
from llmser_ray.serving.schema import ApiError, _clip


def _norm_title(title: str) -> str:
    """Case-, width- and whitespace-insensitive key for exact title matching."""
    return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


def configured_model(cfg: Config) -> str | None:
    """The model ``llmser-ray train`` with this config trains (its default name, with
    ``semantic.enabled=auto`` decided against the prepared dataset), or None without a dataset."""
    from llmser_ray.models.naming import default_name, resolve_semantic

    manifest = read_manifest(cfg.workdir_path / "dataset")  # the prepare stage's output
    if not manifest or cfg.train.reverse:  # the reverse model predicts the past: never served
        return None
    return default_name(resolve_semantic(cfg, manifest)[0])


def pick_model(cfg: Config) -> tuple[str, Path]:
    """The model folder to serve: ``serve.model``; else the one this config trains (so a served
    workdir answers with the model its last `train`/`run` built, not an older arm beside it);
    else, of what exists, ``<backbone>-llmser``, LLM-ESR's ``-llmesr`` or ``-dualview``, then
    the plain ``<backbone>``."""
    models = cfg.workdir_path / "models"

    def ok(name: str) -> bool:
        return (models / name / "best" / "model.json").is_file()

    if cfg.serve.model:
        if not ok(cfg.serve.model):
            have = sorted(p.parent.parent.name for p in models.glob("*/best/model.json"))
            raise StageError(f"no trained model '{cfg.serve.model}' in {models}",
                             f"set serve.model to one of {have or '(none yet)'} or run `llmser-ray train`")
        return cfg.serve.model, models / cfg.serve.model
    b = cfg.model.backbone
    own = configured_model(cfg)
    for name in ((own,) if own else ()) + (f"{b}-llmser", f"{b}-llmesr", f"{b}-dualview", b):
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
        from llmser_ray.models.checkpoint import load_trained

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
        from llmser_ray.models.checkpoint import load_trained

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
        return selection_prefix(picked, candidates, dual.num_pseudo, dual.order)

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

    def score(self, queries: list[Query]) -> list[list[tuple[int, float]]]:
        self.batches["score"] += 1
        kmax = max(q.k for q in queries)
        seqs, exclude = [q.sequence for q in queries], [q.exclude for q in queries]
        items, vals = topk_scores(self.model, seqs, exclude, kmax, batch_size=len(seqs), trim=True)
        out = []
        for row, q in enumerate(queries):
            out.append([(int(i), float(v)) for i, v in zip(items[row, : q.k], vals[row, : q.k], strict=True)
                        if i > 0])
        return out

    def candidates(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        """The reverse model's top ``augment.num_candidates`` for the item before each history."""
        self.batches["candidates"] += 1
        k = self.cfg.augment.num_candidates
        items, _ = topk_scores(self.reverse, [h[::-1].copy() for h in histories], list(histories), k,
                               batch_size=len(histories), trim=True)
        return [row[row > 0] for row in items]

    def pseudo_prefix(self, candidates: np.ndarray) -> np.ndarray:
        """The prefix the no-LLM dual-channel ablation trains on (``augment.weights.candidate_prefix``):
        the top ``dual.num_pseudo`` candidates with the best last, next to the history."""
        return candidate_prefix(candidates, (self._served_dual() or self.cfg.dual).num_pseudo)

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


def check_llm_pseudo(cfg: Config) -> None:
    """``serve.llm_pseudo`` asks an endpoint per request: a vLLM engine inside a replica is not
    what a latency-bound server should hold, so only the OpenAI-compatible backend is accepted."""
    if cfg.serve.llm_pseudo and cfg.llm.backend != "openai":
        raise ConfigError("serve.llm_pseudo asks an OpenAI-compatible endpoint per request, but "
                          f"llm.backend is '{cfg.llm.backend}'",
                          "set llm.backend=openai and llm.base_url (e.g. a vLLM server at "
                          "http://127.0.0.1:8001/v1), or serve.llm_pseudo=false")
