"""The ``select`` stage: the Semantic Interaction Augmentor's LLM selection (SIA, METHOD 1).

Output: ``<workdir>/augmented/``.

Pipeline, one Ray Data stream over the chosen users:
  candidates/ (CCG, reverse model) -> selection prompts -> LLM actor pool (llmser_ray.llm)
  -> grounding actor pool (parse; for free text: embeddings + FAISS actors) -> shards on disk.

Selectors (``augment.selector``, docs/SELECTION.md): ``generate`` is the path above;
``score`` explodes each user into one scoring request per candidate (plus the history-free
baseline of each candidate, answered once per item by the reply cache) through the same LLM
actor pool and picks by PMI; ``embedding``, ``collaborative`` and ``fusion`` need no LLM and go
through a small actor pool (``RankSelector``) instead. Every selector writes the same shards,
so every one resumes and caches the same way.

Why this shape: the LLM is the expensive part, so everything around it streams (no stage waits
for the whole previous one), results are written per shard as they complete (an interrupted
run keeps every finished shard), LLM replies are cached by content (a rerun after a crash does
not pay for replies already received), and the same code runs on a laptop and on a cluster
where the actor pools span GPUs on several nodes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from llmser_ray.augment.grounding import Grounded, ground_lines, ground_numbers, ground_whole, split_lines
from llmser_ray.augment.prompts import (
    request_row,
    scoring_messages,
    scoring_title,
    selection_messages,
    selection_schema,
)
from llmser_ray.augment.selection import fuse, history_similarity, mean_logprob, pmi, top_n
from llmser_ray.augment.shards import ShardWriter
from llmser_ray.config import Config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.io import read_manifest, write_json
from llmser_ray.stages.base import Stage, digest, needs
from llmser_ray.stages.candidates import CandidatesResult, candidates_current, generate_candidates

STAGE = Stage(
    name="select", cli="augment", output="augmented", schema_version=1,
    inputs=("candidates", "embed (free-text grounding)"),
    identity=("candidates digest", "augment.ask_items", "augment.prompt_history", "augment.grounding",
              "augment.min_similarity", "augment.selector", "augment.fusion_weight", "augment.pmi_alpha",
              "llm identity (backend, model, base_url, sampling, seed; LLM selectors only)",
              "embeddings digest (free-text grounding, embedding and fusion selectors)"),
    schema="docs/SCHEMA.md#augmented", summary="each chosen user's pseudo-prior items, picked by the LLM")
SCHEMA_VERSION = STAGE.schema_version
OUT_COLUMNS = ["user_id", "history", "candidates", "pseudo_items", "raw_reply", "status", "n_lines",
               "n_mapped", "n_unmapped", "n_duplicates", "prompt_tokens", "completion_tokens", "error"]


@dataclass
class AugmentResult:
    path: Path
    skipped: bool
    summary: dict[str, Any]
    candidates: CandidatesResult


def llm_identity(cfg: Config) -> dict[str, Any]:
    """What makes two LLM answers comparable: the model and how it samples."""
    llm = cfg.llm
    return {"backend": llm.backend, "model": llm.model, "base_url": llm.base_url,
            "temperature": llm.temperature, "top_p": llm.top_p, "max_tokens": llm.max_tokens,
            "seed": llm.seed}


# ----------------------------------------------------------------------------- Ray Data stages


class SelectionPrompter:
    """Rows (user_id, history, candidates) -> generation requests; item text is fetched once."""

    def __init__(self, texts: Any, n: int, prompt_history: int, grounding: str) -> None:
        import ray

        self.texts = ray.get(texts) if isinstance(texts, ray.ObjectRef) else texts
        self.n, self.prompt_history, self.numbered = n, prompt_history, grounding == "constrained"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        reqs = []
        for user, hist, cands in zip(batch["user_id"], batch["history"], batch["candidates"], strict=True):
            titles = [self.texts[i] for i in np.asarray(hist)[-self.prompt_history:]]
            ctitles = [self.texts[i] for i in cands]
            msgs = selection_messages(titles, ctitles, self.n, numbered=self.numbered)
            schema = selection_schema(len(cands), self.n) if self.numbered else None
            reqs.append(request_row(f"sia-{int(user)}", msgs, schema=schema))
        out = dict(batch)
        for key in ("request_id", "messages", "guided_json", "guided_choice"):
            out[key] = [r[key] for r in reqs]
        return out


class SIAGrounder:
    """Replies -> pseudo items + diagnostics (grounding.py); free text uses embeddings + FAISS."""

    def __init__(self, texts: Any, n: int, mode: str, min_similarity: float,
                 embed_cfg: dict[str, Any] | None, faiss_handles: list[Any] | None) -> None:
        import ray

        self.texts = ray.get(texts) if isinstance(texts, ray.ObjectRef) else texts
        self.n, self.mode, self.min_similarity = n, mode, min_similarity
        self.embedder = None
        self.faiss = faiss_handles or []
        if mode != "constrained":
            from llmser_ray.config import EmbedConfig
            from llmser_ray.text.embed import Embedder

            self.embedder = Embedder(EmbedConfig.model_validate(embed_cfg or {}))

    def _knn(self, queries: np.ndarray, k: int, allowed: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import ray

        actor = random.choice(self.faiss)
        return ray.get(actor.knn.remote(queries, k, allowed))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n_rows = len(batch["user_id"])
        results: list[Grounded | None] = [None] * n_rows
        free_rows: list[int] = []
        for i in range(n_rows):
            status = str(batch["status"][i])
            if status == "error":
                results[i] = Grounded(status="error", error=str(batch["error"][i]))
            elif self.mode == "constrained":
                results[i] = ground_numbers(str(batch["reply"][i]), np.asarray(batch["candidates"][i]),
                                            self.n, truncated=status == "truncated")
            else:
                free_rows.append(i)
        if free_rows:
            self._ground_free_text(batch, free_rows, results)
        out = {k: batch[k] for k in ("user_id", "history", "candidates")}
        rows = [r.row() for r in results]  # type: ignore[union-attr]
        for key in ("pseudo_items", "status", "n_lines", "n_mapped", "n_unmapped", "n_duplicates", "error"):
            out[key] = [r[key] for r in rows]
        out["pseudo_items"] = [np.asarray(p, dtype=np.int64) for p in out["pseudo_items"]]
        out["raw_reply"] = batch["reply"]
        out["prompt_tokens"] = batch["prompt_tokens"]
        out["completion_tokens"] = batch["completion_tokens"]
        return out

    def _ground_free_text(self, batch: dict[str, np.ndarray], rows: list[int],
                          results: list[Grounded | None]) -> None:
        """Embed every reply line (and, for the reference mode, every whole reply) of the batch
        at once, then one restricted k-NN call per kind against each user's own candidates."""
        assert self.embedder is not None
        lines = {i: split_lines(str(batch["reply"][i])) for i in rows}
        flat = [(i, line) for i in rows for line in lines[i]]
        line_sim = {i: np.zeros(len(lines[i])) for i in rows}
        line_best = {i: np.full(len(lines[i]), -1) for i in rows}
        if flat:
            vecs = self.embedder.encode([line for _, line in flat])
            allowed = [np.asarray(batch["candidates"][i], dtype=np.int64) for i, _ in flat]
            scores, ids = self._knn(vecs, 1, allowed)
            pos = {i: 0 for i in rows}
            for (i, _), s, item in zip(flat, scores[:, 0], ids[:, 0], strict=True):
                cands = np.asarray(batch["candidates"][i])
                j = pos[i]
                line_sim[i][j] = s if item > 0 else -1.0
                hit = np.flatnonzero(cands == item)
                line_best[i][j] = int(hit[0]) if len(hit) else -1
                pos[i] += 1
        reply_sim: dict[int, np.ndarray] = {}
        if self.mode == "whole_response":
            with_text = [i for i in rows if str(batch["reply"][i]).strip()]
            if with_text:
                vecs = self.embedder.encode([str(batch["reply"][i]) for i in with_text])
                allowed = [np.asarray(batch["candidates"][i], dtype=np.int64) for i in with_text]
                k = max(len(a) for a in allowed)
                scores, ids = self._knn(vecs, k, allowed)
                for row, i in enumerate(with_text):
                    cands = np.asarray(batch["candidates"][i])
                    sims = np.full(len(cands), -np.inf)
                    for s, item in zip(scores[row], ids[row], strict=True):
                        hit = np.flatnonzero(cands == item)
                        if item > 0 and len(hit):
                            sims[hit[0]] = s
                    reply_sim[i] = sims
        for i in rows:
            cands = np.asarray(batch["candidates"][i])
            truncated = str(batch["status"][i]) == "truncated"
            if self.mode == "lines":
                titles = [self.texts[c] for c in cands]
                results[i] = ground_lines(lines[i], line_sim[i], line_best[i], cands, titles, self.n,
                                          self.min_similarity, truncated)
            else:
                results[i] = ground_whole(reply_sim.get(i, np.full(len(cands), -np.inf)), cands, self.n,
                                          lines[i], line_sim[i], self.min_similarity, truncated)


