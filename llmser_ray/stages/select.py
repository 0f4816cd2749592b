"""The ``select`` stage: the Semantic Interaction Augmentor's LLM selection (SIA, METHOD 1).

Output: ``<workdir>/augmented/``.

Pipeline, one Ray Data stream over the chosen users:
  candidates/ (CCG, reverse model) -> selection prompts -> LLM actor pool (llmser_ray.llm)
  -> grounding actor pool (parse; for free text: embeddings + FAISS actors) -> shards on disk.

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
from llmser_ray.augment.prompts import request_row, selection_messages, selection_schema
from llmser_ray.augment.shards import ShardWriter
from llmser_ray.config import Config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.io import read_manifest, write_json
from llmser_ray.stages.base import Stage, digest, needs
from llmser_ray.stages.candidates import CandidatesResult, candidates_current, generate_candidates

STAGE = Stage(
    name="select", output="augmented", schema_version=1, inputs=("candidates", "embed (free-text grounding)"),
    identity=("candidates digest", "augment.ask_items", "augment.prompt_history", "augment.grounding",
              "augment.min_similarity", "llm identity (backend, model, base_url, sampling, seed)",
              "embeddings digest (free-text grounding)"),
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


def _sia_config(cfg: Config) -> dict[str, Any]:
    keys = ("ask_items", "prompt_history", "grounding", "min_similarity")
    return {k: getattr(cfg.augment, k) for k in keys}


def select_key(cfg: Config) -> str:
    """The identity of ``augmented/`` given the candidates and embeddings now on disk."""
    emb_digest = None
    if cfg.augment.grounding != "constrained":
        emb_digest = (read_manifest(cfg.workdir_path / "embeddings") or {}).get("config_digest")
    cand = read_manifest(cfg.workdir_path / "candidates") or {}
    return digest({"candidates": cand.get("config_digest"), "sia": _sia_config(cfg),
                   "llm": llm_identity(cfg), "embeddings": emb_digest, "v": SCHEMA_VERSION})


def select_current(cfg: Config) -> bool:
    """Whether ``augmented/`` is current (its candidates and embeddings current too)."""
    if not candidates_current(cfg):
        return False
    if cfg.augment.grounding != "constrained":
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
    if a.grounding != "constrained":
        from llmser_ray.stages.embed import embed_current, embed_items

        needs("select", "embed", lambda: embed_current(cfg), lambda: embed_items(cfg))
    key = select_key(cfg)
    if STAGE.current(out, key, force) is not None:
        return AugmentResult(out, True, json.loads((out / "summary.json").read_text()), cand)

    t0 = time.perf_counter()
    table = pq.read_table(cand.path / "candidates.parquet").select(["user_id", "history", "candidates"])
    writer = ShardWriter(cfg.workdir_path / ".partial" / f"augment-{key}",
                         table.column("user_id").to_numpy(), a.shard_size)
    pending = table.filter(pa.array(writer.pending_mask()))
    # Degenerate users (no candidate left to choose from) never reach the LLM.
    n_cands = pa.compute.list_value_length(pending.column("candidates")).to_numpy(zero_copy_only=False)
    writer.add(_no_candidate_rows(pending.filter(pa.array(n_cands == 0))))
    pending = pending.filter(pa.array(n_cands > 0))
    if pending.num_rows:
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
    with STAGE.publish(out, key, config=sia_cfg, llm=llm_identity(cfg),
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