# ----------------------------------------------------------------------------- the stage


def positional(pseudo: Any, candidates: Any) -> bool:
    """True when the selection is exactly the first ``len(pseudo)`` candidates, in order."""
    p, c = list(pseudo), list(candidates)
    return len(p) > 1 and p == c[: len(p)]


def summarise(table: pa.Table, seconds: float, new_users: int, reused_shards: int) -> dict[str, Any]:
    df = table.to_pandas()
    n_lines = int(df["n_lines"].sum())
    lengths = df["pseudo_items"].map(len)
    return {
        "users": len(df), "users_with_pseudo_items": int((lengths > 0).sum()),
        "mean_pseudo_len": float(lengths.mean()) if len(df) else 0.0,
        "hallucination_rate": float(df["n_unmapped"].sum() / n_lines) if n_lines else 0.0,
        "duplicate_rate": float(df["n_duplicates"].sum() / n_lines) if n_lines else 0.0,
        "answer_entries": n_lines, "status": df["status"].value_counts().to_dict(),
        # Replies that just list the first candidates in the order shown: the LLM added nothing
        # beyond the candidate generator's ranking (small models do this under constraints).
        "positional_rate": float(np.mean([positional(p, c) for p, c in
                                          zip(df["pseudo_items"], df["candidates"], strict=True)]))
                           if len(df) else 0.0,
        "prompt_tokens": int(df["prompt_tokens"].sum()),
        "completion_tokens": int(df["completion_tokens"].sum()),
        "seconds": seconds, "users_processed_now": new_users, "reused_shards": reused_shards,
        "users_per_s": new_users / seconds if seconds > 0 else None,
    }


NO_LLM = ("embedding", "collaborative", "fusion")


def needs_embeddings(cfg: Config) -> bool:
    """Free-text grounding of generated replies, and the embedding-based selectors."""
    a = cfg.augment
    free_text = a.selector == "generate" and a.grounding != "constrained"
    return free_text or a.selector in ("embedding", "fusion")


def _sia_config(cfg: Config) -> dict[str, Any]:
    """What decides the selection. The selector keys join only for a selector other than
    ``generate``, so an augmentation generated before they existed (hours of LLM time on Beauty)
    is still recognised as current; each selector hashes only the keys it reads."""
    a = cfg.augment
    keys: tuple[str, ...] = ("ask_items", "prompt_history", "grounding", "min_similarity")
    if a.selector == "score":
        keys = ("ask_items", "prompt_history", "selector", "pmi_alpha")
    elif a.selector == "fusion":
        keys = ("ask_items", "prompt_history", "selector", "fusion_weight")
    elif a.selector in ("embedding", "collaborative"):
        keys = ("ask_items", "prompt_history", "selector") if a.selector == "embedding" else (
            "ask_items", "selector")
    return {k: getattr(a, k) for k in keys}


def select_key(cfg: Config) -> str:
    """The identity of ``augmented/`` given the candidates and embeddings now on disk."""
    emb_digest = None
    if needs_embeddings(cfg):
        emb_digest = (read_manifest(cfg.workdir_path / "embeddings") or {}).get("config_digest")
    cand = read_manifest(cfg.workdir_path / "candidates") or {}
    llm = None if cfg.augment.selector in NO_LLM else llm_identity(cfg)
    return digest({"candidates": cand.get("config_digest"), "sia": _sia_config(cfg),
                   "llm": llm, "embeddings": emb_digest, "v": SCHEMA_VERSION})


def select_current(cfg: Config) -> bool:
    """Whether ``augmented/`` is current (its candidates and embeddings current too)."""
    if not candidates_current(cfg):
        return False
    if needs_embeddings(cfg):
        from llmser_ray.stages.embed import embed_current

        if not embed_current(cfg):
            return False
    return STAGE.current(STAGE.folder(cfg.workdir_path), select_key(cfg)) is not None


def select_items(cfg: Config, force: bool = False) -> AugmentResult:
    """The LLM selection with grounding over ``candidates/`` (produced first when missing)."""
    import ray

    from llmser_ray.llm import generate
    from llmser_ray.ray_utils import from_arrow_blocks, init_ray, iter_plain_batches, quiet_ray_data

    cand = needs("select", "candidates", lambda: candidates_current(cfg), lambda: generate_candidates(cfg))
    out = STAGE.folder(cfg.workdir_path)
    ds = load_dataset(cfg.workdir_path / "dataset")
    a = cfg.augment
    sia_cfg = _sia_config(cfg)
    if a.selector == "score" and cfg.llm.backend != "vllm":
        from llmser_ray.errors import ConfigError

        raise ConfigError("augment.selector=score needs llm.backend=vllm (prompt log-probabilities)",
                          "use llm.backend=vllm, or augment.selector=generate with this endpoint")
    if needs_embeddings(cfg):
        from llmser_ray.stages.embed import embed_current, embed_items

        needs("select", "embed", lambda: embed_current(cfg), lambda: embed_items(cfg))
    key = select_key(cfg)
    if STAGE.current(out, key, force) is not None:
        return AugmentResult(out, True, json.loads((out / "summary.json").read_text()), cand)

    t0 = time.perf_counter()
    table = pq.read_table(cand.path / "candidates.parquet").select(
        ["user_id", "history", "candidates", "scores"])
    writer = ShardWriter(cfg.workdir_path / ".partial" / f"augment-{key}",
                         table.column("user_id").to_numpy(), a.shard_size)
    pending = table.filter(pa.array(writer.pending_mask()))
    # Degenerate users (no candidate left to choose from) never reach the LLM.
    n_cands = pa.compute.list_value_length(pending.column("candidates")).to_numpy(zero_copy_only=False)
    writer.add(_no_candidate_rows(pending.filter(pa.array(n_cands == 0))))
    pending = pending.filter(pa.array(n_cands > 0))
    if pending.num_rows and a.selector != "generate":
        init_ray(cfg.ray)
        quiet_ray_data()
        if a.selector == "score":
            _score_select(cfg, pending, ds.item_text, writer)
        else:
            _rank_select(cfg, pending, writer)
    elif pending.num_rows:
        pending = pending.drop_columns(["scores"])
        init_ray(cfg.ray)
        quiet_ray_data()
        texts = ray.put(ds.item_text)
        pool = None
        if a.grounding != "constrained":
            from llmser_ray.text.embed import load_item_vectors
            from llmser_ray.text.faiss_index import FaissPool

            pool = FaissPool(load_item_vectors(cfg.workdir_path), cfg.faiss)
        blocks = max(1, min(pending.num_rows // max(cfg.llm.batch_size, 1) + 1, 64))
        requests = from_arrow_blocks(pending, blocks).map_batches(
            SelectionPrompter, fn_constructor_kwargs={"texts": texts, "n": a.ask_items,
                                                      "prompt_history": a.prompt_history,
                                                      "grounding": a.grounding},
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, batch_size=256)
        replies = generate(requests, cfg.llm, cache_dir=cfg.workdir_path / "llm_cache")
        grounded = replies.map_batches(
            SIAGrounder, fn_constructor_kwargs={
                "texts": texts, "n": a.ask_items, "mode": a.grounding, "min_similarity": a.min_similarity,
                "embed_cfg": cfg.embed.model_dump(mode="json"),
                "faiss_handles": pool.handles if pool else None},
            compute=ray.data.ActorPoolStrategy(size=a.scorer_actors), num_cpus=a.scorer_cpus,
            batch_size=a.scorer_batch_size)
        for batch in iter_plain_batches(grounded.select_columns(OUT_COLUMNS)):
            writer.add(batch)
        if pool is not None:
            pool.shutdown()
    result = writer.assemble()
    if not writer.complete or result is None or result.num_rows != table.num_rows:
        from llmser_ray.errors import StageError

        raise StageError(f"augmentation finished {len(writer.done)}/{writer.n_shards} shards",
                         "rerun the same command: finished shards are kept and reused")
    result = _conform(result)
    summary = summarise(result, time.perf_counter() - t0, pending.num_rows, writer.reused)
    summary["selector"] = a.selector
    with STAGE.publish(out, key, config=sia_cfg, llm=None if a.selector in NO_LLM else llm_identity(cfg),
                       counts={"users": result.num_rows}) as pub:
        pq.write_table(result, pub.dir / "augmented.parquet")
        write_json(pub.dir / "summary.json", summary)
    writer.cleanup()
    return AugmentResult(out, False, summary, cand)


def _no_candidate_rows(rows: pa.Table) -> pa.Table:
    n = rows.num_rows
    zeros = pa.array([0] * n, pa.int64())
    return pa.table({
        "user_id": rows.column("user_id"), "history": rows.column("history"),
        "candidates": rows.column("candidates"), "pseudo_items": pa.array([[]] * n, pa.list_(pa.int64())),
        "raw_reply": pa.array([""] * n, pa.string()), "status": pa.array(["empty"] * n, pa.string()),
        "n_lines": zeros, "n_mapped": zeros, "n_unmapped": zeros, "n_duplicates": zeros,
        "prompt_tokens": zeros, "completion_tokens": zeros,
        "error": pa.array(["no candidates to choose from"] * n, pa.string()),
    })


def _conform(table: pa.Table) -> pa.Table:
    """The documented schema (docs/SCHEMA.md), whatever types the stream inferred."""
    types = {"user_id": pa.int64(), "history": pa.list_(pa.int64()), "candidates": pa.list_(pa.int64()),
             "pseudo_items": pa.list_(pa.int64()), "raw_reply": pa.string(), "status": pa.string(),
             "n_lines": pa.int64(), "n_mapped": pa.int64(), "n_unmapped": pa.int64(),
             "n_duplicates": pa.int64(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
             "error": pa.string()}
    cols = []
    for name in OUT_COLUMNS:
        col = table.column(name)
        if pa.types.is_null(col.type):
            col = pa.array([None] * table.num_rows, types[name])
        cols.append(col.cast(types[name]))
    return pa.table(dict(zip(OUT_COLUMNS, cols, strict=True))).sort_by("user_id")


# ----------------------------------------------------------------------------- selectors without generation


def _chosen_row(user: int, history: Any, cands: np.ndarray, picks: np.ndarray, scores: np.ndarray,
                status: str = "ok", error: str = "", prompt_tokens: int = 0) -> dict[str, Any]:
    """One ``augmented`` row for a scoring selector: the picks in the selector's order, the
    per-candidate scores (candidate order) as the raw reply, no generated entries to ground."""
    shown = [round(float(x), 6) if np.isfinite(x) else None for x in scores]
    return {"user_id": int(user), "history": np.asarray(history, dtype=np.int64),
            "candidates": np.asarray(cands, dtype=np.int64),
            "pseudo_items": np.asarray(picks, dtype=np.int64), "raw_reply": json.dumps({"scores": shown}),
            "status": status, "n_lines": len(picks), "n_mapped": len(picks), "n_unmapped": 0,
            "n_duplicates": 0, "prompt_tokens": int(prompt_tokens), "completion_tokens": 0, "error": error}


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return _conform(pa.table({c: [r[c] for r in rows] for c in OUT_COLUMNS})) if rows else None


class RankSelector:
    """The no-LLM selectors as a Ray Data actor: (history, candidates, reverse-model scores) ->
    pseudo items. ``embedding``: cosine to the history profile; ``collaborative``: the reverse
    model's scores; ``fusion``: their z-scored, weighted sum. Ties go to the reverse model."""

    def __init__(self, selector: str, n: int, prompt_history: int, fusion_weight: float,
                 vectors: Any) -> None:
        import ray

        self.vectors = ray.get(vectors) if isinstance(vectors, ray.ObjectRef) else vectors
        self.selector, self.n, self.prompt_history, self.w = selector, n, prompt_history, fusion_weight

    def scores(self, hist: np.ndarray, cands: np.ndarray, collab: np.ndarray) -> np.ndarray:
        if self.selector == "collaborative":
            return collab
        hist = hist[-self.prompt_history:] if len(hist) else hist
        sem = history_similarity(self.vectors[cands], self.vectors[hist])
        return sem if self.selector == "embedding" else fuse(collab, sem, self.w)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = []
        for user, hist, cands, collab in zip(batch["user_id"], batch["history"], batch["candidates"],
                                             batch["scores"], strict=True):
            hist = np.asarray(hist, dtype=np.int64)
            cands = np.asarray(cands, dtype=np.int64)
            collab = np.asarray(collab, dtype=np.float64)
            sc = self.scores(hist, cands, collab)
            rows.append(_chosen_row(user, hist, cands, top_n(cands, sc, self.n, tiebreak=collab), sc))
        return {c: [r[c] for r in rows] for c in OUT_COLUMNS}


def _rank_select(cfg: Config, pending: pa.Table, writer: ShardWriter) -> None:
    import ray

    from llmser_ray.ray_utils import from_arrow_blocks, iter_plain_batches

    a = cfg.augment
    vectors = None
    if a.selector in ("embedding", "fusion"):
        from llmser_ray.text.embed import load_item_vectors

        vectors = ray.put(load_item_vectors(cfg.workdir_path))
    blocks = max(1, min(pending.num_rows // a.shard_size + 1, 64))
    chosen = from_arrow_blocks(pending, blocks).map_batches(
        RankSelector, fn_constructor_kwargs={"selector": a.selector, "n": a.ask_items,
                                             "prompt_history": a.prompt_history,
                                             "fusion_weight": a.fusion_weight, "vectors": vectors},
        compute=ray.data.ActorPoolStrategy(size=a.scorer_actors), num_cpus=a.scorer_cpus,
        batch_size=a.scorer_batch_size)
    for batch in iter_plain_batches(chosen.select_columns(OUT_COLUMNS)):
        writer.add(_conform(batch))


class ScorePrompter:
    """Each user -> one scoring request per candidate (its title after the user's history) and
    one per candidate without the history (the PMI baseline; the same request for the same item
    whoever asks, so the reply cache answers it once per item)."""

    def __init__(self, texts: Any, prompt_history: int) -> None:
        import ray

        self.texts = ray.get(texts) if isinstance(texts, ray.ObjectRef) else texts
        self.prompt_history = prompt_history

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        base_msgs = scoring_messages([])
        out: dict[str, list[Any]] = {k: [] for k in ("user_id", "position", "kind", "request_id", "messages",
                                                      "guided_json", "guided_choice", "continuation")}
        for user, hist, cands in zip(batch["user_id"], batch["history"], batch["candidates"], strict=True):
            hist = np.asarray(hist, dtype=np.int64)
            titles = [self.texts[i] for i in hist[-self.prompt_history:]] if len(hist) else []
            msgs = scoring_messages(titles)
            for pos, c in enumerate(np.asarray(cands, dtype=np.int64)):
                cont = scoring_title(self.texts[c])
                for kind, m in (("cond", msgs), ("base", base_msgs)):
                    row = request_row(f"score-{int(user)}-{pos}-{kind}", m, continuation=cont)
                    out["user_id"].append(int(user))
                    out["position"].append(pos)
                    out["kind"].append(kind)
                    for k in ("request_id", "messages", "guided_json", "guided_choice", "continuation"):
                        out[k].append(row[k])
        return out


def _score_select(cfg: Config, pending: pa.Table, item_text: list[str], writer: ShardWriter) -> None:
    """The ``score`` selector: requests stream through the LLM pool; replies come back in any
    order and are regrouped per user here, and a user's row is written once all 2K are in."""
    import ray

    from llmser_ray.llm import generate
    from llmser_ray.ray_utils import from_arrow_blocks, iter_plain_batches

    a = cfg.augment
    texts = ray.put(item_text)
    cols_in = [pending.column(c).to_pylist() for c in ("user_id", "history", "candidates", "scores")]
    users = {int(u): (np.asarray(h, dtype=np.int64), np.asarray(c, dtype=np.int64),
                      np.asarray(s, dtype=np.float64)) for u, h, c, s in zip(*cols_in, strict=True)}
    got: dict[int, dict[str, Any]] = {}
    # A block of a few users at a time: one block is 2K requests per user.
    blocks = max(1, min(pending.num_rows // 8 + 1, 256))
    requests = from_arrow_blocks(pending.select(["user_id", "history", "candidates"]), blocks).map_batches(
        ScorePrompter, fn_constructor_kwargs={"texts": texts, "prompt_history": a.prompt_history},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, batch_size=8)
    replies = generate(requests, cfg.llm, cache_dir=cfg.workdir_path / "llm_cache")
    cols = ["user_id", "position", "kind", "reply", "status", "error", "prompt_tokens"]
    for batch in iter_plain_batches(replies.select_columns(cols)):
        done = []
        for row in batch.to_pylist():
            u = int(row["user_id"])
            k = len(users[u][1])
            g = got.setdefault(u, {"cond": np.full(k, np.nan), "base": np.full(k, np.nan), "n": 0,
                                   "tokens": 0, "errors": []})
            lp = mean_logprob(row["reply"]) if row["status"] == "ok" else float("nan")
            if row["status"] != "ok":
                g["errors"].append(row["error"] or row["status"])
            g[row["kind"]][int(row["position"])] = lp
            g["n"] += 1
            g["tokens"] += int(row["prompt_tokens"] or 0) if row["kind"] == "cond" else 0
            if g["n"] == 2 * k:
                done.append(u)
        rows = []
        for u in done:
            g = got.pop(u)
            hist, cands, collab = users[u]
            sc = pmi(g["cond"], g["base"], a.pmi_alpha)
            if g["errors"]:
                rows.append(_chosen_row(u, hist, cands, np.zeros(0, np.int64), sc, "error",
                                        f"{len(g['errors'])} scoring request(s) failed: {g['errors'][0]}",
                                        g["tokens"]))
            else:
                rows.append(_chosen_row(u, hist, cands, top_n(cands, sc, a.ask_items, tiebreak=collab), sc,
                                        prompt_tokens=g["tokens"]))
        if rows:
            writer.add(_rows_table(rows))
